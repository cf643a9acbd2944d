"""The one benchmark harness: timing, peak memory, a ratio table, and a JSON record.

Each benchmark file only says *what* to compare: it builds `Row`s of `Measurement`s (one per provider, measured
side by side in the same process) and hands them to `report`.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import gc
import json
import os
import platform
import resource
import shlex
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch

# Two runs of the same configuration differ by up to 5-10% (docs/PERFORMANCE.md), so a ratio this close to 1 says
# neither side is faster.
PARITY = 0.05


@dataclass
class Measurement:
    provider: str                 # who produced the number ("fastlm", "tiktoken", "sdpa-flash", ...)
    value: float                  # in the row's unit
    peak_mib: float | None = None  # extra peak memory while it ran, where measured


@dataclass
class Row:
    case: str                     # what was measured ("encode 1 thread, short lines", "32x12x512x64 fwd")
    unit: str                     # "MB/s", "ms", "TFLOP/s", "s"
    higher_is_better: bool
    results: list[Measurement] = field(default_factory=list)

    def ratio(self, ours: str = "fastlm") -> dict[str, float]:
        """ours / peer, oriented so that > 1 always means fastlm is better."""
        mine = next((m.value for m in self.results if m.provider == ours), None)
        out = {}
        for m in self.results:
            if m.provider == ours or mine is None or m.value <= 0 or mine <= 0:
                continue
            out[m.provider] = mine / m.value if self.higher_is_better else m.value / mine
        return out


def format_ratio(ratio: float) -> str:
    """"1.32x", or "1.04x (parity)" within PARITY of 1."""
    return f"{ratio:.2f}x" + (" (parity)" if abs(ratio - 1.0) <= PARITY else "")


def device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"CPU {cpu}, {os.cpu_count()} cores"


def versions() -> str:
    """The commit measured (marked dirty when the tree has changes) and the torch / triton versions."""
    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", *args], capture_output=True, text=True, check=True,
                                  cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            return ""
    commit = (git("rev-parse", "--short", "HEAD") or "unknown") + ("+dirty" if git("status", "--porcelain") else "")
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    return f"commit {commit}, torch {torch.__version__}, triton {triton_version}"


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def time_call(fn: Callable[[], object], *, warmup: int = 1, repeat: int = 5, min_seconds: float = 0.0) -> float:
    """Median wall-clock seconds of one call of `fn` (GPU work synchronised)."""
    for _ in range(warmup):
        fn()
    sync()
    times: list[float] = []
    started = time.perf_counter()
    while len(times) < repeat or time.perf_counter() - started < min_seconds:
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def time_interleaved(fns: dict[str, Callable[[], object]], *, warmup: int = 1, repeat: int = 5) -> dict[str, float]:
    """Median wall-clock seconds of one call of each function, the calls taken in turns (a, b, a, b, ...): on a
    shared or throttling machine every provider then sees the same slow and fast moments."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    sync()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeat):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            sync()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(samples) for name, samples in times.items()}


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_memory_mib(fn: Callable[[], object]) -> tuple[object, float]:
    """Run `fn` once; return its result and the extra peak memory it needed, in MiB.

    On CUDA the allocator's peak; on CPU the process RSS sampled every millisecond, since ru_maxrss
    only ever grows and so cannot isolate one call.
    """
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        result = fn()
        torch.cuda.synchronize()
        return result, (torch.cuda.max_memory_allocated() - base) / 2**20
    base = _rss_mib()
    peak = base
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, _rss_mib())
            done.wait(0.001)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        result = fn()
    finally:
        done.set()
        sampler.join()
    peak = max(peak, _rss_mib())
    return result, peak - base


def max_rss_mib_of_children() -> float:
    return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024


def format_table(title: str, rows: list[Row], ours: str = "fastlm", compare: bool = True) -> str:
    """A markdown table, one column per provider; with `compare`, also the ratio of `ours` to each of them."""
    providers: list[str] = []
    for row in rows:
        for m in row.results:
            if m.provider not in providers:
                providers.append(m.provider)
    show_memory = any(m.peak_mib is not None for row in rows for m in row.results)
    peers = [p for p in providers if p != ours] if compare else []
    header = ["case", "unit"] + providers + [f"{ours} / {p}" for p in peers]
    lines = [f"### {title}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        by = {m.provider: m for m in row.results}
        cells = [row.case, row.unit]
        for p in providers:
            m = by.get(p)
            if m is None:
                cells.append("-")
            else:
                mem = f" ({m.peak_mib:.0f} MiB)" if show_memory and m.peak_mib is not None else ""
                cells.append(f"{m.value:.3g}{mem}")
        ratios = row.ratio(ours)
        cells += [format_ratio(ratios[p]) if p in ratios else "-" for p in peers]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    if compare:
        lines.append(f"Ratios are oriented so that > 1 means {ours} is better, and within {PARITY:.0%} of 1 are parity "
                     "(the run-to-run spread); memory in parentheses is extra peak memory.")
    elif show_memory:
        lines.append("Memory in parentheses is extra peak memory.")
    return "\n".join(lines)


def report(title: str, rows: list[Row], *, json_path: str | None = None, notes: str = "", compare: bool = True,
           ours: str = "fastlm") -> str:
    """Print the table with the date, machine and command line; optionally write the JSON record. `compare=False`
    leaves out the ratio columns, for tables whose columns are not providers (sizes, say); `ours` is the provider
    the ratios compare the others with."""
    when = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    command = shlex.join(["python"] + sys.argv)
    text = "\n".join([
        format_table(title, rows, ours=ours, compare=compare),
        "",
        f"Date: {when}. Machine: {device_name()}. {versions()}. Command: `{command}`",
    ] + ([notes] if notes else []))
    print(text, flush=True)
    if json_path:
        record = {"title": title, "date": when, "machine": device_name(), "versions": versions(), "command": command,
                  "notes": notes, "rows": [asdict(r) | {"ratios": r.ratio(ours)} for r in rows]}
        with open(json_path, "w") as f:
            json.dump(record, f, indent=2)
    return text


class CaseBudget:
    """`--budget SECONDS`: start no new case after that many seconds (a lent GPU comes in short slots, and each new
    shape compiles or autotunes first), and name the cases left out in the report's notes."""

    def __init__(self, seconds: float | None):
        self.seconds = seconds
        self.started = time.perf_counter()
        self.skipped: list[str] = []

    def allows(self, case: str) -> bool:
        if self.seconds is not None and time.perf_counter() - self.started > self.seconds:
            self.skipped.append(case)
            return False
        return True

    def note(self) -> str:
        if not self.skipped:
            return ""
        return f" Not measured (past the {self.seconds:g} s budget): {', '.join(self.skipped)}."


def add_budget_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--budget", type=float, metavar="SECONDS",
                        help="start no new case after SECONDS; the report names the cases left out")


def base_parser(description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--quick", action="store_true", help="a short run: fewer sizes and repeats")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON to PATH")
    return parser
