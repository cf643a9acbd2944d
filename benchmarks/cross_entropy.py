"""fastlm's cross-entropy kernels against torch, torch.compile, Liger-Kernel and Cut-Cross-Entropy.

The peers: torch eager, compiled and its own chunked F.linear_cross_entropy; Liger-Kernel and Cut-Cross-Entropy
where importable. Each provider runs forward + backward (`torch.autograd.grad`) on the same inputs, all timed in
turns in one process; "fastlm-accumulate" and "fastlm-by-vocab" force one of linear_cross_entropy's two ways to
d_weight ("fastlm" is the one its rule picks), "fastlm-48MiB" never holds more than 48 MiB of logits
(`max_chunk_bytes`), and "fastlm-block-N" streams rows in slices of N. "torch-compiled" is the unfused
`F.cross_entropy(h @ W.T)` through torch.compile, which compiles each new shape in the warm-up calls, outside the
timed ones (on the CPU that takes tens of seconds). A second table gives each provider's error against float64
torch. "Extra" memory is the peak allocation of that step beyond its inputs and the gradients it returns, the
memory a fused loss exists to save. Without a GPU this says so and runs a small CPU comparison of the reference
paths.

    python benchmarks/cross_entropy.py [--quick] [--json PATH]
"""

import importlib
import sys
from pathlib import Path
from typing import Callable
from unittest import mock

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, without installing

from benchmarks.harness import (  # noqa: E402
    Measurement, Row, base_parser, peak_memory_mib, report, time_interleaved,
)
from fastlm.kernels.cross_entropy import cross_entropy, linear_cross_entropy  # noqa: E402

cross_entropy_module = importlib.import_module("fastlm.kernels.cross_entropy")
Loss = Callable[[], torch.Tensor]
WARMUP_CALLS = 5  # per provider before its timed calls: caches, autotuning, torch.compile's compilation


def unfused_linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """What a torch user writes without a fused kernel: the logits in full, then the loss."""
    return F.cross_entropy(hidden @ weight.T, target)


# Compiles lazily, at the first call of each new shape or dtype.
compiled_linear_cross_entropy = torch.compile(unfused_linear_cross_entropy)
TORCH_PEERS_NOTE = ("torch-compiled compiled each shape in its warm-up calls, which are not timed; torch-chunked is "
                    "torch's F.linear_cross_entropy with LinearCrossEntropyOptions().")


def patched(loss: Loss, **module_patches) -> Loss:
    """`loss` with some of fastlm.kernels.cross_entropy's constants or rules replaced, to check its defaults."""
    def run():
        with mock.patch.multiple(cross_entropy_module, **module_patches):
            return loss()
    return run


def linear_losses(hidden, weight, target) -> dict[str, Loss]:
    """fastlm (its rule's pick and both walks forced), unfused torch and every installed peer, by provider name."""
    torch_name = "torch" if hidden.dtype == torch.float32 else f"torch-{str(hidden.dtype).removeprefix('torch.')}"
    fastlm = lambda: linear_cross_entropy(hidden, weight, target)  # noqa: E731
    losses: dict[str, Loss] = {
        "fastlm": fastlm,
        "fastlm-accumulate": patched(fastlm, _weight_grad_by_vocab=lambda *_: False),
        "fastlm-by-vocab": patched(fastlm, _weight_grad_by_vocab=lambda *_: True),
        "fastlm-48MiB": lambda: linear_cross_entropy(hidden, weight, target, max_chunk_bytes=48 * 2**20),
        torch_name: lambda: unfused_linear_cross_entropy(hidden, weight, target),
    }
    if hidden.dtype != torch.float32:  # the other common recipe: half GEMM, logits upcast before the loss
        losses["torch-fp32-logits"] = lambda: F.cross_entropy((hidden @ weight.T).float(), target)
    return losses | peer_linear_losses(hidden, weight, target)


def peer_linear_losses(hidden, weight, target) -> dict[str, Loss]:
    """Fused linear + cross-entropy losses by provider name: torch's (its compiler's fusion of the unfused loss, its
    chunked F.linear_cross_entropy) and those of other projects that are installed."""
    peers: dict[str, Loss] = {"torch-compiled": lambda: compiled_linear_cross_entropy(hidden, weight, target)}
    if hasattr(F, "linear_cross_entropy"):  # torch's own chunked version (torch >= 2.12)
        options = torch.nn.LinearCrossEntropyOptions()
        peers["torch-chunked"] = lambda: F.linear_cross_entropy(hidden, weight, target, options=options)
    try:
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy
    except ImportError:
        pass
    else:
        peers["liger"] = lambda: liger_fused_linear_cross_entropy(hidden, weight, target)
    try:
        from cut_cross_entropy import linear_cross_entropy as cce_linear_cross_entropy
    except ImportError:
        pass
    else:
        peers["cce"] = lambda: cce_linear_cross_entropy(hidden, weight, target)
        # CCE by default drops gradient tiles whose softmax is below ~2**-12 ("filter_eps"): with near-uniform
        # logits (random weights, early training) that is most of them. Without the filter it is exact.
        peers["cce-exact"] = lambda: cce_linear_cross_entropy(hidden, weight, target, filter_eps=None)
    return peers


def peer_logit_losses(logits, target) -> dict[str, Loss]:
    peers: dict[str, Loss] = {}
    try:
        from liger_kernel.transformers.functional import liger_cross_entropy
    except ImportError:
        pass
    else:
        peers["liger"] = lambda: liger_cross_entropy(logits, target)
    return peers


def measure(case: str, inputs: list[torch.Tensor], losses: dict[str, Loss], repeat: int) -> Row:
    """Time and extra memory of forward + backward for every provider, in ms and MiB: each one warmed up (and
    compiled) and its memory measured on its own, then all timed in turns."""
    input_mib = sum(t.numel() * t.element_size() for t in inputs) / 2**20  # each gradient is as large as its input
    steps, extra_mib = {}, {}
    for provider, loss in losses.items():
        def step(loss=loss):
            return torch.autograd.grad(loss(), inputs)

        try:
            for _ in range(WARMUP_CALLS):
                step()
            _, peak_mib = peak_memory_mib(step)
        except Exception as error:  # a peer that fails here (out of memory, version clash) leaves the others
            print(f"{case}: {provider} failed: {type(error).__name__}: {error}", file=sys.stderr)
            continue
        steps[provider], extra_mib[provider] = step, max(peak_mib - input_mib, 0.0)
    seconds = time_interleaved(steps, warmup=0, repeat=repeat)
    return Row(case=case, unit="ms", higher_is_better=False,
               results=[Measurement(provider, seconds[provider] * 1e3, extra_mib[provider]) for provider in steps])


def linear_row(rows: int, hidden_size: int, vocab: int, dtype: torch.dtype, device: str, repeat: int) -> Row:
    generator = torch.Generator(device).manual_seed(0)
    hidden = torch.randn(rows, hidden_size, device=device, dtype=dtype, generator=generator, requires_grad=True)
    weight = (torch.randn(vocab, hidden_size, device=device, generator=generator) / hidden_size**0.5)
    weight = weight.to(dtype).requires_grad_()
    target = torch.randint(0, vocab, (rows,), device=device, generator=generator)
    losses = linear_losses(hidden, weight, target)
    case = f"linear+CE N={rows} Hd={hidden_size} V={vocab} {str(dtype).removeprefix('torch.')}"
    return measure(case, [hidden, weight], losses, repeat)


def logits_row(rows: int, vocab: int, dtype: torch.dtype, device: str, repeat: int) -> Row:
    generator = torch.Generator(device).manual_seed(0)
    logits = (torch.randn(rows, vocab, device=device, generator=generator) * 4).to(dtype).requires_grad_()
    target = torch.randint(0, vocab, (rows,), device=device, generator=generator)
    fastlm = lambda: cross_entropy(logits, target)  # noqa: E731
    losses: dict[str, Loss] = {
        "fastlm": fastlm,
        "fastlm-block-8192": patched(fastlm, MAX_BLOCK_V=8192),
        "fastlm-block-16384": patched(fastlm, MAX_BLOCK_V=16384),
        "torch": lambda: F.cross_entropy(logits, target),
    }
    losses |= peer_logit_losses(logits, target)
    return measure(f"CE on logits N={rows} V={vocab} {str(dtype).removeprefix('torch.')}", [logits], losses, repeat)


def accuracy_rows(cases: list[tuple[int, int, int]], dtype: torch.dtype, device: str) -> list[Row]:
    """Relative error ||ours - exact|| / ||exact|| of loss, d hidden and d weight against float64 torch on the same
    (rounded) inputs, for every provider: what each one's speed costs in accuracy."""
    rows = []
    for n, hidden_size, vocab in cases:
        generator = torch.Generator(device).manual_seed(1)
        hidden = torch.randn(n, hidden_size, device=device, generator=generator).to(dtype)
        weight = (torch.randn(vocab, hidden_size, device=device, generator=generator) * 2 / hidden_size**0.5)
        weight = weight.to(dtype)
        target = torch.randint(0, vocab, (n,), device=device, generator=generator)
        target[::7] = -100
        inputs = [hidden.requires_grad_(), weight.requires_grad_()]
        exact_inputs = [t.detach().double().requires_grad_() for t in inputs]
        exact_loss = F.cross_entropy(exact_inputs[0] @ exact_inputs[1].T, target)
        exact = [exact_loss.detach(), *torch.autograd.grad(exact_loss, exact_inputs)]
        del exact_loss
        losses = linear_losses(hidden, weight, target)
        case = f"N={n} Hd={hidden_size} V={vocab} {str(dtype).removeprefix('torch.')}"
        errors = [Row(case=f"{what} {case}", unit="rel. error", higher_is_better=False)
                  for what in ("loss", "d hidden", "d weight")]
        for provider, loss_fn in losses.items():
            try:
                loss = loss_fn()
                results = [loss.detach(), *torch.autograd.grad(loss, inputs)]
            except Exception as error:  # as in measure()
                print(f"{case}: {provider} failed: {type(error).__name__}: {error}", file=sys.stderr)
                continue
            for row, mine, reference in zip(errors, results, exact):
                error = (mine.double() - reference).norm() / reference.norm()
                row.results.append(Measurement(provider, error.item()))
        rows += errors
    return rows


def main() -> None:
    args = base_parser(__doc__.splitlines()[0]).parse_args()
    if torch.cuda.is_available():
        repeat = 3 if args.quick else 10
        sizes = [(768, 32000)] if args.quick else [(768, 32000), (2048, 128256)]
        rows = [linear_row(16384, hd, v, dtype, "cuda", repeat) for hd, v in sizes for dtype in (torch.bfloat16,)]
        rows += [logits_row(16384, v, torch.bfloat16, "cuda", repeat) for _, v in sizes]
        accuracy = accuracy_rows([(4096, 768, 32000), (4096, 1024, 128256)], torch.bfloat16, "cuda")
        notes = TORCH_PEERS_NOTE
    else:
        # The Triton kernels need a GPU (off it, only the slow interpreter); compare the plain-torch paths.
        repeat = 2 if args.quick else 5
        n = 1024 if args.quick else 4096
        rows = [linear_row(n, 256, 32000, torch.float32, "cpu", repeat),
                logits_row(n, 32000, torch.float32, "cpu", repeat)]
        accuracy = accuracy_rows([(512, 64, 5003)], torch.float32, "cpu")
        notes = ("No GPU: GPU speed was not measured. CPU rows compare fastlm's plain-torch reference path (chunked, "
                 f"fp32) with torch; CPU memory is sampled process RSS. {TORCH_PEERS_NOTE}")
    report("fastlm cross-entropy vs peers (forward + backward)", rows, json_path=args.json, notes=notes)
    json_path = args.json and args.json.removesuffix(".json") + "_accuracy.json"
    report("Accuracy against float64 torch (1/7 of targets ignored)", accuracy, json_path=json_path)


if __name__ == "__main__":
    main()
