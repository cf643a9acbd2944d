"""experiments/ko_en.py --quick, run as a user would: every stage of the grid leaves its result files, a second run
skips every finished job, and --report writes the results page and its plots from them; and the files the
experiment derives from its data, stated literally."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

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
               for stage in ("tokenizers", "plateau", "pretrain", "finetune", "test", "source", "sweep")}
    assert results == {
        "tokenizers": ["byte-1100", "char-1100"],
        "plateau": ["baseline", "mask40"],
        "pretrain": ["char-decoder", "char-encoder"],
        "finetune": ["char-Enc2Dec-random-seed0", "char-Rnd2Rnd-random-seed0"],
        "test": ["char-Enc2Dec-random-seed0-beam1", "char-Enc2Dec-random-seed0-beam4",
                 "char-Enc2Dec-random-seed0-everyday-beam4", "char-Enc2Dec-random-seed0-heldout-beam1",
                 "char-Enc2Dec-random-seed0-heldout-beam4",
                 "char-Rnd2Rnd-random-seed0-beam1", "char-Rnd2Rnd-random-seed0-beam4",
                 "char-Rnd2Rnd-random-seed0-everyday-beam4", "char-Rnd2Rnd-random-seed0-heldout-beam1",
                 "char-Rnd2Rnd-random-seed0-heldout-beam4"],
        "source": ["char-Enc2Dec-random-seed0", "char-Rnd2Rnd-random-seed0"],
        "sweep": ["wd0-lr1e-3"],
    }, first.stdout
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
    assert re.search(r"\| char \| 0 \| held-out \| Enc2Dec \| [+-][\d.e+-]+ \| (\*\*)?[\d.]+", text), text
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
    finished = {"pretrain/char-encoder": {"final": evals[0], "evals": evals},
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
    assert "| byte |" not in text.split("## 3. Pre-training")[1].split("## 5.")[0]
    for stage in ("plateau", "sweep"):
        assert f"Not run for this page: section 7 (the first study) gives its result, at the same settings. " \
               f"`python experiments/ko_en.py --stages {stage}` runs it." in text
    assert text.rstrip().endswith(report.FIRST_STUDY.read_text(encoding="utf-8").strip())


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
