"""Fused softmax cross-entropy, and the output layer fused with it (`linear_cross_entropy`).

Per row the loss is `F.cross_entropy`'s, with label smoothing eps as torch defines it, plus PaLM's z-loss:

    loss = (1 - eps) * (lse - x[target]) + eps * (lse - mean(x)) + z_loss * lse**2,   lse = logsumexp(x)

and its gradient:

    dloss/dx = softmax(x) * (1 + 2 * z_loss * lse) - (1 - eps) * onehot(target) - eps / V

Design (why it looks like this):
- One Triton program per row streams it with an online max and sum (no overflow for logits up to +-1e4). For
  `cross_entropy` the forward reads the logits once (loss, logsumexp) and the backward once more, writing the
  gradient already multiplied by grad_output: three passes over [N, V] per training step, no extra [N, V] buffer,
  no host sync (Liger's in-place trick needs `grad_output == 1` checked on the host to be as cheap). For
  `linear_cross_entropy` the same kernel writes loss and gradient in one launch per chunk.
- `linear_cross_entropy` never holds the [N, V] logits, only a chunk of them at a time, in one workspace: rows
  that fit CHUNK_BYTES, or on a GPU MIN_CHUNK_ROWS rows where the vocabulary is so large that fewer would fit
  (small GEMMs are slow); `max_chunk_bytes` caps it instead. Walk 1 goes over row chunks holding whole rows: a
  GEMM gives the chunk's logits (in the input dtype with fp32 accumulation and, on CUDA, the bias added in the
  epilogue, as torch's linear), the row kernel gives loss, logsumexp, argmax hit and the gradient G written over the
  logits in one launch, and one GEMM gives d_hidden = G @ W of those rows, written once. d_weight = G^T @ hidden
  then takes one of two ways, whichever costs less (`_weight_grad_by_vocab`, by the machine balance FLOPS_PER_BYTE):
  * accumulated chunk by chunk in walk 1 (beta = 1 GEMMs): no extra FLOPs, but every chunk re-reads and re-writes
    d_weight and rounds it to its dtype once more (bf16: 21 times at N = 16k, V = 32k), which suits few chunks;
  * or walk 2 over vocabulary chunks holding all rows: the logits once more (one more GEMM), their gradient from
    the stored logsumexp, and d_weight (and d_bias) of those classes written once, rounded once as in unfused
    torch. With many row chunks (large N * V) this costs less than re-reading d_weight per chunk.
  With "mean"/"sum" this happens in the forward (grad_output, a scalar, only rescales the result: in place, since
  a scaled copy would cost another d_weight), so training costs three or four GEMMs; "none" needs per-row
  grad_outputs, so its backward walks again. The same walks in plain torch are the CPU reference path.
  Why not one Triton kernel that keeps the logits in registers (Cut-Cross-Entropy's design): its backward must
  recompute the logits and add d_hidden and d_weight tiles from many programs with atomics, into fp32 accumulators
  of (N + V) * Hd floats (1.1 GiB at N = 16k, Hd = 2048, V = 128k) or into bf16 with a rounding per tile; on an
  H100 CCE itself took 2x as long as this design (docs/PERFORMANCE.md).
- Every target is ignored -> loss 0 and zero gradient, where F.cross_entropy gives NaN for "mean": a NaN in a
  training step is what our users must never see.
- -inf logits (a masked vocabulary, or a bias of -inf) give what F.cross_entropy gives: a finite loss while the
  target and, with label smoothing, every class is allowed; inf where the target or a smoothed class is masked
  (NaN with label_smoothing = 1 and a masked target: 0 * inf); NaN for a row with no allowed class (its gradient
  too, even when ignored). Gradients stay finite wherever torch's are.
- Targets outside [0, V) that are not ignore_index: with CPU targets in eager mode (or FASTLM_DEBUG=1) a ValueError
  is raised; with CUDA targets (or under torch.compile) checking would need a host sync, so the kernel instead
  writes NaN into that row's loss and gradient, which poisons the reduced loss: never a silently wrong number, and
  no sync in the training step.
- No host synchronisation on CUDA (the mean's divisor and the accuracy count stay on the device; only
  FASTLM_DEBUG=1 adds the eager target check). Both functions are torch custom ops (`fastlm::cross_entropy`,
  `fastlm::linear_cross_entropy`, with fake implementations and autograd formulas) for torch.compile.
"""

import torch
import triton
import triton.language as tl

from fastlm.kernels.utils import check_same_device, debug_checks_enabled, next_power_of_2, select_impl

REDUCTIONS = ("mean", "sum", "none")

# One chunk of linear_cross_entropy's logits (and their gradient, written over them) stays under CHUNK_BYTES (with
# the per-row vectors, under 64 MiB extra in all) unless on a GPU that leaves fewer than MIN_CHUNK_ROWS rows: GEMMs
# of fewer rows ran at ~60% of cuBLAS's speed on an H100 (at V = 128k, 192-row chunks took 1.6x as long as 768-row
# ones, docs/PERFORMANCE.md), so at large V speed wins over memory (768 rows x 128k bf16 logits = 192 MiB).
CHUNK_BYTES = 48 * 2**20
MIN_CHUNK_ROWS = 768
# Machine balance, the FLOPs done in the time one byte of memory moves: the exchange rate between recomputing and
# re-reading in `_weight_grad_by_vocab`. An H100 or H200 does 989 dense bf16 TFLOP/s over 3.35-4.8 TB/s; a CPU
# core some 50 fp32 GFLOP/s over ~10 GB/s.
FLOPS_PER_BYTE = {"cuda": 300, "cpu": 5}
# Widest slice of a row one Triton program loads at once, 16 values per thread (8192 with 16 warps): on an H100 it
# streamed 32k-wide rows 12% faster than 4096 with 8 warps, and 128k-wide ones as fast.
MAX_BLOCK_V = 8192
# Rows of logits the CPU path takes at a time (see _rows_torch), in fp32: a block stays in the last-level cache
# through its passes. Smaller blocks mean more, smaller ops: linear + cross-entropy at 1536 x 8000 (AMD EPYC,
# docs/PERFORMANCE.md) took 18-34% longer with 1 MiB blocks, and with bf16 logits 20-40% longer as one 48 MiB block.
CPU_BLOCK_BYTES = 8 * 2**20


# ---------------------------------------------------------------------------------------------------------------
# Argument checks


def _check_options(ignore_index: int, label_smoothing: float, z_loss: float, reduction: str) -> None:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction={reduction!r}: expected one of {REDUCTIONS}")
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"label_smoothing={label_smoothing}: expected a float in [0, 1]")
    if not z_loss >= 0.0:
        raise ValueError(f"z_loss={z_loss}: expected a float >= 0")
    if not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index={ignore_index!r}: expected an int")


def _check_tensors(**named: torch.Tensor | None) -> None:
    """TypeError naming the first argument that is neither a tensor nor None."""
    for name, value in named.items():
        if value is not None and not isinstance(value, torch.Tensor):
            raise TypeError(f"{name} of type {type(value).__name__}: expected a torch.Tensor")


def _check_floating(name: str, tensor: torch.Tensor) -> None:
    # Integer logits would run through integer matmuls and truncating divisions: a silently wrong loss.
    if not tensor.dtype.is_floating_point:
        raise TypeError(f"{name}.dtype={tensor.dtype}: expected a floating-point dtype (fp32, fp16 or bf16)")


def _check_target(target: torch.Tensor, rows_shape: torch.Size, what: str) -> None:
    """target must hold one class index per row, in the rows' own shape: a flat [B*T] or transposed [T, B] target
    for [B, T, V] logits has the right count but would pair rows with the wrong targets."""
    if target.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"target has dtype {target.dtype}: expected torch.int64 or torch.int32 class indices")
    if target.shape != rows_shape:
        raise ValueError(
            f"target has shape {tuple(target.shape)}: expected {tuple(rows_shape)}, one class index per {what}"
        )


def _validate_targets(target: torch.Tensor, num_classes: int, ignore_index: int) -> None:
    """Raise ValueError if a target is outside [0, num_classes) and not ignore_index. The check reads the values on
    the host, so it runs for CPU targets in eager mode, and elsewhere (CUDA, torch.compile) only with FASTLM_DEBUG=1:
    without it such rows get a NaN loss instead (see the module docstring)."""
    if (target.is_cuda or torch.compiler.is_compiling()) and not debug_checks_enabled():
        return
    bad = (target != ignore_index) & ((target < 0) | (target >= num_classes))
    if bool(bad.any()):
        value = int(target[bad][0])
        raise ValueError(
            f"target contains {value}: expected class indices in [0, {num_classes}) or ignore_index={ignore_index}"
        )


def _mean_divisor(target: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """1 / (number of non-ignored rows), as a 1-element fp32 device tensor; 1 when all are ignored (loss 0, not NaN)."""
    valid = (target != ignore_index).sum().clamp_min(1)
    return valid.to(torch.float32).reciprocal().reshape(1)


# ---------------------------------------------------------------------------------------------------------------
# The row kernel, one program per row. Pass 1 (COMPUTE_LOSS): loss, logsumexp and, if asked, whether the first
# argmax is the target. Pass 2 (WRITE_GRAD): the scaled gradient, from pass 1's logsumexp or from a stored one.


@triton.jit
def _cross_entropy_rows_kernel(
    logits_ptr, logits_row_stride,
    target_ptr,
    loss_ptr, lse_ptr, correct_ptr,
    grad_ptr, grad_row_stride,
    grad_scale_ptr, grad_scale_stride,
    row_width, column_offset, num_classes, ignore_index, label_smoothing, z_loss,
    BLOCK_V: tl.constexpr,
    COMPUTE_LOSS: tl.constexpr,
    SMOOTHING: tl.constexpr,
    FIND_ARGMAX: tl.constexpr,
    WRITE_GRAD: tl.constexpr,
):
    # int64 offsets: N * V passes 2**31 at N=16384, V=131072.
    row = tl.program_id(0).to(tl.int64)
    target = tl.load(target_ptr + row).to(tl.int64)
    ignored = target == ignore_index
    out_of_range = (target < 0) | (target >= num_classes)
    row_logits = logits_ptr + row * logits_row_stride
    columns = tl.arange(0, BLOCK_V)

    if COMPUTE_LOSS:
        # Whole rows only (row_width == num_classes, column_offset == 0): the loss needs every logit.
        # Loads upcast to fp32 at once: all arithmetic is fp32 whatever the input dtype (which is also what keeps
        # bf16 correct under the interpreter).
        target_logit = tl.load(row_logits + target, mask=~out_of_range, other=0.0).to(tl.float32)
        # Online max and sum of exponentials; the sum of logits if label smoothing needs it, the first argmax if
        # accuracy does (each is one more reduction per block).
        running_max = -float("inf")
        running_sum = 0.0
        logit_sum = 0.0
        best_value = -float("inf")
        best_index = 0
        for start in range(0, num_classes, BLOCK_V):
            index = start + columns
            in_row = index < num_classes
            x = tl.load(row_logits + index, mask=in_row, other=-float("inf")).to(tl.float32)
            block_max = tl.max(x, axis=0)
            new_max = tl.maximum(running_max, block_max)
            # A masked vocabulary (-inf logits) can leave the maximum at -inf so far: shift by 0 then, as
            # exp(-inf - -inf) would be NaN; exp(-inf) = 0 keeps the sum empty until a finite logit comes.
            shift = tl.where(new_max == -float("inf"), 0.0, new_max)
            running_sum = running_sum * tl.exp(running_max - shift) + tl.sum(tl.exp(x - shift), axis=0)
            running_max = new_max
            if SMOOTHING:
                logit_sum += tl.sum(tl.where(in_row, x, 0.0), axis=0)
            if FIND_ARGMAX:
                block_best = start + tl.argmax(x, axis=0, tie_break_left=True)
                # Strict comparison: the earliest maximum wins, as in torch.argmax.
                best_index = tl.where(block_max > best_value, block_best, best_index)
                best_value = tl.maximum(best_value, block_max)
        lse = running_max + tl.log(running_sum)  # -inf for a row of -inf logits: its loss is NaN, as in torch
        # Differences of lse with logits first: exact when they nearly cancel (a confident, correct row).
        loss = (1.0 - label_smoothing) * (lse - target_logit)
        if SMOOTHING:
            # Only with smoothing: a -inf logit makes this term infinite, and 0 * inf would be NaN.
            loss += label_smoothing * (lse - logit_sum / num_classes)
        loss += z_loss * lse * lse
        loss = tl.where(ignored, 0.0, loss)
        loss = tl.where(out_of_range & ~ignored, float("nan"), loss)
        tl.store(loss_ptr + row, loss)
        tl.store(lse_ptr + row, lse)
        if FIND_ARGMAX:
            tl.store(correct_ptr + row, (best_index == target) & ~ignored)
    else:
        lse = tl.load(lse_ptr + row)

    if WRITE_GRAD:
        # grad_scale: one value for all rows (stride 0; 1/(non-ignored rows) for "mean") or one per row (stride 1).
        scale = tl.load(grad_scale_ptr + row * grad_scale_stride).to(tl.float32)
        scale = tl.where(ignored, 0.0, scale)
        scale = tl.where(out_of_range & ~ignored, float("nan"), scale)
        softmax_scale = 1.0 + 2.0 * z_loss * lse
        uniform = label_smoothing / num_classes
        row_grad = grad_ptr + row * grad_row_stride
        # The buffer may hold a slice of the row: classes [column_offset, column_offset + row_width).
        for start in range(0, row_width, BLOCK_V):
            index = start + columns
            in_row = index < row_width
            x = tl.load(row_logits + index, mask=in_row, other=-float("inf")).to(tl.float32)
            is_target = index + column_offset == target
            grad = tl.exp(x - lse) * softmax_scale - uniform - tl.where(is_target, 1.0 - label_smoothing, 0.0)
            tl.store(row_grad + index, (grad * scale).to(grad_ptr.dtype.element_ty), mask=in_row)


def _rows_triton(logits, target, lse, grad_out, grad_scale, options, find_argmax, column_offset, num_classes):
    ignore_index, label_smoothing, z_loss = options
    rows, row_width = logits.shape
    compute_loss = lse is None
    write_grad = grad_out is not None
    loss = torch.empty(rows, dtype=torch.float32, device=logits.device) if compute_loss else None
    lse = torch.empty(rows, dtype=torch.float32, device=logits.device) if compute_loss else lse
    correct = torch.empty(rows, dtype=torch.bool, device=logits.device) if find_argmax else None
    if rows == 0:
        return loss, lse, correct
    block_v = min(next_power_of_2(row_width, minimum=16), MAX_BLOCK_V)
    _cross_entropy_rows_kernel[(rows,)](
        logits, logits.stride(0),
        target,
        loss if compute_loss else lse, lse, correct if find_argmax else lse,  # unused pointers: any tensor
        grad_out if write_grad else logits, grad_out.stride(0) if write_grad else 0,
        grad_scale if write_grad else lse, int(write_grad and grad_scale.numel() > 1),
        row_width, column_offset, num_classes, ignore_index, label_smoothing, z_loss,
        BLOCK_V=block_v,
        COMPUTE_LOSS=compute_loss,
        SMOOTHING=label_smoothing > 0,
        FIND_ARGMAX=find_argmax,
        WRITE_GRAD=write_grad,
        num_warps=4 if block_v < 2048 else max(8, block_v // 512),
    )
    return loss, lse, correct


def _rows_torch(logits, target, lse, grad_out, grad_scale, options, find_argmax, column_offset, num_classes):
    """The plain-torch reference of the row kernel: same outputs, same NaN rows for out-of-range targets. It is also
    the CPU's training path, so it walks the rows in blocks of CPU_BLOCK_BYTES: each block's few passes then run in
    the core's cache instead of streaming the whole [rows, V] chunk from memory once per pass, and the gradient is
    written in place, with no [rows, V] temporary."""
    rows, width = logits.shape
    compute = torch.float64 if logits.dtype == torch.float64 else torch.float32
    loss = torch.empty(rows, dtype=compute, device=logits.device) if lse is None else None
    correct = torch.empty(rows, dtype=torch.bool, device=logits.device) if lse is None and find_argmax else None
    lse_out = torch.empty(rows, dtype=compute, device=logits.device) if lse is None else lse.to(compute)
    per_row_scale = grad_out is not None and grad_scale.numel() > 1
    step = max(1, CPU_BLOCK_BYTES // (width * torch.finfo(compute).bits // 8))
    for start in range(0, rows, step):
        block = slice(start, min(start + step, rows))
        block_loss, block_lse, block_correct = _rows_torch_block(
            logits[block], target[block], None if lse is None else lse_out[block],
            None if grad_out is None else grad_out[block], grad_scale[block] if per_row_scale else grad_scale,
            options, find_argmax, column_offset, num_classes)
        if lse is None:
            loss[block], lse_out[block] = block_loss, block_lse
            if correct is not None:
                correct[block] = block_correct
    return loss, lse_out, correct


def _rows_torch_block(logits, target, lse, grad_out, grad_scale, options, find_argmax, column_offset, num_classes):
    """_rows_torch on one block of rows. Without `lse` the softmax's exponentials are written into the gradient
    buffer and normalised there: max, exp, sum and scale, four passes, one of them also finding the argmax."""
    ignore_index, label_smoothing, z_loss = options
    compute = torch.float64 if logits.dtype == torch.float64 else torch.float32
    x = logits.to(compute)
    target = target.long()
    ignored = target == ignore_index
    out_of_range = (target < 0) | (target >= num_classes)
    poison = torch.where(out_of_range & ~ignored, float("nan"), 0.0).to(compute)
    # The gradient goes into `grad_out` itself where its dtype allows (it may be the logits: every pass reads an
    # element of x before writing it), else into x when x is already a copy, else into a block-sized buffer.
    grad = None
    if grad_out is not None:
        grad = grad_out if grad_out.dtype == compute else (x if x is not logits else torch.empty_like(x))
    loss = correct = None
    if lse is None:
        safe_target = torch.where(out_of_range, 0, target)
        target_logit = x.gather(1, safe_target[:, None]).squeeze(1)
        mean = x.mean(dim=1) if label_smoothing else None
        if find_argmax:
            row_max, argmax = x.max(dim=1)
            correct = (argmax == target) & ~ignored
        else:
            row_max = x.amax(dim=1)
        if grad is None:
            lse = torch.logsumexp(x, dim=1)
        else:
            # A row of -inf only (no allowed class) gives NaN here, as logsumexp's -inf gives NaN below.
            torch.sub(x, row_max[:, None], out=grad).exp_()
            total = grad.sum(dim=1)
            lse = row_max + total.log()
        loss = (1.0 - label_smoothing) * (lse - target_logit)
        if label_smoothing:
            # Only with smoothing: a -inf logit (a masked class) makes this term infinite, and 0 * inf is NaN.
            loss = loss + label_smoothing * (lse - mean)
        loss = loss + z_loss * lse * lse
        loss = torch.where(ignored, 0.0, loss) + poison
        if grad is None:
            return loss, lse, correct
        normalise = total.reciprocal()
    else:
        lse = lse.to(compute)
        torch.sub(x, lse[:, None], out=grad).exp_()
        normalise = 1.0
    # grad now holds exp(x - lse) (or its unnormalised exp(x - max)); make it
    # (softmax(x) * (1 + 2 z_loss lse) - eps / V) * scale, then add (eps - 1) * scale at the target.
    scale = torch.where(ignored, 0.0, grad_scale.to(compute).expand(len(target))) + poison
    grad.mul_((normalise * scale * (1.0 + 2.0 * z_loss * lse))[:, None])
    if label_smoothing:
        grad.sub_((label_smoothing / num_classes * scale)[:, None])
    local_target = target - column_offset
    in_slice = (local_target >= 0) & (local_target < x.shape[1])
    target_term = torch.where(in_slice, (label_smoothing - 1.0) * scale, 0.0)
    grad.scatter_add_(1, torch.where(in_slice, local_target, 0)[:, None], target_term[:, None])
    if grad is not grad_out:
        grad_out.copy_(grad)
    return loss, lse, correct


def _cross_entropy_rows(
    logits, target, *, ignore_index, label_smoothing, z_loss, triton_path,
    lse=None, grad_out=None, grad_scale=None, find_argmax=False, column_offset=0, num_classes=None,
):
    """The row kernel (or its torch reference) on `logits` [rows, width]. Returns (loss, lse, correct) per row:
    without `lse`, computes loss and lse of whole rows (and, if find_argmax, whether each row's first argmax is its
    target; else None); with `lse` from an earlier call, skips to the gradient (loss None). If `grad_out` is given
    (may be `logits` itself) writes the gradient times `grad_scale` (1 element, shared, or one per row) into it.
    With `lse` given, `logits` may hold the slice [column_offset, column_offset + width) of rows of `num_classes`.
    """
    if num_classes is None:
        num_classes = logits.shape[1]
    if lse is None and (column_offset, num_classes) != (0, logits.shape[1]):
        raise ValueError("the loss needs whole rows: a column slice takes a stored lse")
    rows_fn = _rows_triton if triton_path else _rows_torch
    options = (ignore_index, label_smoothing, z_loss)
    return rows_fn(logits, target, lse, grad_out, grad_scale, options, find_argmax, column_offset, num_classes)


def _reduce(loss_rows: torch.Tensor, target: torch.Tensor, reduction: str, ignore_index: int) -> torch.Tensor:
    if reduction == "none":
        return loss_rows
    total = loss_rows.sum()
    return total * _mean_divisor(target, ignore_index)[0] if reduction == "mean" else total


def _grad_scale(grad_loss: torch.Tensor, target: torch.Tensor, reduction: str, ignore_index: int) -> torch.Tensor:
    """d loss / d loss_rows as the row kernel takes it: one fp32 value for all rows, or one per row ("none")."""
    scale = grad_loss.float().reshape(-1)
    return scale * _mean_divisor(target, ignore_index) if reduction == "mean" else scale


# ---------------------------------------------------------------------------------------------------------------
# cross_entropy: custom ops, autograd, public function. The forward reads the logits once (loss and logsumexp);
# the backward reads them once more and writes the gradient already multiplied by grad_output. A gradient written
# by the forward would cost one more [N, V] buffer and, to apply grad_output, one more pass over it.


@torch.library.custom_op("fastlm::cross_entropy", mutates_args=())
def _cross_entropy_op(
    logits: torch.Tensor, target: torch.Tensor, ignore_index: int, label_smoothing: float, z_loss: float,
    reduction: str, triton_path: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss in logits' dtype, fp32 logsumexp per row for the backward)."""
    loss_rows, lse, _ = _cross_entropy_rows(
        logits, target, ignore_index=ignore_index, label_smoothing=label_smoothing, z_loss=z_loss,
        triton_path=triton_path,
    )
    return _reduce(loss_rows, target, reduction, ignore_index).to(logits.dtype), lse.float()


@_cross_entropy_op.register_fake
def _(logits, target, ignore_index, label_smoothing, z_loss, reduction, triton_path):
    loss = logits.new_empty((logits.shape[0],) if reduction == "none" else ())
    return loss, logits.new_empty(logits.shape[0], dtype=torch.float32)


@torch.library.custom_op("fastlm::cross_entropy_backward", mutates_args=())
def _cross_entropy_backward_op(
    logits: torch.Tensor, target: torch.Tensor, lse: torch.Tensor, grad_scale: torch.Tensor, ignore_index: int,
    label_smoothing: float, z_loss: float, triton_path: bool,
) -> torch.Tensor:
    grad = torch.empty_like(logits)
    _cross_entropy_rows(
        logits, target, ignore_index=ignore_index, label_smoothing=label_smoothing, z_loss=z_loss,
        triton_path=triton_path, lse=lse, grad_out=grad, grad_scale=grad_scale,
    )
    return grad


@_cross_entropy_backward_op.register_fake
def _(logits, target, lse, grad_scale, ignore_index, label_smoothing, z_loss, triton_path):
    return torch.empty_like(logits)


def _cross_entropy_setup(ctx, inputs, output):
    logits, target, ignore_index, label_smoothing, z_loss, reduction, triton_path = inputs
    ctx.save_for_backward(logits, target, output[1])
    ctx.reduction = reduction
    ctx.options = (ignore_index, label_smoothing, z_loss, triton_path)


def _cross_entropy_backward(ctx, grad_loss, _grad_lse):
    logits, target, lse = ctx.saved_tensors
    grad_scale = _grad_scale(grad_loss, target, ctx.reduction, ctx.options[0])
    grad_logits = _cross_entropy_backward_op(logits, target, lse, grad_scale, *ctx.options)
    return grad_logits, None, None, None, None, None, None


_cross_entropy_op.register_autograd(_cross_entropy_backward, setup_context=_cross_entropy_setup)


def cross_entropy(
    logits: torch.Tensor,
    target: torch.Tensor,
    *,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    reduction: str = "mean",
    impl: str = "auto",
) -> torch.Tensor:
    """`F.cross_entropy(logits, target)` for logits [N, V] or [B, T, V], plus `z_loss * logsumexp**2` per row.

    target: int64/int32 class indices shaped like logits without the class dim ([N] or [B, T]; a flat target for
    3-D logits is an error, since a transposed one would pair rows with the wrong targets).
    Differences from torch: logits are [..., V] (torch's 3-D input is [N, V, d]); all targets ignored (or N = 0)
    gives loss 0 and zero gradient (torch: NaN); out-of-range targets raise on CPU and give NaN on CUDA (see the
    module docstring). A NaN or infinite logit is not hidden: its row's loss is NaN or inf. Loss has logits'
    dtype; arithmetic is fp32.
    """
    _check_options(ignore_index, label_smoothing, z_loss, reduction)
    _check_tensors(logits=logits, target=target)
    _check_floating("logits", logits)
    if logits.dim() not in (2, 3):
        raise ValueError(f"logits has shape {tuple(logits.shape)}: expected [N, V] or [B, T, V]")
    if logits.shape[-1] == 0:
        raise ValueError(f"logits has shape {tuple(logits.shape)}: expected at least one class")
    flat = logits.reshape(-1, logits.shape[-1])
    if flat.stride(1) != 1:
        flat = flat.contiguous()
    _check_target(target, logits.shape[:-1], "row of logits")
    check_same_device("logits", logits, target=target)
    flat_target = target.reshape(-1).contiguous()
    _validate_targets(flat_target, flat.shape[1], ignore_index)
    triton_path = select_impl(impl, logits, target) == "triton"
    loss, _ = _cross_entropy_op(flat, flat_target, ignore_index, float(label_smoothing), float(z_loss), reduction,
                                triton_path)
    return loss.reshape(logits.shape[:-1]) if reduction == "none" else loss


# ---------------------------------------------------------------------------------------------------------------
# linear_cross_entropy: chunked walk over rows, custom ops, public function


def _chunk_length(total: int, bytes_per_item: int, budget: int, minimum: int) -> int:
    """Rows (or columns) per chunk so that a chunk fits `budget` bytes, or `minimum` if more: a multiple of 16
    (GEMM tiles), at least 16."""
    length = max(16, minimum, budget // bytes_per_item // 16 * 16)
    return max(1, min(total, length))


def _weight_grad_by_vocab(
    rows: int, num_classes: int, hidden_size: int, row_chunks: int, itemsize: int, device: torch.device
) -> bool:
    """Whether d_weight is better computed by a second walk over vocabulary chunks (recomputing the logits: one
    more GEMM of 2 * rows * V * Hd FLOPs) than accumulated over the row chunks (each chunk after the first
    re-reads and re-writes d_weight: 2 * V * Hd * itemsize bytes), by the machine balance FLOPS_PER_BYTE."""
    accumulate_bytes = (row_chunks - 1) * 2 * num_classes * hidden_size * itemsize
    balance = FLOPS_PER_BYTE.get(device.type, FLOPS_PER_BYTE["cpu"])
    return accumulate_bytes * balance > 2 * rows * num_classes * hidden_size


def _logits(hidden_chunk, weight_chunk, bias_chunk, out):
    """hidden_chunk @ weight_chunk.T (+ bias_chunk) into `out`; cuBLAS adds the bias in its fp32 epilogue."""
    if bias_chunk is None:
        return torch.mm(hidden_chunk, weight_chunk.t(), out=out)
    return torch.addmm(bias_chunk, hidden_chunk, weight_chunk.t(), out=out)


def _linear_cross_entropy_chunks(
    hidden, weight, bias, target, grad_scale, *, ignore_index, label_smoothing, z_loss, triton_path, max_chunk_bytes
):
    """Per-row loss and argmax hits, and if `grad_scale` is given (1 element, or one per row) the gradients of
    sum(grad_scale * loss_rows) w.r.t. hidden, weight and bias (an empty tensor when bias is None), holding a chunk
    of logits at a time: at most max_chunk_bytes of them (at least 16 rows or columns), or with max_chunk_bytes = 0
    the default rule (CHUNK_BYTES, MIN_CHUNK_ROWS). See the module docstring for the two walks."""
    rows, hidden_size = hidden.shape
    num_classes = weight.shape[0]
    compute = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    # GEMMs and logits in the input dtype, as torch's own linear: half inputs run with fp32 accumulation on tensor
    # cores, or on a CPU with native bf16 dot products (AVX-512 BF16, AMX), which multiplies them 2.5-3x faster than
    # fp32; the row kernel reads them into fp32.
    gemm_dtype = hidden.dtype
    hidden_gemm, weight_gemm = hidden.to(gemm_dtype), weight.to(gemm_dtype)
    bias_gemm = None if bias is None else bias.to(gemm_dtype)
    options = dict(ignore_index=ignore_index, label_smoothing=label_smoothing, z_loss=z_loss, triton_path=triton_path)
    loss = torch.empty(rows, dtype=compute, device=hidden.device)
    correct = torch.empty(rows, dtype=torch.bool, device=hidden.device)
    lse = torch.empty(rows, dtype=torch.float32 if triton_path else compute, device=hidden.device)
    with_grad = grad_scale is not None
    per_row_scale = with_grad and grad_scale.numel() > 1
    # A caller's cap is kept; the default gives a GPU at least MIN_CHUNK_ROWS rows.
    budget, min_rows = max_chunk_bytes, 16
    if not max_chunk_bytes:
        budget, min_rows = CHUNK_BYTES, MIN_CHUNK_ROWS if hidden.is_cuda else 16
    row_step = _chunk_length(rows, num_classes * gemm_dtype.itemsize, budget, min_rows)
    by_vocab = with_grad and _weight_grad_by_vocab(
        rows, num_classes, hidden_size, -(-rows // row_step), gemm_dtype.itemsize, hidden.device)
    column_step = _chunk_length(num_classes, rows * gemm_dtype.itemsize, budget, 16) if by_vocab else 0
    # One workspace for every chunk of both walks: allocating per chunk would hold two chunks at once.
    workspace = torch.empty(max(row_step * num_classes, rows * column_step), dtype=gemm_dtype, device=hidden.device)
    if with_grad:
        grad_hidden = torch.empty(hidden.shape, dtype=gemm_dtype, device=hidden.device)
        grad_weight = (torch.empty if by_vocab else torch.zeros)(weight.shape, dtype=gemm_dtype, device=weight.device)
        grad_bias = torch.zeros(num_classes, dtype=compute, device=weight.device) if bias is not None else None
    # Autocast already chose the input dtype (in linear_cross_entropy); here the dtypes above must hold.
    with torch.autocast(hidden.device.type, enabled=False):
        # Walk 1, row chunks holding whole rows: loss, logsumexp, argmax hit and the gradient of the logits
        # (written over them), then d_hidden of those rows and, unless by_vocab, their share of d_weight.
        for start in range(0, rows, row_step):
            stop = min(start + row_step, rows)
            hidden_chunk = hidden_gemm[start:stop]
            logits = _logits(hidden_chunk, weight_gemm, bias_gemm,
                             workspace[: (stop - start) * num_classes].view(stop - start, num_classes))
            loss[start:stop], lse[start:stop], correct[start:stop] = _cross_entropy_rows(
                logits, target[start:stop], grad_out=logits if with_grad else None,
                grad_scale=grad_scale[start:stop] if per_row_scale else grad_scale, find_argmax=True, **options,
            )
            if not with_grad:
                continue
            torch.mm(logits, weight_gemm, out=grad_hidden[start:stop])
            if not by_vocab:
                grad_weight.addmm_(logits.t(), hidden_chunk)
                if grad_bias is not None:
                    grad_bias += logits.sum(dim=0, dtype=compute)
        # Walk 2, vocabulary chunks holding all rows: the logits again from the stored logsumexp, their gradient,
        # then d_weight and d_bias of those classes, each written once.
        for first in range(0, num_classes, column_step) if by_vocab else ():
            last = min(first + column_step, num_classes)
            logits = _logits(hidden_gemm, weight_gemm[first:last], None if bias is None else bias_gemm[first:last],
                             workspace[: rows * (last - first)].view(rows, last - first))
            _cross_entropy_rows(logits, target, lse=lse, grad_out=logits, grad_scale=grad_scale,
                                column_offset=first, num_classes=num_classes, **options)
            torch.mm(logits.t(), hidden_gemm, out=grad_weight[first:last])
            if grad_bias is not None:
                grad_bias[first:last] = logits.sum(dim=0, dtype=compute)
    if not with_grad:
        return loss, correct, None, None, None
    grad_bias = grad_bias.to(bias.dtype) if grad_bias is not None else hidden.new_empty(0)
    return loss, correct, grad_hidden.to(hidden.dtype), grad_weight.to(weight.dtype), grad_bias


def _loss_dtype(input_dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if input_dtype == torch.float64 else torch.float32


@torch.library.custom_op("fastlm::linear_cross_entropy", mutates_args=())
def _linear_cross_entropy_op(
    hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, target: torch.Tensor, ignore_index: int,
    label_smoothing: float, z_loss: float, reduction: str, compute_grad: bool, triton_path: bool, max_chunk_bytes: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, correct count, then for "mean"/"sum" with compute_grad the gradients for grad_output = 1 w.r.t.
    hidden, weight, bias; empty tensors otherwise, the backward then recomputes them)."""
    grads_now = compute_grad and reduction != "none"
    loss_rows, correct, grad_hidden, grad_weight, grad_bias = _linear_cross_entropy_chunks(
        hidden, weight, bias, target,
        _grad_scale(torch.ones((), device=hidden.device), target, reduction, ignore_index) if grads_now else None,
        ignore_index=ignore_index, label_smoothing=label_smoothing, z_loss=z_loss, triton_path=triton_path,
        max_chunk_bytes=max_chunk_bytes,
    )
    # The loss stays in fp32 (fp64 for fp64 inputs) whatever the input dtype: a bf16 loss would log as 10.4375.
    loss = _reduce(loss_rows, target, reduction, ignore_index).to(_loss_dtype(hidden.dtype))
    if not grads_now:
        grad_hidden, grad_weight, grad_bias = (hidden.new_empty(0) for _ in range(3))
    return loss, correct.sum(), grad_hidden, grad_weight, grad_bias


@_linear_cross_entropy_op.register_fake
def _(hidden, weight, bias, target, ignore_index, label_smoothing, z_loss, reduction, compute_grad, triton_path,
      max_chunk_bytes):
    loss = hidden.new_empty((hidden.shape[0],) if reduction == "none" else (), dtype=_loss_dtype(hidden.dtype))
    count = hidden.new_empty((), dtype=torch.int64)
    if compute_grad and reduction != "none":
        grad_bias = torch.empty_like(bias) if bias is not None else hidden.new_empty(0)
        return loss, count, torch.empty_like(hidden), torch.empty_like(weight), grad_bias
    return loss, count, hidden.new_empty(0), hidden.new_empty(0), hidden.new_empty(0)


@torch.library.custom_op("fastlm::linear_cross_entropy_backward", mutates_args=())
def _linear_cross_entropy_backward_op(
    hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, target: torch.Tensor,
    grad_loss_rows: torch.Tensor, ignore_index: int, label_smoothing: float, z_loss: float, triton_path: bool,
    max_chunk_bytes: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients for reduction "none": recompute every chunk with its rows' grad_output."""
    _, _, grad_hidden, grad_weight, grad_bias = _linear_cross_entropy_chunks(
        hidden, weight, bias, target, grad_loss_rows.contiguous(),
        ignore_index=ignore_index, label_smoothing=label_smoothing, z_loss=z_loss, triton_path=triton_path,
        max_chunk_bytes=max_chunk_bytes,
    )
    return grad_hidden, grad_weight, grad_bias


@_linear_cross_entropy_backward_op.register_fake
def _(hidden, weight, bias, target, grad_loss_rows, ignore_index, label_smoothing, z_loss, triton_path,
      max_chunk_bytes):
    grad_bias = torch.empty_like(bias) if bias is not None else hidden.new_empty(0)
    return torch.empty_like(hidden), torch.empty_like(weight), grad_bias


def _linear_cross_entropy_setup(ctx, inputs, output):
    hidden, weight, bias, target, ignore_index, label_smoothing, z_loss, reduction, _, triton_path, chunk = inputs
    # The outputs after the loss (count, gradients) get no gradient: without this autograd would hand the backward
    # a zero tensor for each, as large as d_hidden and d_weight.
    ctx.set_materialize_grads(False)
    ctx.has_bias = bias is not None
    ctx.reduction = reduction
    ctx.options = (ignore_index, label_smoothing, z_loss, triton_path, chunk)
    if reduction == "none":
        ctx.save_for_backward(hidden, weight, bias, target)
    else:
        ctx.save_for_backward(*output[2:])


def _linear_cross_entropy_backward(ctx, grad_loss, _grad_count, *_grad_of_grads):
    if grad_loss is None:  # only the (non-differentiable) count or gradient outputs were used
        return (None,) * 11
    if ctx.reduction == "none":
        hidden, weight, bias, target = ctx.saved_tensors
        grads = _linear_cross_entropy_backward_op(hidden, weight, bias, target, grad_loss, *ctx.options)
    else:
        try:
            grads = ctx.saved_tensors
        except RuntimeError as error:  # the version check of a tensor the first backward scaled in place
            raise RuntimeError(
                "linear_cross_entropy with reduction='mean' or 'sum' computes its gradients in the forward and "
                "hands them to the first backward (scaling them in place: a copy would cost another d_weight); "
                "to backward twice through a retained graph use reduction='none' and reduce it yourself"
            ) from error
        # A traced graph (torch.compile; its tensors are fake or functional subclasses) cannot mutate a saved
        # tensor; there the compiler plans the memory.
        if torch.compiler.is_compiling() or type(grad_loss) is not torch.Tensor:
            grads = [grad * grad_loss.to(grad.dtype) for grad in grads]
        else:
            for grad in grads:
                grad.mul_(grad_loss.to(grad.dtype))
    grad_hidden, grad_weight, grad_bias = grads
    return (grad_hidden, grad_weight, grad_bias if ctx.has_bias else None) + (None,) * 8


_linear_cross_entropy_op.register_autograd(_linear_cross_entropy_backward, setup_context=_linear_cross_entropy_setup)


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    reduction: str = "mean",
    return_accuracy: bool = False,
    max_chunk_bytes: int | None = None,
    impl: str = "auto",
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """`cross_entropy(hidden @ weight.T + bias, target)` for hidden [N, Hd] or [B, T, Hd], weight [V, Hd], without
    ever holding the [N, V] logits. Gradients reach hidden, weight (e.g. a tied embedding: autograd adds them to the
    lookup's) and bias. With return_accuracy=True returns (loss, correct) where correct is the int64 device count
    of non-ignored rows whose first argmax is the target. The loss is fp32 for fp32/fp16/bf16 inputs (unlike
    `cross_entropy`, which keeps F.cross_entropy's dtype rule), so training logs keep their precision.
    max_chunk_bytes: the most logits held at a time, in bytes (at least 16 rows or classes of them). By default
    48 MiB, raised on a GPU to 768 rows where the vocabulary leaves fewer (GEMMs of fewer rows are slow: 192 MiB at
    V = 128k); a smaller cap saves that memory for time (48 MiB at V = 128k took 1.6x as long on an H100).
    """
    _check_options(ignore_index, label_smoothing, z_loss, reduction)
    if max_chunk_bytes is not None and (
        isinstance(max_chunk_bytes, bool) or not isinstance(max_chunk_bytes, int) or max_chunk_bytes < 1
    ):
        raise ValueError(f"max_chunk_bytes={max_chunk_bytes!r}: expected None or a positive int")
    _check_tensors(hidden=hidden, weight=weight, target=target, bias=bias)
    _check_floating("hidden", hidden)
    if hidden.dim() not in (2, 3):
        raise ValueError(f"hidden has shape {tuple(hidden.shape)}: expected [N, Hd] or [B, T, Hd]")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1] or weight.shape[0] == 0:
        raise ValueError(
            f"weight has shape {tuple(weight.shape)}: expected [V, {hidden.shape[-1]}] with V >= 1 (hidden's last dim)"
        )
    check_same_device("hidden", hidden, weight=weight, bias=bias, target=target)
    if weight.dtype != hidden.dtype and not torch.is_autocast_enabled(hidden.device.type):
        raise ValueError(f"weight.dtype={weight.dtype}: expected hidden's dtype {hidden.dtype}")
    if bias is not None and bias.shape != (weight.shape[0],):
        raise ValueError(f"bias has shape {tuple(bias.shape)}: expected ({weight.shape[0]},)")
    if torch.is_autocast_enabled(hidden.device.type):
        # As F.linear under autocast: the GEMMs take the autocast dtype; gradients flow back through the casts.
        autocast_dtype = torch.get_autocast_dtype(hidden.device.type)
        hidden, weight = hidden.to(autocast_dtype), weight.to(autocast_dtype)
        bias = None if bias is None else bias.to(autocast_dtype)
    flat = hidden.reshape(-1, hidden.shape[-1]).contiguous()
    _check_target(target, hidden.shape[:-1], "row of hidden")
    flat_target = target.reshape(-1).contiguous()
    _validate_targets(flat_target, weight.shape[0], ignore_index)
    triton_path = select_impl(impl, hidden, weight, target) == "triton"
    compute_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (hidden, weight, bias)
    )
    loss, correct, *_ = _linear_cross_entropy_op(
        flat, weight.contiguous(), bias, flat_target, ignore_index, float(label_smoothing), float(z_loss), reduction,
        compute_grad, triton_path, max_chunk_bytes or 0,
    )
    if reduction == "none":
        loss = loss.reshape(hidden.shape[:-1])
    return (loss, correct) if return_accuracy else loss
