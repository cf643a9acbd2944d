"""Checkpoint averaging: the element-wise mean of the model weights of a run's last checkpoints, which often
translates better than any one of them (Vaswani et al. 2017 average their last 5 or 20; fairseq's
average_checkpoints.py).

Checkpoints are read one at a time into a float64 sum, so memory holds one checkpoint and the sum whatever their
number; each tensor comes back in its own dtype. Checkpoints of different runs (task, model, tokenizer or seed) or of
one step twice are refused: their mean would be no model the run ever approached.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, Sequence

import torch

from fastlm.train.checkpoint import CHECKPOINT_FORMAT, MOVABLE_RUN_INFO, CheckpointDir, differences, load_checkpoint


def mean_state_dict(states: Iterable[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The element-wise mean of state dicts with the same names, shapes and dtypes: floating tensors are summed in
    float64 and returned in their own dtype; other tensors (integer counters) must be equal in all of them."""
    sums: dict[str, torch.Tensor] = {}
    first_layout: dict[str, tuple] = {}
    count = 0
    for state in states:
        layout = {name: (tuple(tensor.shape), tensor.dtype) for name, tensor in state.items()}
        if count == 0:
            first_layout = layout
            # A copy even where the tensor already is float64: the sum must not write into the caller's tensor.
            sums = {name: tensor.to(torch.float64, copy=True) if tensor.is_floating_point() else tensor
                    for name, tensor in state.items()}
        elif layout != first_layout:
            changes = differences(first_layout, layout, ("the first has", f"state {count} has"))
            raise ValueError(f"state dicts of different models cannot be averaged ({'; '.join(changes[:6])})")
        else:
            for name, tensor in state.items():
                if tensor.is_floating_point():
                    sums[name] += tensor
                elif not torch.equal(sums[name], tensor):
                    raise ValueError(f"{name}: a {tensor.dtype} tensor that differs between the state dicts averaged "
                                     "(only floating-point tensors can be averaged)")
        count += 1
    if count == 0:
        raise ValueError("no state dicts to average: expected at least one")
    return {name: (total / count).to(first_layout[name][1]) if total.is_floating_point() else total
            for name, total in sums.items()}


def newest_checkpoints(run_dir: str | Path, count: int) -> list[Path]:
    """The `count` newest step checkpoints of the run in `run_dir`, oldest first; a ValueError naming keep_last
    where the run kept fewer."""
    directory = Path(run_dir) / "checkpoints"
    if count < 1:
        raise ValueError(f"--last {count}: expected a number of checkpoints >= 1")
    if not directory.is_dir():
        raise FileNotFoundError(f"--run-dir {run_dir}: no checkpoints/ in it, expected the directory of a training run")
    files = CheckpointDir(directory, keep_last=count).step_files()
    if len(files) < count:
        config_path = Path(run_dir) / "config.json"
        kept = ""
        if config_path.is_file():
            keep_last = json.loads(config_path.read_text(encoding="utf-8"))["train"]["keep_last"]
            kept = f" (the run keeps keep_last={keep_last})"
        raise ValueError(f"--last {count}: {directory} holds {len(files)} step checkpoint(s){kept}: average at most "
                         f"{len(files)}, or train with --keep_last {count} or more")
    return files[-count:]


def average_checkpoints(paths: Sequence[str | Path]) -> tuple[dict[str, torch.Tensor], dict, list[int]]:
    """(the mean of the model weights, the run_info, the steps) of the checkpoints at `paths`, which must be of one
    run and distinct steps."""
    first: dict = {}
    steps: list[int] = []

    def model_states() -> Iterable[dict[str, torch.Tensor]]:
        for path in map(Path, paths):
            state = load_checkpoint(path)
            if state.get("format") != CHECKPOINT_FORMAT:
                raise ValueError(f"{path}: format {state.get('format')!r}, expected a {CHECKPOINT_FORMAT!r} file")
            # What makes a run: its task, model and tokenizer (run_info; data paths may move) and its seed.
            identity = {"run_info": {k: v for k, v in state["run_info"].items() if k not in MOVABLE_RUN_INFO},
                        "seed": state["config"]["seed"],
                        "shapes": {name: tuple(tensor.shape) for name, tensor in state["model"].items()}}
            if not first:
                first.update(path=path, identity=identity, run_info=state["run_info"])
            changes = differences(first["identity"], identity, ("the first has", "this one"))
            if changes:
                raise ValueError(f"{path} is a checkpoint of another run than {first['path']} "
                                 f"({'; '.join(changes[:6])}): average checkpoints of one run")
            if state["step"] in steps:
                raise ValueError(f"{path}: step {state['step']} given twice (best.pt is a step checkpoint too): give "
                                 "each checkpoint once")
            steps.append(state["step"])
            yield state["model"]

    return mean_state_dict(model_states()), first["run_info"], steps
