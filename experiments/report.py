"""The results page of the ko->en experiment (experiments/ko_en.py --report): tables and PNG plots from whatever
jobs have finished, every missing cell marked "pending", and, for the full grid, the hand-written findings
(experiments/findings.md) on top. Reads OUT/results/**.json, and for the paired bootstrap between starts the
translations in OUT/translations and the test sets' references, so it runs anywhere those were copied to."""

from __future__ import annotations

import dataclasses
import json
import math
import platform
import statistics
import subprocess
import time
from pathlib import Path

from grid import (BEAMS, DECODER_SETTINGS, ENCODER_SETTINGS, EVERYDAY, EVERYDAY_PAIRS, HELDOUT, MODEL_SETTINGS,
                  PLATEAU, QUICK_RECIPE, RECIPE, RECIPE_BASE, REPO, STARTS, TEST_SETS, Grid,
                  finetune_name, overrides, test_name, translation_path)

PENDING = "pending"
FINDINGS = Path(__file__).resolve().parent / "findings.md"
FIRST_STUDY = Path(__file__).resolve().parent / "first_study.md"  # the full grid's earlier run, in short
FIRST_STUDY_STAGES = ("plateau", "sweep")  # the stages of the first study that this study did not re-run
FINDINGS_PRESET = "tiny"  # the preset whose grid the findings and the first study describe
TEST_SET_NAMES = {"test": "news test", HELDOUT: "held-out"}
SIGNIFICANT = 0.05  # p-values below this are marked
# The paired tests: each start against the starts with one side fewer pre-trained, and against Rnd2Rnd.
COMPARED_WITH = {"Enc2Rnd": ("Rnd2Rnd",), "Rnd2Dec": ("Rnd2Rnd",), "Enc2Dec": ("Rnd2Rnd", "Enc2Rnd", "Rnd2Dec")}


def write_report(grid: Grid, out: Path, data: str, references: dict[str, Path], page: Path, *,
                 data_sources: dict[str, list[tuple[str, int]]] | None = None,
                 heldout_sources: list[str] | None = None) -> Path:
    """Write `page` and its plots (in `page.parent/results/`, or results/PRESET/) from the results in `out` of the
    grid's jobs (those --only selects), run on `data` (in words); `references`: the English file of each test set and
    of "valid"; `data_sources`: the corpora of each split and `heldout_sources` the corpus of each held-out pair,
    where known. Returns the page."""
    results = load_results(out / "results")
    # Another preset's plots go apart (results/small/...): its page can sit beside the tiny grid's in docs/.
    figures = page.parent / "results" if grid.preset == FINDINGS_PRESET else page.parent / "results" / grid.preset
    figures.mkdir(parents=True, exist_ok=True)
    shown = dataclasses.replace(grid, shown_levels=levels_with_results(grid, results))
    gpu = gpu_name()
    sections = [header(grid, results, data, gpu), findings(grid),
                *([data_section(data_sources, heldout_sources)] if data_sources and heldout_sources else []),
                tokenizer_section(grid, results), plateau_section(grid, results, figures, page.parent),
                pretrain_section(shown, results, figures, page.parent),
                translation_section(shown, results, figures, page.parent, out, references, gpu, heldout_sources),
                sweep_section(grid, results), recipe_section(grid, results, out, references["valid"])]
    if has_first_study(grid):
        sections.append(FIRST_STUDY.read_text(encoding="utf-8").strip())
    page.write_text("\n\n".join(sections) + "\n", encoding="utf-8")
    return page


def load_results(root: Path) -> dict[str, dict]:
    """"stage/name" -> result, for every finished job."""
    return {f"{path.parent.name}/{path.stem}": json.loads(path.read_text(encoding="utf-8"))
            for path in sorted(root.glob("*/*.json"))}


def levels_with_results(grid: Grid, results: dict) -> tuple[str, ...]:
    """The levels with a finished pre-training or translation run (all of them while none has one): the page
    names the others once rather than filling their rows with pending cells."""
    ran = tuple(level for level in grid.levels
                if any(name.startswith((f"pretrain/{level}-", f"finetune/{level}-")) for name in results))
    return ran or grid.levels


def has_first_study(grid: Grid) -> bool:
    """Whether the page ends with the first study: a full grid of the preset it ran at."""
    return not grid.quick and grid.preset == FINDINGS_PRESET and FIRST_STUDY.is_file()


def stage_not_run(grid: Grid, results: dict, stage: str) -> str | None:
    """What a full-grid section says instead of a table of pending cells when none of its jobs has run."""
    if grid.quick or any(name.startswith(f"{stage}/") for name in results):
        return None
    elsewhere = ("section 7 (the first study) gives its result, at the same settings. "
                 if has_first_study(grid) and stage in FIRST_STUDY_STAGES else "")
    return f"Not run for this page: {elsewhere}`{run_command(grid)} --stages {stage}` runs it."


def run_command(grid: Grid) -> str:
    """The command that runs the grid at this page's preset and scale."""
    preset = [] if grid.quick or grid.preset == "tiny" else [f"--preset {grid.preset}"]
    scale = ["--scale " + " ".join(f"{key}={value}" for key, value in grid.scale_overrides.items())] \
        if grid.scale_overrides else []
    return " ".join(["python experiments/ko_en.py", *(["--quick"] if grid.quick else []), *preset, *scale])


def gpu_name() -> str | None:
    """The GPU of the machine writing the page, by nvidia-smi, or None (no GPU, or no driver)."""
    try:
        names = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                               text=True, check=True, timeout=20).stdout.split("\n")
    except (OSError, subprocess.SubprocessError):
        return None
    return names[0].strip() or None


def header(grid: Grid, results: dict, data: str, gpu: str | None) -> str:
    try:
        commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    scale = grid.scale
    command = run_command(grid) + (" --only " + " ".join(f"'{pattern}'" for pattern in grid.only) if grid.only else "")
    machine = ", ".join([platform.machine(), platform.system(), *([f"GPU: {gpu}"] if gpu else [])])
    overridden = (f", with `--scale` replacing the preset's {', '.join(grid.scale_overrides)}"
                  if grid.scale_overrides else "")
    return "\n".join([
        "# Does pre-training help Korean->English translation?",
        "",
        f"Generated by `{command} --report` on {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}"
        f" from {len(results)} finished jobs (commit {commit}, {machine}). "
        f"Cells marked *{PENDING}* have not run yet: `{command}` continues the grid where it "
        "stopped (finished jobs are skipped, interrupted ones resume exactly) and `--report` rewrites this page.",
        "",
        f"Scale: `--preset {grid.preset}`{' (--quick)' if grid.quick else ''}{overridden}: batch "
        f"{scale['batch_size']}, pre-training {scale['pretrain']} steps, plateau runs {scale['plateau']}, "
        f"translation until the valid loss stops improving (at most {scale['finetune_epochs']} epochs, stopped "
        f"after {scale['patience']} evaluations without a new best), weight-decay sweep {scale['sweep']}; "
        "evaluation every "
        f"{scale['eval_interval']} steps on the whole valid split; test scores on the news test split and on "
        f"{grid.heldout_pairs} pairs held out of train (drawn before any tokenizer or model saw train). "
        f"Data: {data}."
        + (" A GPU reruns everything at `--preset small` (or `base`)." if grid.preset == "tiny" else ""),
        *levels_not_shown(grid, results),
    ])


def levels_not_shown(grid: Grid, results: dict) -> list[str]:
    missing = [level for level in grid.levels if level not in levels_with_results(grid, results)]
    if not missing:
        return []
    jobs = sum(1 for job in grid.finetune_jobs() if job[0] in missing) + 2 * len(missing)
    return ["", f"Not run yet, so not shown: the {' and '.join(missing)} level ({jobs} pre-training and translation "
            f"jobs pending; `{run_command(grid)}` runs them after the others)."]


def findings(grid: Grid) -> str:
    """The hand-written findings of the full grid; a --quick run's page, or another preset's, describes that run
    alone."""
    if grid.quick:
        return ("## Findings\n\nNone: a `--quick` run checks that every stage runs, at a micro scale whose numbers "
                "say nothing about translation. The full grid's findings are in docs/RESULTS.md.")
    if grid.preset != FINDINGS_PRESET:
        return (f"## Findings\n\nNone written for this page: those of docs/RESULTS.md are of the `--preset "
                f"{FINDINGS_PRESET}` grid.")
    return FINDINGS.read_text(encoding="utf-8").strip() if FINDINGS.is_file() else "## Findings\n\nNone yet."


def data_section(sources: dict[str, list[tuple[str, int]]], heldout_sources: list[str]) -> str:
    """The pairs of each corpus in each split, the held-out pairs drawn from train, and each corpus's share of the
    pairs every model trains on."""
    trained_on = sum(pairs for _, pairs in sources["train"]) - len(heldout_sources)
    rows = []
    for split, corpora in sources.items():
        for corpus, pairs in corpora:
            if split == "train":
                held_out = heldout_sources.count(corpus)
                rows.append([corpus, split, pairs, held_out, pairs - held_out,
                             f"{100 * (pairs - held_out) / trained_on:.1f}%"])
            else:
                rows.append([corpus, split, pairs, "", "", ""])
    return ("## Data\n\nThe Korean-English pairs of each corpus and split, by the data's SOURCES.md (which gives "
            "their origin, licence and cleaning). The held-out pairs are drawn at random from train before any "
            "tokenizer or model sees it; the rest is what every tokenizer, pre-training (each its own side) and "
            "fine-tuning trains on.\n\n"
            + table(["corpus", "split", "pairs", "held out", "trained on", "share of training"], rows))


def table(head: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(cell if isinstance(cell, str) else fmt(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def fmt(value) -> str:
    if value is None:
        return PENDING
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 100 else f"{value:.0f}"
    return str(value)


def tokenizer_section(grid: Grid, results: dict) -> str:
    rows = []
    # A page of selected jobs (--only) shows the tokenizers they made, not the tokenizers stage's others.
    in_grid = [] if grid.only else [f"{level}-{vocab_size}" for level in ("byte", "char")
                                    for vocab_size in grid.vocab_sizes]
    others = [name.split("/")[1] for name in results if name.startswith("tokenizers/")]  # e.g. the plateau's
    for name in sorted(set(in_grid + others), key=lambda n: (n.split("-")[0], int(n.split("-")[1]))):
        level, vocab_size = name.split("-")[0], int(name.split("-")[1])
        r = results.get(f"tokenizers/{name}", {})
        fallback = (f"{100 * r['byte_fallback_ko']:.2f}% / {100 * r['byte_fallback_en']:.2f}%"
                    if r and level == "char" else ("none (bytes are the alphabet)" if r else None))
        rows.append([level, vocab_size, r.get("tokens_per_sentence_ko"), r.get("tokens_per_sentence_en"), fallback,
                     r.get("unigram_loss_ko"), r.get("seconds")])
    return "## 1. Tokenizers\n\nTrained on train.ko + train.en; measured on the valid split. The unigram loss is " \
           "the cross-entropy of the Korean valid tokens under the train frequencies: the loss of an MLM that " \
           "learned token frequencies only, i.e. the level of the plateau.\n\n" + table(
               ["level", "vocab", "tokens/sentence ko", "tokens/sentence en", "byte fallback ko / en",
                "unigram loss ko", "training s"], rows)


def job_hours(result: dict | None) -> float | None:
    """The wall hours of a finished job, all its resumed segments added up."""
    return result["seconds"] / 3600 if result and result.get("seconds") else None


def eval_at(result: dict | None, step: int):
    if not result:
        return None
    return next((r["loss"] for r in result["evals"] if r["step"] == step), None)


def plateau_section(grid: Grid, results: dict, figures: Path, base: Path) -> str:
    interval, steps = grid.scale["eval_interval"], grid.scale["plateau"]
    evaluated = sorted({*range(interval, steps + 1, interval), steps})  # a run evaluates at its end too
    stride = -(-len(evaluated) // 5)  # at most five step columns, the last one the end of the run
    marks = evaluated[stride - 1::stride]
    rows, curves = [], {}
    for name in grid.plateau_names:
        r = results.get(f"plateau/{name}")
        settings = dict(PLATEAU[name])
        vocab = settings.pop("vocab", grid.train_vocab)
        change = " ".join(overrides(settings)) or ("(the stalled setting)" if name == "baseline" else "")
        change = f"`{change}`" if change else f"byte-level tokenizer of {vocab} tokens"
        final = r["final"] if r else {}
        level = results.get(f"tokenizers/byte-{vocab}", {}).get("unigram_loss_ko")
        rows.append([name, change, level, *[eval_at(r, m) for m in marks],
                     f"{final['loss']:.3f} (step {final['step']})" if final else None,
                     level - final["loss"] if final and level else None, final.get("accuracy")])
        if r and level:  # drawn as the distance to its own tokenizer's plateau: vocabularies compare
            curves[name] = [{"step": e["step"], "loss": e["loss"] - level} for e in r["evals"]]
    unigram = results.get(f"tokenizers/byte-{grid.train_vocab}", {}).get("unigram_loss_ko")
    not_run = stage_not_run(grid, results, "plateau")
    if not_run:
        return f"## 2. The MLM plateau\n\n{not_run}"
    text = ("## 2. The MLM plateau\n\nEncoder MLM on Korean, byte level, vocab "
            f"{grid.train_vocab}, preset {grid.preset} (tiny: lr 1e-3, warmup 30), batch "
            f"{grid.scale['batch_size']}, mask 15%, pre-norm, learned positions: each row "
            "changes one thing. Validation loss (nats per masked token) by step, the final one (a longer run "
            "ends later), and the final masked-token accuracy, beside the unigram level (the plateau: section 1) "
            f"of the run's tokenizer ({fmt(unigram)} nats at {grid.train_vocab}).\n\n"
            + table(["variant", "change", "unigram level", *[f"step {m}" for m in marks], "final",
                     "below unigram", "accuracy"], rows))
    if curves:
        path = plot_curves(curves, figures / "plateau.png", "MLM validation loss minus the unigram level",
                           reference=0.0, ylabel="nats/token above the plateau")
        text += f"\n\n![plateau curves]({path.relative_to(base)})"
    return text


def pretrain_section(grid: Grid, results: dict, figures: Path, base: Path) -> str:
    rows, curves = [], {}
    for level in grid.levels:
        for arch in ("encoder", "decoder"):
            r = results.get(f"pretrain/{level}-{arch}")
            final = r["final"] if r else {}
            rows.append([level, arch, "MLM on ko" if arch == "encoder" else "causal LM on en", job_hours(r),
                         final.get("loss"), final.get("perplexity"), final.get("accuracy")])
            if r:
                curves[f"{level} {arch}"] = r["evals"]
    def shown(settings: dict) -> str:
        return f"`{' '.join(overrides(settings))}`" if settings else "the preset's settings"

    settings = (f"every model {shown(MODEL_SETTINGS)}, the encoder also {shown(ENCODER_SETTINGS)}, the decoder "
                f"{shown(DECODER_SETTINGS)}")
    text = ("## 3. Pre-training\n\nThe wall hours of each job (measured as in section 4), and the validation "
            "loss, perplexity (masked tokens for the encoder) and accuracy at the end of pre-training "
            f"({grid.scale['pretrain']} steps; {settings}).\n\n"
            + table(["level", "model", "task", "hours", "valid loss", "perplexity", "accuracy"], rows))
    if curves:
        path = plot_curves(curves, figures / "pretrain.png", "pre-training validation loss")
        text += f"\n\n![pre-training curves]({path.relative_to(base)})"
    return text


def translation_section(grid: Grid, results: dict, figures: Path, base: Path, out: Path,
                        references: dict[str, Path], gpu: str | None, heldout_sources: list[str] | None) -> str:
    rows, curves, bars = [], {}, {}
    for level, start, init, seed in grid.finetune_jobs():
        name = finetune_name(level, start, init, seed)
        r = results.get(f"finetune/{name}")
        source = results.get(f"source/{name}", {})
        best = r["best"] if r and r["best"] else {}
        row = [level, start, init, seed, best.get("step"), r["final"]["step"] if r and r["final"] else None,
               job_hours(r), best.get("loss"), source.get("gap")]
        for test_set in TEST_SETS:
            scores = [results.get(f"test/{test_name(name, test_set, beam)}", {}) for beam in BEAMS]
            row += [*[s.get("bleu") for s in scores], *[s.get("chrf") for s in scores]]
        rows.append(row)
        if r:
            curves.setdefault(level, {})[f"{start} {init} s{seed}"] = r["evals"]
        news = results.get(f"test/{test_name(name, 'test', BEAMS[-1])}")
        if news:
            bars[f"{level} {start}\n{init} s{seed}"] = news["bleu"]
    head = ["level", "start", "cross-attention", "seed", "best step", "last step", "hours", "valid loss",
            "source gap"]
    for test_set in TEST_SETS:
        head += [f"{TEST_SET_NAMES[test_set]} {metric} beam {beam}" for metric in ("BLEU", "chrF") for beam in BEAMS]
    hours = f"on the {gpu} (shared by the jobs that ran at once)" if gpu else \
        "on one CPU core (the process's one thread)"
    text = ("## 4. Translation ko->en\n\nEvery start trains until its validation loss stops improving (at most "
            f"{grid.scale['finetune_epochs']} epochs; stopped after {grid.scale['patience']} evaluations without a "
            "new best) and keeps its best checkpoint: the step of that checkpoint, the last step trained, the wall "
            f"hours of the job {hours}, and the best validation loss (whole valid "
            "split); the source gap: the loss on the whole valid split with each English sentence given the Korean "
            "of another pair, minus the loss with its own (0: the model ignores its source and is an English LM); "
            "sacrebleu BLEU and chrF of the detokenised output (greedy = beam 1) on the raw news test split and on "
            f"the {grid.heldout_pairs} held-out train pairs (in domain: the train split's mix of Bible and other "
            "text).\n\n" + table(head, rows))
    for level, level_curves in curves.items():
        path = plot_curves(level_curves, figures / f"translation-{level}.png", f"translation ({level} level)")
        text += f"\n\n![translation curves, {level} level]({path.relative_to(base)})"
    if bars:
        path = plot_bars(bars, figures / "bleu.png", f"news test BLEU, beam {BEAMS[-1]}")
        text += f"\n\n![BLEU chart]({path.relative_to(base)})"
    text += "\n\n" + main_comparison(grid, results)
    text += "\n\n" + significance(grid, results, out, references)
    if heldout_sources:
        text += "\n\n" + heldout_by_source(grid, results, out, references[HELDOUT], heldout_sources)
    text += "\n\n" + datasize_section(grid, results)
    text += "\n\n" + samples(grid, results)
    text += "\n\n" + everyday(grid, out)
    return text


def main_jobs(grid: Grid) -> dict[str, list[int]]:
    """The starts of the main comparison (the default cross-attention init), in grid order, with the seeds of each
    (all of MAIN_SEEDS in a full grid; --only may select fewer for some)."""
    seeds: dict[str, set[int]] = {}
    for _, start, init, seed in grid.finetune_jobs():
        if init == "random":
            seeds.setdefault(start, set()).add(seed)
    return {start: sorted(each) for start, each in seeds.items()}


def seeds_in_words(seeds: dict[str, list[int]]) -> str:
    """"seeds 0, 1", or where the starts have different seeds "seeds 0, 1 (Rnd2Rnd, Enc2Dec), 0 (Enc2Rnd)"."""
    by_seeds: dict[tuple[int, ...], list[str]] = {}
    for start, each in seeds.items():
        by_seeds.setdefault(tuple(each), []).append(start)
    if len(by_seeds) == 1:
        return "seeds " + ", ".join(map(str, next(iter(by_seeds))))
    return "seeds " + "; ".join(f"{', '.join(map(str, each))} ({', '.join(starts)})"
                                for each, starts in by_seeds.items())


def main_comparison(grid: Grid, results: dict) -> str:
    """The starts per level over the seeds of the main comparison (default cross-attention init; test scores at
    beam 4): the mean of each measure over the start's seeds, each start's difference from Rnd2Rnd, and whether that
    difference exceeds the measure's seed noise (the largest difference between two seeds of one start at that
    level, of the starts with two)."""
    seeds = main_jobs(grid)

    def test_score(test_set: str, metric: str):
        return lambda name: results.get(f"test/{test_name(name, test_set, BEAMS[-1])}", {}).get(metric)

    measures = {  # name -> the measure of a finished run's name, or None
        "valid loss": lambda name: ((results.get(f"finetune/{name}") or {}).get("best") or {}).get("loss"),
        "source gap": lambda name: results.get(f"source/{name}", {}).get("gap"),
        **{f"{TEST_SET_NAMES[test_set]} {label}": test_score(test_set, metric)
           for test_set in TEST_SETS for label, metric in (("BLEU", "bleu"), ("chrF", "chrf"))},
    }
    rows = []
    seeded = any(len(each) > 1 for each in seeds.values())
    for level in grid.levels:
        values = {start: {measure: [get(finetune_name(level, start, "random", seed)) for seed in each]
                          for measure, get in measures.items()} for start, each in seeds.items()}
        noise = {measure: max((max(v[measure]) - min(v[measure]) for v in values.values()
                               if len(v[measure]) > 1 and None not in v[measure]), default=None)
                 for measure in measures}
        means = {start: {measure: None if None in v[measure] else sum(v[measure]) / len(v[measure])
                         for measure in measures} for start, v in values.items()}
        for start in seeds:
            row = [level, start]
            for measure in measures:
                mean, baseline = means[start][measure], means.get("Rnd2Rnd", {}).get(measure)
                delta = None if mean is None or baseline is None else mean - baseline
                within = (start != "Rnd2Rnd" and delta is not None and noise[measure] is not None
                          and abs(delta) <= noise[measure])
                row += [mean, None if delta is None else f"{delta:+.3g}" + (" (within seed noise)" if within else "")]
            rows.append(row)
        if seeded:
            rows.append([level, "seed noise", *[cell for measure in measures for cell in (noise[measure], "")]])
    head = ["level", "start"] + [f"{measure} {column}" for measure in measures for column in ("mean", "vs Rnd2Rnd")]
    return (f"### The main comparison: means over {seeds_in_words(seeds)} (test scores at beam "
            f"{BEAMS[-1]})\n\nSeed noise is the largest difference between the seeds of one start at that level; a "
            "difference from Rnd2Rnd no larger than it is marked *within seed noise*. Each seed's numbers are in the "
            "table above; the paired bootstrap below tests each difference within one seed.\n\n" + table(head, rows))


def significance(grid: Grid, results: dict, out: Path, references: dict[str, Path]) -> str:
    """Each start against the starts with fewer pre-trained sides (COMPARED_WITH) of the same level and seed, on each
    test set at beam 4: the BLEU and chrF differences and their p-values by paired bootstrap resampling (see
    paired_bootstrap)."""
    seeds = main_jobs(grid)
    rows = []
    for level in grid.levels:
        for seed in sorted({seed for each in seeds.values() for seed in each}):
            starts = [start for start, each in seeds.items() if seed in each]
            for test_set in TEST_SETS:
                names = {start: test_name(finetune_name(level, start, "random", seed), test_set, BEAMS[-1])
                         for start in starts}
                done = {start: translation_path(out, name) for start, name in names.items()
                        if f"test/{name}" in results and translation_path(out, name).is_file()}
                for baseline in dict.fromkeys(b for each in COMPARED_WITH.values() for b in each if b in starts):
                    systems = [start for start in starts if baseline in COMPARED_WITH.get(start, ())]
                    tested = {}
                    if baseline in done and references[test_set].is_file():
                        scored = {start: read_lines(done[start]) for start in systems if start in done}
                        tested = paired_bootstrap(read_lines(done[baseline]), scored, read_lines(references[test_set]))
                    for start in systems:
                        cells = [cell for metric in ("BLEU", "chrF") for cell in shown_test(tested.get(start), metric)]
                        rows.append([level, seed, TEST_SET_NAMES[test_set], start, baseline, *cells])
    return ("### Significance: paired bootstrap\n\nEach start against Rnd2Rnd, and Enc2Dec against Enc2Rnd and "
            "Rnd2Dec (what the other pre-trained side adds): sacrebleu's paired bootstrap "
            "resampling (`sacrebleu --paired-bs`: 1000 resamples of the test sentences, its fixed seed 12345) of "
            f"the beam-{BEAMS[-1]} translations of two starts of the same level and seed: the "
            "difference in BLEU and chrF, and its p-value, the chance of a difference at least that large between "
            f"two equally good systems; p < {SIGNIFICANT} is marked **bold**. It measures the test sets' sampling "
            "noise for one pair of trained models; the seed noise above is the training's.\n\n"
            + table(["level", "seed", "test set", "start", "against", "BLEU difference", "p", "chrF difference", "p"],
                    rows))


def heldout_by_source(grid: Grid, results: dict, out: Path, references: Path, sources: list[str]) -> str:
    """The held-out scores of the main comparison's first seed (beam 4) per corpus the pairs came from, and without
    the largest corpus: how much of the held-out score is that one corpus (the Bible in ../shared/data/ko-en)."""
    import sacrebleu

    lines = read_lines(references)
    if len(lines) != len(sources):
        return f"### Held-out scores by corpus\n\nNot shown: {len(sources)} corpus labels for {len(lines)} pairs."
    corpora = sorted(set(sources), key=sources.index)
    largest = max(corpora, key=sources.count)
    groups = {name: [i for i, source in enumerate(sources) if source == name] for name in corpora}
    groups[f"all but {largest}"] = [i for i, source in enumerate(sources) if source != largest]
    blocks = ["### Held-out scores by corpus (beam 4, seed 0)",
              f"The {len(lines)} held-out pairs split by the corpus each came from (the train table of the data's "
              f"SOURCES.md), and all but the largest corpus: sacrebleu BLEU / chrF of each subset."]
    for level in grid.levels:
        outputs = {}
        for start in STARTS:
            name = test_name(finetune_name(level, start, "random", 0), HELDOUT, BEAMS[-1])
            if f"test/{name}" in results:  # scored, so its translations are whole
                outputs[start] = read_lines(translation_path(out, name))
        rows = []
        for name, members in groups.items():
            cells = []
            for hypotheses in outputs.values():
                chosen, wanted = [hypotheses[i] for i in members], [[lines[i] for i in members]]
                cells.append(f"{sacrebleu.corpus_bleu(chosen, wanted).score:.1f} / "
                             f"{sacrebleu.corpus_chrf(chosen, wanted).score:.1f}")
            rows.append([name, len(members), *cells])
        if outputs:
            blocks.append(f"**{level} level**\n\n" + table(["corpus", "pairs", *outputs], rows))
    return "\n\n".join(blocks) if len(blocks) > 2 else "\n\n".join(blocks) + f"\n\n{PENDING}"


def datasize_section(grid: Grid, results: dict) -> str:
    """The datasize stage: its start on part of the train pairs and on all of them (its finetune run), at beam 4,
    and the news BLEU gained per doubling of the pairs (a least-squares line in log2 pairs)."""
    level, start, init, seed = grid.datasize_start
    title = f"### More pairs: {start} ({level} level, seed {seed}) on part of the train pairs"
    not_run = stage_not_run(grid, results, "datasize")
    if not_run:
        return f"{title}\n\n{not_run}"
    runs = [(fraction, f"datasize/{grid.datasize_name(fraction)}") for fraction in grid.data_fractions]
    runs.append((1.0, f"finetune/{finetune_name(*grid.datasize_start)}"))
    rows, points = [], []
    for fraction, job in runs:
        r = results.get(job)
        best = r["best"] if r and r["best"] else {}
        scores = {test_set: results.get(f"test/{test_name(job.split('/')[1], test_set, BEAMS[-1])}", {})
                  for test_set in TEST_SETS}
        rows.append([f"{fraction:.0%}", best.get("step"), r["final"]["step"] if r and r["final"] else None,
                     job_hours(r), best.get("loss"),
                     *[scores[test_set].get(metric) for test_set in TEST_SETS for metric in ("bleu", "chrf")]])
        if "bleu" in scores["test"]:
            points.append((math.log2(fraction), scores["test"]["bleu"]))
    head = ["pairs", "best step", "last step", "hours", "valid loss",
            *[f"{TEST_SET_NAMES[test_set]} {metric}" for test_set in TEST_SETS for metric in ("BLEU", "chrF")]]
    text = (f"{title}\n\nThe same fine-tuning (tokenizer, pre-trained sides, step cap, schedule, early stopping) on a "
            "nested random part of the train pairs (held-out pairs excluded, the same mix of corpora); 100% is the "
            f"run of the table above; grid.py's DATASIZE_START says why this start. Beam {BEAMS[-1]}.\n\n"
            + table(head, rows))
    if len(points) == len(runs):
        slope = statistics.linear_regression(*zip(*points)).slope
        text += (f"\n\nNews test BLEU per doubling of the pairs (least squares over these {len(points)} points): "
                 f"{slope:+.2f}.")
    return text


def read_lines(path: Path) -> list[str]:
    return path.read_text(encoding="utf-8").splitlines()


def shown_test(test: dict | None, metric: str) -> list:
    """[difference, p-value] cells of one metric of a paired test (pending without one)."""
    if test is None:
        return [None, None]
    difference, p_value = test[metric]
    return [f"{difference:+.3g}", f"**{p_value:.3g}**" if p_value < SIGNIFICANT else f"{p_value:.3g}"]


def paired_bootstrap(baseline: list[str], systems: dict[str, list[str]], references: list[str]) -> dict[str, dict]:
    """name -> {"BLEU": (difference, p), "chrF": (difference, p)} of each system against `baseline`, by
    sacrebleu's paired bootstrap resampling (its Python API of `sacrebleu --paired-bs`). sacrebleu gives a
    difference of exactly 0 the p-value 1/1001 (every resampled difference is then 0 as well, none exceeds it);
    the p-value of no difference is 1."""
    from sacrebleu.metrics import BLEU, CHRF
    from sacrebleu.significance import PairedTest

    if not systems:
        return {}
    _, scores = PairedTest([("baseline", baseline), *systems.items()], {"BLEU": BLEU(), "chrF": CHRF()},
                           [references], test_type="bs")()
    by_metric = [results for name, results in scores.items() if name != "System"]  # BLEU, then chrF
    tested = {}
    for index, name in enumerate(systems, start=1):
        tested[name] = {}
        for metric, results in zip(("BLEU", "chrF"), by_metric):
            difference = results[index].score - results[0].score
            tested[name][metric] = (difference, results[index].p_value if difference != 0 else 1.0)
    return tested


def samples(grid: Grid, results: dict) -> str:
    """Good and bad translations of the main comparison's first seed (beam 4) on each test set."""
    blocks = [f"### Sample translations (beam {BEAMS[-1]}, best and worst by sentence chrF)"]
    for level in grid.levels:
        for start in STARTS:  # those of the grid that ran
            for test_set in TEST_SETS:
                r = results.get(f"test/{test_name(finetune_name(level, start, 'random', 0), test_set, BEAMS[-1])}")
                if not r:
                    continue
                blocks.append(f"**{level} {start}, {TEST_SET_NAMES[test_set]}**")
                if not r["best"]:
                    blocks.append("- (best) none: no output scores above chrF 0")
                for kind in ("best", "worst"):
                    for sample in r[kind]:
                        output = sample["output"] or "*(empty)*"
                        blocks.append(f"- ({kind}) {sample['ko']}\n  - output: {output}\n"
                                      f"  - reference: {sample['reference']}")
    return "\n\n".join(blocks) if len(blocks) > 1 else blocks[0] + f"\n\n{PENDING}"


def everyday(grid: Grid, out: Path) -> str:
    """The main comparison's first seed on the everyday sentences (beam 4), one table per level."""
    blocks = [f"### Everyday sentences (beam {BEAMS[-1]}, seed 0)"]
    for level in grid.levels:
        outputs = {}
        for start in STARTS:
            path = translation_path(out, test_name(finetune_name(level, start, "random", 0), EVERYDAY, BEAMS[-1]))
            if path.is_file():
                outputs[start] = read_lines(path)
        if outputs:
            rows = [[korean, reference, *(lines[i] if i < len(lines) else "" for lines in outputs.values())]
                    for i, (korean, reference) in enumerate(EVERYDAY_PAIRS)]
            blocks.append(f"**{level} level**\n\n" + table(["Korean", "reference", *outputs], rows))
    return "\n\n".join(blocks) if len(blocks) > 1 else blocks[0] + f"\n\n{PENDING}"


def sweep_section(grid: Grid, results: dict) -> str:
    not_run = stage_not_run(grid, results, "sweep")
    if not_run:
        return f"## 5. Weight decay x learning rate (encoder MLM)\n\n{not_run}"
    cells = grid.sweep_cells
    lrs = list(dict.fromkeys(lr for _, lr in cells))
    decays = list(dict.fromkeys(wd for wd, _ in cells))
    rows = []
    for wd in decays:
        row = [wd]
        for lr in lrs:
            r = results.get(f"sweep/wd{wd}-lr{lr}")
            row.append(f"{r['final']['loss']:.3f} ({100 * r['final']['accuracy']:.1f}%)" if r and r["final"]
                       else PENDING)
        rows.append(row)
    return "## 5. Weight decay x learning rate (encoder MLM)\n\nFinal validation loss (masked-token accuracy) after " \
           f"{grid.scale['sweep']} steps; a loss at the unigram level (section 2) is a stall.\n\n" + \
           table(["weight decay", *[f"lr {lr}" for lr in lrs]], rows)


def recipe_section(grid: Grid, results: dict, out: Path, references: Path) -> str:
    """The low-resource settings, each one change to the base, on the whole valid split: loss (per token, and per
    character, which compares vocabularies), greedy BLEU and chrF, and each against the base by paired bootstrap."""
    not_run = stage_not_run(grid, results, "recipe")
    if not_run:
        return f"## 6. The fine-tuning recipe (low-resource settings)\n\n{not_run}"
    names = list(QUICK_RECIPE if grid.quick else RECIPE)
    translations = {name: translation_path(out, f"valid-{name}") for name in names
                    if f"valid/{name}" in results and translation_path(out, f"valid-{name}").is_file()}
    tested = {}
    if "base" in translations and references.is_file():
        tested = paired_bootstrap(read_lines(translations["base"]),
                                  {name: read_lines(path) for name, path in translations.items() if name != "base"},
                                  read_lines(references))
    rows = []
    for name in names:
        trained, scored = results.get(f"recipe/{name}"), results.get(f"valid/{name}") or {}
        change = " ".join(overrides(RECIPE[name])) or "(the base)"
        cells = [cell for metric in ("BLEU", "chrF") for cell in shown_test(tested.get(name), metric)] \
            if name != "base" else ["", "", "", ""]
        rows.append([name, f"`{change}`", trained["final"]["step"] if trained and trained["final"] else None,
                     scored.get("loss"), scored.get("loss_per_char"), scored.get("bleu"), scored.get("chrf"),
                     *cells])
    return (f"## 6. The fine-tuning recipe (low-resource settings)\n\nOne change each to the base: Rnd2Rnd at char "
            f"level {grid.train_vocab}, the grid's architecture, batch {grid.scale['batch_size']} pairs, model "
            f"dropout 0.1, no label smoothing; every run {grid.scale['recipe_epochs']} epochs of the training pairs "
            "(a smaller batch takes more steps), its best checkpoint chosen by the loss on a fixed random sample of "
            f"the valid split (`{' '.join(overrides(RECIPE_BASE))}`). Scored on the whole valid split (news dev): "
            "cross-entropy per target token and per character of the reference (what compares vocabularies), and "
            "greedy BLEU and chrF; each against the base by paired bootstrap (p < "
            f"{SIGNIFICANT} in **bold**).\n\n"
            + table(["name", "change", "steps", "valid loss", "loss / char", "BLEU", "chrF",
                     "BLEU vs base", "p", "chrF vs base", "p"], rows))


def plot_curves(curves: dict[str, list[dict]], path: Path, title: str, reference: float | None = None,
                ylabel: str = "validation loss (nats/token)") -> Path:
    """Validation loss against step, one line per run, overlaid; `reference` as a dashed unigram line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 4))
    for label, evals in curves.items():
        axis.plot([r["step"] for r in evals], [r["loss"] for r in evals], "o-", markersize=3, label=label)
    if reference is not None:
        axis.axhline(reference, color="gray", linestyle="--", linewidth=1, label="unigram level")
    axis.set_xlabel("step")
    axis.set_ylabel(ylabel)
    axis.set_title(title)
    axis.grid(alpha=0.3)
    axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=90)
    plt.close(figure)
    return path


def plot_bars(values: dict[str, float], path: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(max(5, 0.8 * len(values)), 4))
    axis.bar(range(len(values)), list(values.values()))
    axis.set_xticks(range(len(values)), list(values), fontsize=6, rotation=60, ha="right")
    axis.set_ylabel("BLEU")
    axis.set_title(title)
    axis.grid(alpha=0.3, axis="y")
    figure.tight_layout()
    figure.savefig(path, dpi=90)
    plt.close(figure)
    return path
