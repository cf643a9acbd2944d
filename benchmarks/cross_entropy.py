"""fastlm's cross-entropy kernels against torch, Liger-Kernel and Cut-Cross-Entropy (those two when importable).

Each provider runs forward + backward (`torch.autograd.grad`) on the same inputs, side by side in one process.
"Extra" memory is the peak allocation of that step beyond its inputs and the gradients it returns, the memory a
fused loss exists to save. Without a GPU this says so and runs a small CPU comparison of the reference paths.

    python benchmarks/cross_entropy.py [--quick] [--json PATH]
"""

import sys
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, without installing

from benchmarks.harness import Measurement, Row, base_parser, peak_memory_mib, report, time_call  # noqa: E402
from fastlm.kernels.cross_entropy import cross_entropy, linear_cross_entropy  # noqa: E402

Loss = Callable[[], torch.Tensor]


def peer_linear_losses(hidden, weight, target) -> dict[str, Loss]:
    """The fused linear + cross-entropy losses of other projects that are installed, by provider name."""
    peers: dict[str, Loss] = {}
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
    """Time and extra memory of forward + backward for every provider, in ms and MiB."""
    input_mib = sum(t.numel() * t.element_size() for t in inputs) / 2**20  # each gradient is as large as its input
    row = Row(case=case, unit="ms", higher_is_better=False)
    for provider, loss in losses.items():
        def step(loss=loss):
            return torch.autograd.grad(loss(), inputs)

        seconds = time_call(step, warmup=2, repeat=repeat)
        _, peak_mib = peak_memory_mib(step)
        row.results.append(Measurement(provider, seconds * 1e3, max(peak_mib - input_mib, 0.0)))
    return row


def linear_row(rows: int, hidden_size: int, vocab: int, dtype: torch.dtype, device: str, repeat: int) -> Row:
    generator = torch.Generator(device).manual_seed(0)
    hidden = torch.randn(rows, hidden_size, device=device, dtype=dtype, generator=generator, requires_grad=True)
    weight = (torch.randn(vocab, hidden_size, device=device, generator=generator) / hidden_size**0.5)
    weight = weight.to(dtype).requires_grad_()
    target = torch.randint(0, vocab, (rows,), device=device, generator=generator)
    torch_name = "torch" if dtype == torch.float32 else f"torch-{str(dtype).removeprefix('torch.')}"
    losses: dict[str, Loss] = {
        "fastlm": lambda: linear_cross_entropy(hidden, weight, target),
        torch_name: lambda: F.cross_entropy(hidden @ weight.T, target),
    }
    if dtype != torch.float32:  # the other common recipe: half GEMM, logits upcast before the loss
        losses["torch-fp32-logits"] = lambda: F.cross_entropy((hidden @ weight.T).float(), target)
    losses |= peer_linear_losses(hidden, weight, target)
    case = f"linear+CE N={rows} Hd={hidden_size} V={vocab} {str(dtype).removeprefix('torch.')}"
    return measure(case, [hidden, weight], losses, repeat)


def logits_row(rows: int, vocab: int, dtype: torch.dtype, device: str, repeat: int) -> Row:
    generator = torch.Generator(device).manual_seed(0)
    logits = (torch.randn(rows, vocab, device=device, generator=generator) * 4).to(dtype).requires_grad_()
    target = torch.randint(0, vocab, (rows,), device=device, generator=generator)
    losses: dict[str, Loss] = {
        "fastlm": lambda: cross_entropy(logits, target),
        "torch": lambda: F.cross_entropy(logits, target),
    }
    losses |= peer_logit_losses(logits, target)
    return measure(f"CE on logits N={rows} V={vocab} {str(dtype).removeprefix('torch.')}", [logits], losses, repeat)


def correctness_notes(device: str) -> str:
    """Largest deviation of fastlm from float64 torch on one small case, loss and gradients."""
    generator = torch.Generator(device).manual_seed(1)
    hidden = torch.randn(512, 64, device=device, generator=generator)
    weight = torch.randn(5003, 64, device=device, generator=generator) / 8
    target = torch.randint(0, 5003, (512,), device=device, generator=generator)
    target[::7] = -100
    ours = [hidden.clone().requires_grad_(), weight.clone().requires_grad_()]
    loss = linear_cross_entropy(*ours, target, label_smoothing=0.1, z_loss=1e-4)
    loss.backward()
    exact = [hidden.double().requires_grad_(), weight.double().requires_grad_()]
    logits = exact[0] @ exact[1].T
    expected = F.cross_entropy(logits, target, label_smoothing=0.1)
    expected = expected + 1e-4 * (torch.logsumexp(logits, -1) ** 2)[target != -100].mean()
    expected.backward()
    errors = [abs(loss.item() - expected.item())] + [(a.grad - b.grad).abs().max().item() for a, b in zip(ours, exact)]
    return ("Correctness (fp32, N=512 Hd=64 V=5003, ignore 1/7, smoothing 0.1, z-loss 1e-4) vs float64 torch: "
            "max |error| loss {:.2e}, d hidden {:.2e}, d weight {:.2e}.".format(*errors))


def main() -> None:
    args = base_parser(__doc__.splitlines()[0]).parse_args()
    if torch.cuda.is_available():
        repeat = 3 if args.quick else 10
        sizes = [(768, 32000)] if args.quick else [(768, 32000), (2048, 128256)]
        rows = [linear_row(16384, hd, v, dtype, "cuda", repeat) for hd, v in sizes for dtype in (torch.bfloat16,)]
        rows += [logits_row(16384, v, torch.bfloat16, "cuda", repeat) for _, v in sizes]
        notes = correctness_notes("cuda")
    else:
        # The Triton kernels need a GPU (off it, only the slow interpreter); compare the plain-torch paths.
        repeat = 2 if args.quick else 5
        n = 1024 if args.quick else 4096
        rows = [linear_row(n, 256, 32000, torch.float32, "cpu", repeat),
                logits_row(n, 32000, torch.float32, "cpu", repeat)]
        notes = ("No GPU: GPU speed was not measured. CPU rows compare fastlm's plain-torch reference path (chunked, "
                 "fp32) with torch; CPU memory is sampled process RSS. " + correctness_notes("cpu"))
    report("fastlm cross-entropy vs peers (forward + backward)", rows, json_path=args.json, notes=notes)


if __name__ == "__main__":
    main()
