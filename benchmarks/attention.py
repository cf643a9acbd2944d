"""fastlm's fused attention against every available SDPA backend (flash, efficient, cuDNN, math), side by side.

    python benchmarks/attention.py [--quick] [--json PATH] [--budget SECONDS]

Forward and forward+backward, bf16, TFLOP/s of *useful* work (only the (query, key) pairs a mask lets through, so
a padded row's TFLOP/s ratio is its time ratio) and the extra peak memory of one call. Without a GPU it says so
and runs a tiny correctness-only pass of the same cases (the Triton kernels under the interpreter).
"""

import os
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported: the only way it runs on CPU

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import torch.nn.functional as F  # noqa: E402
from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: E402

from benchmarks.harness import (  # noqa: E402
    CaseBudget, Measurement, Row, add_budget_argument, base_parser, peak_memory_mib, report, time_call,
)
from fastlm.kernels import attention  # noqa: E402

SDPA_BACKENDS = {
    "sdpa-flash": SDPBackend.FLASH_ATTENTION,
    "sdpa-efficient": SDPBackend.EFFICIENT_ATTENTION,
    "sdpa-cudnn": SDPBackend.CUDNN_ATTENTION,
    "sdpa-math": SDPBackend.MATH,
}


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


CASES = [
    Case("BERT", 32, 12, 512, 512, 64, quick=True),
    Case("BERT padded", 32, 12, 512, 512, 64, padded=True, quick=True),
    Case("GPT", 8, 16, 2048, 2048, 64),
    Case("GPT causal", 8, 16, 2048, 2048, 64, causal=True),
    Case("GPT", 8, 16, 2048, 2048, 128),
    Case("GPT causal", 8, 16, 2048, 2048, 128, causal=True, quick=True),
    Case("long causal", 2, 16, 8192, 8192, 128, causal=True),
    Case("cross-attention padded", 16, 16, 512, 1024, 64, padded=True),
    Case("decode", 8, 16, 1, 4096, 128, backward=False, quick=True),
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


def providers(case: Case, kv_lens, impl: str) -> dict:
    """name -> f(q, k, v): fastlm and each SDPA backend, given the same semantics."""
    # SDPA's is_causal is top-left aligned and it has no lengths: anything else takes an explicit mask.
    needs_mask = kv_lens is not None or (case.causal and case.q_len != case.k_len)
    mask = visible_mask(case, kv_lens, kv_lens.device if kv_lens is not None else "cpu") if needs_mask else None

    def sdpa(backend):
        def run(q, k, v):
            with sdpa_kernel([backend]):
                return F.scaled_dot_product_attention(q, k, v, attn_mask=None if mask is None else mask.to(q.device),
                                                      is_causal=case.causal and mask is None)
        return run

    found = {"fastlm": lambda q, k, v: attention(q, k, v, causal=case.causal, kv_lens=kv_lens, impl=impl)}
    found.update({name: sdpa(backend) for name, backend in SDPA_BACKENDS.items()})
    return found


def useful_tflop(case: Case, kv_lens) -> float:
    """TFLOP of the forward: 2 matmuls of 2 flops per (query, key, dim) over the visible pairs only."""
    pairs = visible_mask(case, None if kv_lens is None else kv_lens.cpu(), "cpu").sum().item() * case.heads
    return 4 * pairs * case.head_dim / 1e12


def measure(case: Case, quick: bool) -> list[Row]:
    generator = torch.Generator().manual_seed(0)
    q, k, v, kv_lens = make_inputs(case, "cuda", torch.bfloat16, generator)
    grad_out = torch.randn_like(q)
    forward_tflop = useful_tflop(case, kv_lens)
    rows = [Row(f"{case.label} fwd", "TFLOP/s", True)]
    if case.backward:
        rows.append(Row(f"{case.label} fwd+bwd", "TFLOP/s", True))
    repeat = 5 if quick else 20
    for name, fn in providers(case, kv_lens, "auto").items():
        def forward():
            with torch.no_grad():
                return fn(q, k, v)

        leaves = [t.detach().requires_grad_() for t in (q, k, v)]

        def forward_backward():
            return torch.autograd.grad(fn(*leaves), leaves, grad_out)

        work = [(rows[0], forward, forward_tflop)]
        if case.backward:
            work.append((rows[1], forward_backward, 3.5 * forward_tflop))  # the backward does 5 matmuls to 2
        for row, step, tflop in work:
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # SDPA warns before refusing a backend for this input
                    seconds = time_call(step, warmup=2, repeat=repeat)
                    _, peak = peak_memory_mib(step)
            except RuntimeError as refusal:  # this backend does not run this case (e.g. flash with a mask)
                print(f"# {name} skipped {row.case}: {str(refusal).splitlines()[0][:100]}", file=sys.stderr)
                continue
            row.results.append(Measurement(name, tflop / seconds, peak))
        torch.cuda.empty_cache()
    for row in rows:  # the ratio the targets are stated against
        sdpa = [m.value for m in row.results if m.provider in SDPA_BACKENDS]
        if sdpa:
            row.results.append(Measurement("best SDPA", max(sdpa)))
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
            out = providers(case, kv_lens, "triton")[name](*leaves)
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
    if not torch.cuda.is_available():
        print("No CUDA GPU here: speed is not measured. Correctness-only pass of each case in miniature, "
              "fastlm's Triton kernels under the interpreter against SDPA math in float64:")
        sys.exit(0 if check_correctness(cases) else 1)
    rows = [row for case in cases if budget.allows(case.label) for row in measure(case, args.quick)]
    notes = "TFLOP/s count only the (query, key) pairs the mask lets through; fwd+bwd counts 3.5x the forward."
    notes += budget.note()
    report("Fused attention, bf16: fastlm vs SDPA backends", rows, json_path=args.json, notes=notes)


if __name__ == "__main__":
    main()
