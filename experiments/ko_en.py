"""Does pre-training help Korean->English translation? The experiment of issue #15, as one resumable script that
drives `fastlm` commands alone (`python -m fastlm ...` in subprocesses):

1. tokenizers: byte- and char-level BPE at 8k/16k/32k (tokens per sentence, byte-fallback rate, training time);
2. plateau: what moves the masked-LM encoder off the unigram plateau (lr, warmup, mask rate, norm position,
   positions, dropout, vocab size) on byte-level 8k, the setting where it stalled;
3. pretrain: an encoder (MLM on ko) and a decoder (causal on en) per tokenizer level;
4. finetune: ko->en from Rnd2Rnd, Enc2Rnd, Rnd2Dec, Enc2Dec (x the three cross-attention inits), 2 seeds for the
   main comparison, same budget for all; each followed by its test scores (sacrebleu BLEU and chrF, detokenised,
   greedy and beam 4, via `fastlm translate --input`) on the raw news test split and on an in-domain held-out set
   carved from train, its sample translations, and its source use (the valid loss with mispaired sources);
5. datasize: one start (grid.py's DATASIZE_START) fine-tuned on a quarter and a half of the train pairs;
6. sweep: weight decay x lr on the encoder (and recipe: the fine-tuning recipe's low-resource settings).

    python experiments/ko_en.py                        # the whole grid, CPU scale (hours on 2 cores)
    python experiments/ko_en.py --stages plateau       # one stage (prerequisites are made as needed)
    python experiments/ko_en.py --preset small         # the same grid at GPU scale
    python experiments/ko_en.py --preset small --scale pretrain=3000 finetune_epochs=4   # its steps to a budget
    python experiments/ko_en.py --quick --out /tmp/q   # a minutes-long smoke version of every stage
    python experiments/ko_en.py --report               # docs/RESULTS.md and its plots from what has finished

Every job writes OUT/results/<stage>/<name>.json when it finishes; its run directory is OUT/runs/<stage>/<name>.
Running the script again skips finished jobs, continues interrupted ones exactly (`--resume`) and reruns a job
whose command (or a job it depends on) changed. SIGINT/SIGTERM stop the running job at a checkpoint.

On a CPU, give each process one thread (OMP_NUM_THREADS=1) and start one process per core with the same command:
each training job is claimed by one process (a lock file under OUT/locks, released when the process ends), and
the others go on to the next one. On a box busier than its cores, torch's default threads spin: a tiny-model MLM
step took 13 s there, 0.75 s with one thread.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import json
import math
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from grid import (BEAMS, DECODER_SETTINGS, ENCODER_SETTINGS, EVERYDAY, EVERYDAY_PAIRS, HELDOUT, HELDOUT_SEED,
                  LEVELS, MISPAIRED, MODEL_SETTINGS, PLATEAU, PLATEAU_BASELINE, QUICK_LINES, QUICK_MODEL,
                  QUICK_RECIPE, RECIPE, RECIPE_BASE, REPO, SAMPLES, SCALES, STAGES, STARTS, SUBSET_SEED, TEST_SETS,
                  TRANSLATOR, Grid, finetune_name, overrides, scale_override, subset_split, test_name,
                  translation_path)
from report import write_report

sys.path.insert(0, str(REPO))  # the fastlm next to this script, for the statistics


class JobFailed(Exception):
    """A fastlm command ended with an error: the job stays unfinished and the next run of the script retries it."""

    def __init__(self, message: str, code: int | None = None):
        super().__init__(message)
        self.code = code


class Stopped(Exception):
    """SIGINT/SIGTERM: the running job checkpointed and stopped; the script stops too."""


@dataclass
class Experiment(Grid):
    """The grid's jobs, run from the data in `data` into `out`; with `train_only`, the training jobs without the
    scoring that follows them (a later run without it scores them)."""
    data: Path
    out: Path
    train_only: bool = False
    child: subprocess.Popen | None = field(default=None, init=False)

    # ----- bookkeeping -----

    def log(self, message: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)

    def result_path(self, stage: str, name: str) -> Path:
        return self.out / "results" / stage / f"{name}.json"

    def run_dir(self, stage: str, name: str) -> Path:
        return self.out / "runs" / stage / name

    @contextlib.contextmanager
    def claim(self, stage: str, name: str, wait: bool = False):
        """True inside if this process holds the job's lock; False if another process runs the job now, unless
        `wait` (for what later jobs need: it waits for the other process). The lock is the kernel's (flock), so a
        killed process never leaves a job locked."""
        path = self.out / "locks" / stage / f"{name}.lock"
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
            except BlockingIOError:
                self.log(f"{stage}/{name}: running in another process: skipped")
                yield False
                return
            yield True

    def finished(self, stage: str, name: str, key: str, quiet: bool = False) -> dict | None:
        """The job's result if it finished with this key (its command and those of the jobs it depends on)."""
        path = self.result_path(stage, name)
        if not path.is_file():
            return None
        result = json.loads(path.read_text(encoding="utf-8"))
        if result.get("key") == key:
            return result
        if not quiet:
            self.log(f"{stage}/{name}: its command changed since it finished: running it again")
        return None

    def job_key(self, command: list, *depends_on: str) -> str:
        """What a result was made by: its command, with the data and output directories written $DATA and $OUT
        (moved or reached by another path, they keep their results), and the keys of the jobs it reads from."""
        places = {str(self.out): "$OUT", str(self.data): "$DATA"}
        words = []
        for word in map(str, command):
            for place, name in places.items():
                word = word.replace(place, name)
            words.append(word)
        return hashlib.sha256(json.dumps([words, *depends_on]).encode()).hexdigest()[:16]

    def save(self, stage: str, name: str, result: dict) -> dict:
        path = self.result_path(stage, name)
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(".json.tmp")
        partial.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
        os.replace(partial, path)  # a result file is whole or absent, whenever the script is killed
        return result

    def fastlm(self, *args: str | Path, stdout=None) -> float:
        """Run `python -m fastlm ARGS`, forwarding SIGINT/SIGTERM to it; returns its wall time in seconds."""
        command = [sys.executable, "-m", "fastlm", *map(str, args)]
        self.log("$ fastlm " + " ".join(map(str, args)))
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, (str(REPO), os.environ.get("PYTHONPATH"))))}
        started = time.perf_counter()
        self.child = subprocess.Popen(command, env=env, stdout=stdout, start_new_session=True)
        code = self.child.wait()
        self.child = None
        if code < 0 or code in (128 + signal.SIGINT, 128 + signal.SIGTERM):  # killed, or stopped at a checkpoint
            raise Stopped(f"fastlm stopped by a signal (exit code {code})")
        if code != 0:
            raise JobFailed(f"fastlm {args[0]} exited with code {code}", code)
        return time.perf_counter() - started

    def forward_signal(self, signal_number: int, frame) -> None:
        if self.child is not None:
            self.child.send_signal(signal_number)  # fastlm checkpoints, stops, and wait() above returns
        else:
            raise Stopped(f"stopped by signal {signal_number}")

    # ----- data -----

    def source_path(self, split: str, lang: str) -> Path:
        """Where the raw text of a split is, once `source` made it."""
        if split in ("train", HELDOUT, MISPAIRED, EVERYDAY, *self.subset_splits):
            return self.out / "data" / f"{split}.{lang}"
        return self.raw_path(split, lang)

    def raw_path(self, split: str, lang: str) -> Path:
        """Where a split is as --data gives it, or its --quick cut."""
        return self.out / "data" / "quick" / f"{split}.{lang}" if self.quick else self.data / f"{split}.{lang}"

    def source(self, split: str, lang: str) -> Path:
        """The raw text of a split, made if need be. "train" is the train split without the HELDOUT pairs, which
        are their own split (carve_heldout). MISPAIRED is the valid split with every Korean sentence moved one line
        down (the last to the top) and the English as it is, so that each English sentence has the Korean of the
        pair before it."""
        path = self.source_path(split, lang)
        if path.is_file():
            return path
        if split in ("train", HELDOUT):
            self.carve_heldout()
        elif split == MISPAIRED:
            lines = self.source("valid", lang).read_text(encoding="utf-8").splitlines()
            write_lines(path, lines[-1:] + lines[:-1] if lang == "ko" else lines)
        elif split == EVERYDAY:
            write_lines(path, [pair[("ko", "en").index(lang)] for pair in EVERYDAY_PAIRS])
        elif split in self.subset_splits:
            self.carve_subsets()
        else:
            self.raw_source(split, lang)
        return path

    def raw_source(self, split: str, lang: str) -> Path:
        """A split as given by --data; in --quick, its first lines, or the bundled sample's where --data has no
        train.ko (see quick_lines)."""
        path = self.raw_path(split, lang)
        if self.quick and not path.is_file():
            write_lines(path, quick_lines(self.data, split, lang))
        return path

    def data_sources(self) -> dict[str, list[tuple[str, int]]] | None:
        """The corpora of each split of --data, by its SOURCES.md table (sources_table), where that table describes
        train.ko line by line (train_sources); None in --quick (its splits are cuts) or where it does not."""
        if self.quick or not (self.data / "SOURCES.md").is_file():
            return None
        text = (self.data / "SOURCES.md").read_text(encoding="utf-8")
        train_lines = len(self.raw_source("train", "ko").read_text(encoding="utf-8").splitlines())
        return sources_table(text) if train_sources(text, train_lines) else None

    def heldout_sources(self) -> list[str] | None:
        """The corpus each held-out pair came from (data_sources); None where the corpora are not known."""
        sources = self.data_sources()
        if sources is None:
            return None
        by_line = [name for name, count in sources["train"] for _ in range(count)]
        return [by_line[line] for line in heldout_lines(len(by_line), self.heldout_pairs)]

    def data_name(self) -> str:
        """The data the grid ran on, in words for the report."""
        data = f"`{os.path.relpath(self.data, REPO)}`"
        if not self.quick:
            return data
        counts = "/".join(str(QUICK_LINES[split]) for split in ("train", "valid", "test"))
        if (self.data / "train.ko").is_file():
            return f"the first {counts} lines of train/valid/test of {data}"
        return f"fastlm's bundled sample (`fastlm/demo_data`), cut into {counts} train/valid/test lines ({data} " \
               "has no train.ko)"

    def carve_heldout(self) -> None:
        """Split the train pairs into OUT/data/train.* and OUT/data/heldout.* (heldout_lines, kept in train
        order); the held-out files are written last, so a killed carve redoes itself."""
        sides = {lang: self.raw_source("train", lang).read_text(encoding="utf-8").splitlines()
                 for lang in ("ko", "en")}
        if len(sides["ko"]) != len(sides["en"]):
            raise JobFailed(f"train.ko has {len(sides['ko'])} lines, train.en {len(sides['en'])}: expected pairs")
        chosen = set(heldout_lines(len(sides["ko"]), self.heldout_pairs))
        for split in ("train", HELDOUT):
            for lang, lines in sides.items():
                write_lines(self.source_path(split, lang),
                            [line for i, line in enumerate(lines) if (i in chosen) == (split == HELDOUT)])

    def carve_subsets(self) -> None:
        """OUT/data/trainNN.*: the first fraction of the train pairs (held-out removed) in one draw with SUBSET_SEED,
        kept in train order, so that each subset holds the smaller ones."""
        import numpy as np

        sides = {lang: self.source("train", lang).read_text(encoding="utf-8").splitlines() for lang in ("ko", "en")}
        order = np.random.default_rng(SUBSET_SEED).permutation(len(sides["ko"]))
        for fraction in self.data_fractions:
            chosen = sorted(order[:round(fraction * len(order))].tolist())
            for lang, lines in sides.items():
                write_lines(self.source_path(subset_split(fraction), lang), [lines[i] for i in chosen])

    def tokenizer(self, level: str, vocab_size: int) -> tuple[Path, str]:
        """The tokenizer file of a level and size (trained and measured by the tokenizers stage) and its key."""
        name = f"{level}-{vocab_size}"
        path = self.out / "tokenizers" / f"{name}.json"
        command = ["tokenizer", "train", "--input", self.source("train", "ko"), self.source("train", "en"),
                   "--level", level, "--vocab-size", str(vocab_size), "--output", path]
        key = self.job_key(command)
        if self.finished("tokenizers", name, key) and path.is_file():
            return path, key
        with self.claim("tokenizers", name, wait=True):
            if not (self.finished("tokenizers", name, key, quiet=True) and path.is_file()):
                path.parent.mkdir(parents=True, exist_ok=True)
                path.unlink(missing_ok=True)  # the job's older output (`tokenizer train` never replaces unasked)
                seconds = self.fastlm(*command)
                self.save("tokenizers", name, {"key": key, "command": list(map(str, command)), "level": level,
                                               "vocab_size": vocab_size, "seconds": seconds,
                                               **tokenizer_statistics(path, self.source)})
        return path, key

    def corpus(self, tokenizer: Path, split: str, langs: str) -> Path:
        """A prepared corpus of one split: "ko" or "en" (one language) or "ko-en" (the pairs)."""
        path = self.out / "corpora" / tokenizer.stem / f"{split}.{langs}"
        done = path / ("src" if langs == "ko-en" else "") / "meta.json"  # prepare writes its meta.json last
        made_by, tokenizer_hash = path / "tokenizer_sha256", hashlib.sha256(tokenizer.read_bytes()).hexdigest()
        made = lambda: done.is_file() and made_by.is_file() and made_by.read_text() == tokenizer_hash  # noqa: E731
        if made():
            return path
        with self.claim("corpora", f"{tokenizer.stem}-{split}.{langs}", wait=True):
            if not made():
                inputs = [self.source(split, lang) for lang in langs.split("-")]
                self.fastlm("prepare", "--tokenizer", tokenizer, "--input", *inputs, "--output", path, "--quiet",
                            "--overwrite")
                made_by.write_text(tokenizer_hash)  # a retrained tokenizer (changed command) prepares it again
        return path

    # ----- training jobs -----

    def train_settings(self, steps: int, seed: int = 0) -> dict[str, str]:
        settings = {"preset": self.preset, "max_steps": steps, "batch_size": self.scale["batch_size"],
                    "max_len": self.scale["max_len"], "eval_interval": self.scale["eval_interval"],
                    "checkpoint_interval": self.scale["eval_interval"], "eval_batches": "0", "seed": seed,
                    "progress": "false"}
        if self.quick:
            settings.update(warmup_steps="1")
        return settings

    def model_settings(self, settings: dict[str, str] = MODEL_SETTINGS) -> dict[str, str]:
        """--model.KEY settings: the micro model of --quick, then `settings` (the grid's architecture)."""
        micro = {f"model.{key}": value for key, value in QUICK_MODEL.items()} if self.quick else {}
        return {**micro, **settings}

    def train(self, stage: str, name: str, command: list, depends_on: tuple[str, ...] = ()) -> dict | None:
        """Run a pretrain/finetune command into its run directory, unless finished; its result, or None if it
        failed. (--only selects jobs in the stage loops: a selected job still makes what it depends on.)"""
        key = self.job_key(command, *depends_on)
        done = self.finished(stage, name, key)
        if done:
            return done
        with self.claim(stage, name) as mine:
            return self.run_training(stage, name, command, key) if mine else None

    def run_training(self, stage: str, name: str, command: list, key: str) -> dict | None:
        run_dir = self.run_dir(stage, name)
        done = self.finished(stage, name, key, quiet=True)  # by another process, since this one looked
        if done:
            return done
        checkpoints, run_key = run_dir / "checkpoints", run_dir / "run_key"
        same_job = run_key.is_file() and run_key.read_text() == key
        if same_job and checkpoints.is_dir() and any(checkpoints.glob("*.pt")):
            again = ["--resume"]
        else:
            again = ["--overwrite"] if run_dir.exists() else []
        run_dir.mkdir(parents=True, exist_ok=True)
        run_key.write_text(key)  # the job its checkpoints belong to: only that job resumes from them
        # The wall time of the job's segments so far: a long job runs over several sessions, each resuming it.
        spent = run_dir / "seconds"
        seconds = float(spent.read_text()) if again == ["--resume"] and spent.is_file() else 0.0
        started = time.perf_counter()
        try:
            self.fastlm(*command, "--run-dir", run_dir, *again)
            status = "finished"
        except JobFailed as error:
            if error.code != 1:  # 1: training diverged, a result too (with its curve so far); others are retried
                self.log(f"{stage}/{name} failed: {error}")
                return None
            status = "diverged"
        finally:
            seconds += time.perf_counter() - started
            spent.write_text(f"{seconds:.1f}")
        return self.save(stage, name, {"key": key, "command": list(map(str, command)), "status": status,
                                       "seconds": seconds, **run_metrics(run_dir)})

    def pretrain(self, arch: str, level: str) -> tuple[str, str]:
        """The pre-trained model of an arch and level (its run directory) and its key."""
        tokenizer, tokenizer_key = self.tokenizer(level, self.train_vocab)
        lang = "ko" if arch == "encoder" else "en"
        settings = ENCODER_SETTINGS if arch == "encoder" else DECODER_SETTINGS
        command = ["pretrain", "--arch", arch, "--tokenizer", tokenizer,
                   "--train", self.corpus(tokenizer, "train", lang), "--valid", self.corpus(tokenizer, "valid", lang),
                   *overrides(self.train_settings(self.scale["pretrain"]), self.model_settings(), settings)]
        name = f"{level}-{arch}"
        self.train("pretrain", name, command, (tokenizer_key,))
        return str(self.run_dir("pretrain", name)), self.job_key(command, tokenizer_key)

    # ----- stages -----

    def stage_tokenizers(self) -> None:
        for level in LEVELS:
            for vocab_size in self.vocab_sizes:
                self.tokenizer(level, vocab_size)

    def stage_plateau(self) -> None:
        for name in self.plateau_names:
            if not self.wanted(f"plateau/{name}"):
                continue  # nor its tokenizer and corpora
            settings = {**PLATEAU_BASELINE, **PLATEAU[name]}
            vocab = int(settings.pop("vocab", self.train_vocab))
            tokenizer, tokenizer_key = self.tokenizer("byte", vocab)
            command = ["pretrain", "--arch", "encoder", "--tokenizer", tokenizer,
                       "--train", self.corpus(tokenizer, "train", "ko"),
                       "--valid", self.corpus(tokenizer, "valid", "ko"),
                       *overrides(self.train_settings(self.scale["plateau"]), self.model_settings({}), settings)]
            self.train("plateau", name, command, (tokenizer_key,))

    def stage_pretrain(self) -> None:
        for level in self.levels:
            for arch in ("encoder", "decoder"):
                if self.wanted(f"pretrain/{level}-{arch}"):
                    self.pretrain(arch, level)

    def stage_finetune(self) -> None:
        for level, start, init, seed in self.finetune_jobs():  # those --only selects
            name = finetune_name(level, start, init, seed)
            job = self.translation_job(level, start, init, seed)
            if job is None:
                continue
            tokenizer, command, keys = job
            if self.train("finetune", name, command, keys) and not self.train_only:
                model_key = self.job_key(command, *keys)
                self.test("finetune", name, tokenizer, model_key)
                self.source_use(name, tokenizer, model_key)

    def stage_datasize(self) -> None:
        level, start, init, seed = self.datasize_start
        for fraction in self.data_fractions:
            name = self.datasize_name(fraction)
            if not self.wanted(f"datasize/{name}"):
                continue
            job = self.translation_job(level, start, init, seed, train=subset_split(fraction))
            if job is None:
                continue
            tokenizer, command, keys = job
            if self.train("datasize", name, command, keys) and not self.train_only:
                self.test("datasize", name, tokenizer, self.job_key(command, *keys), beams=BEAMS[-1:],
                          everyday=False)

    def translation_job(self, level: str, start: str, init: str, seed: int,
                        train: str = "train") -> tuple[Path, list, tuple[str, ...]] | None:
        """(tokenizer, command, keys of the jobs it reads from) of a translation run on the pairs of split `train`,
        with its step cap set by the whole train split (a subset runs the same schedule); None, said in the log,
        while a pre-trained side it starts from is not finished."""
        tokenizer, tokenizer_key = self.tokenizer(level, self.train_vocab)
        sides, keys = [], [tokenizer_key]
        for side, arch in zip(STARTS[start], ("encoder", "decoder")):
            if side == "random":
                sides.append("random")
                continue
            path, key = self.pretrain(arch, level)
            if not self.result_path("pretrain", Path(path).name).is_file():
                self.log(f"finetune {level} {start}: the {arch} is not pre-trained yet: skipped")
                return None
            sides.append(path)
            keys.append(key)
        model = self.model_settings() if start == "Rnd2Rnd" else {}
        command = ["finetune", "--encoder", sides[0], "--decoder", sides[1], "--tokenizer", tokenizer,
                   "--train", self.corpus(tokenizer, train, "ko-en"),
                   "--valid", self.corpus(tokenizer, "valid", "ko-en"),
                   "--cross-attention-init", init, "--bleu-sentences", "0",
                   *overrides(self.train_settings(self.epoch_steps(self.scale["finetune_epochs"]), seed),
                              {"patience": self.scale["patience"]}, model)]
        return tokenizer, command, tuple(keys)

    def source_use(self, name: str, tokenizer: Path, model_key: str) -> None:
        """How much a translation model reads its source: its loss on the whole valid split with every pair as
        it is and with each English sentence given another sentence's Korean. A model that ignores the source (an
        English LM) scores the same on both."""
        model = self.run_dir("finetune", name) / "model"
        corpora = {"paired": self.corpus(tokenizer, "valid", "ko-en"),
                   "mispaired": self.corpus(tokenizer, MISPAIRED, "ko-en")}
        commands = {kind: ["eval", "--model", model, "--tokenizer", tokenizer, "--data", corpus, "--batch_size", "32",
                           "--eval_batches", "0", "--json"] for kind, corpus in corpora.items()}
        key = self.job_key([*commands["paired"], *commands["mispaired"]], model_key)
        if self.finished("source", name, key):
            return
        with self.claim("source", name) as mine:
            if not mine or self.finished("source", name, key, quiet=True):
                return
            losses = {}
            for kind, command in commands.items():
                output = self.out / "source" / f"{name}-{kind}.json"
                output.parent.mkdir(parents=True, exist_ok=True)
                with open(output, "w", encoding="utf-8") as f:
                    self.fastlm(*command, stdout=f)
                losses[kind] = json.loads(output.read_text(encoding="utf-8"))["loss"]
            self.save("source", name, {"key": key, "command": [list(map(str, c)) for c in commands.values()],
                                       **losses, "gap": losses["mispaired"] - losses["paired"]})

    def test(self, stage: str, name: str, tokenizer: Path, model_key: str, beams: tuple[int, ...] = BEAMS,
             everyday: bool = True) -> None:
        """A translation model's scores on each test set (the news test split, the held-out train pairs) at each of
        `beams`, with its best and worst sentences, and its beam-4 translations of the everyday sentences; its
        translations stay in OUT/translations, where the report reads them for the paired bootstrap between starts
        and for samples."""
        model = self.run_dir(stage, name) / "model"
        for test_set, widths in [*((each, beams) for each in TEST_SETS), *([(EVERYDAY, BEAMS[-1:])] * everyday)]:
            for beam in widths:
                result_name = test_name(name, test_set, beam)
                command = ["translate", "--model", model, "--tokenizer", tokenizer,
                           "--input", self.source(test_set, "ko"), "--beam", beam, *self.translate_batch()]
                key = self.job_key(command, model_key)
                if self.finished("test", result_name, key):
                    continue
                with self.claim("test", result_name) as mine:
                    if mine and not self.finished("test", result_name, key, quiet=True):
                        self.translate_and_score(result_name, command, key, test_set)

    def translate_batch(self) -> list[str]:
        """translate's --batch-size where the scale sets one (none at tiny: the commands its results were made by)."""
        return ["--batch-size", str(self.scale["translate_batch"])] if "translate_batch" in self.scale else []

    def translate_and_score(self, result_name: str, command: list, key: str, test_set: str) -> None:
        output = translation_path(self.out, result_name)
        output.parent.mkdir(parents=True, exist_ok=True)
        with open(output, "w", encoding="utf-8") as f:
            seconds = self.fastlm(*command, stdout=f)
        texts = {lang: self.source(test_set, lang).read_text(encoding="utf-8").splitlines() for lang in ("ko", "en")}
        hypotheses = output.read_text(encoding="utf-8").splitlines()
        self.save("test", result_name, {"key": key, "command": list(map(str, command)), "seconds": seconds,
                                        **test_scores(texts["ko"], hypotheses, texts["en"])})

    def translator(self) -> Path:
        """The TRANSLATOR, made by the finetune stage's jobs it needs (tokenizer, corpora, pre-training, fine-tuning,
        tests), exported for transformers into OUT/translator; its scores and its translations of the everyday
        sentences are printed. The exported directory."""
        level, start, init, seed = TRANSLATOR
        name = finetune_name(level, start, init, seed)
        self.only = [f"finetune/{name}"]
        self.stage_finetune()
        tests = {test_set: self.result_path("test", test_name(name, test_set, BEAMS[-1])) for test_set in TEST_SETS}
        if not all(path.is_file() for path in tests.values()):
            raise JobFailed(f"{name} has no test scores yet (another process may be running its jobs): run again")
        exported = self.out / "translator"
        self.fastlm("export", "--model", self.run_dir("finetune", name) / "model",
                    "--tokenizer", self.tokenizer(level, self.train_vocab)[0], "--output", exported, "--overwrite")
        print(f"\n{start} ({level} level, seed {seed}), beam {BEAMS[-1]}:")
        for test_set, path in tests.items():
            scores = json.loads(path.read_text(encoding="utf-8"))
            print(f"  {test_set}: BLEU {scores['bleu']:.2f}, chrF {scores['chrf']:.1f} "
                  f"({self.source(test_set, 'en')})")
        outputs = translation_path(self.out, test_name(name, EVERYDAY, BEAMS[-1])).read_text(encoding="utf-8")
        print("\nEveryday sentences (source, fastlm, a reference translation):")
        for (korean, reference), output in zip(EVERYDAY_PAIRS, outputs.splitlines()):
            print(f"  {korean}\n    -> {output}\n    (ref: {reference})")
        print(f"\nExported for transformers: {exported}")
        return exported

    def stage_sweep(self) -> None:
        for weight_decay, lr in self.sweep_cells:
            if not self.wanted(f"sweep/wd{weight_decay}-lr{lr}"):
                continue
            tokenizer, tokenizer_key = self.tokenizer("byte", self.train_vocab)
            settings = {**ENCODER_SETTINGS, "lr": lr, "weight_decay": weight_decay}
            command = ["pretrain", "--arch", "encoder", "--tokenizer", tokenizer,
                       "--train", self.corpus(tokenizer, "train", "ko"),
                       "--valid", self.corpus(tokenizer, "valid", "ko"),
                       *overrides(self.train_settings(self.scale["sweep"]), self.model_settings(), settings)]
            self.train("sweep", f"wd{weight_decay}-lr{lr}", command, (tokenizer_key,))

    def epoch_steps(self, epochs: float, batch_size: int | None = None) -> int:
        """The steps of `epochs` passes over the training pairs (at least one)."""
        pairs = len(self.source("train", "ko").read_text(encoding="utf-8").splitlines())
        return max(1, math.ceil(epochs * pairs / (batch_size or self.scale["batch_size"])))

    def stage_recipe(self) -> None:
        for name in QUICK_RECIPE if self.quick else tuple(RECIPE):
            if not self.wanted(f"recipe/{name}"):
                continue
            settings = {**RECIPE_BASE, **RECIPE[name]}
            tokenizer, tokenizer_key = self.tokenizer("char", int(settings.pop("vocab", self.train_vocab)))
            batch_size = int(settings.pop("batch_size", self.scale["batch_size"]))
            steps = self.epoch_steps(self.scale["recipe_epochs"], batch_size)
            command = ["finetune", "--encoder", "random", "--decoder", "random", "--tokenizer", tokenizer,
                       "--train", self.corpus(tokenizer, "train", "ko-en"),
                       "--valid", self.corpus(tokenizer, "valid", "ko-en"), "--bleu-sentences", "0",
                       *overrides(self.train_settings(steps), {"batch_size": batch_size},
                                  self.model_settings(), settings)]
            if self.train("recipe", name, command, (tokenizer_key,)) and not self.train_only:
                self.score_valid(name, tokenizer, self.job_key(command, tokenizer_key))

    def score_valid(self, name: str, tokenizer: Path, model_key: str) -> None:
        """A recipe model on the whole valid split: its loss per target character (comparable across vocabularies,
        where the loss per token is not) and greedy BLEU and chrF."""
        model = self.run_dir("recipe", name) / "model"
        evaluation = ["eval", "--model", model, "--tokenizer", tokenizer,
                      "--data", self.corpus(tokenizer, "valid", "ko-en"), "--json", "--eval_batches", "0"]
        translation = ["translate", "--model", model, "--tokenizer", tokenizer, "--input", self.source("valid", "ko"),
                       "--beam", "1", "--max-new-tokens", str(self.scale["max_len"]), *self.translate_batch()]
        key = self.job_key([*evaluation, *translation], model_key)
        if self.finished("valid", name, key):
            return
        with self.claim("valid", name) as mine:
            if not mine or self.finished("valid", name, key, quiet=True):
                return
            scores = self.out / "valid" / f"{name}.json"
            scores.parent.mkdir(parents=True, exist_ok=True)
            with open(scores, "w", encoding="utf-8") as f:
                self.fastlm(*evaluation, stdout=f)
            loss = json.loads(scores.read_text(encoding="utf-8"))["loss"]
            references = self.source("valid", "en").read_text(encoding="utf-8").splitlines()
            from fastlm import Tokenizer

            # What the loss averaged over: each target with its </s>, cut at max_len as the batches cut it.
            targets = sum(min(len(ids) + 1, self.scale["max_len"])
                          for ids in Tokenizer.load(tokenizer).encode_batch(references))
            characters = sum(len(line) + 1 for line in references)  # + the end of the sentence
            output = self.out / "translations" / f"valid-{name}.en"
            output.parent.mkdir(parents=True, exist_ok=True)
            with open(output, "w", encoding="utf-8") as f:
                seconds = self.fastlm(*translation, stdout=f)
            hypotheses = output.read_text(encoding="utf-8").splitlines()
            sources = self.source("valid", "ko").read_text(encoding="utf-8").splitlines()
            self.save("valid", name, {"key": key, "loss": loss, "loss_per_char": loss * targets / characters,
                                      "seconds": seconds, **test_scores(sources, hypotheses, references)})


# ----- helpers -----

def write_lines(path: Path, lines: list[str]) -> None:
    """`lines` (without line ends) as a text file, each ending in "\n"; whole or absent, whoever reads it (two
    processes may make the same file at once)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    partial.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    os.replace(partial, path)


def data_problem(data: Path) -> str | None:
    """Why `data` cannot feed the grid (a missing file, sides of a split that do not pair up), or None."""
    missing = [f"{split}.{lang}" for split in ("train", "valid", "test") for lang in ("ko", "en")
               if not (data / f"{split}.{lang}").is_file()]
    if missing:
        return (f"no {', '.join(missing)} there: expected train, valid and test splits, each as a .ko file and an .en "
                "file of the same number of lines (line i of one translates line i of the other)")
    for split in ("train", "valid", "test"):
        counts = {}
        for lang in ("ko", "en"):
            try:  # as the grid reads them (carve_heldout, the test stage)
                counts[lang] = len((data / f"{split}.{lang}").read_text(encoding="utf-8").splitlines())
            except UnicodeDecodeError as error:
                return f"{split}.{lang} is not UTF-8 text ({error.reason} at byte {error.start})"
        if counts["ko"] != counts["en"]:
            return f"{split}.ko has {counts['ko']} lines, {split}.en {counts['en']}: expected pairs, line by line"
        if not counts["ko"]:
            return f"{split}.ko and {split}.en are empty"
    return None


def quick_lines(data: Path, split: str, lang: str) -> list[str]:
    """The first lines of a split of --data, or (without it) of fastlm's bundled sample, split train/valid/test."""
    count = QUICK_LINES[split]
    if (data / f"{split}.{lang}").is_file():
        with open(data / f"{split}.{lang}", encoding="utf-8") as f:
            return [line.rstrip("\n") for _, line in zip(range(count), f)]
    sample = (REPO / "fastlm" / "demo_data" / f"sample.{lang}").read_text(encoding="utf-8").splitlines()
    held_out = QUICK_LINES["valid"] + QUICK_LINES["test"]
    parts = {"train": sample[:-held_out], "valid": sample[-held_out:-QUICK_LINES["test"]],
             "test": sample[-QUICK_LINES["test"]:]}
    return parts[split][:count]


def tokenizer_statistics(path: Path, source) -> dict:
    """Tokens per sentence (valid split, each language), the share of byte-fallback tokens, and the unigram
    cross-entropy of Korean tokens (valid, under train frequencies): the loss of an MLM that learned frequencies
    only, the plateau's level."""
    import math
    from collections import Counter

    from fastlm import Tokenizer

    tokenizer = Tokenizer.load(path)
    fallback = {i for i in range(tokenizer.vocab_size) if tokenizer.id_to_token(i).startswith("<0x")} \
        if tokenizer.level == "char" else set()
    statistics = {}
    for lang in ("ko", "en"):
        lines = source("valid", lang).read_text(encoding="utf-8").splitlines()
        encoded = tokenizer.encode_batch(lines)
        tokens = sum(len(ids) for ids in encoded)
        statistics[f"tokens_per_sentence_{lang}"] = tokens / max(1, len(lines))
        statistics[f"byte_fallback_{lang}"] = sum(i in fallback for ids in encoded for i in ids) / max(1, tokens)
    train = Counter(i for ids in tokenizer.encode_batch(source("train", "ko").read_text(encoding="utf-8")
                                                         .splitlines()) for i in ids)
    valid = [i for ids in tokenizer.encode_batch(source("valid", "ko").read_text(encoding="utf-8").splitlines())
             for i in ids]
    total = sum(train.values()) + tokenizer.vocab_size  # add-one smoothing: unseen tokens keep a finite loss
    statistics["unigram_loss_ko"] = -sum(math.log((train[i] + 1) / total) for i in valid) / max(1, len(valid))
    return statistics


def run_metrics(run_dir: Path) -> dict:
    """The evaluations of a run (every one, for the curves), its last and its best."""
    from fastlm.train.metrics import read_records

    evals = [r for r in read_records(run_dir / "metrics.jsonl", "eval") if "loss" in r]
    train = read_records(run_dir / "metrics.jsonl", "train")
    every = max(1, len(train) // 200)  # enough points for a curve, few enough for a small file
    return {"evals": evals, "final": evals[-1] if evals else None,
            "best": min(evals, key=lambda r: r["loss"]) if evals else None,
            "train_curve": [[r["step"], r["loss"]] for r in train[::every]]}


def heldout_lines(train_lines: int, count: int) -> list[int]:
    """The train lines held out as the in-domain test set: `count` of them drawn with HELDOUT_SEED, in order."""
    import numpy as np

    return sorted(np.random.default_rng(HELDOUT_SEED).choice(train_lines, size=count, replace=False).tolist())


def sources_table(sources_md: str) -> dict[str, list[tuple[str, int]]]:
    """split -> (corpus, pairs kept) in the file's order, from a SOURCES.md whose Markdown table has columns
    "source", "split" and "kept", as ../shared/data/ko-en's does; {} where there is no such table."""
    rows = [[cell.strip() for cell in line.strip().strip("|").split("|")]
            for line in sources_md.splitlines() if line.lstrip().startswith("|")]
    head = next((row for row in rows if {"source", "split", "kept"} <= set(row)), None)
    if head is None:
        return {}
    source, split, kept = (head.index(name) for name in ("source", "split", "kept"))
    table: dict[str, list[tuple[str, int]]] = {}
    for row in rows:
        if len(row) == len(head) and row[kept].isdigit():
            table.setdefault(row[split], []).append((row[source], int(row[kept])))
    return table


def train_sources(sources_md: str, train_lines: int) -> list[tuple[str, int]] | None:
    """(corpus, pairs) in train order from a SOURCES.md's table (sources_table): its train rows are the corpora
    train.ko holds one after the other. None where there is no such table or its kept pairs do not add up to
    `train_lines`."""
    sources = sources_table(sources_md).get("train", [])
    return sources if sources and sum(count for _, count in sources) == train_lines else None


def test_scores(sources: list[str], hypotheses: list[str], references: list[str]) -> dict:
    """Corpus BLEU and chrF, and the SAMPLES best and worst sentences by sentence chrF; "best" only among those
    that score above 0 (an output of nothing is no one's best)."""
    import sacrebleu

    if len(hypotheses) != len(references):
        raise JobFailed(f"{len(hypotheses)} translations for {len(references)} test sentences")
    chrf = [sacrebleu.sentence_chrf(hypothesis, [reference]).score
            for hypothesis, reference in zip(hypotheses, references)]
    by_sentence = sorted(range(len(references)), key=chrf.__getitem__)
    best = [i for i in reversed(by_sentence) if chrf[i] > 0][:SAMPLES]
    worst = [i for i in by_sentence if i not in best][:SAMPLES]

    def sample(i: int) -> dict:
        return {"ko": sources[i], "output": hypotheses[i], "reference": references[i]}

    return {"bleu": sacrebleu.corpus_bleu(hypotheses, [references]).score,
            "chrf": sacrebleu.corpus_chrf(hypotheses, [references]).score,
            "best": [sample(i) for i in best], "worst": [sample(i) for i in worst]}


def scale_argument(text: str) -> tuple[str, int | float]:
    try:
        return scale_override(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "ko-en",
                        help="train/valid/test .ko/.en files (default: ../shared/data/ko-en)")
    parser.add_argument("--out", type=Path, help="outputs (default: runs/experiment, runs/experiment-quick)")
    parser.add_argument("--preset", default="tiny", choices=sorted(SCALES),
                        help="training preset and scale of every stage: tiny for a CPU, small or base for a GPU")
    parser.add_argument("--stages", nargs="+", choices=STAGES, default=list(STAGES), help="stages to run")
    parser.add_argument("--only", nargs="+", default=[], metavar="GLOB",
                        help="run only the jobs whose STAGE/NAME matches (e.g. 'plateau/mask*'); with --report, "
                        "the page shows the pre-training and translation jobs it selects")
    parser.add_argument("--quick", action="store_true", help="a minutes-long smoke version of every stage")
    parser.add_argument("--scale", nargs="+", type=scale_argument, default=[], metavar="KEY=VALUE",
                        help="replace entries of the preset's scale (experiments/grid.py, SCALES), e.g. pretrain=3000 "
                        "finetune_epochs=4 eval_interval=250: the steps of a run sized to a budget (the jobs' "
                        "commands change, so give the same --scale to every run over the same --out, --report too)")
    parser.add_argument("--train-only", action="store_true",
                        help="run the training jobs without the scoring that follows them (test translations, "
                        "source use, valid scores); a later run without it scores them")
    parser.add_argument("--translator", action="store_true",
                        help="make only the study's best translator (" + finetune_name(*TRANSLATOR) + ": its "
                        "tokenizer, pre-training and fine-tuning), export it to OUT/translator, and print its scores "
                        "and a few translations")
    parser.add_argument("--report", action="store_true",
                        help="write the results page from what has finished instead of running jobs")
    parser.add_argument("--report-to", type=Path,
                        help="results page, its plots in results/ beside it, results/PRESET/ at another preset than "
                        "tiny (default: docs/RESULTS.md; with --quick: OUT/report/RESULTS.md)")
    args = parser.parse_args(argv)
    if args.translator and (args.report or args.only or args.stages != list(STAGES) or args.train_only):
        parser.error("--translator runs the jobs of one model: it takes no --stages, --only, --report or --train-only")
    if args.quick and args.preset != "tiny":
        parser.error(f"--quick runs its own micro scale: --preset {args.preset} does not apply to it")
    scale = dict(args.scale)
    if len(scale) < len(args.scale):
        parser.error("--scale: an entry given twice")
    out = args.out or REPO / "runs" / ("experiment-quick" if args.quick else "experiment")
    problem = None if args.quick else data_problem(args.data)
    if problem:
        parser.error(f"--data {args.data}: {problem}")
    experiment = Experiment(args.preset, args.quick, data=args.data.absolute(), out=out.absolute(), only=args.only,
                            scale_overrides=scale, train_only=args.train_only)
    if args.report:
        page = args.report_to or (out / "report" / "RESULTS.md" if args.quick else REPO / "docs" / "RESULTS.md")
        references = {split: experiment.source_path(split, "en") for split in (*TEST_SETS, "valid")}
        print(write_report(experiment, experiment.out, experiment.data_name(), references, page,
                           data_sources=experiment.data_sources(), heldout_sources=experiment.heldout_sources()))
        return 0
    signal.signal(signal.SIGINT, experiment.forward_signal)
    signal.signal(signal.SIGTERM, experiment.forward_signal)
    out.mkdir(parents=True, exist_ok=True)
    try:
        if args.translator:
            experiment.translator()
        for stage in [] if args.translator else args.stages:
            experiment.log(f"== {stage}")
            getattr(experiment, f"stage_{stage}")()
    except Stopped as stop:
        experiment.log(f"{stop}: run the same command again to continue")
        return 130
    except JobFailed as error:
        experiment.log(f"stopped: {error}")
        return 1
    experiment.log("done")
    return 0


if __name__ == "__main__":
    sys.exit(main())
