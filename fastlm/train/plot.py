"""Loss curves of runs from their metrics.jsonl, drawn to a PNG: the training loss raw (faint) and smoothed, the
validation loss as points, several runs overlaid in one colour each (to compare, say, pre-trained and random starts).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from fastlm.train.metrics import read_records

# Weight of the past in the moving average of the training loss: about the last 1 / (1 - 0.9) = 10 steps count.
DEFAULT_SMOOTHING = 0.9


@dataclass(frozen=True)
class Curve:
    run: str            # the run's name in the legend
    kind: str           # "train (raw)", "train" (smoothed when smoothing > 0) or "validation"
    steps: list[int]
    losses: list[float]


def smooth(values: list[float], smoothing: float) -> list[float]:
    """Exponential moving average, debiased as TensorBoard's: the first values are not pulled toward 0."""
    average, smoothed = 0.0, []
    for count, value in enumerate(values, 1):
        average = smoothing * average + (1 - smoothing) * value
        smoothed.append(average / (1 - smoothing ** count))
    return smoothed


def loss_curves(run_dirs: list[str | Path], smoothing: float = DEFAULT_SMOOTHING) -> list[Curve]:
    """The curves `plot_runs` draws, run by run: raw and smoothed training loss (one curve when smoothing is 0),
    and the validation loss when the run evaluated. A run is named by its directory, by the path given when two
    directories share a name."""
    if not 0 <= smoothing < 1:
        raise ValueError(f"smoothing = {smoothing}: expected a number in [0, 1) (0: no smoothing)")
    if not run_dirs:
        raise ValueError("run_dirs is empty: expected at least one run directory")
    names = [Path(run_dir).name for run_dir in run_dirs]
    if len(set(names)) < len(names):
        names = [str(run_dir) for run_dir in run_dirs]
    curves = []
    for run_dir, name in zip(run_dirs, names):
        metrics = Path(run_dir) / "metrics.jsonl"
        if not metrics.is_file():
            raise FileNotFoundError(f"run_dir {str(run_dir)!r}: no metrics.jsonl (is it a fastlm run directory?)")
        train = read_records(metrics, "train")
        if not train:
            raise ValueError(f"{metrics}: no training records to plot")
        steps, losses = [r["step"] for r in train], [r["loss"] for r in train]
        if smoothing > 0:
            curves += [Curve(name, "train (raw)", steps, losses),
                       Curve(name, "train", steps, smooth(losses, smoothing))]
        else:
            curves.append(Curve(name, "train", steps, losses))
        evals = [r for r in read_records(metrics, "eval") if "loss" in r]
        if evals:
            curves.append(Curve(name, "validation", [r["step"] for r in evals], [r["loss"] for r in evals]))
    return curves


def plot_runs(run_dirs: list[str | Path], output: str | Path | None = None, *,
              smoothing: float = DEFAULT_SMOOTHING) -> Path:
    """Draw the loss curves of `run_dirs` to `output` (default: RUN_DIR/loss.png for one run, loss.png in the
    current directory for several); returns the PNG's path."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed on servers and in CI
    import matplotlib.pyplot as plt

    curves = loss_curves(run_dirs, smoothing)
    runs = list(dict.fromkeys(curve.run for curve in curves))
    if output is None:
        output = Path(run_dirs[0]) / "loss.png" if len(runs) == 1 else Path("loss.png")
    styles = {"train (raw)": dict(linewidth=0.8, alpha=0.25), "train": dict(linewidth=1.2),
              "validation": dict(linestyle="--", marker="o", markersize=3)}

    figure, axis = plt.subplots(figsize=(7, 4))
    for curve in curves:
        # One colour per run; a raw curve stays out of the legend, its smoothed twin speaks for it.
        label = f"_{curve.kind}" if curve.kind == "train (raw)" else (
            curve.kind if len(runs) == 1 else f"{curve.run} {curve.kind}")
        axis.plot(curve.steps, curve.losses, color=f"C{runs.index(curve.run) % 10}", label=label,
                  **styles[curve.kind])
    axis.set_xlabel("step")
    axis.set_ylabel("loss (nats/token)")
    if len(runs) == 1:
        axis.set_title(runs[0])
    axis.grid(alpha=0.3)
    axis.legend()
    figure.tight_layout()
    figure.savefig(output, dpi=110)
    plt.close(figure)
    return Path(output)
