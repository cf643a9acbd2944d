"""Training checkpoints: atomic writes, the last K kept plus the best, the RNG states that make resume exact, and
the checks that refuse a checkpoint of another run.

A checkpoint is one file `step-00000100.pt` holding a plain dict (tensors, numbers, strings, lists) so that it
loads with `torch.load(weights_only=True)`, which unpickles no code: model, optimizer and scheduler state, the data
position, the config, and the RNG states of every rank. Model and optimizer state are unsharded and keyed by
parameter names, so a checkpoint fits any world size. `best.pt` is a hard link to the best step file (no copy),
made atomically (an atomic copy on a file system without hard links). A failed write (a full disk) leaves the
earlier files as they were.
"""

from __future__ import annotations

import errno
import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch

from fastlm.train.config import RESUMABLE_CHANGES, TrainConfig, field_defaults

_STEP_FILE = re.compile(r"^step-(\d{8})\.pt$")
BEST_NAME = "best.pt"
CHECKPOINT_FORMAT = "fastlm-checkpoint"
# 2: optimizer state keyed by parameter names (any world size); 1 keyed it by position (one layout only).
CHECKPOINT_VERSION = 2
# run_info entries that may change between a run and its resumption: paths of data that may have moved.
MOVABLE_RUN_INFO = ("data",)


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (all devices) from one integer."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def capture_rng_state() -> dict:
    """This process's python, numpy, torch and CUDA generator states, as checkpoint-safe values."""
    version, mt_state, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached_gauss = np.random.get_state()
    state = {
        "python": {"version": version, "state": list(mt_state), "gauss": gauss},
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gauss": float(cached_gauss)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict) -> None:
    python = state["python"]
    random.setstate((python["version"], tuple(python["state"]), python["gauss"]))
    numpy = state["numpy"]
    np.random.set_state((numpy["kind"], numpy["keys"].numpy().astype(np.uint32), numpy["pos"], numpy["has_gauss"],
                         numpy["cached_gauss"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def restore_rank_rng_state(states: list[dict], rank: int, *, seed: int, step: int) -> None:
    """Restore rank `rank`'s generators from the per-rank `states` of a checkpoint. A rank that the checkpoint's
    run did not have (resuming on more processes) gets a fresh stream, seeded from (seed, rank, step) so that it is
    reproducible and differs from every stream used before; the states of ranks that are gone are dropped."""
    if rank < len(states):
        restore_rng_state(states[rank])
    else:
        seed_everything(hash((seed, rank, step)) % 2**63)


def atomic_save(payload: dict, path: Path) -> None:
    """Write `payload` to `path` so that a reader (or a crash) sees either the old file or the complete new one."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as error:
        kept = "the earlier checkpoints are intact" if error.errno == errno.ENOSPC else "no file was replaced"
        raise OSError(error.errno, f"writing checkpoint {path} failed ({error.strerror or error}); {kept}, "
                      "and a resumed run starts from the latest of them") from error
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_dir(path.parent)


def _fsync_dir(directory: Path) -> None:
    # Makes the rename itself durable: without it a power cut can leave the directory entry unwritten.
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _copy_durably(source: Path, destination: Path) -> None:
    with open(source, "rb") as src, open(destination, "wb") as dst:
        shutil.copyfileobj(src, dst)
        dst.flush()
        os.fsync(dst.fileno())


def load_checkpoint(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises several types for a truncated or foreign file
        raise ValueError(f"checkpoint {str(path)!r} cannot be read: {error}") from error


def check_resumable(state: dict, path: Path, *, run_info: dict, model: torch.nn.Module, config: TrainConfig,
                    world_size: int) -> None:
    """Raise ValueError unless the checkpoint `state` read from `path` can resume this run of `world_size`
    processes: the same format and version, the same run_info (task, model config, tokenizer, corpora; data paths
    may move), the same parameter names and shapes as `model` (a clear message instead of a state_dict traceback)
    and the same `config` but for RESUMABLE_CHANGES. Each difference is named.

    What the checkpoint does not record was added to fastlm since it was written: a TrainConfig field counts as its
    default, a run_info entry is not compared."""
    found = (state.get("format"), state.get("version"))
    if found != (CHECKPOINT_FORMAT, CHECKPOINT_VERSION):
        raise ValueError(f"checkpoint {path}: format {found[0]!r} version {found[1]!r}, expected "
                         f"{CHECKPOINT_FORMAT!r} version {CHECKPOINT_VERSION}")
    saved_info = {k: v for k, v in state.get("run_info", {}).items() if k not in MOVABLE_RUN_INFO}
    current_info = {k: v for k, v in run_info.items() if k in saved_info}
    changes = differences(saved_info, current_info)
    if changes:
        raise ValueError(f"checkpoint {path} belongs to another run ({'; '.join(changes)}): resume with the "
                         "settings the run was started with, or train in a new run directory")
    saved_shapes = {name: tuple(tensor.shape) for name, tensor in state["model"].items()}
    # Under FSDP2 the model's tensors are DTensors, whose shape is the global (unsharded) one.
    model_shapes = {name: tuple(tensor.shape) for name, tensor in model.state_dict().items()}
    changes = differences(saved_shapes, model_shapes)
    if changes:
        raise ValueError(f"checkpoint {path} holds another model ({'; '.join(changes[:6])}): resume with the model "
                         "the run was started with, or train in a new run directory")
    saved_config = {**field_defaults(TrainConfig), **state.get("config", {})}
    changes = differences(_fixed_settings(saved_config, state["world_size"]),
                           _fixed_settings(config.to_dict(), world_size))
    if changes:
        raise ValueError(f"checkpoint {path} was trained with other settings ({'; '.join(changes)}): resume with "
                         "the settings the run was started with (the run's config.json lists them; only "
                         f"{', '.join(RESUMABLE_CHANGES)} may change), or train in a new run directory")


def _fixed_settings(config: dict, world_size: int) -> dict:
    """The settings of `config` that a resume must keep, grad_accum as the micro-batches of a step."""
    fixed = {k: v for k, v in config.items() if k not in RESUMABLE_CHANGES and k != "grad_accum"}
    fixed["grad_accum * world_size"] = config["grad_accum"] * world_size
    return fixed


def differences(saved: dict, current: dict, names: tuple[str, str] = ("checkpoint has", "this run"),
                prefix: str = "") -> list[str]:
    """'key: checkpoint has X, this run Y' (the words of `names`) for every (nested) key whose values differ."""
    changes = []
    for key in sorted(set(saved) | set(current), key=str):
        old, new = saved.get(key, "nothing"), current.get(key, "nothing")
        if isinstance(old, dict) and isinstance(new, dict):
            changes += differences(old, new, names, f"{prefix}{key}.")
        elif old != new:
            changes.append(f"{prefix}{key}: {names[0]} {old!r}, {names[1]} {new!r}")
    return changes


class CheckpointDir:
    """The `checkpoints/` directory of a run: step files (the last `keep_last` kept) and best.pt."""

    def __init__(self, directory: str | Path, keep_last: int):
        if keep_last < 1:
            raise ValueError(f"keep_last={keep_last!r}: expected >= 1")
        self.directory = Path(directory)
        self.keep_last = keep_last

    def step_files(self) -> list[Path]:
        """Step checkpoints, oldest first."""
        if not self.directory.is_dir():
            return []
        found = [p for p in self.directory.iterdir() if _STEP_FILE.match(p.name)]
        return sorted(found, key=lambda p: int(_STEP_FILE.match(p.name).group(1)))

    def latest(self) -> Path | None:
        files = self.step_files()
        return files[-1] if files else None

    @property
    def best(self) -> Path:
        return self.directory / BEST_NAME

    def save(self, payload: dict, step: int, *, is_best: bool) -> Path:
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self.directory / f"step-{step:08d}.pt"
        atomic_save(payload, path)
        if is_best:
            link = self.directory / f".{BEST_NAME}.link-{os.getpid()}"
            link.unlink(missing_ok=True)
            try:
                os.link(path, link)
            except OSError:  # no hard links here (some network and FUSE file systems): a copy, as durable
                _copy_durably(path, link)
            os.replace(link, self.best)
            _fsync_dir(self.directory)
        self._prune()
        return path

    def _prune(self) -> None:
        # best.pt is a separate link, so deleting an old step file never loses the best weights.
        for old in self.step_files()[: -self.keep_last]:
            old.unlink()
