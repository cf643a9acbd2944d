"""fastlm's fused attention against every available SDPA backend, FlexAttention and flash-attn, timed in turns.

    python benchmarks/attention.py [--quick] [--json PATH] [--budget SECONDS]

Forward and forward+backward, bf16, TFLOP/s of *useful* work (only the (query, key) pairs a mask lets through, so
a padded row's TFLOP/s ratio is its time ratio) and the extra peak memory of one call. Every case runs fastlm, each
SDPA backend (flash, efficient, cuDNN, math) and FlexAttention (compiled, as torch documents it, with a BlockMask of
the case's causal and padding mask where it has one; its compilation happens in the warm-up calls, which are not
timed); padded cases also run, where `flash_attn` is installed and the case is not causal, flash-attn's
`flash_attn_varlen_func` on keys unpadded beforehand (every query row kept, so that all providers compute the same
output). "best peer" is the fastest of them, the one the targets are stated against. The notes name the forward
each row of fastlm took (`forward_path`: TMA loads, pointer loads, split keys, or the reference path). On Hopper,
"fastlm-tma" is fastlm with its TMA forward enabled (`tma_enabled`, off by default until a GPU run has measured it).

Without a GPU it says so, runs a tiny correctness-only pass of the same cases (the Triton kernels under the
interpreter) and times the padded cases at batch CPU_BATCH in fp32 (what the models attend in on the CPU), where
fastlm's `attention` takes its plain-torch reference path.
"""

import dataclasses
import os
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported: the only way it runs on CPU

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import torch.nn.functional as F  # noqa: E402
from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: E402

from benchmarks.harness import (  # noqa: E402
    CaseBudget, Measurement, Row, add_budget_argument, base_parser, peak_memory_mib, report, time_interleaved,
)
from fastlm.kernels import attention  # noqa: E402
from fastlm.kernels import attention as attention_kernels  # noqa: E402
from fastlm.kernels.attention import forward_path  # noqa: E402

try:  # torch >= 2.5
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
except ImportError:
    flex_attention = None
else:
    # Compiled as torch documents FlexAttention (eager it is a slow reference); a fixed shape per case.
    flex_attention = torch.compile(flex_attention, dynamic=False)
    # Each case and kind (with or without grad) compiles it anew: more than dynamo's default of 8 recompilations,
    # past which it would run eagerly.
    torch._dynamo.config.cache_size_limit = 64
try:
    from flash_attn import flash_attn_varlen_func
except ImportError:
    flash_attn_varlen_func = None

SDPA_BACKENDS = {
    "sdpa-flash": SDPBackend.FLASH_ATTENTION,
    "sdpa-efficient": SDPBackend.EFFICIENT_ATTENTION,
    "sdpa-cudnn": SDPBackend.CUDNN_ATTENTION,
    "sdpa-math": SDPBackend.MATH,
}
CPU_BATCH = 4  # the padded cases' batch on the CPU, which has not a GPU's throughput


@dataclass
class Case:
    name: str
    batch: int
    heads: int
    q_len: int
    k_len: int
    head_dim: int
    causal: bool = False
    padded: bool = False     # key lengths uniform in [Nk/2, Nk]
    backward: bool = True    # decoding has no backward
    quick: bool = False      # part of --quick

    @property
    def label(self) -> str:
        return f"{self.name} {self.batch}x{self.heads}x{self.q_len}x{self.k_len}x{self.head_dim}"


# --quick runs its cases in this order and --budget cuts the tail: head dim 64 (forward+backward, then decoding) first.
CASES = [
    Case("BERT", 32, 12, 512, 512, 64, quick=True),
    Case("decode", 8, 16, 1, 4096, 64, backward=False, quick=True),
    Case("BERT padded", 32, 12, 512, 512, 64, padded=True, quick=True),
    Case("GPT", 8, 16, 2048, 2048, 64),
    Case("GPT causal", 8, 16, 2048, 2048, 64, causal=True),
    Case("GPT", 8, 16, 2048, 2048, 128),
    Case("GPT causal", 8, 16, 2048, 2048, 128, causal=True, quick=True),
    Case("long causal", 2, 16, 8192, 8192, 128, causal=True),
    Case("cross-attention padded", 16, 16, 512, 1024, 64, padded=True),
    Case("decode", 8, 16, 1, 4096, 128, backward=False, quick=True),
    # 16 (sequence, head) pairs leave the one-pass kernel on 16 SMs: the case split-key decoding is for.
    Case("decode long", 1, 16, 1, 16384, 128, backward=False, quick=True),
]


def make_inputs(case: Case, device: str, dtype: torch.dtype, generator: torch.Generator):
    def tensor(n):
        return torch.randn(case.batch, case.heads, n, case.head_dim, generator=generator).to(device, dtype)

    kv_lens = None
    if case.padded:
        kv_lens = torch.randint(case.k_len // 2, case.k_len + 1, (case.batch,), generator=generator).to(device)
    return tensor(case.q_len), tensor(case.k_len), tensor(case.k_len), kv_lens


def visible_mask(case: Case, kv_lens, device) -> torch.Tensor:
    """(B, 1, Nq, Nk) bool: the mask SDPA needs to match fastlm's causal (bottom-right) and kv_lens semantics."""
    query = torch.arange(case.q_len, device=device)[:, None]
    key = torch.arange(case.k_len, device=device)[None, :]
    visible = torch.ones(case.batch, 1, case.q_len, case.k_len, dtype=torch.bool, device=device)
    if case.causal:
        visible = visible & (key <= query + case.k_len - case.q_len)
    if kv_lens is not None:
        visible = visible & (key < kv_lens.view(-1, 1, 1, 1))
    return visible


def same_layout(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    return tensors


@dataclass
class Provider:
    """One way to compute a case's attention: `run(q, k, v)` on the tensors that `adapt(q, k, v, grad_out)` makes of
    the (B, H, N, D) inputs, once and before any timing (a varlen user keeps the batch unpadded throughout)."""
    run: Callable[..., torch.Tensor]
    adapt: Callable[..., tuple[torch.Tensor, ...]] = same_layout


def flex_provider(case: Case, kv_lens, device: str) -> Provider:
    """FlexAttention with a BlockMask of the case's semantics (key blocks that no row of a block sees are skipped),
    or none for a case that masks nothing."""
    if not case.causal and kv_lens is None:
        return Provider(lambda q, k, v: flex_attention(q, k, v))
    shift = case.k_len - case.q_len

    def visible(batch, head, query, key):
        before_diagonal = key <= query + shift  # bottom-right aligned, as fastlm's causal mask
        if kv_lens is None:
            return before_diagonal
        keep = key < kv_lens[batch]
        return keep & before_diagonal if case.causal else keep

    batch = None if kv_lens is None else case.batch  # one mask for every sequence when they share it
    block_mask = create_block_mask(visible, batch, None, case.q_len, case.k_len, device=device)
    return Provider(lambda q, k, v: flex_attention(q, k, v, block_mask=block_mask))


def flash_varlen_provider(case: Case, kv_lens) -> Provider:
    """flash-attn's varlen call on keys and values unpadded by kv_lens, every query row kept (so that it computes
    what the others do), in its (tokens, H, D) layout."""
    device = kv_lens.device
    query_starts = torch.arange(case.batch + 1, device=device, dtype=torch.int32) * case.q_len
    key_starts = F.pad(kv_lens.cumsum(0), (1, 0)).to(torch.int32)
    real_keys = (torch.arange(case.k_len, device=device)[None, :] < kv_lens[:, None]).reshape(-1)

    def tokens(t: torch.Tensor) -> torch.Tensor:   # (B, H, N, D) -> (B*N, H, D)
        return t.transpose(1, 2).reshape(-1, t.shape[1], t.shape[3]).contiguous()

    def adapt(q, k, v, grad_out):
        return tokens(q), tokens(k)[real_keys], tokens(v)[real_keys], tokens(grad_out)

    def run(q, k, v):
        return flash_attn_varlen_func(q, k, v, query_starts, key_starts, case.q_len, case.k_len)

    return Provider(run, adapt)


def providers(case: Case, kv_lens, impl: str, device: str) -> tuple[dict[str, Provider], dict[str, str]]:
    """name -> Provider: fastlm, each SDPA backend, FlexAttention and, on padded cases, flash-attn's varlen call,
    all with the same semantics; and name -> why, for the peers that cannot run the case here."""
    # SDPA's is_causal is top-left aligned and it has no lengths: anything else takes an explicit mask.
    needs_mask = kv_lens is not None or (case.causal and case.q_len != case.k_len)
    mask = visible_mask(case, kv_lens, kv_lens.device if kv_lens is not None else "cpu") if needs_mask else None

    def sdpa(backend):
        def run(q, k, v):
            with sdpa_kernel([backend]):
                return F.scaled_dot_product_attention(q, k, v, attn_mask=None if mask is None else mask.to(q.device),
                                                      is_causal=case.causal and mask is None)
        return Provider(run)

    def fastlm(tma: bool):
        def run(q, k, v):
            attention_kernels.tma_enabled = tma
            try:
                return attention(q, k, v, causal=case.causal, kv_lens=kv_lens, impl=impl)
            finally:
                attention_kernels.tma_enabled = False
        return Provider(run)

    found = {"fastlm": fastlm(tma=False)}
    if device == "cuda" and torch.cuda.get_device_capability() >= attention_kernels.TMA_MIN_CAPABILITY:
        found["fastlm-tma"] = fastlm(tma=True)  # opt-in until measured: timed beside the default path
    found.update({name: sdpa(backend) for name, backend in SDPA_BACKENDS.items()})
    missing = {}
    if flex_attention is None:
        missing["flex"] = f"no FlexAttention in torch {torch.__version__}"
    else:
        found["flex"] = flex_provider(case, kv_lens, device)
    if kv_lens is None:
        return found, missing
    if flash_attn_varlen_func is None:
        missing["flash-varlen"] = "flash_attn is not installed"
    elif case.causal:  # its causal mask is aligned to each sequence's own end, not to the padded width's
        missing["flash-varlen"] = "its causal alignment differs on padded rows"
    else:
        found["flash-varlen"] = flash_varlen_provider(case, kv_lens)
    return found, missing


def useful_tflop(case: Case, kv_lens) -> float:
    """TFLOP of the forward: 2 matmuls of 2 flops per (query, key, dim) over the visible pairs only."""
    pairs = visible_mask(case, None if kv_lens is None else kv_lens.cpu(), "cpu").sum().item() * case.heads
    return 4 * pairs * case.head_dim / 1e12


def fastlm_paths(case: Case, q, k, v, kv_lens) -> dict[str, str]:
    """kind -> the forward fastlm's `attention` takes in that kind's timed calls ("fwd" runs without gradients)."""
    with torch.no_grad():
        paths = {"fwd": forward_path(q, k, v, kv_lens=kv_lens)}
    if case.backward:
        paths["fwd+bwd"] = forward_path(*(t.detach().requires_grad_() for t in (q, k, v)), kv_lens=kv_lens)
    return paths


def measure(case: Case, repeat: int, device: str, dtype: torch.dtype, skipped: dict[str, set[str]],
            paths: dict[str, list[str]]) -> list[Row]:
    """The case's fwd (and fwd+bwd) row: each provider warmed up and its memory measured on its own, then all timed
    in turns. A provider that refuses the case is left out, and named in `skipped` under its reason; each row is
    named in `paths` under the forward fastlm took."""
    generator = torch.Generator().manual_seed(0)
    q, k, v, kv_lens = make_inputs(case, device, dtype, generator)
    grad_out = torch.randn_like(q)
    forward_tflop = useful_tflop(case, kv_lens)
    work = {"fwd": forward_tflop}
    if case.backward:
        work["fwd+bwd"] = 3.5 * forward_tflop  # the backward does 5 matmuls to the forward's 2
    steps: dict[str, dict] = {kind: {} for kind in work}
    peaks: dict[str, dict] = {kind: {} for kind in work}
    for kind, path in fastlm_paths(case, q, k, v, kv_lens).items():
        paths.setdefault(path, []).append(f"{case.label} {kind}")
    found, missing = providers(case, kv_lens, "auto", device)
    for name, why in missing.items():
        skipped.setdefault(why, set()).add(name)
    for name, provider in found.items():
        *inputs, provider_grad_out = provider.adapt(q, k, v, grad_out)
        leaves = [t.detach().requires_grad_() for t in inputs]

        def forward(provider=provider, inputs=inputs):
            with torch.no_grad():
                return provider.run(*inputs)

        def forward_backward(provider=provider, leaves=leaves, provider_grad_out=provider_grad_out):
            return torch.autograd.grad(provider.run(*leaves), leaves, provider_grad_out)

        for kind, step in (("fwd", forward), ("fwd+bwd", forward_backward)):
            if kind not in work:
                continue
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # SDPA warns before refusing a backend for this input
                    for _ in range(2):   # warm-up: caches, autotuning, torch.compile's compilation
                        step()
                    _, peaks[kind][name] = peak_memory_mib(step)
            except RuntimeError as refusal:  # this provider does not run this case (e.g. flash with a mask)
                reason = str(refusal).splitlines()[0].split(". ")[0][:100]
                print(f"# {name} skipped {case.label} {kind}: {reason}", file=sys.stderr)
                skipped.setdefault(reason, set()).add(f"{name} {kind}")
                continue
            steps[kind][name] = step
    rows = []
    for kind, tflop in work.items():
        seconds = time_interleaved(steps[kind], warmup=0, repeat=repeat)
        row = Row(f"{case.label} {kind}", "TFLOP/s", True,
                  [Measurement(name, tflop / seconds[name], peaks[kind][name]) for name in steps[kind]])
        peers = [m.value for m in row.results if not m.provider.startswith("fastlm")]
        if peers:  # the ratio the targets are stated against
            row.results.append(Measurement("best peer", max(peers)))
        rows.append(row)
    if device == "cuda":
        torch.cuda.empty_cache()
    return rows


def shrink(case: Case) -> Case:
    """The same case in miniature, for the correctness pass on CPU (the interpreter is slow)."""
    return Case(case.name, 2, 2, min(case.q_len, 48), min(case.k_len, 80), case.head_dim, case.causal,
                case.padded, case.backward)


def check_correctness(cases: list[Case]) -> bool:
    """fastlm's Triton kernels against SDPA's math backend in float64, forward and gradients."""
    ok = True
    generator = torch.Generator().manual_seed(0)
    for case in map(shrink, cases):
        q, k, v, kv_lens = make_inputs(case, "cpu", torch.bfloat16, generator)
        grad_out = torch.randn_like(q)
        results = {}
        for name, impl_dtype in (("fastlm", torch.bfloat16), ("sdpa-math", torch.float64)):
            leaves = [t.to(impl_dtype).requires_grad_() for t in (q, k, v)]
            out = providers(case, kv_lens, "triton", "cpu")[0][name].run(*leaves)
            results[name] = [out, *torch.autograd.grad(out, leaves, grad_out.to(impl_dtype))]
        errors = [(a.double() - b).abs().max().item() / max(b.abs().max().item(), 1.0)
                  for a, b in zip(results["fastlm"], results["sdpa-math"])]
        good = all(e < 5e-2 for e in errors)  # bf16 inputs and outputs
        ok &= good
        print(f"{'ok  ' if good else 'FAIL'} {case.name:24s} {case.batch}x{case.heads}x{case.q_len}x{case.k_len}x"
              f"{case.head_dim}: max relative error out/dq/dk/dv " + " ".join(f"{e:.1e}" for e in errors))
    return ok


def main() -> None:
    parser = base_parser(__doc__.splitlines()[0])
    add_budget_argument(parser)
    args = parser.parse_args()
    budget = CaseBudget(args.budget)
    cases = [c for c in CASES if c.quick or not args.quick]
    repeat = 5 if args.quick else 20
    skipped: dict[str, set[str]] = {}
    paths: dict[str, list[str]] = {}
    if torch.cuda.is_available():
        correct, device, dtype = True, "cuda", torch.bfloat16
        title = "Fused attention, bf16: fastlm vs SDPA backends, FlexAttention and flash-attn"
    else:
        print("No CUDA GPU here: GPU speed is not measured. Correctness-only pass of each case in miniature, "
              "fastlm's Triton kernels under the interpreter against SDPA math in float64:")
        correct, device, dtype = check_correctness(cases), "cpu", torch.float32
        cases = [dataclasses.replace(case, batch=CPU_BATCH) for case in cases if case.padded]
        title = "Attention on padded rows, CPU, fp32: fastlm's reference path vs SDPA backends and FlexAttention"
    rows = [row for case in cases if budget.allows(case.label)
            for row in measure(case, repeat, device, dtype, skipped, paths)]
    notes = "TFLOP/s count only the (query, key) pairs the mask lets through; fwd+bwd counts 3.5x the forward."
    if paths:
        notes += " fastlm's forward: " + "; ".join(f"{path} ({', '.join(rows)})" for path, rows in paths.items()) + "."
    if skipped:
        notes += " Not run: " + "; ".join(f"{', '.join(sorted(names))} ({reason})" for reason, names in skipped.items())
        notes += "."
    notes += budget.note()
    report(title, rows, json_path=args.json, notes=notes)
    sys.exit(0 if correct else 1)


if __name__ == "__main__":
    main()
