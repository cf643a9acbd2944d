"""One test per `fastlm` command, each run as a user would (`python -m fastlm ...` in a subprocess), at tiny
sizes, plus the one-line-and-exit-code-2 promise for the mistakes a user can make, and `fastlm demo` end to end."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# A model small enough that each training command takes seconds on one core.
MICRO_MODEL = ["--model.d_model", "32", "--model.n_layers", "1", "--model.n_heads", "2", "--model.d_ff", "64"]
QUICK_RUN = ["--max_steps", "6", "--batch_size", "8", "--max_len", "32", "--eval_interval", "3",
             "--eval_batches", "2", "--checkpoint_interval", "3", "--warmup_steps", "2", "--progress", "false"]


def fastlm(*args: str, stdin: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    env.pop("FASTLM_DEBUG", None)
    result = subprocess.run([sys.executable, "-m", "fastlm", *map(str, args)], input=stdin, capture_output=True,
                            text=True, env=env, timeout=600)
    if check and result.returncode != 0:
        raise AssertionError(f"fastlm {' '.join(map(str, args))} failed ({result.returncode}):\n{result.stderr}")
    return result


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, ko_en_dir):
    """Small ko/en files taken from the shared corpus, a tokenizer, and prepared corpora (built by the CLI)."""
    root = tmp_path_factory.mktemp("cli")
    for split, count in (("train", 200), ("valid", 16)):
        for lang in ("ko", "en"):
            with open(ko_en_dir / f"{split}.{lang}", encoding="utf-8") as f:
                lines = [next(f) for _ in range(count)]
            (root / f"{split}.{lang}").write_text("".join(lines), encoding="utf-8")
    fastlm("tokenizer", "train", "--input", root / "train.ko", root / "train.en", "--vocab-size", "600",
           "--output", root / "tok.json")
    for split in ("train", "valid"):
        for lang in ("ko", "en"):
            fastlm("prepare", "--tokenizer", root / "tok.json", "--input", root / f"{split}.{lang}",
                   "--output", root / f"{split}-{lang}", "--quiet")
        fastlm("prepare", "--tokenizer", root / "tok.json", "--input", root / f"{split}.ko", root / f"{split}.en",
               "--output", root / f"{split}-pairs", "--quiet")
    return root


@pytest.fixture(scope="module")
def pretrained(workspace):
    for arch, lang in (("encoder", "ko"), ("decoder", "en")):
        fastlm("pretrain", "--arch", arch, "--tokenizer", workspace / "tok.json", "--train", workspace / f"train-{lang}",
               "--valid", workspace / f"valid-{lang}", "--run-dir", workspace / arch, *QUICK_RUN, *MICRO_MODEL)
    return workspace


@pytest.fixture(scope="module")
def finetuned(pretrained):
    root = pretrained
    fastlm("finetune", "--encoder", root / "encoder", "--decoder", root / "decoder", "--tokenizer", root / "tok.json",
           "--train", root / "train-pairs", "--valid", root / "valid-pairs", "--run-dir", root / "seq2seq",
           "--bleu-sentences", "4", "--beam", "2", *QUICK_RUN)
    return root


def test_tokenizer_train_writes_a_loadable_tokenizer(workspace):
    from fastlm import Tokenizer

    assert Tokenizer.load(workspace / "tok.json").vocab_size == 600


def test_tokenizer_encode_then_decode_round_trips(workspace):
    text = "오늘은 날씨가 좋다. The weather is nice."
    ids = fastlm("tokenizer", "encode", "--tokenizer", workspace / "tok.json", text).stdout.strip()
    assert all(token.isdigit() for token in ids.split())
    decoded = fastlm("tokenizer", "decode", "--tokenizer", workspace / "tok.json", stdin=ids + "\n").stdout
    assert decoded == text + "\n"


def test_prepare_writes_mono_and_parallel_corpora(workspace):
    from fastlm.data.corpus import ParallelCorpus, TokenizedCorpus

    assert len(TokenizedCorpus(workspace / "train-ko")) == 200
    assert len(ParallelCorpus(workspace / "valid-pairs")) == 16


def test_prepare_into_a_corpus_of_other_inputs_needs_overwrite(workspace, capsys):
    from fastlm import Tokenizer
    from fastlm.cli import main
    from fastlm.data.corpus import TokenizedCorpus

    def prepare(source: str, *extra: str) -> int:
        return main(["prepare", "--tokenizer", str(workspace / "tok.json"), "--input", str(workspace / source),
                     "--output", str(workspace / "reprepared"), "--quiet", *extra])

    assert prepare("valid.ko") == 0 and prepare("valid.ko") == 0  # the same again: nothing to do
    capsys.readouterr()
    assert prepare("valid.en") == 2
    stderr = capsys.readouterr().err
    assert len(stderr.strip().splitlines()) == 1 and "valid.en" in stderr and "--overwrite" in stderr, stderr
    assert prepare("valid.en", "--overwrite") == 0
    first_english = (workspace / "valid.en").read_text(encoding="utf-8").splitlines()[0].strip()
    assert list(TokenizedCorpus(workspace / "reprepared")[0]) == Tokenizer.load(workspace / "tok.json").encode(
        first_english)


@pytest.mark.parametrize("arch", ["encoder", "decoder"])
def test_pretrain_writes_a_complete_run(pretrained, arch):
    run = pretrained / arch
    saved = json.loads((run / "config.json").read_text())
    assert saved["train"]["max_steps"] == 6 and saved["model"]["d_model"] == 32
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["kind"] == "train"] == [1, 2, 3, 4, 5, 6]
    assert {"loss", "perplexity", "accuracy"} <= set(next(r for r in records if r["kind"] == "eval"))
    assert (run / "model" / "model.safetensors").is_file() and (run / "loss.png").is_file()
    assert (run / "checkpoints" / "step-00000006.pt").is_file() and (run / "checkpoints" / "best.pt").is_file()


def test_finetune_reports_bleu(finetuned):
    evals = [json.loads(line) for line in (finetuned / "seq2seq" / "metrics.jsonl").read_text().splitlines()
             if '"eval"' in line]
    assert evals and all(0.0 <= r["bleu"] <= 100.0 for r in evals)


def test_translate_from_arguments_stdin_and_a_file(finetuned):
    common = ["translate", "--model", finetuned / "seq2seq", "--tokenizer", finetuned / "tok.json", "--beam", "2",
              "--max-new-tokens", "8"]
    assert len(fastlm(*common, "안녕하세요", "고맙습니다").stdout.splitlines()) == 2
    assert len(fastlm(*common, stdin="안녕하세요\n").stdout.splitlines()) == 1
    assert len(fastlm(*common, "--input", finetuned / "valid.ko").stdout.splitlines()) == 16


def test_eval_prints_metrics_as_json(finetuned):
    out = fastlm("eval", "--model", finetuned / "seq2seq", "--tokenizer", finetuned / "tok.json",
                 "--data", finetuned / "valid-pairs", "--bleu-sentences", "2", "--beam", "1", "--max_len", "32").stdout
    metrics = json.loads(out)
    assert metrics["loss"] > 0 and metrics["perplexity"] > 1 and 0 <= metrics["bleu"] <= 100


def test_plot_draws_a_png(pretrained, tmp_path):
    out = tmp_path / "curve.png"
    fastlm("plot", pretrained / "decoder", "--output", out)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("args, message", [
    (["plot", "/no/such/run"], "no metrics.jsonl"),
    (["translate", "--model", "/no/such/model", "--tokenizer", "/no/tok.json", "hi"], "does not exist"),
    (["pretrain", "--arch", "encoder", "--tokenizer", "{root}/tok.json", "--train", "{root}/train-ko",
      "--run-dir", "{root}/bad", "--lrr", "1"], "unknown config key 'lrr'"),
    (["pretrain", "--arch", "encoder", "--tokenizer", "{root}/tok.json", "--train", "{root}/train-ko",
      "--run-dir", "{root}/bad", "--lr", "fast"], "--lr 'fast': expected float"),
    (["pretrain", "--arch", "encoder", "--tokenizer", "{root}/tok.json", "--train", "{root}/train-ko",
      "--run-dir", "{root}/bad", "--model.d_model", "wide"], "--model.d_model 'wide': expected int"),
    (["pretrain", "--arch", "encoder", "--tokenizer", "{root}/tok.json", "--train", "{root}/nowhere",
      "--run-dir", "{root}/bad"], "is not a prepared corpus"),
    (["pretrain", "--arch", "encoder", "--tokenizer", "{root}/tok.json", "--train", "{root}/train-ko",
      "--run-dir", "{root}/bad", "--resume"], "holds no checkpoint"),
    (["prepare", "--tokenizer", "{root}/tok.json", "--input", "{root}/missing.txt", "--output", "{root}/x"],
     "no such file"),
    (["translate", "--model", "{root}/encoder", "--tokenizer", "{root}/tok.json", "hi"], "expected a fine-tuned"),
    (["translate", "--model", "{root}/seq2seq", "--tokenizer", "{root}/other-tok.json", "hi"],
     "differs from the tokenizer's vocab_size"),
    (["eval", "--model", "{root}/decoder", "--tokenizer", "{root}/other-tok.json", "--data", "{root}/valid-en"],
     "differs from the tokenizer's vocab_size"),
    (["pretrain", "--arch", "decoder"], "the following arguments are required"),
])
def test_user_mistakes_are_one_line_and_exit_code_2(finetuned, args, message, capsys, monkeypatch):
    from fastlm.cli import main

    monkeypatch.delenv("FASTLM_DEBUG", raising=False)
    if not (finetuned / "other-tok.json").exists():
        fastlm("tokenizer", "train", "--input", finetuned / "train.en", "--vocab-size", "500",
               "--output", finetuned / "other-tok.json")
    # In process (main() is what `python -m fastlm` runs): a subprocess per mistake would only add start-up time.
    assert main([a.format(root=finetuned) for a in args]) == 2
    stderr = capsys.readouterr().err
    assert len(stderr.strip().splitlines()) == 1, stderr
    assert message in stderr


def test_demo_runs_the_whole_pipeline(tmp_path):
    # A tenth of the demo's steps: every stage runs exactly as in `fastlm demo`, just shorter.
    out = fastlm("demo", "--workdir", tmp_path, "--scale", "0.1").stdout
    for stage in ("tokenizer", "prepare", "pre-train encoder", "pre-train decoder", "fine-tune ko->en",
                  "translate", "total"):
        assert stage in out
    assert (tmp_path / "runs" / "finetune" / "model" / "model.safetensors").is_file()
    assert out.count("   out: ") == 5


def test_finetune_offers_every_cross_attention_init():
    from fastlm.cli import build_parser
    from fastlm.models.seq2seq import CROSS_ATTENTION_INITS

    command = ["finetune", "--encoder", "e", "--decoder", "d", "--tokenizer", "t.json", "--train", "x", "--run-dir",
               "r"]
    assert set(CROSS_ATTENTION_INITS) == {"random", "copy-self", "zero-out"}
    for init in CROSS_ATTENTION_INITS:
        args, _ = build_parser().parse_known_args(command + ["--cross-attention-init", init])
        assert args.cross_attention_init == init
    assert build_parser().parse_known_args(command)[0].cross_attention_init == "random"
