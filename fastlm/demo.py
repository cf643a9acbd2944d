"""`fastlm demo`: the whole pipeline on the bilingual sample shipped in fastlm/demo_data, in about 3 minutes on
2 CPU cores: train a tokenizer, prepare the corpora, pre-train a tiny encoder (masked LM) and decoder (causal LM),
merge them, fine-tune ko->en, translate a few sentences, and print a short report.

Each stage is what the matching `fastlm` subcommand runs (fastlm.train.tasks), so the demo doubles as a tour of
the command line; the equivalent commands are printed as it goes.
"""

from __future__ import annotations

import contextlib
import tempfile
import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from fastlm.train.config import TrainConfig

VALID_PAIRS = 24  # the sample's last pairs, held out for validation and BLEU
VOCAB_SIZE = 1024  # a few hundred merges beyond the 260 base tokens: enough for a few hundred short sentences
MAX_LEN = 64  # the sample's sentences are short; 64 tokens hold every one of them
# Steps per stage at scale 1: the whole demo took 94 s (2 min 19 s of CPU) on a shared 2-core box at load ~2.6,
# leaving room under the 3-minute budget on a busier one (158 s beside another training job). Fine-tuning reached
# BLEU ~21 on the 24 held-out pairs at the tiny preset's former lr 3e-3, 26.9 at its lr 1e-3 (with 15% masking): a
# pipeline check, not translation quality, since 13 of those 24 English sentences are at least 0.8 similar to a
# training sentence (docs/RESULTS.md has the real experiment).
STEPS = {"encoder": 200, "decoder": 200, "finetune": 600}


@dataclass
class StageReport:
    name: str
    seconds: float
    result: str


def stage_config(steps: int, task: str) -> TrainConfig:
    """The tiny preset with the task's defaults, shortened to `steps`, evaluating four times and keeping
    checkpoints light."""
    interval = max(1, steps // 4)
    values = dict(max_steps=steps, warmup_steps=max(1, steps // 10), max_len=MAX_LEN, eval_interval=interval,
                  eval_batches=4, checkpoint_interval=steps, keep_last=1, log_interval=max(1, steps // 10))
    return TrainConfig.preset("tiny", task, **values)


def split_sample(data_dir: Path) -> dict[str, Path]:
    """The shipped sample as train/valid files (line-aligned .ko/.en), written under `data_dir`."""
    sample = resources.files("fastlm") / "demo_data"
    files = {}
    for lang in ("ko", "en"):
        lines = (sample / f"sample.{lang}").read_text(encoding="utf-8").splitlines(keepends=True)
        for split, part in (("train", lines[:-VALID_PAIRS]), ("valid", lines[-VALID_PAIRS:])):
            path = data_dir / f"{split}.{lang}"
            path.write_text("".join(part), encoding="utf-8")
            files[f"{split}.{lang}"] = path
    return files


def run_demo(workdir: str | Path | None = None, *, scale: float = 1.0, translate_count: int = 5) -> list[StageReport]:
    """Run every stage in `workdir` (a temporary directory if None); `scale` multiplies the step counts."""
    with contextlib.ExitStack() as stack:
        root = Path(workdir) if workdir else Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="fastlm-")))
        root.mkdir(parents=True, exist_ok=True)
        return _run(root, scale, translate_count, outputs_kept=workdir is not None)


def _stage(title: str, command: str) -> float:
    print(f"\n== {title}\n   $ {command}", flush=True)
    return time.perf_counter()


def _run(root: Path, scale: float, translate_count: int, outputs_kept: bool) -> list[StageReport]:
    from fastlm.data.prepare import prepare_corpus, prepare_parallel_corpus
    from fastlm.data.readers import ParallelLines
    from fastlm.tokenizer import Tokenizer
    from fastlm.train.tasks import finetune, load_model, pretrain
    from fastlm.translation import translate_texts

    reports: list[StageReport] = []
    data = root / "data"
    data.mkdir(exist_ok=True)
    files = split_sample(data)
    steps = {name: max(4, int(count * scale)) for name, count in STEPS.items()}

    tokenizer_path = root / "tokenizer.json"
    started = _stage("1. tokenizer", f"fastlm tokenizer train --input {data}/train.ko {data}/train.en "
                                     f"--vocab-size {VOCAB_SIZE} --output {tokenizer_path}")
    tokenizer = Tokenizer.train([files["train.ko"], files["train.en"]], vocab_size=VOCAB_SIZE)
    tokenizer.save(tokenizer_path)
    reports.append(StageReport("tokenizer", time.perf_counter() - started, f"{tokenizer.vocab_size} tokens"))

    started = _stage("2. prepare", f"fastlm prepare --tokenizer {tokenizer_path} --input {data}/train.ko "
                                   f"--output {root}/corpus/train.ko   (and train.en, valid.*, the pairs)")
    corpora = root / "corpus"
    for split in ("train", "valid"):
        for lang in ("ko", "en"):
            prepare_corpus(files[f"{split}.{lang}"], tokenizer, corpora / f"{split}.{lang}", progress=False)
        prepare_parallel_corpus(ParallelLines(files[f"{split}.ko"], files[f"{split}.en"]), tokenizer,
                                corpora / f"{split}.ko-en", progress=False)
    reports.append(StageReport("prepare", time.perf_counter() - started, "6 corpora"))

    runs = root / "runs"
    for arch, lang in (("encoder", "ko"), ("decoder", "en")):
        started = _stage(f"3. pre-train the {arch} on {lang}",
                         f"fastlm pretrain --arch {arch} --tokenizer {tokenizer_path} --train {corpora}/train.{lang} "
                         f"--valid {corpora}/valid.{lang} --run-dir {runs}/{arch} --max_steps {steps[arch]}")
        # The demo owns its workdir: running it again there starts its runs over.
        result = pretrain(arch, tokenizer_path, corpora / f"train.{lang}", corpora / f"valid.{lang}", runs / arch,
                          stage_config(steps[arch], "pretrain"), overwrite=True)
        summary = f"valid loss {result.metrics['loss']:.3f}, accuracy {result.metrics['accuracy']:.2f}"
        reports.append(StageReport(f"pre-train {arch}", time.perf_counter() - started, summary))

    started = _stage("4. merge and fine-tune ko->en",
                     f"fastlm finetune --encoder {runs}/encoder --decoder {runs}/decoder --tokenizer {tokenizer_path} "
                     f"--train {corpora}/train.ko-en --valid {corpora}/valid.ko-en --run-dir {runs}/finetune "
                     f"--max_steps {steps['finetune']}")
    result = finetune(runs / "encoder", runs / "decoder", tokenizer_path, corpora / "train.ko-en",
                      corpora / "valid.ko-en", runs / "finetune", stage_config(steps["finetune"], "finetune"),
                      bleu_sentences=VALID_PAIRS, overwrite=True)
    reports.append(StageReport("fine-tune ko->en", time.perf_counter() - started,
                               f"valid loss {result.metrics['loss']:.3f}, BLEU {result.metrics.get('bleu', 0):.1f}"))

    started = _stage("5. translate", f"fastlm translate --model {runs}/finetune --tokenizer {tokenizer_path} "
                                     "\"<Korean sentence>\"")
    model = load_model(runs / "finetune")
    sources = files["valid.ko"].read_text(encoding="utf-8").splitlines()[:translate_count]
    references = files["valid.en"].read_text(encoding="utf-8").splitlines()[:translate_count]
    for source, reference, output in zip(sources, references, translate_texts(model, tokenizer, sources)):
        print(f"   ko:  {source}\n   out: {output}\n   ref: {reference}")
    reports.append(StageReport("translate", time.perf_counter() - started, f"{len(sources)} held-out sentences"))

    print("\n== report (a tiny model on a few hundred pairs: it shows the pipeline, not translation quality)")
    for report in reports:
        print(f"   {report.name:<18} {report.seconds:6.1f} s   {report.result}")
    kept = f"outputs in {root}" if outputs_kept else "outputs removed (keep them with --workdir DIR)"
    print(f"   {'total':<18} {sum(r.seconds for r in reports):6.1f} s   {kept}")
    return reports
