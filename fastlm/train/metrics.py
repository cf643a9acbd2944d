"""What a run reports: one JSON object per line in `metrics.jsonl`, the same numbers as TensorBoard curves (when the
tensorboard package is installed), and a progress bar on stderr."""

from __future__ import annotations

import json
import sys
import time
import warnings
from pathlib import Path
from typing import TextIO


class MetricsLog:
    """Append-only JSON lines; each record has a "kind" ("train", "eval", "skip", ...) and a "step"."""

    def __init__(self, path: str | Path, enabled: bool = True):
        self.path = Path(path)
        self.enabled = enabled

    def write(self, kind: str, step: int, **values) -> None:
        if not self.enabled:
            return
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps({"kind": kind, "step": step, **values}) + "\n")

    def truncate_after(self, step: int) -> None:
        """Forget records past `step`: a resumed run redoes those steps and logs them again, so the file reads
        exactly as if the run had never stopped."""
        if not self.enabled or not self.path.exists():
            return
        kept = [line for line in read_records(self.path) if line["step"] <= step]
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in kept), encoding="utf-8")
        tmp.replace(self.path)


class TensorBoardLog:
    """The numbers of the metrics records as TensorBoard scalars, tagged "kind/name" ("train/loss", "eval/bleu"),
    and the run's config as text, in event files beside metrics.jsonl: `tensorboard --logdir runs` then shows each
    run under its directory's name. Needs the tensorboard package (the extra `pip install -e ".[tensorboard]"`);
    without it nothing is written, and training goes on as before."""

    def __init__(self, run_dir: str | Path, enabled: bool = True):
        self.run_dir = Path(run_dir)
        self.enabled = enabled
        self.config: dict | None = None  # the run's config, written as text when the first record opens the file
        self._writer = None
        self._purge_step: int | None = None

    def write(self, kind: str, step: int, **values) -> None:
        writer = self._open()
        if writer is None:
            return
        for name, value in values.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                writer.add_scalar(f"{kind}/{name}", value, step)

    def _open(self):
        """The writer, opened at the first record (a run that fails before its first step leaves no event file,
        as it leaves no metrics), with the config as text; None when disabled or tensorboard is not installed."""
        if self._writer is None and self.enabled:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                self.enabled = False
                return None
            purge_step, self._purge_step = self._purge_step, None
            self._writer = SummaryWriter(str(self.run_dir), purge_step=purge_step)
            if self.config is not None:
                # A code block: TensorBoard renders text as Markdown.
                text = "```\n" + json.dumps(self.config, indent=2) + "\n```"
                self._writer.add_text("config", text, purge_step or 0)
        return self._writer

    def truncate_after(self, step: int) -> None:
        """Hide the events past `step` (a resumed run redoes those steps): the next event file starts with
        TensorBoard's purge marker at step + 1, and TensorBoard drops what earlier files hold from that step on."""
        self.close()
        self._purge_step = step + 1

    def flush(self) -> None:
        if self._writer is not None:
            self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


def read_records(path: str | Path, kind: str | None = None) -> list[dict]:
    """The records of a metrics file (of one `kind` if given). A last line without its newline that is not valid
    JSON is what a kill in the middle of `write` leaves: it is dropped with a warning, so that the run can resume;
    any other bad line is a ValueError naming it."""
    records = []
    with open(path, encoding="utf-8") as f:
        lines = f.readlines()
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            if number == len(lines) and not line.endswith("\n"):
                warnings.warn(f"{path}:{number}: dropped an incomplete last record (the run was killed while "
                              f"writing it): {line[:80]!r}", stacklevel=2)
                break
            raise ValueError(f"{path}:{number}: not a JSON metrics record ({error.msg})") from None
        if kind is None or record.get("kind") == kind:
            records.append(record)
    return records


def format_duration(seconds: float) -> str:
    seconds = int(max(0.0, seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60:02d}:{rest % 60:02d}"


class ProgressBar:
    """`step/total [bar] loss tokens/s ETA`: redrawn in place on a terminal, one line per `every` steps
    otherwise (so logs of batch jobs stay readable)."""

    def __init__(self, total: int, *, enabled: bool = True, every: int = 10, label: str = "train",
                 stream: TextIO | None = None, width: int = 24):
        self.total = total
        self.enabled = enabled
        self.every = max(1, every)
        self.label = label
        self.stream = stream if stream is not None else sys.stderr
        self.width = width
        self.interactive = self.stream.isatty()
        self.started = time.perf_counter()
        self.first_step: int | None = None

    def update(self, step: int, *, loss: float, tokens_per_s: float) -> None:
        if not self.enabled:
            return
        if self.first_step is None:
            self.first_step, self.started = step - 1, time.perf_counter()
        if not self.interactive and step % self.every and step != self.total:
            return
        done = step - self.first_step
        elapsed = time.perf_counter() - self.started
        eta = elapsed / done * (self.total - step) if done > 0 else 0.0
        filled = int(self.width * step / max(1, self.total))
        bar = "#" * filled + "." * (self.width - filled)
        line = (f"{self.label} {step}/{self.total} [{bar}] loss {loss:.4f} "
                f"{tokens_per_s:,.0f} tok/s ETA {format_duration(eta)}")
        self.stream.write(("\r" + line) if self.interactive else line + "\n")
        self.stream.flush()

    def message(self, text: str) -> None:
        """A line that must not be overwritten by the bar (evaluations, skipped steps)."""
        if self.enabled:
            self.stream.write(("\n" if self.interactive else "") + text + "\n")
            self.stream.flush()

    def close(self) -> None:
        if self.enabled and self.interactive:
            self.stream.write("\n")
            self.stream.flush()
