"""cross_entropy and linear_cross_entropy, both impls, against F.cross_entropy in float64."""

import importlib
from unittest import mock

import pytest
import torch
import torch.nn.functional as F
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from fastlm.kernels.cross_entropy import cross_entropy, linear_cross_entropy

# The module itself, for its private launchers and size constants (fastlm.kernels.cross_entropy is the function).
module = importlib.import_module("fastlm.kernels.cross_entropy")

IMPLS = ["torch", "triton"]
# The property tests run where the kernels run: the GPU when there is one, else the CPU (Triton's interpreter).
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# Relative tolerance per input dtype: fp32 arithmetic inside, outputs (loss, gradients) rounded to the input dtype.
TOLERANCE = {torch.float32: 1e-4, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
# Wide values of V are few and get small N: the interpreter walks every element.
VOCABS = st.sampled_from([1, 3, 17, 1000, 1000, 32003])


def reference_loss(logits64, target, *, ignore_index, label_smoothing, z_loss, reduction):
    """F.cross_entropy in float64 plus z_loss * logsumexp**2 per non-ignored row; all ignored -> 0, as fastlm."""
    valid = target != ignore_index
    rows = F.cross_entropy(
        logits64, target.long(), ignore_index=ignore_index, label_smoothing=label_smoothing, reduction="none"
    )
    rows = rows + torch.where(valid, z_loss * torch.logsumexp(logits64, dim=-1) ** 2, 0.0)
    return reduce_rows(rows, target, reduction, ignore_index)


def reduce_rows(rows, target, reduction, ignore_index=-100):
    if reduction == "none":
        return rows
    total = rows.sum()
    return total / (target != ignore_index).sum().clamp_min(1) if reduction == "mean" else total


def loss_magnitude(logits64, z_loss, reduction):
    """The size of the terms behind each loss: logsumexp minus logits (plus z-loss) cancel down to a small loss."""
    largest = logits64.detach().abs().amax(dim=-1)
    rows = largest * (1.0 + 2.0 * z_loss * largest)
    return {"none": rows, "mean": rows.mean(), "sum": rows.sum()}[reduction]


def gradient_term_magnitude(logits64, target, row_weight, z_loss, label_smoothing):
    """The sum of the absolute terms of each d loss / d logit, softmax * (1 + 2 z lse) - eps / V - (1 - eps) at
    the target: they cancel where softmax is near eps / V or near 1 at the target (exactly when V = 1), leaving a
    gradient far smaller than its terms, and only as exact as they are."""
    logits64 = logits64.detach()
    num_classes = logits64.shape[-1]
    lse = torch.logsumexp(logits64, dim=-1, keepdim=True)
    terms = torch.exp(logits64 - lse) * (1.0 + 2.0 * z_loss * lse.abs()) + label_smoothing / num_classes
    valid = (target != -100).nonzero().squeeze(1)
    terms[valid, target[valid]] += 1.0 - label_smoothing
    return terms * row_weight.abs()[:, None]


def assert_close(actual, expected, tol, what):
    actual = actual.double()
    scale = max(expected.abs().max().item(), 1e-3) if expected.numel() else 1.0
    torch.testing.assert_close(actual, expected, rtol=tol, atol=tol * scale, msg=lambda m: f"{what}: {m}")


def assert_within(actual, expected, magnitude, tol, what, magnitude_tol=None, absolute=0.0):
    """|actual - expected| <= tol * |expected| + magnitude_tol * magnitude + absolute elementwise (magnitude_tol
    defaults to tol), where `magnitude` is the size of the terms behind each expected value: a sum over V or N
    terms that cancel, or a difference of logits, is only as exact as its largest terms. Below fp32's smallest
    normal number the arithmetic loses precision (GPUs flush to zero), and fp16's subnormals are spaced by
    tiny * eps: absolute errors that small (one spacing, plus the rounding before it) always pass."""
    error = (actual.double() - expected).abs()
    magnitude_tol = tol if magnitude_tol is None else magnitude_tol
    info = torch.finfo(actual.dtype)
    floor = max(2 * info.tiny * info.eps, torch.finfo(torch.float32).tiny)
    allowed = tol * expected.abs() + magnitude_tol * magnitude + floor + absolute
    worst = (error / allowed).max().item() if error.numel() else 0.0
    at = (error / allowed).argmax()
    assert worst <= 1.0, (
        f"{what}: error {error.flatten()[at].item():.3g} at flat index {at.item()} (expected "
        f"{expected.flatten()[at].item():.3g}) is {worst:.3g} times the allowed"
    )


def draw_target(draw, rows, vocab, ignore_index=-100):
    """Class indices with no, some (each row a coin flip) or all rows set to ignore_index."""
    target = torch.tensor(draw(st.lists(st.integers(0, vocab - 1), min_size=rows, max_size=rows)), dtype=torch.long)
    ignoring = draw(st.sampled_from(["none", "some", "all"]))
    ignored = torch.tensor(draw(st.lists(st.booleans(), min_size=rows, max_size=rows)))
    ignored = {"none": torch.zeros_like(ignored), "some": ignored, "all": torch.ones_like(ignored)}[ignoring]
    return torch.where(ignored, ignore_index, target)


@st.composite
def cross_entropy_cases(draw):
    vocab = draw(VOCABS)
    rows = draw(st.integers(1, 2 if vocab > 5000 else 12))
    dtype = draw(st.sampled_from(DTYPES))
    logit_scale = draw(st.sampled_from([1.0, 30.0, 1e4]))
    z_loss = draw(st.sampled_from([0.0, 1e-4, 1e-2]))
    # fp16 tops out at 65504: a z-loss of lse**2 ~ 1e8 would overflow the fp16 loss (in torch as well).
    assume(not (dtype == torch.float16 and logit_scale == 1e4 and z_loss > 0))
    return dict(
        vocab=vocab, rows=rows, dtype=dtype, logit_scale=logit_scale, z_loss=z_loss,
        seed=draw(st.integers(0, 2**16)),
        target=draw_target(draw, rows, vocab),
        label_smoothing=draw(st.sampled_from([0.0, 0.1, 1.0])),
        reduction=draw(st.sampled_from(["mean", "sum", "none"])),
        three_dims=draw(st.booleans()),
    )


@pytest.mark.parametrize("impl", IMPLS)
@settings(max_examples=30)
@given(case=cross_entropy_cases())
def test_cross_entropy_matches_torch_float64(impl, case):
    generator = torch.Generator().manual_seed(case["seed"])
    logits = torch.randn(case["rows"], case["vocab"], generator=generator) * case["logit_scale"]
    logits = logits.clamp(-1e4, 1e4).to(case["dtype"])  # the supported range, inside fp16's
    target = case["target"]
    options = dict(label_smoothing=case["label_smoothing"], z_loss=case["z_loss"], ignore_index=-100)
    shape = (1, case["rows"]) if case["three_dims"] else (case["rows"],)
    ours_in = logits.reshape(*shape, -1).to(DEVICE, copy=True).requires_grad_()
    # Small blocks so that V = 1000 and 32003 cross several blocks, the last one partial.
    with mock.patch.object(module, "MAX_BLOCK_V", 512):
        loss = cross_entropy(ours_in, target.reshape(shape).to(DEVICE), reduction=case["reduction"], impl=impl,
                             **options)
    reference_in = logits.double().requires_grad_()
    rows64 = reference_loss(reference_in, target, reduction="none", **options)
    rows64.retain_grad()
    expected = reduce_rows(rows64, target, case["reduction"])
    # The exp of fp32 logsumexp differences: relative error grows with the logits' size.
    tol = TOLERANCE[case["dtype"]] + 2e-7 * case["logit_scale"]

    assert loss.dtype == case["dtype"]
    assert loss.shape == (shape if case["reduction"] == "none" else ())
    magnitude = loss_magnitude(reference_in, case["z_loss"], case["reduction"])
    assert_within(loss.reshape(expected.shape).cpu(), expected.detach(), magnitude, tol, "loss", magnitude_tol=1e-6)
    upstream = torch.rand(expected.shape, dtype=torch.float64, generator=generator) + 0.5
    (expected * upstream).sum().backward()
    (loss * upstream.reshape(loss.shape).to(DEVICE, loss.dtype)).sum().backward()
    magnitude = gradient_term_magnitude(reference_in, target, rows64.grad, case["z_loss"], case["label_smoothing"])
    assert_within(ours_in.grad.reshape(logits.shape).cpu(), reference_in.grad, magnitude, tol, "d logits")


@st.composite
def linear_cases(draw):
    vocab = draw(VOCABS)
    rows = draw(st.integers(1, 3 if vocab > 5000 else 40))
    hidden_size = draw(st.sampled_from([1, 16, 24, 64] if vocab > 5000 else [1, 5, 16, 24, 64]))
    return dict(
        vocab=vocab, rows=rows, hidden_size=hidden_size,
        dtype=draw(st.sampled_from(DTYPES)),
        with_bias=draw(st.booleans()),
        seed=draw(st.integers(0, 2**16)),
        target=draw_target(draw, rows, vocab),
        label_smoothing=draw(st.sampled_from([0.0, 0.1])),
        z_loss=draw(st.sampled_from([0.0, 1e-3])),
        reduction=draw(st.sampled_from(["mean", "sum", "none"])),
        weight_grad_by_vocab=draw(st.booleans()),
    )


@pytest.mark.parametrize("impl", IMPLS)
@settings(max_examples=30)
@given(case=linear_cases())
def test_linear_cross_entropy_matches_torch_float64(impl, case):
    generator = torch.Generator().manual_seed(case["seed"])
    dtype = case["dtype"]
    hidden = torch.randn(case["rows"], case["hidden_size"], generator=generator).to(dtype)
    weight = (torch.randn(case["vocab"], case["hidden_size"], generator=generator) * 2).to(dtype)
    bias = torch.randn(case["vocab"], generator=generator).to(dtype) if case["with_bias"] else None
    target = case["target"]
    options = dict(label_smoothing=case["label_smoothing"], z_loss=case["z_loss"], ignore_index=-100)
    ours = [t.to(DEVICE, copy=True).requires_grad_() if t is not None else None for t in (hidden, weight, bias)]
    # A budget of 16 rows per chunk: N up to 40 walks up to three row chunks, the last one partial, and vocabulary
    # chunks of 16 * V / N columns (at least 16); both ways to d_weight. The torch path takes whole-row chunks 5
    # rows at a time, so its blocks split the chunks too.
    with mock.patch.object(module, "_weight_grad_by_vocab", lambda *_: case["weight_grad_by_vocab"]), \
            mock.patch.object(module, "CPU_BLOCK_BYTES", 5 * 4 * case["vocab"]):
        loss, correct = linear_cross_entropy(
            ours[0], ours[1], target.to(DEVICE), bias=ours[2], reduction=case["reduction"], return_accuracy=True,
            max_chunk_bytes=16 * dtype.itemsize * case["vocab"], impl=impl, **options,
        )
    reference = [t.double().requires_grad_() if t is not None else None for t in (hidden, weight, bias)]
    logits64 = reference[0] @ reference[1].T + (reference[2] if reference[2] is not None else 0.0)
    # Half inputs give half logits, as torch's linear does: the function computed is the loss of the rounded
    # logits, whose gradient flows back as if unrounded (straight through).
    if dtype != torch.float32:
        logits64 = logits64 + (logits64.to(dtype).double() - logits64).detach()
    logits64.retain_grad()
    rows64 = reference_loss(logits64, target, reduction="none", **options)
    rows64.retain_grad()
    expected = reduce_rows(rows64, target, case["reduction"])
    tol = TOLERANCE[dtype]

    assert loss.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    magnitude = loss_magnitude(logits64, case["z_loss"], case["reduction"])
    assert_within(loss.cpu(), expected.detach(), magnitude, tol, "loss", magnitude_tol=1e-6)
    upstream = torch.rand(expected.shape, dtype=torch.float64, generator=generator) + 0.5
    (expected * upstream).sum().backward()
    (loss * upstream.to(DEVICE, loss.dtype)).sum().backward()
    grad_logits = gradient_term_magnitude(logits64, target, rows64.grad, case["z_loss"], case["label_smoothing"])
    magnitudes = (grad_logits @ reference[1].detach().abs(), grad_logits.T @ reference[0].detach().abs(),
                  grad_logits.sum(0))
    # The logits' gradient loses its entries below fp32's smallest normal number (GPUs flush them to zero), and that
    # of half inputs is half too (as torch's): rounded to fp16's subnormal spacing. Each is an absolute error that
    # the product after it sums over V or N. A half GEMM may also flush each product below that number (AVX-512
    # BF16's dot products do): one more such error per term of those sums.
    tiny = torch.finfo(torch.float32).tiny
    spacing, flushed = tiny, 0.0
    if dtype != torch.float32:
        spacing, flushed = max(tiny, torch.finfo(dtype).tiny * torch.finfo(dtype).eps), tiny
    spacing_sums = (spacing * reference[1].detach().abs().sum(0) + flushed * case["vocab"],
                    spacing * reference[0].detach().abs().sum(0) + flushed * case["rows"], spacing * case["rows"])
    for name, mine, theirs, magnitude, absolute in zip(
        ("d hidden", "d weight", "d bias"), ours, reference, magnitudes, spacing_sums
    ):
        if mine is not None:
            assert mine.grad.dtype == dtype
            assert_within(mine.grad.cpu(), theirs.grad, magnitude, tol, name, absolute=absolute)

    # Accuracy: rows whose top two logits are nearly tied may rank differently in fp32 and float64.
    valid = target != -100
    top2 = logits64.detach().topk(min(2, case["vocab"]), dim=-1).values
    near_tie = (top2[:, 0] - top2[:, -1] < 1e-3) & valid if case["vocab"] > 1 else torch.zeros_like(valid)
    expected_correct = ((logits64.argmax(-1) == target) & valid).sum()
    assert correct.dtype == torch.int64 and correct.dim() == 0 and correct.device.type == DEVICE
    assert abs(int(correct) - int(expected_correct)) <= int(near_tie.sum())


@pytest.mark.parametrize("impl", IMPLS)
def test_all_ignored_gives_zero_loss_and_zero_gradient(impl):
    logits = torch.randn(4, 7, requires_grad=True)
    target = torch.full((4,), -100)
    loss = cross_entropy(logits, target, impl=impl, z_loss=1e-2, label_smoothing=0.1)
    loss.backward()
    assert loss.item() == 0.0 and torch.count_nonzero(logits.grad) == 0
    hidden, weight = torch.randn(4, 8, requires_grad=True), torch.randn(7, 8, requires_grad=True)
    loss, correct = linear_cross_entropy(hidden, weight, target, impl=impl, return_accuracy=True)
    loss.backward()
    assert loss.item() == 0.0 and correct.item() == 0
    assert torch.count_nonzero(hidden.grad) == 0 and torch.count_nonzero(weight.grad) == 0


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_extreme_logits_stay_finite(impl, dtype):
    # +-1e4 in every position, the target both on the maximum and far below it.
    logits = torch.tensor([[1e4, -1e4, 0.0, 1e4], [-1e4, -1e4, -1e4, 1e4]], dtype=dtype, requires_grad=True)
    target = torch.tensor([0, 0])
    loss = cross_entropy(logits, target, reduction="none", impl=impl)
    loss.sum().backward()
    expected = reference_loss(logits.detach().double(), target, ignore_index=-100, label_smoothing=0.0, z_loss=0.0,
                              reduction="none")
    assert torch.isfinite(loss).all() and torch.isfinite(logits.grad).all()
    assert_close(loss, expected, TOLERANCE[dtype], "loss")


@pytest.mark.parametrize("impl", IMPLS)
def test_out_of_range_target_is_a_clear_error(impl):
    logits, hidden, weight = torch.randn(3, 5), torch.randn(3, 4), torch.randn(5, 4)
    for bad in (5, -1):
        target = torch.tensor([0, bad, -100])
        with pytest.raises(ValueError, match=f"target contains {bad}: expected class indices in \\[0, 5\\)"):
            cross_entropy(logits, target, impl=impl)
        with pytest.raises(ValueError, match=f"target contains {bad}"):
            linear_cross_entropy(hidden, weight, target, impl=impl)


@pytest.mark.parametrize("triton_path", [False, True])
def test_unchecked_out_of_range_target_poisons_its_row_with_nan(triton_path):
    # What CUDA targets get instead of the eager check (which would need a host sync): NaN, never a wrong number.
    logits = torch.randn(3, 5)
    grad = torch.zeros(3, 5)
    loss, _, _ = module._cross_entropy_rows(
        logits, torch.tensor([1, 7, -100]), grad_out=grad, grad_scale=torch.ones(1), ignore_index=-100,
        label_smoothing=0.0, z_loss=0.0, find_argmax=True, triton_path=triton_path,
    )
    assert torch.isnan(loss[1]) and torch.isnan(grad[1]).all()
    assert torch.isfinite(loss[0]) and loss[2] == 0 and torch.isfinite(grad[[0, 2]]).all()


@pytest.mark.parametrize("triton_path", [False, True])
def test_every_gradient_element_is_written_in_both_modes(triton_path):
    # NaN-poisoned output buffers must come back fully overwritten, partial last block included (of a row for the
    # kernel, of rows for the torch path), by the launch that computes loss and gradient together
    # (linear_cross_entropy's) and by the gradient-only launch from a stored logsumexp (cross_entropy's backward),
    # which must agree.
    logits = torch.randn(5, 1003)
    target = torch.tensor([0, 1002, -100, 500, 3])
    options = dict(ignore_index=-100, label_smoothing=0.1, z_loss=1e-3, triton_path=triton_path)
    together, alone = torch.full_like(logits, float("nan")), torch.full_like(logits, float("nan"))
    with mock.patch.object(module, "MAX_BLOCK_V", 256), mock.patch.object(module, "CPU_BLOCK_BYTES", 2 * 4 * 1003):
        loss, lse, correct = module._cross_entropy_rows(
            logits, target, grad_out=together, grad_scale=torch.full((5,), 0.5), find_argmax=True, **options
        )
        module._cross_entropy_rows(logits, target, lse=lse, grad_out=alone, grad_scale=torch.full((5,), 0.5),
                                   **options)
    assert torch.isfinite(together).all() and torch.isfinite(loss).all()
    assert torch.count_nonzero(together[2]) == 0 and not correct[2]
    torch.testing.assert_close(alone, together)


@pytest.mark.parametrize("triton_path", [False, True])
def test_accuracy_counts_the_first_maximum_as_torch_argmax(triton_path):
    # The same maximum in three blocks of 16: only the first counts as the prediction.
    logits = torch.zeros(3, 40)
    logits[:, [2, 20, 35]] = 3.0
    with mock.patch.object(module, "MAX_BLOCK_V", 16):
        _, _, correct = module._cross_entropy_rows(
            logits, torch.tensor([2, 20, 35]), grad_out=None, grad_scale=None, ignore_index=-100,
            label_smoothing=0.0, z_loss=0.0, find_argmax=True, triton_path=triton_path,
        )
    assert correct.tolist() == [True, False, False]


@pytest.mark.parametrize("impl", IMPLS)
def test_tied_embedding_weight_gets_both_gradients(impl):
    torch.manual_seed(0)
    tokens, target = torch.randint(0, 11, (2, 6)), torch.randint(0, 11, (2, 6))
    embedding = torch.randn(11, 8, requires_grad=True)
    hidden = torch.tanh(F.embedding(tokens, embedding))  # [B, T, Hd]
    linear_cross_entropy(hidden, embedding, target, impl=impl).backward()
    expected_weight = embedding.detach().double().requires_grad_()
    expected_hidden = torch.tanh(F.embedding(tokens, expected_weight))
    F.cross_entropy((expected_hidden @ expected_weight.T).reshape(-1, 11), target.reshape(-1)).backward()
    assert_close(embedding.grad, expected_weight.grad, 1e-5, "tied weight")


def test_linear_cross_entropy_follows_autocast_like_a_linear_layer():
    # fp32 master weights, bf16 GEMMs under autocast; the gradients come back in fp32 through the casts.
    hidden, weight = torch.randn(6, 16, requires_grad=True), torch.randn(30, 16, requires_grad=True)
    target = torch.tensor([0, 29, 3, -100, 7, 7])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = linear_cross_entropy(hidden, weight, target, impl="torch")
    loss.backward()
    reference = [t.detach().bfloat16().double().requires_grad_() for t in (hidden, weight)]
    expected = F.cross_entropy(reference[0] @ reference[1].T, target)
    expected.backward()
    assert loss.dtype == torch.float32 and hidden.grad.dtype == weight.grad.dtype == torch.float32
    assert_close(loss, expected, TOLERANCE[torch.bfloat16], "loss")
    assert_close(weight.grad, reference[1].grad, TOLERANCE[torch.bfloat16], "d weight")


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_backward_twice_through_a_retained_graph_gives_the_same_gradient_or_a_clear_error(impl, reduction):
    # cross_entropy scales the gradient out of place, as does linear_cross_entropy with "none". With "mean" or
    # "sum" linear_cross_entropy scales the gradients computed in the forward in place, so a second backward must
    # fail loudly rather than see them rescaled by the first.
    logits = torch.randn(4, 9, requires_grad=True)
    hidden, weight = torch.randn(4, 3, requires_grad=True), torch.randn(9, 3, requires_grad=True)
    target = torch.tensor([1, -100, 8, 0])
    cases = [
        (cross_entropy(logits, target, reduction=reduction, impl=impl), (logits,)),
        (linear_cross_entropy(hidden, weight, target, reduction=reduction, impl=impl), (hidden, weight)),
    ]
    for index, (loss, inputs) in enumerate(cases):
        upstream = torch.full(loss.shape, 3.0)
        first = torch.autograd.grad(loss, inputs, upstream, retain_graph=True)
        if index == 1 and reduction == "mean":
            with pytest.raises(RuntimeError, match="to backward twice through a retained graph use reduction='none'"):
                torch.autograd.grad(loss, inputs, upstream)
            expected = torch.autograd.grad(F.cross_entropy(hidden @ weight.T, target), inputs)
            torch.testing.assert_close(first, tuple(3.0 * grad for grad in expected))
        else:
            torch.testing.assert_close(first, torch.autograd.grad(loss, inputs, upstream))


def test_int32_targets_no_grad_calls_and_batch_shapes():
    logits = torch.randn(4, 9)
    target = torch.tensor([1, 2, 8, 0], dtype=torch.int32)
    expected = F.cross_entropy(logits, target.long())
    torch.testing.assert_close(cross_entropy(logits, target, impl="triton"), expected)
    with torch.no_grad():
        hidden, weight = torch.randn(4, 3, requires_grad=True), torch.randn(9, 3, requires_grad=True)
        loss = linear_cross_entropy(hidden, weight, target, impl="triton")
    assert not loss.requires_grad
    torch.testing.assert_close(loss, F.cross_entropy(hidden @ weight.T, target.long()))
    rows = linear_cross_entropy(hidden.reshape(2, 2, 3), weight, target.reshape(2, 2), reduction="none")
    torch.testing.assert_close(rows, F.cross_entropy(hidden @ weight.T, target.long(), reduction="none").reshape(2, 2))


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: cross_entropy(torch.randn(3, 4), torch.zeros(3, dtype=torch.long), reduction="avg"),
         "reduction='avg'"),
        (lambda: cross_entropy(torch.randn(3, 4), torch.zeros(3, dtype=torch.long), impl="cuda"), "impl='cuda'"),
        (lambda: cross_entropy(torch.randn(3, 4), torch.zeros(3, dtype=torch.long), label_smoothing=1.5),
         "label_smoothing=1.5"),
        (lambda: cross_entropy(torch.randn(3, 4), torch.zeros(3, dtype=torch.long), z_loss=-1.0), "z_loss=-1.0"),
        (lambda: cross_entropy(torch.randn(4), torch.zeros(1, dtype=torch.long)), "logits has shape \\(4,\\)"),
        (lambda: cross_entropy(torch.randn(3, 4), torch.zeros(2, dtype=torch.long)), "target has shape \\(2,\\)"),
        (lambda: cross_entropy(torch.randn(3, 4), torch.zeros(3)), "target has dtype torch.float32"),
        (lambda: cross_entropy(torch.randn(2, 3, 4), torch.zeros(6, dtype=torch.long)),
         "target has shape \\(6,\\): expected \\(2, 3\\)"),
        (lambda: cross_entropy(torch.randn(2, 3, 4), torch.zeros(3, 2, dtype=torch.long)),
         "target has shape \\(3, 2\\): expected \\(2, 3\\)"),
        (lambda: cross_entropy(torch.randint(0, 9, (3, 4)), torch.zeros(3, dtype=torch.long)),
         "logits.dtype=torch.int64"),
        (lambda: cross_entropy([[0.0, 1.0]], torch.zeros(1, dtype=torch.long)), "logits of type list"),
        (lambda: linear_cross_entropy(torch.randn(2, 3, 4), torch.randn(5, 4), torch.zeros(6, dtype=torch.long)),
         "target has shape \\(6,\\): expected \\(2, 3\\)"),
        (lambda: linear_cross_entropy(torch.ones(3, 4, dtype=torch.long), torch.ones(5, 4, dtype=torch.long),
                                      torch.zeros(3, dtype=torch.long)), "hidden.dtype=torch.int64"),
        (lambda: linear_cross_entropy(torch.randn(3, 4), torch.randn(5, 6), torch.zeros(3, dtype=torch.long)),
         "weight has shape \\(5, 6\\)"),
        (lambda: linear_cross_entropy(torch.randn(3, 4), torch.randn(5, 4).double(), torch.zeros(3, dtype=torch.long)),
         "weight.dtype=torch.float64"),
        (lambda: linear_cross_entropy(torch.randn(3, 4), torch.randn(5, 4), torch.zeros(3, dtype=torch.long),
                                      bias=torch.randn(4)), "bias has shape \\(4,\\)"),
        (lambda: linear_cross_entropy(torch.randn(3, 4), torch.randn(5, 4), torch.zeros(3, dtype=torch.long),
                                      max_chunk_bytes=0), "max_chunk_bytes=0: expected None or a positive int"),
    ],
)
def test_invalid_arguments_are_named(call, message):
    with pytest.raises((ValueError, TypeError), match=message):
        call()


def test_compiles_as_one_graph_without_host_sync():
    # fullgraph=True fails on any graph break, such as a .item() or a data-dependent branch on the host.
    hidden, weight = torch.randn(6, 8, requires_grad=True), torch.randn(11, 8, requires_grad=True)
    target = torch.tensor([1, -100, 10, 0, 3, 3])

    def step(hidden, weight, target):
        loss, correct = linear_cross_entropy(hidden, weight, target, z_loss=1e-3, return_accuracy=True, impl="torch")
        return loss + cross_entropy(hidden @ weight.T, target, label_smoothing=0.1, impl="torch"), correct

    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    loss, correct = compiled(hidden, weight, target)
    grads = torch.autograd.grad(loss, (hidden, weight))
    expected_loss, expected_correct = step(hidden, weight, target)
    torch.testing.assert_close((loss, correct), (expected_loss, expected_correct))
    torch.testing.assert_close(grads, torch.autograd.grad(expected_loss, (hidden, weight)))


def test_custom_ops_pass_opcheck():
    # Schema, fake (meta) implementations and autograd registration, as torch.compile relies on them.
    logits = torch.randn(3, 5, requires_grad=True)
    target = torch.tensor([1, -100, 4])
    hidden, weight, bias = torch.randn(3, 4, requires_grad=True), torch.randn(5, 4, requires_grad=True), torch.randn(5)
    for reduction in ("mean", "none"):
        torch.library.opcheck(module._cross_entropy_op, (logits, target, -100, 0.1, 1e-3, reduction, False))
        torch.library.opcheck(
            module._linear_cross_entropy_op,
            (hidden, weight, bias, target, -100, 0.1, 1e-3, reduction, True, False, 64),
        )


# ---- masked vocabularies: -inf logits -------------------------------------------------------------------------


def draw_masked_classes(draw, vocab):
    """Which classes a row may not predict: none, a random subset, the first ones (whole leading blocks of the
    row kernel), or all of them but one."""
    kind = draw(st.sampled_from(["none", "random", "prefix", "all but one"]))
    if kind == "random":
        return torch.tensor(draw(st.lists(st.booleans(), min_size=vocab, max_size=vocab)))
    masked = torch.zeros(vocab, dtype=torch.bool)
    if kind == "prefix":
        masked[: draw(st.integers(0, vocab - 1))] = True
    elif kind == "all but one":
        masked[:] = True
        masked[draw(st.integers(0, vocab - 1))] = False
    return masked


def assert_like_torch(actual, expected, what):
    """Equal to the float64 reference to fp32 accuracy, with inf and NaN exactly where it has them."""
    finite = expected[expected.isfinite()]
    scale = max(finite.abs().max().item(), 1.0) if finite.numel() else 1.0
    torch.testing.assert_close(actual.double(), expected, rtol=1e-4, atol=1e-5 * scale, equal_nan=True,
                               msg=lambda m: f"{what}: {m}")


@st.composite
def masked_cases(draw):
    vocab = draw(st.sampled_from([2, 17, 1000]))
    rows = draw(st.integers(1, 6))
    return dict(
        vocab=vocab, rows=rows, seed=draw(st.integers(0, 2**16)),
        masked=torch.stack([draw_masked_classes(draw, vocab) for _ in range(rows)]),
        # A row of -inf logits only: F.cross_entropy's loss and gradient are NaN there (nothing can be predicted).
        all_masked_row=draw(st.sampled_from([None, *range(rows)])),
        target=draw_target(draw, rows, vocab),
        label_smoothing=draw(st.sampled_from([0.0, 0.1, 1.0])),
        reduction=draw(st.sampled_from(["mean", "sum", "none"])),
    )


@pytest.mark.parametrize("impl", IMPLS)
@settings(max_examples=25)
@given(case=masked_cases())
def test_cross_entropy_with_masked_classes_matches_torch(impl, case):
    # F.cross_entropy's own behaviour is the contract: a finite loss where the target is allowed and no smoothing
    # reads a masked class, inf where it does (smoothing averages over every class), NaN for a row with nothing
    # allowed (its gradient too, ignored or not) and, with smoothing 1, for a masked target (0 * inf).
    generator = torch.Generator().manual_seed(case["seed"])
    masked = case["masked"].clone()
    if case["all_masked_row"] is not None:
        masked[case["all_masked_row"]] = True
    logits = (torch.randn(case["rows"], case["vocab"], generator=generator) * 3).masked_fill(masked, -float("inf"))
    target, options = case["target"], dict(label_smoothing=case["label_smoothing"], ignore_index=-100)
    ours_in = logits.to(DEVICE, copy=True).requires_grad_()
    with mock.patch.object(module, "MAX_BLOCK_V", 512):  # V = 1000: a masked prefix fills whole blocks
        loss = cross_entropy(ours_in, target.to(DEVICE), reduction=case["reduction"], impl=impl, **options)
    reference_in = logits.double().requires_grad_()
    expected = reference_loss(reference_in, target, z_loss=0.0, reduction=case["reduction"], **options)
    assert_like_torch(loss.cpu(), expected.detach(), "loss")
    upstream = torch.rand(expected.shape, dtype=torch.float64, generator=generator) + 0.5
    (expected * upstream).sum().backward()
    (loss * upstream.to(DEVICE, loss.dtype)).sum().backward()
    assert_like_torch(ours_in.grad.cpu(), reference_in.grad, "d logits")


@pytest.mark.parametrize("impl", IMPLS)
@settings(max_examples=25)
@given(case=masked_cases(), weight_grad_by_vocab=st.booleans())
def test_linear_cross_entropy_with_a_masking_bias_matches_torch(impl, case, weight_grad_by_vocab):
    # A bias of -inf masks a class for every row (all classes masked is no model: left out).
    generator = torch.Generator().manual_seed(case["seed"])
    masked = case["masked"][0]
    hidden = torch.randn(case["rows"], 16, generator=generator)
    weight = torch.randn(case["vocab"], 16, generator=generator)
    bias = torch.randn(case["vocab"], generator=generator).masked_fill(masked, -float("inf"))
    target, options = case["target"], dict(label_smoothing=case["label_smoothing"], ignore_index=-100)
    ours = [t.to(DEVICE, copy=True).requires_grad_() for t in (hidden, weight, bias)]
    with mock.patch.object(module, "_weight_grad_by_vocab", lambda *_: weight_grad_by_vocab), \
            mock.patch.object(module, "MAX_BLOCK_V", 512):
        loss = linear_cross_entropy(ours[0], ours[1], target.to(DEVICE), bias=ours[2], reduction=case["reduction"],
                                    max_chunk_bytes=16 * 4 * case["vocab"], impl=impl, **options)
    reference = [t.double().requires_grad_() for t in (hidden, weight, bias)]
    expected = reference_loss(F.linear(*reference), target, z_loss=0.0, reduction=case["reduction"], **options)
    assert_like_torch(loss.cpu(), expected.detach(), "loss")
    upstream = torch.rand(expected.shape, dtype=torch.float64, generator=generator) + 0.5
    (expected * upstream).sum().backward()
    (loss * upstream.to(DEVICE, loss.dtype)).sum().backward()
    for name, mine, theirs in zip(("d hidden", "d weight", "d bias"), ours, reference):
        assert_like_torch(mine.grad.cpu(), theirs.grad, name)
