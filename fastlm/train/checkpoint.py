"""Training checkpoints: atomic writes, the last K kept plus the best, and the RNG states that make resume exact.

A checkpoint is one file `step-00000100.pt` holding a plain dict (tensors, numbers, strings, lists) so that it
loads with `torch.load(weights_only=True)`: model, optimizer and scheduler state, the data position, the config,
and the RNG states of every rank. `best.pt` is a hard link to the best step file (no copy), made atomically; on a
file system without hard links it is an atomic copy instead.
"""

from __future__ import annotations

import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch

_STEP_FILE = re.compile(r"^step-(\d{8})\.pt$")
BEST_NAME = "best.pt"


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


def atomic_save(payload: dict, path: Path) -> None:
    """Write `payload` to `path` so that a reader (or a crash) sees either the old file or the complete new one."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
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
