"""Loss curves of a run (train and validation) from its metrics.jsonl, drawn to a PNG."""

from __future__ import annotations

from pathlib import Path

from fastlm.train.metrics import read_records


def plot_run(run_dir: str | Path, output: str | Path | None = None) -> Path:
    """Draw `run_dir/metrics.jsonl` to `output` (default `run_dir/loss.png`); returns the PNG's path."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed on servers and in CI
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    metrics = run_dir / "metrics.jsonl"
    if not metrics.is_file():
        raise FileNotFoundError(f"run_dir {str(run_dir)!r}: no metrics.jsonl (is it a fastlm run directory?)")
    train = read_records(metrics, "train")
    evals = [r for r in read_records(metrics, "eval") if "loss" in r]
    if not train:
        raise ValueError(f"{metrics}: no training records to plot")
    output = Path(output) if output is not None else run_dir / "loss.png"

    figure, axis = plt.subplots(figsize=(7, 4))
    axis.plot([r["step"] for r in train], [r["loss"] for r in train], label="train", linewidth=1, alpha=0.8)
    if evals:
        axis.plot([r["step"] for r in evals], [r["loss"] for r in evals], "o-", label="validation")
    axis.set_xlabel("step")
    axis.set_ylabel("loss (nats/token)")
    axis.set_title(run_dir.name)
    axis.grid(alpha=0.3)
    axis.legend()
    figure.tight_layout()
    figure.savefig(output, dpi=110)
    plt.close(figure)
    return output
