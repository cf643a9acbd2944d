"""Reading a model.safetensors that someone else may have written: every tensor checked before any is copied in."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn


def load_weights(model: nn.Module, path: Path) -> None:
    """Copy the tensors of the safetensors file `path` into `model`, or raise ValueError naming the file and the
    problem. The file must hold exactly the model's tensors: the same names (a tied tensor once, under any of its
    names, as `save_model` writes it), shapes and dtypes, and finite values only. safetensors itself runs no code
    from the file and refuses a header whose offsets overrun the file (a truncated or padded file)."""
    try:
        stored = load_file(path)
    except SafetensorError as error:
        raise ValueError(f"{path}: not the weights of this {type(model).__name__}: not a readable safetensors file "
                         f"({error})") from None
    expected = model.state_dict(keep_vars=True)
    # Names that share one tensor (tied embeddings): the file may store the tensor under any one of them.
    tied_groups: dict[int, list[str]] = {}
    for name, tensor in expected.items():
        tied_groups.setdefault(id(tensor), []).append(name)
    problems = [f"unexpected tensor {name!r}" for name in stored if name not in expected]
    for names in tied_groups.values():
        present = [name for name in names if name in stored]
        if not present:
            problems.append(f"missing tensor {' = '.join(map(repr, names))}")
        elif any(not torch.equal(stored[present[0]], stored[other]) for other in present[1:]):
            problems.append(f"tied tensors {present} differ")
    for name, tensor in stored.items():
        if name not in expected:
            continue
        want = expected[name]
        if tensor.shape != want.shape:
            problems.append(f"{name!r} has shape {tuple(tensor.shape)}, expected {tuple(want.shape)}")
        elif tensor.dtype != want.dtype:
            problems.append(f"{name!r} has dtype {tensor.dtype}, expected {want.dtype}")
        elif tensor.is_floating_point() and not torch.isfinite(tensor).all():
            bad = int((~torch.isfinite(tensor)).sum())
            problems.append(f"{name!r} holds {bad} non-finite values (NaN or inf)")
    if problems:
        shown = "; ".join(problems[:5]) + (f"; and {len(problems) - 5} more" if len(problems) > 5 else "")
        raise ValueError(f"{path}: not the weights of this {type(model).__name__}: {shown}")
    model.load_state_dict(stored, strict=False)
