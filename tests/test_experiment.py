"""experiments/ko_en.py --quick, run as a user would: every stage of the grid leaves its result files, a second run
skips every finished job, and --report writes the results page and its plots from them; and the files the
experiment derives from its data, stated literally."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "experiments" / "ko_en.py"
sys.path.insert(0, str(SCRIPT.parent))
import ko_en  # noqa: E402


def experiment(*args) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, str(SCRIPT), "--quick", *map(str, args)], capture_output=True, text=True,
                            env=env, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def test_quick_grid_runs_every_stage_then_skips_it_all(tmp_path, ko_en_dir):
    out = tmp_path / "experiment"
    first = experiment("--data", ko_en_dir, "--out", out)
    results = {stage: sorted(p.stem for p in (out / "results" / stage).glob("*.json"))
               for stage in ("tokenizers", "plateau", "pretrain", "finetune", "test", "source", "sweep", "datasize")}
    assert results == {
        "tokenizers": ["byte-1100", "char-1100"],
        "plateau": ["baseline", "mask40"],
        "pretrain": ["char-decoder", "char-encoder"],
        "finetune": ["char-Enc2Dec-random-seed0", "char-Rnd2Rnd-random-seed0"],
        "test": sorted(["char-Enc2Dec-random-seed0-beam1", "char-Enc2Dec-random-seed0-beam4",
                        "char-Enc2Dec-random-seed0-everyday-beam4", "char-Enc2Dec-random-seed0-heldout-beam1",
                        "char-Enc2Dec-random-seed0-heldout-beam4",
                        "char-Rnd2Rnd-random-seed0-beam1", "char-Rnd2Rnd-random-seed0-beam4",
                        "char-Rnd2Rnd-random-seed0-everyday-beam4", "char-Rnd2Rnd-random-seed0-heldout-beam1",
                        "char-Rnd2Rnd-random-seed0-heldout-beam4",
                        "char-Enc2Dec-random-seed0-train50-beam4", "char-Enc2Dec-random-seed0-train50-heldout-beam4"]),
        "source": ["char-Enc2Dec-random-seed0", "char-Rnd2Rnd-random-seed0"],
        "sweep": ["wd0-lr1e-3"],
        "datasize": ["char-Enc2Dec-random-seed0-train50"],
    }, first.stdout
    subset = (out / "data" / "train50.en").read_text(encoding="utf-8").splitlines()
    train = (out / "data" / "train.en").read_text(encoding="utf-8").splitlines()
    assert len(subset) == round(len(train) / 2) and set(subset) <= set(train)
    pretrained = json.loads((out / "results" / "pretrain" / "char-encoder.json").read_text())
    assert pretrained["status"] == "finished" and pretrained["final"]["step"] == 4
    source = json.loads((out / "results" / "source" / "char-Rnd2Rnd-random-seed0.json").read_text())
    assert source["gap"] == source["mispaired"] - source["paired"] and source["paired"] > 0
    test = json.loads((out / "results" / "test" / "char-Enc2Dec-random-seed0-beam4.json").read_text())
    assert {"bleu", "chrf", "best", "worst"} <= set(test)
    for result, references in (("beam4", out / "data" / "quick" / "test.en"),
                               ("heldout-beam4", out / "data" / "heldout.en"),
                               ("everyday-beam4", out / "data" / "everyday.en")):
        translations = out / "translations" / f"char-Enc2Dec-random-seed0-{result}.en"
        assert len(translations.read_text().splitlines()) == len(references.read_text().splitlines()), result
    assert len((out / "data" / "heldout.en").read_text().splitlines()) == 24

    again = experiment("--data", ko_en_dir, "--out", out)
    assert "$ fastlm" not in again.stdout, again.stdout  # nothing ran: every job was finished

    # --translator: its jobs are finished, so it only exports the model and prints its scores and translations.
    translator = experiment("--data", ko_en_dir, "--out", out, "--translator").stdout
    assert "$ fastlm export" in translator and "$ fastlm finetune" not in translator, translator
    assert "Everyday sentences" in translator and "오늘 날씨가 정말 좋네요." in translator
    assert json.loads((out / "translator" / "config.json").read_text())["auto_map"]  # rope: the remote code
    assert "--translator runs the jobs of one model" in subprocess.run(
        [sys.executable, str(SCRIPT), "--translator", "--only", "x"], capture_output=True, text=True).stderr

    page = Path(experiment("--data", ko_en_dir, "--out", out, "--report").stdout.strip())
    text = page.read_text()
    assert "pending" not in text.split("## 1.")[1], text  # the quick grid is complete: no pending cell
    # A quick page describes the quick run: no findings of the full grid, the data it was cut from.
    assert "## Findings\n\nNone: a `--quick` run" in text and "**Status.**" not in text
    assert f"Data: the first 300/24/24 lines of train/valid/test of `{os.path.relpath(ko_en_dir, REPO)}`" in text
    assert re.search(r"\| char \| 0 \| held-out \| Enc2Dec \| Rnd2Rnd \| [+-][\d.e+-]+ \| (\*\*)?[\d.]+", text), text
    assert not re.search(r"- \(best\) [^\n]*\n  - output: \*\(empty\)\*", text), text  # nothing is no one's best
    assert "### Everyday sentences" in text and "| 오늘 날씨가 정말 좋네요. | The weather is really nice today. |" in text
    assert {p.name for p in (page.parent / "results").glob("*.png")} == {"plateau.png", "pretrain.png",
                                                                          "translation-char.png", "bleu.png"}


def test_an_interrupted_job_resumes_and_a_changed_command_reruns(tmp_path, ko_en_dir):
    """A run directory with the job's checkpoints is continued with --resume; a result made by another command
    (here: another job key stored with it) is run again."""
    out = tmp_path / "experiment"
    experiment("--data", ko_en_dir, "--out", out, "--stages", "plateau", "--only", "plateau/baseline")
    result_path = out / "results" / "plateau" / "baseline.json"
    first = json.loads(result_path.read_text())
    result_path.unlink()  # as if killed after its last checkpoint, before the result was written
    resumed = experiment("--data", ko_en_dir, "--out", out, "--stages", "plateau", "--only", "plateau/baseline")
    again = json.loads(result_path.read_text())
    assert "--resume" in resumed.stdout and again["final"] == first["final"]
    assert again["seconds"] > first["seconds"]  # the job's wall time adds up its segments

    result_path.write_text(json.dumps({**first, "key": "an older command"}))
    rerun = experiment("--data", ko_en_dir, "--out", out, "--stages", "plateau", "--only", "plateau/baseline")
    assert "its command changed" in rerun.stdout and "$ fastlm pretrain" in rerun.stdout


def test_two_processes_share_the_grid_and_run_each_job_once(tmp_path, ko_en_dir):
    """The same command started twice at once: tokenizers and corpora are made once (the second process waits
    for them), each training job runs in one process, and both end with every result."""
    out = tmp_path / "experiment"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, str(SCRIPT), "--quick", "--data", str(ko_en_dir), "--out", str(out),
               "--stages", "plateau"]
    processes = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
                 for _ in range(2)]
    logs = [process.communicate(timeout=900)[0] for process in processes]
    assert [process.returncode for process in processes] == [0, 0], logs
    ran = "".join(logs)
    assert ran.count("$ fastlm tokenizer train") == 1 and ran.count("$ fastlm prepare") == 2, logs  # train, valid
    assert ran.count("$ fastlm pretrain") == 2, logs  # the two plateau jobs of --quick, once each
    assert sorted(p.stem for p in (out / "results" / "plateau").glob("*.json")) == ["baseline", "mask40"]


def test_mispaired_valid_is_the_korean_shifted_one_line_down_and_the_english_unchanged(tmp_path):
    """Each English sentence gets the Korean of the pair before it, the first the last one's; a last line without
    its newline stays a line."""
    data = tmp_path / "data"
    data.mkdir()
    (data / "valid.ko").write_text("가\n나\n다", encoding="utf-8")
    (data / "valid.en").write_text("a\nb\nc\n", encoding="utf-8")
    experiment = ko_en.Experiment("tiny", False, data=data, out=tmp_path / "out")
    assert experiment.source(ko_en.MISPAIRED, "ko").read_text(encoding="utf-8") == "다\n가\n나\n"
    assert experiment.source(ko_en.MISPAIRED, "en").read_text(encoding="utf-8") == "a\nb\nc\n"


def test_a_quick_report_names_the_bundled_sample_it_ran_on(tmp_path):
    empty = tmp_path / "no-data"
    empty.mkdir()
    page = tmp_path / "RESULTS.md"
    assert ko_en.main(["--quick", "--data", str(empty), "--out", str(tmp_path / "out"), "--report", "--report-to",
                       str(page)]) == 0
    text = page.read_text(encoding="utf-8")
    assert "Data: fastlm's bundled sample (`fastlm/demo_data`), cut into 300/24/24 train/valid/test lines" in text
    assert "shared/data" not in text and "None: a `--quick` run" in text


def test_a_full_grid_page_shows_the_levels_and_stages_that_ran_and_names_the_others(tmp_path):
    """Char-level results only, no plateau or sweep: the page names the byte level and those stages once, with
    the command that runs them, instead of rows of pending cells, and ends with the first study."""
    import report

    results = tmp_path / "out" / "results"
    evals = [{"step": 500, "loss": 5.0, "perplexity": 148.0, "accuracy": 0.2}]
    finished = {"pretrain/char-encoder": {"final": evals[0], "evals": evals, "seconds": 7200.0},
                "finetune/char-Rnd2Rnd-random-seed0": {"best": evals[0], "final": evals[0], "evals": evals,
                                                       "seconds": 3600.0}}
    for name, result in finished.items():
        (results / name).parent.mkdir(parents=True, exist_ok=True)
        (results / f"{name}.json").write_text(json.dumps(result), encoding="utf-8")
    missing = tmp_path / "missing.en"
    page = report.write_report(ko_en.Grid("tiny", False), tmp_path / "out", "test data",
                               {"test": missing, "heldout": missing, "valid": missing}, tmp_path / "RESULTS.md")
    text = page.read_text(encoding="utf-8")
    assert "Not run yet, so not shown: the byte level (12 pre-training and translation jobs pending" in text
    assert "| char | Rnd2Rnd | random | 0 | 500 | 500 | 1 | 5 |" in text
    assert "| char | encoder | MLM on ko | 2 | 5 | 148 | 0.2 |" in text  # hours, then the final eval
    assert "| byte |" not in text.split("## 3. Pre-training")[1].split("## 5.")[0]
    for stage in ("plateau", "sweep"):
        assert f"Not run for this page: section 7 (the first study) gives its result, at the same settings. " \
               f"`python experiments/ko_en.py --stages {stage}` runs it." in text
    assert text.rstrip().endswith(report.FIRST_STUDY.read_text(encoding="utf-8").strip())


def test_held_out_pairs_are_scored_per_corpus_named_by_the_sources_table(tmp_path):
    """SOURCES.md's train rows label train.ko's lines in order; the held-out pairs keep their corpus, and the page
    scores each corpus and all but the largest apart (here a perfect Rnd2Rnd: 100 on every subset), and its data
    table counts each corpus's pairs held out and trained on."""
    import report

    data, out = tmp_path / "data", tmp_path / "out"
    data.mkdir()
    table = ("| source | split | read | kept |\n| --- | --- | ---: | ---: |\n| news | test | 9 | 9 |\n"
             "| tatoeba | train | 1500 | 1400 |\n| bible | train | 2100 | 2000 |\n")
    (data / "SOURCES.md").write_text("# sources\n\n" + table, encoding="utf-8")
    assert ko_en.train_sources(table, 3400) == [("tatoeba", 1400), ("bible", 2000)]
    assert ko_en.train_sources(table, 3401) is None  # kept pairs that do not add up to train: no labels
    assert ko_en.train_sources("| source | kept |\n| a | 3 |\n", 3) is None  # no split column
    english = [f"sentence number {i} of the corpus" for i in range(3400)]
    (data / "train.ko").write_text("".join(f"문장 {i}\n" for i in range(3400)), encoding="utf-8")
    (data / "train.en").write_text("\n".join(english) + "\n", encoding="utf-8")
    experiment = ko_en.Experiment("tiny", False, data=data, out=out)
    sources = experiment.heldout_sources()
    heldout = experiment.source(ko_en.HELDOUT, "en").read_text(encoding="utf-8").splitlines()
    assert [("tatoeba" if english.index(line) < 1400 else "bible") for line in heldout] == sources
    translations = ko_en.translation_path(out, ko_en.test_name("char-Rnd2Rnd-random-seed0", ko_en.HELDOUT, 4))
    translations.parent.mkdir(parents=True)
    translations.write_text("\n".join(heldout) + "\n", encoding="utf-8")
    scored = {f"test/{translations.stem}": {}}
    text = report.heldout_by_source(ko_en.Grid("tiny", False, shown_levels=("char",)), scored, out,
                                    experiment.source_path(ko_en.HELDOUT, "en"), sources)
    bible, tatoeba = sources.count("bible"), sources.count("tatoeba")
    assert f"| tatoeba | {tatoeba} | 100.0 / 100.0 |\n| bible | {bible} | 100.0 / 100.0 |\n" \
           f"| all but bible | {tatoeba} | 100.0 / 100.0 |" in text, text
    assert experiment.data_sources() == {"test": [("news", 9)], "train": [("tatoeba", 1400), ("bible", 2000)]}
    data_table = report.data_section(experiment.data_sources(), sources)
    trained_on = 3400 - len(sources)
    assert f"| tatoeba | train | 1400 | {tatoeba} | {1400 - tatoeba} | {100 * (1400 - tatoeba) / trained_on:.1f}% |\n" \
           f"| bible | train | 2000 | {bible} | {2000 - bible} | {100 * (2000 - bible) / trained_on:.1f}% |" in data_table
    assert "| news | test | 9 |  |  |  |" in data_table, data_table
    assert experiment.heldout_sources() == sources and ko_en.Experiment(
        "tiny", True, data=data, out=tmp_path / "quick").heldout_sources() is None  # --quick's train is a cut


def test_data_that_cannot_feed_the_grid_is_refused_with_the_reason(tmp_path):
    def problem(files: dict[str, bytes]) -> str | None:
        data = tmp_path / str(len(list(tmp_path.iterdir())))
        data.mkdir()
        for name, content in files.items():
            (data / name).write_bytes(content)
        return ko_en.data_problem(data)

    pairs = {f"{split}.{lang}": "가\n나\n".encode() if lang == "ko" else b"a\nb\n"
             for split in ("train", "valid", "test") for lang in ("ko", "en")}
    assert problem(pairs) is None
    assert problem({name: content for name, content in pairs.items() if name != "valid.en"}).startswith(
        "no valid.en there")
    assert problem({**pairs, "test.en": b"a\n"}) == "test.ko has 2 lines, test.en 1: expected pairs, line by line"
    assert problem({**pairs, "train.ko": b"\xff\n\n"}).startswith("train.ko is not UTF-8 text")
    assert problem({**pairs, "valid.ko": b"", "valid.en": b""}) == "valid.ko and valid.en are empty"


class JobKeys(ko_en.Experiment):
    """The grid with every job taken for finished, and its key recorded: {(stage, name): key} of each training,
    scoring (test, source, valid) and pre-training job, in grid order. Tokenizers and corpora are named, not made."""

    def tokenizer(self, level: str, vocab_size: int):
        return self.out / "tokenizers" / f"{level}-{vocab_size}.json", f"tokenizer-{level}-{vocab_size}"

    def corpus(self, tokenizer, split: str, langs: str):
        return self.out / "corpora" / tokenizer.stem / f"{split}.{langs}"

    def finished(self, stage, name, key, quiet=False):
        self.recorded[(stage, name)] = key  # a pre-training once, however often asked for
        return {"key": key}


def grid_job_keys(tmp_path, **grid) -> dict[tuple[str, str], str]:
    """Every job of the full tiny grid (on 1200 made-up pairs), with its key."""
    data = tmp_path / "data"
    data.mkdir(parents=True)
    for split, lines in (("train", 1200), ("valid", 3), ("test", 3)):
        for lang, word in (("ko", "가"), ("en", "a")):
            (data / f"{split}.{lang}").write_text("".join(f"{word} {i}\n" for i in range(lines)), encoding="utf-8")
    experiment = JobKeys("tiny", False, data=data, out=tmp_path / "out", **grid)
    experiment.recorded = {}
    for name in ("char-encoder", "char-decoder", "byte-encoder", "byte-decoder"):  # what Enc2* starts wait for
        experiment.result_path("pretrain", name).parent.mkdir(parents=True, exist_ok=True)
        experiment.result_path("pretrain", name).touch()
    for stage in ("plateau", "pretrain", "finetune", "datasize", "sweep", "recipe"):
        getattr(experiment, f"stage_{stage}")()
    return experiment.recorded


def test_the_tiny_grid_jobs_keep_the_keys_they_ran_with(tmp_path):
    """A changed key reruns a finished job: the running grid's results hold these."""
    import hashlib

    keys = grid_job_keys(tmp_path)
    subsets = {"char-Enc2Rnd-random-seed0-train25", "char-Enc2Rnd-random-seed0-train50"}
    datasize = {job: key for job, key in keys.items() if job[1].startswith(tuple(subsets))}
    scored = [("test", f"{name}{test}-beam4") for name in subsets for test in ("", "-heldout")]
    assert sorted(datasize) == sorted([("datasize", name) for name in subsets] + scored)
    kept = [(job, key) for job, key in keys.items() if job not in datasize]
    stages = [stage for (stage, _), _ in kept]
    assert [stages.count(stage) for stage in ("plateau", "pretrain", "finetune", "test", "source", "sweep", "recipe",
                                              "valid")] == [11, 4, 20, 20 * 5, 20, 15, 5, 5]
    assert hashlib.sha256(json.dumps(kept).encode()).hexdigest()[:16] == "5f57e8b74ed65be5"  # at 910ecf4


def test_a_scale_override_changes_the_jobs_that_use_its_entry_alone(tmp_path):
    default = grid_job_keys(tmp_path / "default")
    longer = grid_job_keys(tmp_path / "longer", scale_overrides={"pretrain": 3000})
    changed = {job for job in default if longer[job] != default[job]}
    # The pre-trainings, and the translation runs that start from one and their scoring (their keys hold the
    # pre-training's).
    assert changed == {job for job in default if job[0] == "pretrain"
                       or (job[0] in ("finetune", "datasize", "test", "source") and "-Rnd2Rnd-" not in job[1])}
    assert len(changed) == 4 + 16 * (1 + 5 + 1) + 2 * (1 + 2)  # and two subsets, each scored on two test sets
    batched = grid_job_keys(tmp_path / "batched", scale_overrides={"translate_batch": 64})
    assert {job for job in default if batched[job] != default[job]} == {job for job in default
                                                                          if job[0] in ("test", "valid")}


def test_a_bad_scale_override_is_a_parser_error(capsys):
    for scale, message in ((["pretrain"], "'pretrain': expected KEY=VALUE"),
                           (["steps=3"], "'steps' is not a scale entry: expected one of batch_size, max_len"),
                           (["pretrain=1.5"], "pretrain='1.5': expected a whole number > 0"),
                           (["finetune_epochs=0"], "finetune_epochs='0': expected a number > 0"),
                           (["patience=2", "patience=3"], "--scale: an entry given twice")):
        with pytest.raises(SystemExit):
            ko_en.main(["--scale", *scale, "--report"])
        assert message in capsys.readouterr().err, scale
    assert ko_en.scale_override("finetune_epochs=2.5") == ("finetune_epochs", 2.5)
    assert ko_en.scale_override("eval_interval=250") == ("eval_interval", 250)


def test_a_page_of_selected_jobs_at_another_scale_says_what_ran(tmp_path):
    """The GPU call's page (experiments/gpu.sh): --only's jobs alone, the --scale that ran in its header, means over
    the seeds each start has, the plots apart from the tiny grid's, no findings of the tiny grid."""
    import report

    evals = [{"step": 500, "loss": 5.0, "perplexity": 148.0, "accuracy": 0.2}]
    bleu = {"Rnd2Rnd": (1.0, 3.0), "Enc2Rnd": (2.0,), "Enc2Dec": (4.0, 6.0)}  # per seed
    finished = {"pretrain/char-encoder": {"final": evals[0], "evals": evals, "seconds": 7200.0},
                "tokenizers/char-8000": {"tokens_per_sentence_ko": 41.3, "tokens_per_sentence_en": 43.2,
                                         "byte_fallback_ko": 0.0144, "byte_fallback_en": 0.0024,
                                         "unigram_loss_ko": 7.57, "seconds": 5.6}}
    for start, scores in bleu.items():
        for seed, score in enumerate(scores):
            name = f"char-{start}-random-seed{seed}"
            finished[f"finetune/{name}"] = {"best": evals[0], "final": evals[0], "evals": evals, "seconds": 360.0}
            finished[f"test/{name}-beam4"] = {"bleu": score, "chrf": 10 * score, "best": [], "worst": []}
    results = tmp_path / "out" / "results"
    for name, result in finished.items():
        (results / name).parent.mkdir(parents=True, exist_ok=True)
        (results / f"{name}.json").write_text(json.dumps(result), encoding="utf-8")
    only = ["pretrain/char-*", "finetune/char-*-random-seed0", "finetune/char-Rnd2Rnd-random-seed1",
            "finetune/char-Enc2Dec-random-seed1"]
    grid = ko_en.Grid("small", False, only=only, scale_overrides={"pretrain": 3000, "finetune_epochs": 2.5})
    missing = tmp_path / "missing.en"
    page = report.write_report(grid, tmp_path / "out", "test data",
                               {"test": missing, "heldout": missing, "valid": missing}, tmp_path / "RESULTS-small.md")
    text = page.read_text(encoding="utf-8")
    command = ("python experiments/ko_en.py --preset small --scale pretrain=3000 finetune_epochs=2.5 --only "
               "'pretrain/char-*' 'finetune/char-*-random-seed0' 'finetune/char-Rnd2Rnd-random-seed1' "
               "'finetune/char-Enc2Dec-random-seed1'")
    assert f"Generated by `{command} --report`" in text
    assert ("Scale: `--preset small`, with `--scale` replacing the preset's pretrain, finetune_epochs: batch 64, "
            "pre-training 3000 steps") in text and "at most 2.5 epochs" in text
    assert "## Findings\n\nNone written for this page" in text and "## 7." not in text
    tokenizers = text.split("## 1.")[1].split("## 2.")[0]
    assert "| char | 8000 | 41.3 |" in tokenizers and tokenizers.count("| char |") == 1 and "| byte |" not in tokenizers
    assert ("Not run for this page: `python experiments/ko_en.py --preset small --scale pretrain=3000 "
            "finetune_epochs=2.5 --stages plateau` runs it.") in text
    translations = text.split("## 4.")[1].split("###")[0]
    assert translations.count("| char |") == 6 and "byte" not in translations and "copy-self" not in translations
    comparison = text.split("### The main comparison")[1].split("###")[0]
    assert "means over seeds 0, 1 (Rnd2Rnd, Enc2Dec); 0 (Enc2Rnd, Rnd2Dec)" in comparison
    assert "| char | Rnd2Rnd | 5 | +0 |" in comparison  # mean valid loss over its two seeds
    news_bleu = [row.split(" | ")[6:8] for row in comparison.splitlines() if row.startswith("| char |")]
    # Rnd2Rnd 2 (1, 3), Enc2Rnd 2 (one seed), Rnd2Dec pending, Enc2Dec 5 (4, 6): seed noise 2 (both seeded starts).
    assert news_bleu == [["2", "+0"], ["2", "+0 (within seed noise)"], ["pending", "pending"], ["5", "+3"],
                         ["2", ""]], comparison
    assert {p.name for p in (tmp_path / "results" / "small").glob("*.png")} == {"pretrain.png",
                                                                                 "translation-char.png", "bleu.png"}


def test_the_budget_fills_the_seconds_and_keeps_the_second_seeds_where_they_fit():
    """experiments/budget.py, on made-up probe measurements of the small grid: 400 s take the second seeds, 250 s
    leave them out (the fine-tunings would get under two epochs with them)."""
    import budget

    probe = budget.Probe(budget.Stage(step_seconds=0.05, job_seconds=20), budget.Stage(0.08, 20),
                         budget.Scoring(start_seconds=6, line_seconds=0.001), [1996, 1996, 1000, 1000, 10, 0, 0],
                         score_processes=8, train_pairs=46348, batch_size=64)
    grid = ko_en.Grid("small", False)
    roomy, tight = (budget.plan(probe, grid, seconds, pretrained=False) for seconds in (400, 250))
    assert (roomy.models, tight.models) == (6, 4)
    assert roomy.finetune_epochs >= budget.MIN_SEED_EPOCHS > tight.finetune_epochs > 1
    assert budget.SAFETY * 400 < sum(roomy.seconds().values()) <= 400
    assert sum(tight.seconds().values()) <= 250
