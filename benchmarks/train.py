"""Training throughput: EncoderLM (masked LM) and DecoderLM (causal LM) with fastlm's kernels against the same
model on torch SDPA + F.cross_entropy ("torch"), side by side, eager and (on CUDA) torch.compile'd.

One training step = bf16 autocast forward (CUDA; fp32 on CPU), backward, fused AdamW step: what the Trainer runs.
Reports tokens/s, extra peak memory, and model FLOPs utilisation against the device's dense bf16 peak.

    python benchmarks/train.py            # CUDA: base preset, decoder 16x1024, MLM encoder 32x512 with padding
    python benchmarks/train.py --quick    # CPU: tiny preset, small batches, eager only
    python benchmarks/train.py --modes compiled --budget 60   # only the compiled runs, no new case after 60 s
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import (  # noqa: E402
    CaseBudget, Measurement, Row, add_budget_argument, base_parser, peak_memory_mib, report, time_call,
)

from fastlm.models import DecoderLM, EncoderLM, ModelConfig  # noqa: E402

VOCAB = 32000
MASK_PROB = 0.15
# Dense bf16 peak TFLOP/s (no sparsity) of the devices we know; MFU is left out elsewhere.
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "L4": 121.0, "A10": 125.0,
               "RTX 4090": 165.0}


def device_peak_tflops() -> float | None:
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next((peak for key, peak in PEAK_TFLOPS.items() if key in name), None)


def make_batch(arch: str, batch: int, length: int, device: torch.device, generator: torch.Generator) -> dict:
    """Random ids; the decoder gets full packed blocks, the encoder lengths in [length/2, length] (padding) and
    15% of its real tokens as targets."""
    ids = torch.randint(4, VOCAB, (batch, length), generator=generator)
    if arch == "decoder":
        lengths = torch.full((batch,), length)
        labels = ids.clone()
    else:
        lengths = torch.randint(length // 2, length + 1, (batch,), generator=generator)
        real = torch.arange(length)[None, :] < lengths[:, None]
        chosen = (torch.rand(batch, length, generator=generator) < MASK_PROB) & real
        labels = ids.masked_fill(~chosen, -100)
    return {"input_ids": ids.to(device), "lengths": lengths.to(device), "labels": labels.to(device)}


def torch_loss(model, arch: str, batch: dict) -> torch.Tensor:
    """The plain-torch objective: full logits, then F.cross_entropy (decoder targets shifted by one)."""
    logits = model(batch["input_ids"], batch["lengths"], return_logits=True).logits
    labels = batch["labels"]
    if arch == "decoder":
        logits, labels = logits[:, :-1], labels[:, 1:]
        beyond = torch.arange(labels.shape[1], device=labels.device)[None, :] >= batch["lengths"][:, None] - 1
        labels = labels.masked_fill(beyond, -100)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1), ignore_index=-100)


def training_step(provider: str, arch: str, preset: str, batch: dict, device: torch.device, compile_model: bool):
    """A closure running one optimizer step of a fresh model for `provider` ("fastlm" or "torch")."""
    torch.manual_seed(0)
    config = ModelConfig.preset(preset, vocab_size=VOCAB, dropout=0.0,
                                attn_impl="fastlm" if provider == "fastlm" else "sdpa")
    model = (EncoderLM if arch == "encoder" else DecoderLM)(config).to(device)
    optimizer = model.configure_optimizers(weight_decay=0.1, lr=1e-4)
    forward = torch.compile(model) if compile_model else model
    use_bf16 = device.type == "cuda"

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
            loss = forward(**batch).loss if provider == "fastlm" else torch_loss(forward, arch, batch)
        loss.backward()
        optimizer.step()

    return step, model.estimate_flops_per_token()


def measure(arch: str, preset: str, shape: tuple[int, int], device: torch.device, compile_model: bool,
            repeat: int) -> tuple[Row, Row | None]:
    batch_size, length = shape
    batch = make_batch(arch, batch_size, length, device, torch.Generator().manual_seed(0))
    tokens = int(batch["lengths"].sum())
    mode = "compiled" if compile_model else "eager"
    name = f"{'MLM encoder' if arch == 'encoder' else 'decoder'} {preset} {batch_size}x{length} {mode}"
    throughput = Row(name, "tokens/s", higher_is_better=True)
    peak = device_peak_tflops()
    utilisation = Row(name, "MFU %", higher_is_better=True) if peak else None
    for provider in ("fastlm", "torch"):
        step, flops_per_token = training_step(provider, arch, preset, batch, device, compile_model)
        seconds = time_call(step, warmup=3 if compile_model else 2, repeat=repeat)
        _, extra_peak = peak_memory_mib(step)
        throughput.results.append(Measurement(provider, tokens / seconds, extra_peak))
        if utilisation is not None:
            mfu = 100.0 * tokens / seconds * flops_per_token / (peak * 1e12)
            utilisation.results.append(Measurement(provider, mfu))
        del step
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return throughput, utilisation


def main() -> None:
    parser = base_parser(__doc__.split("\n\n")[0])
    parser.add_argument("--preset", help="model preset (default: base on CUDA, tiny on CPU)")
    parser.add_argument("--modes", nargs="+", choices=["eager", "compiled"],
                        help="which runs to measure (default: eager, plus compiled on CUDA without --quick)")
    add_budget_argument(parser)
    args = parser.parse_args()
    budget = CaseBudget(args.budget)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    preset = args.preset or ("base" if device.type == "cuda" else "tiny")
    if device.type == "cuda":
        cases = [("decoder", (16, 1024)), ("encoder", (32, 512))]
        modes = ["eager"] if args.quick else ["eager", "compiled"]
        repeat = 5 if args.quick else 20
    else:
        cases = [("decoder", (8, 128)), ("encoder", (16, 128))]
        modes, repeat = ["eager"], 3 if args.quick else 10
    modes = args.modes or modes
    rows: list[Row] = []
    for arch, shape in cases:
        for mode in modes:
            if not budget.allows(f"{arch} {mode}"):
                continue
            throughput, utilisation = measure(arch, preset, shape, device, mode == "compiled", repeat)
            rows.append(throughput)
            if utilisation is not None:
                rows.append(utilisation)
    notes = (f"Preset {preset}, vocab {VOCAB}; fastlm = attention + linear cross-entropy kernels, torch = SDPA + "
             f"full logits + F.cross_entropy; {'bf16 autocast' if device.type == 'cuda' else 'fp32'}, AdamW"
             f"{' (fused)' if device.type == 'cuda' else ''}. MFU against the device's dense bf16 peak "
             f"({device_peak_tflops() or 'unknown'} TFLOP/s) with the model's estimate_flops_per_token; memory is "
             "the extra peak of one step over weights and optimizer state.")
    notes += budget.note()
    report("Training throughput: fastlm kernels vs plain torch", rows, json_path=args.json, notes=notes)


if __name__ == "__main__":
    main()
