"""experiments/ko_en.py --quick, run as a user would: every stage of the grid leaves its result files, a second run
skips every finished job, and --report writes the results page and its plots from them."""

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "experiments" / "ko_en.py"


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
        "pretrain": ["byte-decoder", "byte-encoder"],
        "finetune": ["byte-Enc2Dec-random-seed0", "byte-Rnd2Rnd-random-seed0"],
        "test": ["byte-Enc2Dec-random-seed0-beam1", "byte-Enc2Dec-random-seed0-beam4",
                 "byte-Rnd2Rnd-random-seed0-beam1", "byte-Rnd2Rnd-random-seed0-beam4"],
        "source": ["byte-Enc2Dec-random-seed0", "byte-Rnd2Rnd-random-seed0"],
        "sweep": ["wd0-lr1e-3"],
    }, first.stdout
    pretrained = json.loads((out / "results" / "pretrain" / "byte-encoder.json").read_text())
    assert pretrained["status"] == "finished" and pretrained["final"]["step"] == 4
    source = json.loads((out / "results" / "source" / "byte-Rnd2Rnd-random-seed0.json").read_text())
    assert source["gap"] == source["mispaired"] - source["paired"] and source["paired"] > 0
    test = json.loads((out / "results" / "test" / "byte-Enc2Dec-random-seed0-beam4.json").read_text())
    assert {"bleu", "chrf", "best", "worst"} <= set(test)
    assert len((out / "translations" / "byte-Enc2Dec-random-seed0-beam4.en").read_text().splitlines()) == \
        len((out / "data" / "quick" / "test.en").read_text().splitlines())

    again = experiment("--data", ko_en_dir, "--out", out)
    assert "$ fastlm" not in again.stdout, again.stdout  # nothing ran: every job was finished

    page = Path(experiment("--data", ko_en_dir, "--out", out, "--report").stdout.strip())
    text = page.read_text()
    assert "pending" not in text.split("## 1.")[1], text  # the quick grid is complete: no pending cell
    assert {p.name for p in (page.parent / "results").glob("*.png")} == {"plateau.png", "pretrain.png",
                                                                          "translation-byte.png", "bleu.png"}


def test_an_interrupted_job_resumes_and_a_changed_command_reruns(tmp_path, ko_en_dir):
    """A run directory with the job's checkpoints is continued with --resume; a result made by another command
    (here: another job key stored with it) is run again."""
    out = tmp_path / "experiment"
    experiment("--data", ko_en_dir, "--out", out, "--stages", "plateau", "--only", "plateau/baseline")
    result_path = out / "results" / "plateau" / "baseline.json"
    first = json.loads(result_path.read_text())
    result_path.unlink()  # as if killed after its last checkpoint, before the result was written
    resumed = experiment("--data", ko_en_dir, "--out", out, "--stages", "plateau", "--only", "plateau/baseline")
    assert "--resume" in resumed.stdout and json.loads(result_path.read_text())["final"] == first["final"]

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
