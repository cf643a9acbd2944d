"""Training throughput: EncoderLM (masked LM), DecoderLM (causal LM) and Seq2SeqLM (translation) with fastlm's
kernels against the same model in the best plain torch a user would write ("torch"), side by side, eager and
torch.compile'd.

fastlm = attn_impl="fastlm" (the Triton kernel on CUDA, torch's SDPA elsewhere) + linear_cross_entropy, the MLM
head on the masked rows only (the batch's target_positions).
torch = attn_impl="sdpa" + the faster (timed first on the batch) of full logits + F.cross_entropy and torch's own
chunked F.linear_cross_entropy (torch >= 2.12); the MLM head and loss run on the masked rows only, gathered by
`labels != -100` as fairseq's RobertaLMHead(masked_tokens=...) does. Packed decoder blocks carry no lengths, so
SDPA gets is_causal=True and no mask; padded MLM and translation batches pass their padding masks, with the fastest
SDPA backend that takes them (each one that accepts the call timed first on the batch's attention shapes). Each row
names the attention backend that ran for each provider, read from the profiler. Translation rows count target
tokens.

One training step = forward under the Trainer's default precision (bf16 autocast on CUDA and on a CPU with native
bf16, fp32 elsewhere; --precision picks one), backward, AdamW step: what the Trainer runs.
Steps of the two providers are timed in turns and the medians reported. Reports tokens/s, extra peak memory (CUDA:
the allocator's peak over what was allocated before the step; CPU: the process's peak RSS, sampled every
millisecond, over its RSS before the step) and, on a known GPU, model FLOPs utilisation with attention FLOPs at the
batch's real lengths.

    python benchmarks/train.py            # CUDA: base preset, decoder 16x1024, MLM encoder 32x512 with padding,
                                          # translation 64x128
    python benchmarks/train.py --quick    # CPU: tiny preset, small batches, eager only
    python benchmarks/train.py --archs seq2seq --shapes 32x48 --vocab 8000 --threads 1   # CPU: translation alone
    python benchmarks/train.py --modes compiled --budget 60   # only the compiled runs, no new case after 60 s
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
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
from fastlm.models import DecoderLM, EncoderLM, ModelConfig, Seq2SeqLM  # noqa: E402
from fastlm.models.blocks import attention_mask  # noqa: E402
from fastlm.train.config import PRECISIONS, TrainConfig  # noqa: E402
from fastlm.train.precision import trains_in_bf16  # noqa: E402

MASK_PROB = TrainConfig.mask_prob   # the MLM batches of the Trainer's default
PROVIDERS = ("fastlm", "torch")
ARCHS = ("decoder", "encoder", "seq2seq")
KINDS = {"decoder": "decoder", "encoder": "MLM encoder", "seq2seq": "translation"}
# The torch baseline's loss: the logits in full, or torch's own chunked linear + cross-entropy (torch >= 2.12);
# each row takes the faster on its batch.
TORCH_RECIPES = ("full logits + F.cross_entropy", "F.linear_cross_entropy")
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


@dataclass(frozen=True)
class Setup:
    """What every row of one run shares."""
    preset: str
    vocab: int
    device: torch.device
    use_bf16: bool        # bf16 autocast (fp32 master weights), as the Trainer's precision
    repeat: int           # timed steps per provider


def device_peak_tflops() -> float | None:
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next((peak for key, peak in PEAK_TFLOPS.items() if key in name), None)


def make_batch(arch: str, batch: int, length: int, vocab: int, device: torch.device,
               generator: torch.Generator) -> dict:
    """Random ids; the decoder gets full packed blocks (no lengths: nothing is padded), the encoder lengths in
    [length/2, length] (padding), MASK_PROB of its real tokens as targets and their target_positions, as
    MaskedLMBatches delivers them (fastlm's head runs on those rows only; the torch baseline finds the same rows
    from the labels); translation gets a source and a target of `length` columns, each padded that way, labels -100
    at the target's padding, as TranslationBatches delivers them."""
    ids = torch.randint(4, vocab, (batch, length), generator=generator)
    if arch == "decoder":
        return {"input_ids": ids.to(device), "labels": ids.to(device)}
    lengths = torch.randint(length // 2, length + 1, (batch,), generator=generator)
    if arch == "seq2seq":
        tgt_ids = torch.randint(4, vocab, (batch, length), generator=generator)
        tgt_lengths = torch.randint(length // 2, length + 1, (batch,), generator=generator)
        labels = tgt_ids.masked_fill(torch.arange(length)[None, :] >= tgt_lengths[:, None], -100)
        return {key: value.to(device) for key, value in (("src_ids", ids), ("src_lengths", lengths),
                ("tgt_ids", tgt_ids), ("tgt_lengths", tgt_lengths), ("labels", labels))}
    real = torch.arange(length)[None, :] < lengths[:, None]
    chosen = (torch.rand(batch, length, generator=generator) < MASK_PROB) & real
    labels = ids.masked_fill(~chosen, -100)
    return {"input_ids": ids.to(device), "lengths": lengths.to(device), "labels": labels.to(device),
            "target_positions": target_positions(labels).to(device)}


def padding_lengths(batch: dict) -> torch.Tensor | None:
    """The lengths that pad the batch's (first) attended sequence: the MLM rows, the translation source."""
    return batch.get("lengths", batch.get("src_lengths"))


def scored_tokens(batch: dict) -> int:
    """Tokens a step trains on: the target side of a translation batch, else every real token."""
    lengths = batch.get("tgt_lengths", batch.get("lengths"))
    return int(lengths.sum()) if lengths is not None else batch["input_ids"].numel()


def real_length(batch: dict) -> float:
    """Keys attended per token: the block length, or for padded rows sum(lengths**2) / sum(lengths)."""
    lengths = padding_lengths(batch)
    if lengths is None:
        return float(batch["input_ids"].shape[1])
    lengths = lengths.double()
    return float((lengths * lengths).sum() / lengths.sum())


def output_projection(model, arch: str) -> torch.nn.Linear:
    return model.head.output if arch == "encoder" else model.lm_head


def torch_objective(recipe: str, states: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                    labels: torch.Tensor) -> torch.Tensor:
    """The loss of flat states (N, D) through the output projection, by one of TORCH_RECIPES."""
    if recipe == "F.linear_cross_entropy":
        return F.linear_cross_entropy(states, weight, labels, linear_bias=bias, ignore_index=-100,
                                      options=torch.nn.LinearCrossEntropyOptions())
    return F.cross_entropy(F.linear(states, weight, bias).float(), labels, ignore_index=-100)


def torch_loss(model, arch: str, batch: dict, recipe: str) -> torch.Tensor:
    """The plain-torch objective of `model`, whose output projection hands back its input (training_step), by
    `recipe`: decoder targets shifted by one, the MLM head on the masked rows only."""
    labels = batch["labels"]
    if arch == "encoder":
        # The one line a careful torch user writes (fairseq's RobertaLMHead(masked_tokens=...)): only the rows with
        # a target go through the head, not all B x T of them.
        scored = labels != -100
        hidden = model.body(batch["input_ids"], batch["lengths"])
        states, labels = model.head.transform(hidden[scored]), labels[scored]
    elif arch == "seq2seq":
        states = model(batch["src_ids"], batch["tgt_ids"], batch["src_lengths"], batch["tgt_lengths"],
                       return_logits=True).logits
    else:   # packed blocks: position t is scored against token t + 1
        states, labels = model(batch["input_ids"], return_logits=True).logits[:, :-1], labels[:, 1:]
    projection = output_projection(model, arch)
    return torch_objective(recipe, states.reshape(-1, states.shape[-1]), projection.weight, projection.bias,
                           labels.reshape(-1))


def fastest_torch_recipe(arch: str, config: ModelConfig, batch: dict, setup: Setup) -> str:
    """The loss recipe a careful torch user would pick for this batch: each of TORCH_RECIPES torch has, timed on a
    forward and backward of the rows torch_loss scores through the output projection."""
    labels = batch["labels"].reshape(-1)
    if arch == "encoder":   # the masked rows only, as torch_loss gathers them
        labels = labels[labels != -100]
    states = torch.randn(len(labels), config.d_model, device=setup.device, requires_grad=True)
    weight = torch.randn(config.vocab_size, config.d_model, device=setup.device, requires_grad=True)
    seconds = {}
    for recipe in TORCH_RECIPES:
        if recipe == "F.linear_cross_entropy" and not hasattr(F, "linear_cross_entropy"):   # torch < 2.12
            continue

        def call(recipe=recipe) -> None:
            with torch.autocast(setup.device.type, dtype=torch.bfloat16, enabled=setup.use_bf16):
                loss = torch_objective(recipe, states, weight, None, labels)
            loss.backward()
        seconds[recipe] = time_call(call, repeat=5)
    return min(seconds, key=seconds.get)


def fastest_sdpa_backend(arch: str, config: ModelConfig, batch: dict, device: torch.device, dtype: torch.dtype
                         ) -> SDPBackend:
    """The SDPA backend a careful torch user would pin for this batch: each one that accepts the model's attention
    call (is_causal for packed blocks, the padding mask otherwise: the MLM rows, the translation source) timed on a
    forward and backward at its shapes, in the dtype the model attends in."""
    size, length = next(iter(batch.values())).shape
    q, k, v = (torch.randn(size, heads, length, config.head_dim, device=device, dtype=dtype, requires_grad=True)
               for heads in (config.n_heads, config.kv_heads, config.kv_heads))
    is_causal = arch == "decoder" and "lengths" not in batch
    mask = None if is_causal else attention_mask(length, length, causal=arch == "decoder",
                                                 kv_lens=padding_lengths(batch), device=device)

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


def model_config(setup: Setup, provider: str) -> ModelConfig:
    return ModelConfig.preset(setup.preset, vocab_size=setup.vocab, dropout=0.0,
                              attn_impl="fastlm" if provider == "fastlm" else "sdpa")


def training_step(provider: str, arch: str, setup: Setup, batch: dict, compile_model: bool, recipe: str):
    """A closure running one optimizer step of a fresh model for `provider` (torch: with loss `recipe`), and the
    model."""
    device, use_bf16 = setup.device, setup.use_bf16
    torch.manual_seed(0)
    config = model_config(setup, provider)
    if arch == "seq2seq":
        model = Seq2SeqLM(config, config).to(device)
    else:
        model = (EncoderLM if arch == "encoder" else DecoderLM)(config).to(device)
    if provider == "torch":
        # The model hands its states to the loss recipe, which applies the projection's parameters itself.
        output_projection(model, arch).forward = lambda states: states
    optimizer = model.configure_optimizers(weight_decay=0.1, lr=1e-4)

    def objective() -> torch.Tensor:
        return model(**batch).loss if provider == "fastlm" else torch_loss(model, arch, batch, recipe)

    # The whole objective, so that torch's own loss code is compiled too, not only the model's forward.
    objective = torch.compile(objective) if compile_model else objective
    # Both providers' models attend in fp32 under CPU autocast (fastlm.models.blocks.scaled_dot_product).
    attention_dtype = torch.bfloat16 if use_bf16 and device.type == "cuda" else torch.float32
    backends = (list(SDPA_BACKENDS) if provider == "fastlm"
                else [fastest_sdpa_backend(arch, config, batch, device, attention_dtype)])

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16), sdpa_kernel(backends):
            loss = objective()
        loss.backward()
        optimizer.step()

    return step, model


def attention_backends(step) -> str:
    """The attention backends one call of `step` ran, by the profiler's op names."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profiler:
        step()
    ran = {event.key for event in profiler.key_averages()}
    return " + ".join(name for op, name in ATTENTION_OPS.items() if op in ran) or "plain torch math or compiler-fused"


def measure(arch: str, shape: tuple[int, int], setup: Setup, compile_model: bool) -> tuple[Row, Row | None]:
    batch_size, length = shape
    batch = make_batch(arch, batch_size, length, setup.vocab, setup.device, torch.Generator().manual_seed(0))
    tokens = scored_tokens(batch)
    recipe = fastest_torch_recipe(arch, model_config(setup, "torch"), batch, setup)
    steps, models = {}, {}
    for provider in PROVIDERS:
        steps[provider], models[provider] = training_step(provider, arch, setup, batch, compile_model, recipe)
    seconds = time_interleaved(steps, warmup=3 if compile_model else 2, repeat=setup.repeat)
    backends = {provider: attention_backends(step) for provider, step in steps.items()}
    mode = "compiled" if compile_model else "eager"
    name = (f"{KINDS[arch]} {setup.preset} {batch_size}x{length} {mode} {'bf16' if setup.use_bf16 else 'fp32'} "
            "(attention: " + ", ".join(f"{provider} {backend}" for provider, backend in backends.items())
            + f"; torch loss: {recipe})")
    throughput = Row(name, "target tokens/s" if arch == "seq2seq" else "tokens/s", higher_is_better=True)
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
    parser.add_argument("--archs", nargs="+", choices=ARCHS, default=list(ARCHS), help="which models to measure")
    parser.add_argument("--shapes", nargs="+", metavar="BxT", type=batch_shape,
                        help="one batch shape per --archs entry, e.g. 8x128 16x128 32x48 (default: by device)")
    parser.add_argument("--vocab", type=int, default=32000, help="vocabulary size (default: 32000)")
    parser.add_argument("--precision", choices=PRECISIONS, default="auto",
                        help="as TrainConfig.precision (default: auto, the Trainer's default)")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads before measuring (default: torch's)")
    parser.add_argument("--modes", nargs="+", choices=["eager", "compiled"],
                        help="which runs to measure (default: eager, plus compiled on CUDA without --quick)")
    parser.add_argument("--repeat", type=int, help="timed steps per provider (default: by device and --quick)")
    add_budget_argument(parser)
    args = parser.parse_args()
    if args.repeat is not None and args.repeat < 1:
        parser.error(f"--repeat {args.repeat}: expected at least 1 timed step")
    if args.shapes is not None and len(args.shapes) != len(args.archs):
        parser.error(f"--shapes: {len(args.shapes)} given, expected one per --archs entry ({' '.join(args.archs)})")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    budget = CaseBudget(args.budget)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        shapes = {"decoder": (16, 1024), "encoder": (32, 512), "seq2seq": (64, 128)}
        modes = ["eager"] if args.quick else ["eager", "compiled"]
        repeat = 5 if args.quick else 20
    else:
        shapes = {"decoder": (8, 128), "encoder": (16, 128), "seq2seq": (32, 48)}
        modes, repeat = ["eager"], 5 if args.quick else 10
    shapes = dict(zip(args.archs, args.shapes)) if args.shapes else shapes
    setup = Setup(preset=args.preset or ("base" if device.type == "cuda" else "tiny"), vocab=args.vocab,
                  device=device, use_bf16=trains_in_bf16(args.precision, device), repeat=args.repeat or repeat)
    rows: list[Row] = []
    for arch in args.archs:
        for mode in args.modes or modes:
            if not budget.allows(f"{arch} {mode}"):
                continue
            throughput, utilisation = measure(arch, shapes[arch], setup, mode == "compiled")
            rows.append(throughput)
            if utilisation is not None:
                rows.append(utilisation)
    threads = torch.get_num_threads()
    notes = (f"Preset {setup.preset}, vocab {setup.vocab}, {threads} thread{'s' if threads > 1 else ''}; fastlm = "
             "attention (Triton on CUDA, SDPA elsewhere) + linear_cross_entropy; torch = SDPA (is_causal for packed "
             "blocks, the padding masks on the fastest backend that takes them) + the faster loss recipe (in the row); "
             f"MLM: {MASK_PROB:.0%} of the real tokens masked, both providers' heads on those rows only; "
             f"{'bf16 autocast' if setup.use_bf16 else 'fp32'}, AdamW{' (fused)' if device.type == 'cuda' else ''}"
             f"; steps timed in turns, median of {setup.repeat}. MFU against the device's dense bf16 peak "
             f"({device_peak_tflops() or 'unknown'} TFLOP/s) with estimate_flops_per_token at the batch's real length;"
             " memory is the extra peak of one step over weights and optimizer state (CPU: peak RSS growth).")
    notes += budget.note()
    report("Training throughput: fastlm kernels vs plain torch", rows, json_path=args.json, notes=notes)


if __name__ == "__main__":
    main()
