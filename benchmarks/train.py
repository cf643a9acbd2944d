"""Training throughput: EncoderLM (masked LM) and DecoderLM (causal LM) with fastlm's kernels against the same
model in the best plain torch a user would write ("torch"), side by side, eager and torch.compile'd.

fastlm = attn_impl="fastlm" (the Triton kernel on CUDA, torch's SDPA elsewhere) + linear_cross_entropy.
torch = attn_impl="sdpa" + full logits + F.cross_entropy: packed decoder blocks carry no lengths, so SDPA gets
is_causal=True and no mask; padded MLM batches pass their padding mask, with the fastest SDPA backend that takes it
(each one that accepts the call timed first on the batch's attention shapes). Each row names the attention backend
that ran for each provider, read from the profiler.

One training step = bf16 autocast forward (CUDA; fp32 on CPU), backward, AdamW step: what the Trainer runs.
Steps of the two providers are timed in turns and the medians reported. Reports tokens/s, extra peak memory (CUDA:
the allocator's peak over what was allocated before the step; CPU: the process's peak RSS, sampled every
millisecond, over its RSS before the step) and, on a known GPU, model FLOPs utilisation with attention FLOPs at the
batch's real lengths.

    python benchmarks/train.py            # CUDA: base preset, decoder 16x1024, MLM encoder 32x512 with padding
    python benchmarks/train.py --quick    # CPU: tiny preset, small batches, eager only
    python benchmarks/train.py --modes compiled --budget 60   # only the compiled runs, no new case after 60 s
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import (  # noqa: E402
    CaseBudget, Measurement, Row, add_budget_argument, base_parser, peak_memory_mib, report, time_call,
    time_interleaved,
)

from fastlm.data import target_positions  # noqa: E402
from fastlm.models import DecoderLM, EncoderLM, ModelConfig  # noqa: E402
from fastlm.models.blocks import attention_mask  # noqa: E402

VOCAB = 32000
MASK_PROB = 0.15
PROVIDERS = ("fastlm", "torch")
# Dense bf16 peak TFLOP/s (no sparsity) of the devices we know; MFU is left out elsewhere.
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "L4": 121.0, "A10": 125.0,
               "RTX 4090": 165.0}
# The op each attention backend runs as, to name the one that ran.
ATTENTION_OPS = {
    "fastlm::attention_fwd": "fastlm Triton",
    "aten::_scaled_dot_product_flash_attention_for_cpu": "SDPA flash (CPU)",
    "aten::_scaled_dot_product_flash_attention": "SDPA flash",
    "aten::_scaled_dot_product_cudnn_attention": "SDPA cuDNN",
    "aten::_scaled_dot_product_efficient_attention": "SDPA mem-efficient",
    "aten::_scaled_dot_product_attention_math": "SDPA math",
}
SDPA_BACKENDS = (SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                 SDPBackend.MATH)


def device_peak_tflops() -> float | None:
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next((peak for key, peak in PEAK_TFLOPS.items() if key in name), None)


def make_batch(arch: str, batch: int, length: int, device: torch.device, generator: torch.Generator) -> dict:
    """Random ids; the decoder gets full packed blocks (no lengths: nothing is padded), the encoder lengths in
    [length/2, length] (padding), 15% of its real tokens as targets and their target_positions, as MaskedLMBatches
    delivers them (fastlm's head runs on those rows only; the torch baseline ignores them)."""
    ids = torch.randint(4, VOCAB, (batch, length), generator=generator)
    if arch == "decoder":
        return {"input_ids": ids.to(device), "labels": ids.to(device)}
    lengths = torch.randint(length // 2, length + 1, (batch,), generator=generator)
    real = torch.arange(length)[None, :] < lengths[:, None]
    chosen = (torch.rand(batch, length, generator=generator) < MASK_PROB) & real
    labels = ids.masked_fill(~chosen, -100)
    return {"input_ids": ids.to(device), "lengths": lengths.to(device), "labels": labels.to(device),
            "target_positions": target_positions(labels).to(device)}


def real_length(batch: dict) -> float:
    """Keys attended per token: the block length, or for padded rows sum(lengths**2) / sum(lengths)."""
    lengths = batch.get("lengths")
    if lengths is None:
        return float(batch["input_ids"].shape[1])
    lengths = lengths.double()
    return float((lengths * lengths).sum() / lengths.sum())


def torch_loss(model, arch: str, batch: dict) -> torch.Tensor:
    """The plain-torch objective: full logits, then F.cross_entropy (decoder targets shifted by one)."""
    logits = model(batch["input_ids"], batch.get("lengths"), return_logits=True).logits
    labels = batch["labels"]
    if arch == "decoder":   # packed blocks: position t is scored against token t + 1
        logits, labels = logits[:, :-1], labels[:, 1:]
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1), ignore_index=-100)


def fastest_sdpa_backend(arch: str, config: ModelConfig, batch: dict, device: torch.device) -> SDPBackend:
    """The SDPA backend a careful torch user would pin for this batch: each one that accepts the model's attention
    call (is_causal for packed blocks, the padding mask otherwise) timed on a forward and backward at its shapes."""
    size, length = batch["input_ids"].shape
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    q, k, v = (torch.randn(size, heads, length, config.head_dim, device=device, dtype=dtype, requires_grad=True)
               for heads in (config.n_heads, config.kv_heads, config.kv_heads))
    is_causal = arch == "decoder" and "lengths" not in batch
    mask = None if is_causal else attention_mask(length, length, causal=arch == "decoder",
                                                 kv_lens=batch.get("lengths"), device=device)

    def call() -> None:
        F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal,
                                       enable_gqa=config.kv_heads != config.n_heads).sum().backward()

    seconds = {}
    for backend in SDPA_BACKENDS:
        with sdpa_kernel([backend]):
            try:
                call()
            except RuntimeError:   # this backend does not take the call (mask, dtype, device)
                continue
            seconds[backend] = time_call(call, repeat=5)
    return min(seconds, key=seconds.get)


def training_step(provider: str, arch: str, preset: str, batch: dict, device: torch.device, compile_model: bool):
    """A closure running one optimizer step of a fresh model for `provider`, and the model."""
    torch.manual_seed(0)
    config = ModelConfig.preset(preset, vocab_size=VOCAB, dropout=0.0,
                                attn_impl="fastlm" if provider == "fastlm" else "sdpa")
    model = (EncoderLM if arch == "encoder" else DecoderLM)(config).to(device)
    optimizer = model.configure_optimizers(weight_decay=0.1, lr=1e-4)
    forward = torch.compile(model) if compile_model else model
    use_bf16 = device.type == "cuda"
    backends = list(SDPA_BACKENDS) if provider == "fastlm" else [fastest_sdpa_backend(arch, config, batch, device)]

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16), sdpa_kernel(backends):
            loss = forward(**batch).loss if provider == "fastlm" else torch_loss(forward, arch, batch)
        loss.backward()
        optimizer.step()

    return step, model


def attention_backends(step) -> str:
    """The attention backends one call of `step` ran, by the profiler's op names."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profiler:
        step()
    ran = {event.key for event in profiler.key_averages()}
    return " + ".join(name for op, name in ATTENTION_OPS.items() if op in ran) or "plain torch math or compiler-fused"


def measure(arch: str, preset: str, shape: tuple[int, int], device: torch.device, compile_model: bool,
            repeat: int) -> tuple[Row, Row | None]:
    batch_size, length = shape
    batch = make_batch(arch, batch_size, length, device, torch.Generator().manual_seed(0))
    tokens = int(batch["lengths"].sum()) if "lengths" in batch else batch["input_ids"].numel()
    steps, models = {}, {}
    for provider in PROVIDERS:
        steps[provider], models[provider] = training_step(provider, arch, preset, batch, device, compile_model)
    seconds = time_interleaved(steps, warmup=3 if compile_model else 2, repeat=repeat)
    backends = {provider: attention_backends(step) for provider, step in steps.items()}
    mode = "compiled" if compile_model else "eager"
    kind = "MLM encoder" if arch == "encoder" else "decoder"
    name = (f"{kind} {preset} {batch_size}x{length} {mode} (attention: "
            + ", ".join(f"{provider} {backend}" for provider, backend in backends.items()) + ")")
    throughput = Row(name, "tokens/s", higher_is_better=True)
    peak = device_peak_tflops()
    utilisation = Row(name, "MFU %", higher_is_better=True) if peak else None
    for provider in PROVIDERS:
        _, extra_peak = peak_memory_mib(steps[provider])
        throughput.results.append(Measurement(provider, tokens / seconds[provider], extra_peak))
        if utilisation is not None:
            flops_per_token = models[provider].estimate_flops_per_token(real_length(batch))
            utilisation.results.append(Measurement(provider, 100.0 * tokens / seconds[provider] * flops_per_token
                                                   / (peak * 1e12)))
    return throughput, utilisation


def batch_shape(text: str) -> tuple[int, int]:
    """"8x128" -> (8, 128), for --shapes."""
    try:
        size, length = (int(part) for part in text.split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected BATCHxLENGTH, e.g. 8x128") from None
    if size < 1 or length < 2:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a batch >= 1 and a length >= 2")
    return size, length


def main() -> None:
    parser = base_parser(__doc__.split("\n\n")[0])
    parser.add_argument("--preset", help="model preset (default: base on CUDA, tiny on CPU)")
    parser.add_argument("--shapes", nargs=2, metavar="BxT", type=batch_shape,
                        help="decoder and encoder batch shapes, e.g. 8x128 16x128 (default: by device)")
    parser.add_argument("--modes", nargs="+", choices=["eager", "compiled"],
                        help="which runs to measure (default: eager, plus compiled on CUDA without --quick)")
    parser.add_argument("--repeat", type=int, help="timed steps per provider (default: by device and --quick)")
    add_budget_argument(parser)
    args = parser.parse_args()
    if args.repeat is not None and args.repeat < 1:
        parser.error(f"--repeat {args.repeat}: expected at least 1 timed step")
    budget = CaseBudget(args.budget)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    preset = args.preset or ("base" if device.type == "cuda" else "tiny")
    if device.type == "cuda":
        shapes = [(16, 1024), (32, 512)]
        modes = ["eager"] if args.quick else ["eager", "compiled"]
        repeat = 5 if args.quick else 20
    else:
        shapes = [(8, 128), (16, 128)]
        modes, repeat = ["eager"], 5 if args.quick else 10
    shapes = args.shapes or shapes
    modes, repeat = args.modes or modes, args.repeat or repeat
    rows: list[Row] = []
    for arch, shape in zip(("decoder", "encoder"), shapes):
        for mode in modes:
            if not budget.allows(f"{arch} {mode}"):
                continue
            throughput, utilisation = measure(arch, preset, shape, device, mode == "compiled", repeat)
            rows.append(throughput)
            if utilisation is not None:
                rows.append(utilisation)
    notes = (f"Preset {preset}, vocab {VOCAB}; fastlm = attention (Triton on CUDA, SDPA elsewhere) + "
             "linear_cross_entropy; torch = SDPA (is_causal for packed blocks, the padding mask on the fastest "
             f"backend that takes it) + full logits + F.cross_entropy; "
             f"{'bf16 autocast' if device.type == 'cuda' else 'fp32'}, AdamW{' (fused)' if device.type == 'cuda' else ''}"
             f"; steps timed in turns, median of {repeat}. MFU against the device's dense bf16 peak "
             f"({device_peak_tflops() or 'unknown'} TFLOP/s) with estimate_flops_per_token at the batch's real length;"
             " memory is the extra peak of one step over weights and optimizer state (CPU: peak RSS growth).")
    notes += budget.note()
    report("Training throughput: fastlm kernels vs plain torch", rows, json_path=args.json, notes=notes)


if __name__ == "__main__":
    main()
