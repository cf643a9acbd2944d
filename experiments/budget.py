"""Sizes the runs of one time-boxed call (experiments/gpu.sh) from its probe: the grid's jobs run for a few dozen
steps in the probe's --out, the pre-trainings at once, then the fine-tunings at once, then a while of their scoring;
from their step times, their fixed costs (start, data, evaluation, checkpoint) and the scoring's pace this picks the
pre-training steps and fine-tuning epochs that fill the seconds left, and whether the second seeds fit.

    python experiments/budget.py --probe DIR --data DIR --preset small --probe-steps 40   # the probe's settings
    python experiments/budget.py --probe DIR --data DIR --preset small --seconds 400 --score-window 30
    python experiments/budget.py ... --pretrained --eval-interval 250   # after the pre-trainings: the fine-tuning

Prints KEY=VALUE lines for the shell: the probe's --scale and --only (PROBE_SCALE, PROBE_ONLY, PROBE_MODELS), or
the plan's (PRETRAIN_STEPS, FINETUNE_EPOCHS, EVAL_INTERVAL, ONLY, MODELS: the translation models, one process each)
and the seconds each phase should take (T_PRETRAIN, T_FINETUNE, T_SCORE); on stderr, the measurements and the plan
in words.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

from grid import BEAMS, EVERYDAY_PAIRS, LEVELS, MAIN_SEEDS, SEEDED_FIRST, TEST_SETS, Grid
from ko_en import Experiment

WARM_STEPS = 5  # a probe's first steps compile and tune kernels: not the pace of the steps after them
PRETRAIN_SHARE = 0.4  # of the training seconds, for the pre-trainings; the fine-tunings get the rest
SAFETY = 0.85  # of the seconds the plan fills: the evaluations and checkpoints past the probe's one, and noise
EVALUATIONS = 5  # per run: a curve, and a best checkpoint to pick
MIN_SEED_EPOCHS = 2.0  # the second seeds run where the fine-tunings still get this many epochs with them
# The jobs, at the first level: its pre-trainings, and the four starts' first seed with the second seed of
# SEEDED_FIRST (the seed noise of a random and a pre-trained start), or without where they do not fit.
LEVEL = LEVELS[0]
PRETRAININGS = f"pretrain/{LEVEL}-*"
WITH_SEEDS = (f"finetune/{LEVEL}-*-random-seed{MAIN_SEEDS[0]}",
              *(f"finetune/{LEVEL}-{start}-random-seed{MAIN_SEEDS[1]}" for start in SEEDED_FIRST))
SELECTIONS = (WITH_SEEDS, WITH_SEEDS[:1])


@dataclass
class Stage:
    """One stage's probe jobs, run at once: the pace of a step and the fixed cost of a job, the slowest job's."""
    step_seconds: float
    job_seconds: float  # a job's seconds besides its steps: start, data, its evaluation and checkpoint

    @classmethod
    def measured(cls, out: Path, stage: str) -> Stage:
        paces, fixed = [], []
        for path in sorted((out / "results" / stage).glob("*.json")):
            times = step_times(out / "runs" / stage / path.stem)
            pace = statistics.median([seconds for step, seconds in times if step > WARM_STEPS]
                                     or [seconds for _, seconds in times])
            paces.append(pace)
            fixed.append(json.loads(path.read_text(encoding="utf-8"))["seconds"] - pace * len(times))
        if not paces:
            raise SystemExit(f"budget: no finished {stage} job in {out}: the probe failed (see its log)")
        return cls(max(paces), max(fixed))

    def seconds(self, steps: int) -> float:
        return self.job_seconds + steps * self.step_seconds


def step_times(run_dir: Path) -> list[tuple[int, float]]:
    """(step, seconds) of each training step of a run: its tokens over its tokens per second, which the trainer
    measures without the evaluations and checkpoints."""
    from fastlm.train.metrics import read_records

    return [(r["step"], r["tokens"] / r["tokens_per_s"]) for r in read_records(run_dir / "metrics.jsonl", "train")]


@dataclass
class Scoring:
    """What a scoring process costs, from the probe's finished test translations: its start (the shortest
    translation's seconds) and a line (the slowest pace of the longer ones past it: beam 4 where one finished)."""
    start_seconds: float
    line_seconds: float

    @classmethod
    def measured(cls, out: Path, window: float) -> Scoring:
        done = []
        for path in (out / "results" / "test").glob("*.json"):
            result = json.loads(path.read_text(encoding="utf-8"))
            source = Path(result["command"][result["command"].index("--input") + 1])
            done.append((len(source.read_text(encoding="utf-8").splitlines()), result["seconds"]))
        if not done:  # none finished within the window: each takes longer than it
            return cls(window, 0.0)
        fewest, start = min(done)
        return cls(start, max(((seconds - start) / (lines - fewest) for lines, seconds in done if lines > fewest),
                              default=0.0))


@dataclass
class Probe:
    pretrain: Stage
    finetune: Stage
    scoring: Scoring
    model_scoring: list[int]  # the lines of each process that scores a translation model (0: an evaluation)
    score_processes: int  # processes that share the scoring
    train_pairs: int
    batch_size: int

    def score_seconds(self, models: int) -> float:
        """The scoring of `models` translation models spread over the processes, with the corpus of mispaired
        sources made once, after a start of each process (ko_en.py's own), and the longest of the processes it runs
        (the last may start late)."""
        start = self.scoring.start_seconds
        each = [start + lines * self.scoring.line_seconds for lines in self.model_scoring]
        return (models * sum(each) + start) / self.score_processes + start + max(each)


def measure(experiment: Experiment, score_window: float, score_processes: int) -> Probe:
    """The probe's measurements, and what the scoring of a model runs: a translation per test set and beam, of the
    everyday sentences, and the two evaluations of its source use."""
    translations = [len(experiment.source(test_set, "ko").read_text(encoding="utf-8").splitlines())
                    for test_set in TEST_SETS for _ in BEAMS]
    train_pairs = len(experiment.source("train", "ko").read_text(encoding="utf-8").splitlines())
    return Probe(Stage.measured(experiment.out, "pretrain"), Stage.measured(experiment.out, "finetune"),
                 Scoring.measured(experiment.out, score_window), [*translations, len(EVERYDAY_PAIRS), 0, 0],
                 score_processes, train_pairs, experiment.scale["batch_size"])


@dataclass
class Plan:
    pretrain_steps: int
    finetune_steps: int
    selection: tuple[str, ...]  # --only patterns of the translation runs
    models: int  # how many they are
    probe: Probe

    @property
    def finetune_epochs(self) -> float:
        return float(f"{self.finetune_steps * self.probe.batch_size / self.probe.train_pairs:.4g}")

    def seconds(self) -> dict[str, float]:
        """What each phase should take."""
        return {"T_PRETRAIN": self.probe.pretrain.seconds(self.pretrain_steps) if self.pretrain_steps else 0.0,
                "T_FINETUNE": self.probe.finetune.seconds(self.finetune_steps),
                "T_SCORE": self.probe.score_seconds(self.models)}


def models_of(grid: Grid, selection: tuple[str, ...]) -> int:
    """How many translation runs of `grid` a selection holds (a --quick grid has fewer starts and seeds)."""
    return len(Grid(grid.preset, grid.quick, only=list(selection)).finetune_jobs())


def plan(probe: Probe, grid: Grid, seconds: float, pretrained: bool) -> Plan:
    """The runs that fill `seconds`: the pre-trainings' steps (none if `pretrained`), the fine-tunings' steps, and
    which translation runs: with the second seeds where each still gets MIN_SEED_EPOCHS epochs, else without."""
    for selection in SELECTIONS:
        models = models_of(grid, selection)
        fixed = probe.finetune.job_seconds + probe.score_seconds(models) + (0 if pretrained else
                                                                            probe.pretrain.job_seconds)
        training = max(0.0, SAFETY * (seconds - fixed))
        pretraining = 0.0 if pretrained else PRETRAIN_SHARE * training
        chosen = Plan(int(pretraining / probe.pretrain.step_seconds),
                      max(1, int((training - pretraining) / probe.finetune.step_seconds)), selection, models, probe)
        if chosen.finetune_epochs >= MIN_SEED_EPOCHS:
            break
    return chosen


def probe_settings(experiment: Experiment, steps: int) -> dict[str, str | int]:
    """The probe's jobs: every job the plan may choose, each `steps` steps long (the fine-tunings' epochs sized
    on the probe's training pairs, which this carves as the grid does)."""
    train_pairs = len(experiment.source("train", "ko").read_text(encoding="utf-8").splitlines())
    epochs = f"{steps * experiment.scale['batch_size'] / train_pairs:.4g}"
    return {"PROBE_SCALE": f"pretrain={steps} eval_interval={steps} finetune_epochs={epochs}",
            "PROBE_ONLY": " ".join((PRETRAININGS, *SELECTIONS[0])),
            "PROBE_MODELS": models_of(experiment, SELECTIONS[0])}


def described(probe: Probe) -> str:
    return (f"probe: a pre-training step {probe.pretrain.step_seconds:.4f} s (+ {probe.pretrain.job_seconds:.0f} s a "
            f"job), a fine-tuning step {probe.finetune.step_seconds:.4f} s (+ {probe.finetune.job_seconds:.0f} s a "
            f"job), a scoring process {probe.scoring.start_seconds:.1f} s + {probe.scoring.line_seconds:.4f} s a "
            f"line ({sum(probe.model_scoring)} lines, {len(probe.model_scoring)} processes a model); "
            f"{probe.train_pairs} training pairs, batch {probe.batch_size}")


def planned_settings(experiment: Experiment, args: argparse.Namespace) -> dict[str, str | int | float]:
    probe = measure(experiment, args.score_window, args.score_processes)
    chosen = plan(probe, experiment, args.seconds, args.pretrained)
    predicted = chosen.seconds()
    settings = {"FINETUNE_EPOCHS": chosen.finetune_epochs, "ONLY": " ".join((PRETRAININGS, *chosen.selection)),
                "MODELS": chosen.models, **{name: round(value) for name, value in predicted.items()}}
    if args.pretrained:  # the pre-trainings' steps and evaluation interval were decided before: keep them
        del settings["T_PRETRAIN"], predicted["T_PRETRAIN"]
        eval_interval, pretraining = args.eval_interval, "pre-trained"
    else:
        print(described(probe), file=sys.stderr)
        eval_interval = max(1, min(chosen.pretrain_steps or chosen.finetune_steps,
                                   chosen.finetune_steps) // EVALUATIONS)
        settings.update(PRETRAIN_STEPS=chosen.pretrain_steps, EVAL_INTERVAL=eval_interval)
        pretraining = f"pre-training {chosen.pretrain_steps} steps"
    print(f"plan for {args.seconds:.0f} s: {pretraining}, fine-tuning {chosen.finetune_steps} steps "
          f"({chosen.finetune_epochs} epochs) of {chosen.models} models, evaluation every {eval_interval} steps; "
          "expected " + ", ".join(f"{name} {value:.0f} s" for name, value in predicted.items()), file=sys.stderr)
    return settings


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("--probe", type=Path, required=True, help="the probe's --out")
    parser.add_argument("--data", type=Path, required=True, help="the --data of the probe and the runs")
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--probe-steps", type=int, help="print the probe's settings, for runs this many steps long")
    parser.add_argument("--seconds", type=float, help="what the phases to plan may take together")
    parser.add_argument("--score-window", type=float,
                        help="how long the probe's scoring ran (the translations it finished by then set the pace)")
    parser.add_argument("--score-processes", type=int, default=1, help="processes that share the scoring")
    parser.add_argument("--pretrained", action="store_true", help="plan the fine-tuning alone")
    parser.add_argument("--eval-interval", type=int, help="the pre-trainings' (kept: it is part of their commands)")
    args = parser.parse_args(argv)
    if args.probe_steps is None and (args.seconds is None or args.score_window is None):
        parser.error("give --probe-steps, or --seconds and --score-window")
    if args.pretrained and args.eval_interval is None:
        parser.error("--pretrained keeps the pre-trainings' --eval-interval: give it")
    experiment = Experiment(args.preset, args.quick, data=args.data.absolute(), out=args.probe.absolute())
    settings = probe_settings(experiment, args.probe_steps) if args.probe_steps else planned_settings(experiment,
                                                                                                       args)
    for name, value in settings.items():
        print(f"{name}='{value}'")
    return 0


if __name__ == "__main__":
    sys.exit(main())
