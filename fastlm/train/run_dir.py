"""What a run directory holds, so that a new run never mixes with, nor silently replaces, an earlier one.

A run writes `config.json`, `metrics.jsonl`, `loss.png`, TensorBoard event files, `checkpoints/` and `model/`.
Starting a run where those exist is refused unless the caller resumes the earlier run or asks to overwrite it;
overwriting removes only those files, never anything else a user keeps in the directory.
"""

from __future__ import annotations

import re
from pathlib import Path

RUN_FILES = ("config.json", "metrics.jsonl", "loss.png")
# TensorBoard's event files (events.out.tfevents.<time>.<host>.<pid>.<n>): one per writer a run opened.
EVENT_FILES = re.compile(r"^events\.out\.tfevents\.")
# The files a run writes inside its subdirectories (checkpoint steps, best.pt and interrupted temporary files;
# the saved model), removed one by one so that a user's own file there survives an overwrite.
RUN_SUBDIR_FILES = {
    "checkpoints": re.compile(r"^(step-\d{8}\.pt|best\.pt|\..*\.(tmp|link)-\d+)$"),
    "model": re.compile(r"^(config\.json|model\.safetensors)$"),
}


class RunDirectoryInUse(ValueError):
    """The run directory holds an earlier run and neither resuming nor overwriting it was asked for."""


def earlier_run_files(run_dir: str | Path) -> list[Path]:
    """The files of an earlier run in `run_dir` (empty when it holds none)."""
    run_dir = Path(run_dir)
    found = [run_dir / name for name in RUN_FILES if (run_dir / name).is_file()]
    if run_dir.is_dir():
        found += sorted(path for path in run_dir.iterdir() if EVENT_FILES.match(path.name) and path.is_file())
    for subdir, pattern in RUN_SUBDIR_FILES.items():
        if (run_dir / subdir).is_dir():
            found += sorted(path for path in (run_dir / subdir).iterdir() if pattern.match(path.name))
    return found


def refuse_or_clear(run_dir: str | Path, *, overwrite: bool) -> None:
    """Raise RunDirectoryInUse if `run_dir` holds a run, unless `overwrite`: then remove that run's files."""
    files = earlier_run_files(run_dir)
    # A config.json alone is from a run that failed before its first step: starting again loses nothing.
    if all(path == Path(run_dir) / "config.json" for path in files):
        return
    if not overwrite:
        shown = ", ".join(str(path.relative_to(run_dir)) for path in files[:3]) + (", ..." if files[3:] else "")
        raise RunDirectoryInUse(f"run directory {str(run_dir)!r} holds an earlier run ({shown}): continue it with "
                                "--resume, or start over with --overwrite (removes that run's files only)")
    for path in files:
        path.unlink()
    for subdir in RUN_SUBDIR_FILES:
        if (Path(run_dir) / subdir).is_dir() and not any((Path(run_dir) / subdir).iterdir()):
            (Path(run_dir) / subdir).rmdir()
