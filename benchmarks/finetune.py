"""`fastlm finetune` throughput, before and after: the same command from two source trees, or from this one with
other options, each run in its own process(es) with that code's defaults, in turns (A B B A ...), on one corpus.

Every run trains a randomly initialised Seq2SeqLM for --steps steps without evaluation; a run's throughput is its
target tokens over the seconds of its steps after --warmup (the Trainer's own per-step clock, which leaves out
checkpoints), and each variant reports the median over its runs. Each step's batch is rebuilt here from the corpus
(with this tree's TranslationBatches) and checked against the tokens the run logged: a variant that trained on other
batches is an error, not a row.

    mkdir /tmp/before && git archive 8796e24 | tar -x -C /tmp/before && cp fastlm/_native*.so /tmp/before/fastlm/
    python benchmarks/finetune.py --before /tmp/before --tokenizer tok.json --train data/ko-en \\
        --variant "after, fp32" "--precision fp32" \\
        --variant "before, 1 thread" "PYTHONPATH=/tmp/before OMP_NUM_THREADS=1"
    python benchmarks/finetune.py --tokenizer tok.json --train data/ko-en --batch-size 16 \\
        --variant "1 process x 2 threads" "--grad_accum 2" --variant "2 processes x 1 thread" "--nproc 2"

A variant's OPTIONS are `fastlm finetune` options added to the common ones; leading NAME=VALUE words set
environment variables of its process, as in a shell (PYTHONPATH=DIR runs the tree in DIR), and `--nproc N` runs it
under torchrun on N processes (one thread each, torchrun's default).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.harness import Measurement, Row, report  # noqa: E402
from fastlm.train import tasks  # noqa: E402
from fastlm.train.config import TrainConfig  # noqa: E402


@dataclass
class Variant:
    name: str
    source: Path                   # the tree whose fastlm runs (unless env sets PYTHONPATH)
    options: list[str] = field(default_factory=list)  # fastlm finetune options after the common ones
    env: dict[str, str] = field(default_factory=dict)
    processes: int = 1
    throughputs: list[float] = field(default_factory=list)  # target tokens/s of each run

    @property
    def micro_batches_per_step(self) -> int:
        accumulation = self.options[self.options.index("--grad_accum") + 1] if "--grad_accum" in self.options else 1
        return int(accumulation) * self.processes

    def command(self, common: list[str], run_dir: Path) -> list[str]:
        launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                     str(self.processes), "-m", "fastlm"] if self.processes > 1 else [sys.executable, "-m", "fastlm"])
        return [*launcher, "finetune", *common, "--run-dir", str(run_dir), "--overwrite", *self.options]

    def description(self) -> str:
        launch = f" on {self.processes} processes" if self.processes > 1 else ""
        settings = shlex.join([f"{key}={value}" for key, value in self.env.items()] + self.options)
        return f"{self.name} = {self.source}{launch} {settings}".rstrip()


def parse_variant(name: str, text: str) -> Variant:
    words = shlex.split(text)
    variant = Variant(name, REPO)
    while words and "=" in words[0] and not words[0].startswith("-"):
        key, value = words.pop(0).split("=", 1)
        variant.env[key] = value
    if "--nproc" in words:
        at = words.index("--nproc")
        variant.processes = int(words[at + 1])
        del words[at:at + 2]
    variant.options = words
    return variant


def tokens_per_step(args, micro_batches: int) -> tuple[list[int], list[int]]:
    """(all real tokens, target tokens) of each step of `micro_batches` micro-batches, as `fastlm finetune` with
    these settings builds them."""
    config = TrainConfig.preset(args.preset, batch_size=args.batch_size, max_len=args.max_len, seed=args.seed)
    tokenizer = tasks.load_tokenizer(args.tokenizer)
    batches = tasks.translation_batches(tasks.open_parallel(args.train, tokenizer), tokenizer, config, shuffle=True)
    if batches.num_batches(0) < args.steps * micro_batches:
        raise SystemExit(f"--steps {args.steps}: the corpus gives only {batches.num_batches(0)} batches per epoch")
    every, target = [], []
    for step in range(args.steps):
        steps_batches = [batches.batch(0, index) for index in range(step * micro_batches, (step + 1) * micro_batches)]
        target.append(sum(int(batch["tgt_lengths"].sum()) for batch in steps_batches))
        every.append(target[-1] + sum(int(batch["src_lengths"].sum()) for batch in steps_batches))
    return every, target


def run_once(variant: Variant, common: list[str], run_dir: Path) -> list[dict]:
    """One `fastlm finetune` run of `variant`; its per-step train records."""
    command = variant.command(common, run_dir)
    env = {**os.environ, "PYTHONPATH": str(variant.source), **variant.env}
    result = subprocess.run(command, env=env, cwd=run_dir.parent, capture_output=True, text=True)
    if result.returncode:
        raise SystemExit(f"{variant.name}: `{shlex.join(command)}` failed:\n{result.stderr[-3000:]}")
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [record for record in records if record["kind"] == "train"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--before", type=Path, help="source tree of the code before (with its native extension "
                        "built or copied in); a variant 'before' of its defaults")
    parser.add_argument("--tokenizer", required=True)
    parser.add_argument("--train", required=True, help="prepared parallel corpus")
    parser.add_argument("--variant", nargs=2, action="append", default=[], metavar=("NAME", "OPTIONS"),
                        help="one more variant (repeatable; see above)")
    parser.add_argument("--preset", default="tiny", help="TrainConfig preset (default: tiny)")
    parser.add_argument("--batch-size", type=int, default=32, help="pairs per micro-batch (default: 32)")
    parser.add_argument("--max-len", type=int, default=128, help="longest source and target (default: 128)")
    parser.add_argument("--model-options", default="--model.positional rope",
                        help="--model.KEY options (default: the experiment's rope)")
    parser.add_argument("--steps", type=int, default=30, help="steps per run (default: 30)")
    parser.add_argument("--warmup", type=int, default=3, help="first steps of each run not timed (default: 3)")
    parser.add_argument("--rounds", type=int, default=2, help="runs per variant (default: 2)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON to PATH")
    args = parser.parse_args()
    if not 0 <= args.warmup < args.steps:
        parser.error(f"--warmup {args.warmup}: expected 0 <= warmup < --steps {args.steps}")
    common = ["--encoder", "random", "--decoder", "random", "--tokenizer", args.tokenizer, "--train", args.train,
              "--preset", args.preset, "--batch_size", str(args.batch_size), "--max_len", str(args.max_len),
              "--max_steps", str(args.steps), "--eval_interval", "0", "--checkpoint_interval", str(args.steps),
              "--bleu-sentences", "0", "--progress", "false", "--seed", str(args.seed),
              *shlex.split(args.model_options)]
    variants = [Variant("after", REPO)] + ([Variant("before", args.before.resolve())] if args.before else [])
    variants += [parse_variant(name, text) for name, text in args.variant]
    steps = {count: tokens_per_step(args, count) for count in {v.micro_batches_per_step for v in variants}}
    timed = slice(args.warmup, args.steps)
    with tempfile.TemporaryDirectory(prefix="fastlm-finetune-bench-") as scratch:
        for round_ in range(args.rounds):
            for variant in variants if round_ % 2 == 0 else variants[::-1]:
                records = run_once(variant, common, Path(scratch) / "run")
                every, target = steps[variant.micro_batches_per_step]
                if [record["tokens"] for record in records] != every:
                    raise SystemExit(f"{variant.name}: its steps trained on other batches than this tree builds "
                                     "(compare their TranslationBatches): not a like-for-like comparison")
                seconds = sum(record["tokens"] / record["tokens_per_s"] for record in records[timed])
                variant.throughputs.append(sum(target[timed]) / seconds)
                print(f"round {round_ + 1}, {variant.name}: {variant.throughputs[-1]:.0f} target tokens/s",
                      file=sys.stderr, flush=True)
    per_step = sorted({round(statistics.mean(target[timed])) for _, target in steps.values()})
    case = (f"finetune {args.preset}, {args.batch_size} pairs per micro-batch, max_len {args.max_len} "
            f"({' / '.join(map(str, per_step))} target tokens per step), steps {args.warmup + 1}-{args.steps}")
    row = Row(case, "target tokens/s", higher_is_better=True,
              results=[Measurement(v.name, statistics.median(v.throughputs)) for v in variants])
    runs = "; ".join(f"{v.name}: " + ", ".join(f"{t:.0f}" for t in v.throughputs) for v in variants)
    notes = (f"Each variant ran {args.rounds} times in turns; the median run is shown. Runs (target tokens/s): "
             f"{runs}. Common options: {shlex.join(common)}. Variants: "
             + "; ".join(variant.description() for variant in variants) + ".")
    report("fastlm finetune throughput, before and after", rows=[row], json_path=args.json, notes=notes,
           ours="after")


if __name__ == "__main__":
    main()
