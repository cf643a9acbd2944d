"""One test per `fastlm` command, each run as a user would (`python -m fastlm ...` in a subprocess), at tiny
sizes, plus the one-line-and-exit-code-2 promise for the mistakes a user can make, and `fastlm demo` end to end."""

import dataclasses
import json
import math
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# A model small enough that each training command takes seconds on one core.
MICRO_MODEL = ["--model.d_model", "32", "--model.n_layers", "1", "--model.n_heads", "2", "--model.d_ff", "64"]
# --eval_batches 1: the runs evaluate a fixed sample of 8 of the 16 validation sentences (pairs, blocks).
QUICK_RUN = ["--max_steps", "6", "--batch_size", "8", "--max_len", "32", "--eval_interval", "3",
             "--eval_batches", "1", "--checkpoint_interval", "3", "--warmup_steps", "2", "--progress", "false"]


def with_options(args: list, **values) -> list:
    """`args` with each `--KEY` of `values` set to its value: replaced where given (fastlm refuses a setting given
    twice), appended otherwise."""
    args = list(args)
    for key, value in values.items():
        flag = f"--{key}"
        if flag in args:
            args[args.index(flag) + 1] = str(value)
        else:
            args += [flag, str(value)]
    return args


def cli_env() -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    env.pop("FASTLM_DEBUG", None)
    return env


def fastlm(*args: str, stdin: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
    # Under the common umask 022, whatever the test runner's: every file fastlm writes must then be 0o644.
    result = subprocess.run([sys.executable, "-m", "fastlm", *map(str, args)], input=stdin, capture_output=True,
                            text=True, env=cli_env(), timeout=600, umask=0o022)
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
           "--bleu-sentences", "4", "--beam", "2", *QUICK_RUN, "--max_tokens", "256")
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
    assert "overwrite=True" not in stderr  # the command line's words, not Python's
    assert prepare("valid.en", "--overwrite") == 0
    first_english = (workspace / "valid.en").read_text(encoding="utf-8").splitlines()[0].strip()
    assert list(TokenizedCorpus(workspace / "reprepared")[0]) == Tokenizer.load(workspace / "tok.json").encode(
        first_english)


@pytest.mark.parametrize("arch", ["encoder", "decoder"])
def test_pretrain_writes_a_complete_run(pretrained, arch):
    run = pretrained / arch
    saved = json.loads((run / "config.json").read_text())
    assert saved["train"]["max_steps"] == 6 and saved["model"]["d_model"] == 32
    assert saved["train"]["label_smoothing"] == 0.0  # pre-training keeps plain cross-entropy
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["kind"] == "train"] == [1, 2, 3, 4, 5, 6]
    assert {"loss", "perplexity", "accuracy"} <= set(next(r for r in records if r["kind"] == "eval"))
    assert (run / "model" / "model.safetensors").is_file() and (run / "loss.png").is_file()
    assert (run / "checkpoints" / "step-00000006.pt").is_file() and (run / "checkpoints" / "best.pt").is_file()


def test_finetune_reports_bleu(finetuned):
    evals = [json.loads(line) for line in (finetuned / "seq2seq" / "metrics.jsonl").read_text().splitlines()
             if '"eval"' in line]
    assert evals and all(0.0 <= r["bleu"] <= 100.0 for r in evals)
    saved = json.loads((finetuned / "seq2seq" / "config.json").read_text())["train"]
    assert saved["label_smoothing"] == 0.0 and saved["max_tokens"] == 256  # finetune's default; the override


def test_finetune_exports_the_checkpoint_of_the_best_validation_loss(finetuned):
    import torch

    from fastlm.models import Seq2SeqLM
    from fastlm.train import load_checkpoint

    run = finetuned / "seq2seq"
    evals = [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if r["kind"] == "eval"]
    best_step = min(evals, key=lambda r: r["loss"])["step"]
    metadata = json.loads((run / "model" / "config.json").read_text())["metadata"]
    assert (metadata["step"], metadata["selected_by"]) == (best_step, "loss")
    best = load_checkpoint(run / "checkpoints" / "best.pt")
    assert best["step"] == best_step
    exported = Seq2SeqLM.load(run / "model").state_dict()
    assert all(torch.equal(tensor, best["model"][name]) for name, tensor in exported.items())


def test_average_writes_the_mean_of_the_newest_checkpoints_as_a_model_that_translates(finetuned, tmp_path, capsys):
    import torch

    from fastlm.cli import main
    from fastlm.models import Seq2SeqLM
    from fastlm.train import load_checkpoint

    run, output = finetuned / "seq2seq", tmp_path / "averaged"
    assert main(["average", "--run-dir", str(run), "--last", "2", "--output", str(output)]) == 0
    assert capsys.readouterr().out == f"averaged 2 checkpoint(s), steps 3, 6 -> {output}\n"
    states = [load_checkpoint(run / "checkpoints" / f"step-{step:08d}.pt")["model"] for step in (3, 6)]
    for name, tensor in Seq2SeqLM.load(output).state_dict().items():
        torch.testing.assert_close(tensor, (states[0][name] + states[1][name]) / 2, msg=name)
    translated = fastlm("translate", "--model", output, "--tokenizer", finetuned / "tok.json", "--beam", "1",
                        "--max-new-tokens", "4", "안녕하세요")
    assert len(translated.stdout.splitlines()) == 1 and translated.stderr == ""


@pytest.mark.parametrize("args, message", [
    (["--run-dir", "{root}/seq2seq", "--last", "3"], "holds 2 step checkpoint(s) (the run keeps keep_last=2)"),
    (["--run-dir", "{root}/seq2seq"], "give --last K"),
    (["--checkpoints", "{root}/encoder/checkpoints/step-00000006.pt", "{root}/decoder/checkpoints/step-00000006.pt"],
     "task: the first has 'pretrain-encoder', this one 'pretrain-decoder'"),
    (["--checkpoints", "{root}/seq2seq/checkpoints/step-00000006.pt", "--last", "1"],
     "--last counts the checkpoints of --run-dir"),
    ([], "one of the arguments --run-dir --checkpoints is required"),
    (["--run-dir", "{root}/seq2seq", "--last", "1", "--output", "{root}/seq2seq/model"],
     "exists: choose another directory, or pass --overwrite"),
])
def test_average_mistakes_are_one_line_and_exit_code_2(finetuned, tmp_path, args, message, capsys, monkeypatch):
    from fastlm.cli import main

    monkeypatch.delenv("FASTLM_DEBUG", raising=False)
    model_before = (finetuned / "seq2seq" / "model" / "model.safetensors").read_bytes()
    assert main(["average", "--output", str(tmp_path / "out"), *(arg.format(root=finetuned) for arg in args)]) == 2
    stderr = capsys.readouterr().err
    assert len(stderr.strip().splitlines()) == 1 and message in stderr, stderr
    assert not (tmp_path / "out").exists()
    assert (finetuned / "seq2seq" / "model" / "model.safetensors").read_bytes() == model_before


def test_translate_from_arguments_stdin_and_a_file(finetuned):
    common = ["translate", "--model", finetuned / "seq2seq", "--tokenizer", finetuned / "tok.json", "--beam", "2",
              "--max-new-tokens", "8"]
    assert len(fastlm(*common, "안녕하세요", "고맙습니다").stdout.splitlines()) == 2
    assert len(fastlm(*common, stdin="안녕하세요\n").stdout.splitlines()) == 1
    assert len(fastlm(*common, "--input", finetuned / "valid.ko").stdout.splitlines()) == 16


def translate_args(finetuned, *args: str) -> list[str]:
    return ["translate", "--model", str(finetuned / "seq2seq"), "--tokenizer", str(finetuned / "tok.json"),
            "--beam", "1", "--max-new-tokens", "6", *args]


def test_translate_gives_one_line_per_input_line(finetuned, tmp_path, capsys, monkeypatch):
    """Lines end at "\n" only (and "\r\n"), in a file as on stdin: U+2028, U+0085 and form feeds are inside lines.
    An empty (or blank) line translates to an empty line."""
    import io

    import fastlm.translation
    from fastlm.cli import main

    # The sources the model is asked to translate (a small model may well answer some of them with ""): only the
    # four non-blank lines, each whole.
    translated, generate = [], fastlm.translation.generate
    monkeypatch.setattr(fastlm.translation, "generate",
                        lambda *args, **kwargs: translated.append(len(kwargs["src_ids"])) or generate(*args, **kwargs))
    data = "안녕\u2028하세요\r\n고맙\x85습니다\n\n좋은\x0c날\n   \n감사합니다".encode()
    (tmp_path / "lines.ko").write_bytes(data)
    assert main(translate_args(finetuned, "--input", str(tmp_path / "lines.ko"))) == 0
    assert sum(translated) == 4
    from_file = capsys.readouterr().out
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(data), encoding="utf-8"))
    assert main(translate_args(finetuned)) == 0
    assert capsys.readouterr().out == from_file
    lines = from_file.split("\n")
    assert len(lines) == 7 and lines[-1] == ""  # 6 lines, each ended by "\n"
    assert lines[2] == lines[4] == ""


def test_translate_streams_what_is_done_and_keeps_it_on_ctrl_c(finetuned, tmp_path, capsys, monkeypatch):
    import fastlm.translation
    from fastlm.cli import main

    sentences = (finetuned / "valid.ko").read_text(encoding="utf-8").splitlines()[:6]
    (tmp_path / "six.ko").write_text("\n".join(sentences) + "\n", encoding="utf-8")
    command = translate_args(finetuned, "--input", str(tmp_path / "six.ko"), "--batch-size", "1")
    monkeypatch.setattr(fastlm.translation, "SORTED_BATCHES", 1)  # a window of one batch of one sentence
    assert main(command) == 0
    everything = capsys.readouterr().out.splitlines()
    generate = fastlm.translation.generate
    printed_before_each_batch = []

    def generate_then_ctrl_c(*args, **kwargs):
        printed_before_each_batch.append(capsys.readouterr().out)
        if len(printed_before_each_batch) == 4:
            raise KeyboardInterrupt  # Ctrl-C while the fourth sentence is translated
        return generate(*args, **kwargs)

    monkeypatch.setattr(fastlm.translation, "generate", generate_then_ctrl_c)
    assert main(command) == 130
    assert printed_before_each_batch == ["", *(line + "\n" for line in everything[:3])]
    assert capsys.readouterr().err.splitlines() == [
        "fastlm: interrupted (the translations of the first 3 of 6 sentences were written)"]


def test_translate_reports_progress_on_long_inputs_and_cut_sources_once(finetuned, tmp_path, capsys, monkeypatch):
    import fastlm.cli
    from fastlm.cli import main

    too_long = "오늘은 날씨가 좋다. " * 60  # beyond the model's 128 positions
    (tmp_path / "long.ko").write_text(f"{too_long}\n안녕하세요\n{too_long}\n", encoding="utf-8")
    command = translate_args(finetuned, "--input", str(tmp_path / "long.ko"))
    assert main(command) == 0
    assert capsys.readouterr().err.splitlines() == [
        "fastlm: warning: 2 of 3 sources are longer than the encoder's max_seq_len = 128 tokens (with <s> and </s>): "
        "they were cut to fit"]
    monkeypatch.setattr(fastlm.cli, "LONG_INPUT_SENTENCES", 3)
    assert main(command) == 0
    progress = capsys.readouterr().err.splitlines()[1:]
    assert len(progress) == 1 and re.fullmatch(r"translate 3 sentences: 3 sentences \(.* s\)", progress[0]), progress
    assert main([*command, "--quiet"]) == 0
    assert len(capsys.readouterr().err.splitlines()) == 1


@pytest.mark.parametrize("command", ["translate", "eval"])
def test_decoding_options_reach_generate(finetuned, command, monkeypatch, capsys):
    import fastlm.translation
    from fastlm.cli import main

    received = []
    generate = fastlm.translation.generate
    monkeypatch.setattr(fastlm.translation, "generate",
                        lambda *args, **kwargs: received.append(kwargs) or generate(*args, **kwargs))
    options = ["--beam", "2", "--length-penalty", "0.5", "--no-repeat-ngram-size", "3", "--max-len-a", "1.5",
               "--max-len-b", "4"]
    common = ["--model", str(finetuned / "seq2seq"), "--tokenizer", str(finetuned / "tok.json"), *options]
    if command == "translate":
        assert main(["translate", *common, "안녕하세요"]) == 0
    else:
        assert main(["eval", *common, "--data", str(finetuned / "valid-pairs"), "--bleu-sentences", "2",
                     "--max_len", "32"]) == 0
    assert received and all({key: kwargs[key] for key in ("num_beams", "length_penalty", "no_repeat_ngram_size",
                                                          "max_len_a", "max_len_b")}
                            == dict(num_beams=2, length_penalty=0.5, no_repeat_ngram_size=3, max_len_a=1.5,
                                    max_len_b=4) for kwargs in received)


@pytest.mark.parametrize("run, data, bleu", [("encoder", "valid-ko", []), ("decoder", "valid-en", []),
                                             ("seq2seq", "valid-pairs", ["--bleu-sentences", "4", "--beam", "2"])])
def test_eval_of_a_run_on_its_valid_split_reproduces_its_last_evaluation(finetuned, run, data, bleu):
    """The run's own settings by default: the same sample (and masks) as its evaluations, the same numbers."""
    last = [json.loads(line) for line in (finetuned / run / "metrics.jsonl").read_text().splitlines()
            if '"eval"' in line][-1]
    metrics = json.loads(fastlm("eval", "--model", finetuned / run, "--tokenizer", finetuned / "tok.json",
                                "--data", finetuned / data, *bleu, "--json").stdout)
    assert metrics["items"] == 8 and metrics["settings"] == f"the run's, from {finetuned / run / 'config.json'}"
    for key in ("loss", "perplexity", "accuracy", *(["bleu"] if bleu else [])):
        assert metrics[key] == pytest.approx(last[key], rel=1e-5, abs=1e-6), key


def test_eval_prints_a_summary_that_says_what_it_scored(finetuned):
    common = ["eval", "--model", finetuned / "seq2seq", "--tokenizer", finetuned / "tok.json",
              "--data", finetuned / "valid-pairs"]
    sampled = fastlm(*common).stdout.splitlines()
    assert sampled[0] == (f"{finetuned / 'seq2seq'} on {finetuned / 'valid-pairs'}: a fixed random sample of 8 of "
                          "16 pairs (eval_batches 1 x batch_size 8; --eval_batches 0 scores them all)")
    assert sampled[1] == (f"settings: batch_size 8, max_len 32 (the run's, from "
                          f"{finetuned / 'seq2seq' / 'config.json'})")
    assert re.fullmatch(r"loss \d+\.\d{4}, perplexity \S+, accuracy \d+\.\d\d%", sampled[2]), sampled
    whole = fastlm(*common, "--eval_batches", "0", "--bleu-sentences", "2", "--beam", "1").stdout.splitlines()
    assert whole[0].endswith(": all 16 pairs") and whole[1].endswith("with --eval_batches 0)"), whole
    assert re.fullmatch(r"loss .*, BLEU \d+\.\d\d on the first 2 pairs \(beam 1\)", whole[2]), whole
    metrics = json.loads(fastlm(*common, "--preset", "tiny", "--max_len", "32", "--json").stdout)
    assert (metrics["items"], metrics["total"], metrics["settings"]) == (16, 16, "preset tiny with --max_len 32")


def test_export_to_transformers_and_finetune_from_its_directories(finetuned, tmp_path):
    transformers = pytest.importorskip("transformers")
    root, tok = finetuned, finetuned / "tok.json"
    for name in ("encoder", "decoder", "seq2seq"):
        fastlm("export", "--model", root / name, "--tokenizer", tok, "--output", tmp_path / name)
    again = fastlm("export", "--model", root / "seq2seq", "--tokenizer", tok, "--output", tmp_path / "seq2seq",
                   check=False)
    assert again.returncode == 2 and "--overwrite" in again.stderr and "overwrite=True" not in again.stderr
    # The translator answers through transformers as through fastlm (greedy: a beam of one).
    sentence = (root / "valid.ko").read_text(encoding="utf-8").splitlines()[0]
    ours = fastlm("translate", "--model", root / "seq2seq", "--tokenizer", tok, "--beam", "1", "--max-new-tokens", "8",
                  sentence).stdout.strip()
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "seq2seq")
    model = transformers.EncoderDecoderModel.from_pretrained(tmp_path / "seq2seq")
    generated = model.generate(**hf_tokenizer([sentence], truncation=True, return_tensors="pt"), max_new_tokens=8)
    assert hf_tokenizer.decode(generated[0], skip_special_tokens=True) == ours
    fastlm("finetune", "--encoder", tmp_path / "encoder", "--decoder", tmp_path / "decoder", "--tokenizer", tok,
           "--train", root / "train-pairs", "--run-dir", tmp_path / "from-hf", "--max_steps", "2", "--batch_size", "4",
           "--max_len", "32", "--progress", "false")
    assert (tmp_path / "from-hf" / "model" / "model.safetensors").is_file()


def test_files_fastlm_writes_follow_the_umask(finetuned):
    # Tokenizer, prepared corpora, run configs, metrics, checkpoints, plots, models: readable by the machine's other
    # users under umask 022, like any file `open()` creates (mkstemp and safetensors alone would make them 0o600).
    written = [path for path in finetuned.rglob("*") if path.is_file() and path.suffix not in (".ko", ".en")]
    assert any(path.name == "model.safetensors" for path in written) and (finetuned / "tok.json") in written
    assert {str(path.relative_to(finetuned)): oct(path.stat().st_mode & 0o777) for path in written
            if path.stat().st_mode & 0o777 != 0o644} == {}


def test_plot_draws_a_png(pretrained, tmp_path):
    out = tmp_path / "curve.png"
    fastlm("plot", pretrained / "decoder", "--output", out)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def other_tokenizers(finetuned):
    """other-tok.json: another vocab size; same-size-tok.json: the vocab size of tok.json, trained on other text."""
    from fastlm import Tokenizer

    fastlm("tokenizer", "train", "--input", finetuned / "train.en", "--vocab-size", "500",
           "--output", finetuned / "other-tok.json")
    fastlm("tokenizer", "train", "--input", finetuned / "train.ko", finetuned / "train.en", finetuned / "train.ko",
           "--vocab-size", "600", "--output", finetuned / "same-size-tok.json")
    assert Tokenizer.load(finetuned / "same-size-tok.json").vocab_size == 600
    return finetuned


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
    (["export", "--model", "{root}/seq2seq", "--tokenizer", "{root}/other-tok.json", "--output", "{root}/hf-bad"],
     "differs from the tokenizer's"),
    (["pretrain", "--arch", "decoder"], "the following arguments are required"),
    (["eval", "--model", "{root}/seq2seq", "--tokenizer", "{root}/tok.json", "--data", "{root}/valid-en"],
     "from two line-aligned files: `fastlm prepare --tokenizer TOK --input train.ko train.en --output DIR`"),
    # A tokenizer of the model's vocab size, but another one: its ids mean other text.
    (["translate", "--model", "{root}/seq2seq", "--tokenizer", "{root}/same-size-tok.json", "hi"],
     "trained with tokenizer sha256="),
    (["eval", "--model", "{root}/decoder", "--tokenizer", "{root}/same-size-tok.json", "--data", "{root}/valid-en"],
     "trained with tokenizer sha256="),
    (["finetune", "--encoder", "{root}/encoder", "--decoder", "{root}/decoder", "--tokenizer",
      "{root}/same-size-tok.json", "--train", "{root}/train-pairs", "--run-dir", "{root}/bad"],
     "trained with tokenizer sha256="),
    (["finetune", "--encoder", "{root}/encoder", "--decoder", "{root}/decoder", "--tokenizer", "{root}/tok.json",
      "--train", "{root}/train-pairs", "--run-dir", "{root}/decoder", "--max_steps", "1"], "holds an earlier run"),
    (["pretrain", "--arch", "encoder", "--tokenizer", "{root}/tok.json", "--train", "{root}/train-ko",
      "--run-dir", "{root}/encoder", "--resume", "--overwrite"], "give one of them"),
    (["pretrain", "--arch", "encoder", "--tokenizer", "{root}/tok.json", "--train", "{root}/train-ko",
      "--run-dir", "{root}/bad", "--max_steps", "2", "--max-steps", "3"], "--max_steps '2' was given already"),
    (["pretrain", "--arch", "encoder", "--tokenizer", "{root}/tok.json", "--train", "{root}/train-ko",
      "--run-dir", "{root}/bad", "--threads", "0"], "--threads 0: expected a number of threads >= 1"),
    # Byte-level BPE takes any bytes: the command still refuses what is no text, as `prepare` does.
    (["tokenizer", "train", "--input", sys.executable, "--output", "{root}/binary-tok.json", "--level", "byte"],
     "invalid UTF-8"),
])
def test_user_mistakes_are_one_line_and_exit_code_2(other_tokenizers, args, message, capsys, monkeypatch):
    from fastlm.cli import main

    finetuned = other_tokenizers
    monkeypatch.delenv("FASTLM_DEBUG", raising=False)
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
    assert build_parser().parse_known_args(command)[0].cross_attention_init == "copy-self"  # docs/RESULTS.md


def test_finetune_from_random_sides(pretrained):
    """Rnd2Rnd takes its shape from the preset and --model.* overrides; Enc2Rnd and Rnd2Dec copy the pre-trained
    side's weights and give the random side its ModelConfig; the random side depends on the seed alone."""
    import torch

    from fastlm.models import DecoderLM, EncoderLM, Seq2SeqLM
    from fastlm.train.config import TrainConfig
    from fastlm.train.tasks import load_tokenizer, starting_models

    root = pretrained
    fastlm("finetune", "--encoder", "random", "--decoder", "random", "--tokenizer", root / "tok.json",
           "--train", root / "train-pairs", "--run-dir", root / "rnd2rnd", *QUICK_RUN,
           *" ".join(MICRO_MODEL).replace("--model.n_layers 1", "--model.n_layers 2").split())
    merged = Seq2SeqLM.load(root / "rnd2rnd" / "model")
    assert (merged.encoder_config.d_model, merged.encoder_config.n_layers, merged.config.n_layers) == (32, 2, 2)

    tokenizer, config = load_tokenizer(root / "tok.json"), TrainConfig.preset("tiny", seed=3)
    encoder = EncoderLM.load(root / "encoder" / "model")
    decoder = DecoderLM.load(root / "decoder" / "model")
    for encoder_path, decoder_path, pretrained_side in ((root / "encoder", "random", encoder),
                                                        ("random", root / "decoder", decoder)):
        models = starting_models(encoder_path, decoder_path, tokenizer, config, {})
        kept = next(model for model in models if type(model) is type(pretrained_side))
        fresh = next(model for model in models if type(model) is not type(pretrained_side))
        assert fresh.config == pretrained_side.config
        assert all(torch.equal(a, b) for a, b in zip(kept.state_dict().values(),
                                                      pretrained_side.state_dict().values()))
        again = starting_models(encoder_path, decoder_path, tokenizer, config, {})
        assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(),
                                                      next(m for m in again if type(m) is type(fresh))
                                                      .state_dict().values()))


@pytest.mark.parametrize("sides, overrides, message", [
    (("{root}/encoder", "random"), ["--model.d_model", "64"], "apply only with --encoder random --decoder random"),
    (("{root}/decoder", "random"), [], "holds a DecoderLM, expected EncoderLM"),
    (("random", "{root}/nowhere"), [], "neither a model directory nor a run directory"),
])
def test_finetune_random_side_mistakes(pretrained, sides, overrides, message, capsys, monkeypatch):
    from fastlm.cli import main

    monkeypatch.delenv("FASTLM_DEBUG", raising=False)
    encoder, decoder = (side.format(root=pretrained) for side in sides)
    assert main(["finetune", "--encoder", encoder, "--decoder", decoder, "--tokenizer", str(pretrained / "tok.json"),
                 "--train", str(pretrained / "train-pairs"), "--run-dir", str(pretrained / "never"),
                 *overrides]) == 2
    stderr = capsys.readouterr().err
    assert len(stderr.strip().splitlines()) == 1 and message in stderr, stderr


def test_a_model_saved_without_a_tokenizer_hash_still_loads_with_one_warning(finetuned, tmp_path):
    old = tmp_path / "old-model"
    shutil.copytree(finetuned / "seq2seq" / "model", old)
    config = json.loads((old / "config.json").read_text())
    del config["metadata"]  # as saved before models recorded their tokenizer
    (old / "config.json").write_text(json.dumps(config))
    result = fastlm("translate", "--model", old, "--tokenizer", finetuned / "tok.json", "--beam", "1",
                    "--max-new-tokens", "4", "안녕하세요")
    assert len(result.stdout.splitlines()) == 1
    assert result.stderr.strip().splitlines() == [
        f"fastlm: warning: {old} records no tokenizer hash (saved by an older fastlm): cannot check that the "
        "tokenizer given is the one it was trained with"]


def test_an_unreachable_vocab_size_warns_with_the_size_reached(workspace, tmp_path):
    result = fastlm("tokenizer", "train", "--input", workspace / "valid.en", "--vocab-size", "5000",
                    "--output", tmp_path / "tok.json", "--quiet")
    reached = int(re.search(r"tokenizer: (\d+) tokens", result.stdout)[1])
    assert reached < 5000
    assert result.stderr.strip().splitlines() == [
        f"fastlm: warning: vocab_size=5000 asked for, {reached} reached: no pair of tokens occurs min_frequency=2 "
        "times any more (train on more text or lower min_frequency)"]
    reachable = fastlm("tokenizer", "train", "--input", workspace / "valid.en", "--vocab-size", str(reached),
                       "--output", tmp_path / "tok.json", "--quiet", "--overwrite")
    assert reachable.stderr == ""


def test_tokenizer_train_reports_progress_and_never_replaces_a_tokenizer_unasked(workspace, tmp_path):
    from fastlm import Tokenizer

    output = tmp_path / "tok.json"
    first = fastlm("tokenizer", "train", "--input", workspace / "valid.en", "--vocab-size", "400", "--output", output)
    # (a small corpus may also warn that vocab_size=400 is out of reach)
    counting, merging = [line for line in first.stderr.splitlines() if line.startswith("tokenizer: ")]
    assert re.fullmatch(r"tokenizer: counting byte-level pre-tokens: [\d,]+ bytes \(.*\)", counting)
    merges = re.fullmatch(r"tokenizer: merges toward vocab_size=400: (\d+) merges \(.*\)", merging)
    assert int(merges[1]) == len(Tokenizer.load(output)._merges) > 0
    saved = output.read_bytes()
    refused = fastlm("tokenizer", "train", "--input", workspace / "valid.ko", "--vocab-size", "400", "--output",
                     output, check=False)
    assert refused.returncode == 2 and "exists: pass --overwrite" in refused.stderr
    assert output.read_bytes() == saved
    fastlm("tokenizer", "train", "--input", workspace / "valid.ko", "--vocab-size", "400", "--output", output,
           "--overwrite", "--quiet")
    assert output.read_bytes() != saved


def test_a_run_directory_is_never_reused_silently(pretrained, tmp_path):
    run = tmp_path / "run"
    args = ["pretrain", "--arch", "decoder", "--tokenizer", pretrained / "tok.json", "--train",
            pretrained / "train-en", "--run-dir", run, *QUICK_RUN, *MICRO_MODEL]
    fastlm(*args)
    (run / "notes.txt").write_text("the user's own file")
    before = {path: path.read_bytes() for path in run.rglob("*") if path.is_file()}

    refused = fastlm(*with_options(args, max_steps=3), check=False)
    assert refused.returncode == 2 and len(refused.stderr.strip().splitlines()) == 1
    assert "holds an earlier run" in refused.stderr and "--resume" in refused.stderr
    assert {path: path.read_bytes() for path in run.rglob("*") if path.is_file()} == before

    fastlm(*with_options(args, max_steps=3), "--overwrite")  # a new, shorter run: nothing of the old one is left
    assert [r["step"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
            if r["kind"] == "train"] == [1, 2, 3]
    assert sorted(path.name for path in (run / "checkpoints").iterdir()) == ["best.pt", "step-00000003.pt"]
    assert json.loads((run / "config.json").read_text())["train"]["max_steps"] == 3
    assert (run / "notes.txt").read_text() == "the user's own file"


def test_a_resume_refuses_other_settings_and_data_but_not_moved_data_or_more_steps(pretrained, tmp_path, capsys,
                                                                                    monkeypatch):
    from fastlm.cli import main

    monkeypatch.delenv("FASTLM_DEBUG", raising=False)
    run, moved = tmp_path / "encoder", tmp_path / "moved-train-ko"
    shutil.copytree(pretrained / "encoder", run)
    shutil.copytree(pretrained / "train-ko", moved)
    saved = (run / "config.json").read_bytes()

    def resume(train: Path, *options: str) -> int:
        return main(list(map(str, ["pretrain", "--arch", "encoder", "--tokenizer", pretrained / "tok.json", "--train",
                                   train, "--valid", pretrained / "valid-ko", "--run-dir", run, "--resume",
                                   *options, *MICRO_MODEL])))

    assert resume(moved, *with_options(QUICK_RUN, lr="5e-4", batch_size=4)) == 2
    stderr = capsys.readouterr().err
    assert "batch_size: checkpoint has 8, this run 4; lr: checkpoint has 0.001, this run 0.0005" in stderr, stderr
    assert resume(pretrained / "train-en", *QUICK_RUN) == 2  # another corpus, of the same tokenizer
    assert "belongs to another run (corpora.train: checkpoint has '" in capsys.readouterr().err
    assert (run / "config.json").read_bytes() == saved

    assert resume(moved, *with_options(QUICK_RUN, max_steps=7)) == 0
    assert "resuming" in capsys.readouterr().err
    assert train_steps(run) == list(range(1, 8))
    assert json.loads((run / "config.json").read_text())["train"]["max_steps"] == 7


def test_packed_pretraining_runs_and_its_resume_keeps_packing(pretrained, tmp_path, capsys, monkeypatch):
    from fastlm.cli import main

    monkeypatch.delenv("FASTLM_DEBUG", raising=False)
    run = tmp_path / "packed"

    def pretrain(*options: str) -> int:
        return main(list(map(str, ["pretrain", "--arch", "encoder", "--tokenizer", pretrained / "tok.json", "--train",
                                   pretrained / "train-ko", "--valid", pretrained / "valid-ko", "--run-dir", run,
                                   *options, *MICRO_MODEL])))

    assert pretrain(*with_options(QUICK_RUN, packing="true", max_steps=3)) == 0, capsys.readouterr().err
    assert train_steps(run) == [1, 2, 3]
    assert json.loads((run / "config.json").read_text())["train"]["packing"] is True
    assert pretrain(*with_options(QUICK_RUN, packing="false", max_steps=4), "--resume") == 2
    assert "packing: checkpoint has True, this run False" in capsys.readouterr().err
    assert pretrain(*with_options(QUICK_RUN, packing="true", max_steps=4), "--resume") == 0
    assert train_steps(run) == [1, 2, 3, 4]


def test_packed_finetuning_trains_on_packed_pairs_and_evaluates_one_pair_a_row(workspace, tmp_path, capsys,
                                                                              monkeypatch):
    from fastlm.cli import main
    from fastlm.models import Seq2SeqLM

    monkeypatch.delenv("FASTLM_DEBUG", raising=False)
    packed_forwards = {True: [], False: []}  # training: whether each forward had packed rows; evaluation: same
    forward = Seq2SeqLM.forward

    def recording_forward(model, *args, **kwargs):
        packed_forwards[model.training].append(kwargs.get("src_cu_seqlens") is not None)
        return forward(model, *args, **kwargs)

    monkeypatch.setattr(Seq2SeqLM, "forward", recording_forward)
    run = tmp_path / "packed-finetune"
    assert main(list(map(str, ["finetune", "--encoder", "random", "--decoder", "random", "--tokenizer",
                               workspace / "tok.json", "--train", workspace / "train-pairs", "--valid",
                               workspace / "valid-pairs", "--run-dir", run, "--bleu-sentences", "2",
                               *with_options(QUICK_RUN, packing="true", max_steps=3), *MICRO_MODEL]))) == 0, \
        capsys.readouterr().err
    assert train_steps(run) == [1, 2, 3]
    assert json.loads((run / "config.json").read_text())["train"]["packing"] is True
    assert packed_forwards[True] == [True] * 3, "every training step on packed pairs"
    assert packed_forwards[False] and not any(packed_forwards[False]), "validation one pair a row"
    evals = [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if r["kind"] == "eval"]
    assert evals and all(math.isfinite(r["loss"]) for r in evals)


def test_a_prepare_that_failed_before_a_shard_does_not_block_the_corrected_one(workspace, tmp_path, capsys):
    from fastlm.cli import main

    mis_encoded = tmp_path / "train.ko"
    mis_encoded.write_bytes("안녕하세요\n".encode("cp949"))

    def prepare(source: Path) -> int:
        return main(["prepare", "--tokenizer", str(workspace / "tok.json"), "--input", str(source),
                     "--output", str(tmp_path / "corpus"), "--quiet"])

    assert prepare(mis_encoded) == 2 and "invalid UTF-8" in capsys.readouterr().err
    assert prepare(workspace / "valid.ko") == 0, capsys.readouterr().err


def test_training_commands_choose_their_threads(monkeypatch, capsys):
    import torch

    from fastlm import cli

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3}, raising=False)
    for load, expected in ((0.3, 4), (1.6, 2), (9.0, 1)):
        monkeypatch.setattr(os, "getloadavg", lambda load=load: (load, 0.0, 0.0))
        assert cli.default_threads() == expected
    before = torch.get_num_threads()
    try:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
        cli._use_threads(None)
        assert torch.get_num_threads() == 1
        assert capsys.readouterr().out == "torch threads: 1 per process (the idle cores; --threads N to choose)\n"
        cli._use_threads(3)
        assert torch.get_num_threads() == 3 and "3 per process (--threads)" in capsys.readouterr().out
        monkeypatch.setenv("OMP_NUM_THREADS", "2")
        torch.set_num_threads(2)  # as torch does from the variable at start-up
        cli._use_threads(None)
        assert torch.get_num_threads() == 2 and "2 per process (OMP_NUM_THREADS)" in capsys.readouterr().out
    finally:
        torch.set_num_threads(before)


def train_steps(run: Path) -> list[int]:
    return [r["step"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
            if r["kind"] == "train"]


@pytest.mark.parametrize("signal_number", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_stops_after_a_step_with_a_checkpoint_and_the_resume_command(pretrained, tmp_path, signal_number):
    run = tmp_path / "run"
    args = ["pretrain", "--arch", "decoder", "--tokenizer", pretrained / "tok.json", "--train",
            pretrained / "train-en", "--run-dir", run, *with_options(QUICK_RUN, max_steps=100000), *MICRO_MODEL]
    process = subprocess.Popen([sys.executable, "-m", "fastlm", *map(str, args)], env=cli_env(), text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 300
    while not ((run / "metrics.jsonl").exists() and train_steps(run)):
        assert process.poll() is None, process.communicate()[1]
        assert time.monotonic() < deadline, "no training step within 300 s"
        time.sleep(0.05)
    process.send_signal(signal_number)
    _, stderr = process.communicate(timeout=300)

    assert process.returncode == 128 + signal_number
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and signal.Signals(signal_number).name in lines[0], stderr
    stopped = int(re.search(r"after step (\d+)", lines[0])[1])
    assert (run / "checkpoints" / f"step-{stopped:08d}.pt").is_file() and train_steps(run) == list(range(1, stopped + 1))

    command = shlex.split(lines[0].split("resume with: ")[1])
    assert command[:2] == ["fastlm", "pretrain"] and command[-1] == "--resume"
    resumed = fastlm(*with_options(command[1:], max_steps=stopped + 2))  # a resume may extend the run
    assert f"resuming {run} from step {stopped} of {stopped + 2}" in resumed.stderr
    assert train_steps(run) == list(range(1, stopped + 3))


def help_entries(text: str) -> dict[str, str]:
    """'--flag TYPE' -> its help text (wrapped lines joined), for the settings listed in a --help."""
    entries: dict[str, str] = {}
    flag = None
    for line in text.splitlines():
        match = re.match(r"  (--\S+)( \S+)?(.*)$", line)
        if match:
            flag = match[1]
            entries[flag] = match[3]
        elif flag and line.startswith(" " * 20):
            entries[flag] += " " + line.strip()
        else:
            flag = None
    return {key: " ".join(value.split()) for key, value in entries.items()}


def test_help_lists_every_training_setting_with_its_default():
    from fastlm.models.config import PRESETS as MODEL_PRESETS
    from fastlm.models.config import ModelConfig
    from fastlm.train.config import PRESETS, TrainConfig

    tiny_model = {**{f.name: f.default for f in dataclasses.fields(ModelConfig)}, **MODEL_PRESETS["tiny"]}
    for command, task in (("pretrain", "pretrain"), ("finetune", "finetune"), ("eval", None)):
        tiny = TrainConfig.preset("tiny", task)
        entries = help_entries(fastlm(command, "--help").stdout)
        for field in dataclasses.fields(TrainConfig):
            assert f"(default: {getattr(tiny, field.name)}" in entries[f"--{field.name}"], (command, field.name)
            assert len(entries[f"--{field.name}"]) > len("(default: ...)") + 10  # and a meaning
        # finetune takes them for a model trained from scratch (--encoder random --decoder random)
        assert ("--model.d_model" in entries) == (command in ("pretrain", "finetune"))
        if command in ("pretrain", "finetune"):
            for field in dataclasses.fields(ModelConfig):
                assert f"(default: {tiny_model[field.name]}" in entries[f"--model.{field.name}"], field.name
            assert f"small: {PRESETS['small']['max_steps']}" in entries["--max_steps"]


@pytest.mark.parametrize("command, shown", [
    (["tokenizer", "train"], ["--vocab-size", "(default: 32000)", "(default: byte)", "(default: 2)"]),
    (["translate"], ["(default: 4)", "(default: 64)", "(default: 32)", "** P (0: by the sum, which favours short ones; "
                     "above 1: longer ones) (default: 1.0)", "(0: off) (default: 0)", "(default: 2.0)",
                     "(default: 10)"]),
    (["eval"], ["(default: 0)", "(default: the settings of the run that made --model"]),
    (["demo"], ["(default: 1.0)"]),
])
def test_help_shows_defaults(command, shown):
    text = " ".join(fastlm(*command, "--help").stdout.split())
    assert all(item in text for item in shown), text


def test_readme_command_lines_use_only_what_earlier_lines_make():
    from fastlm.cli import build_parser

    readme = (REPO / "README.md").read_text(encoding="utf-8")
    block = readme.split("### Command line", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    made = set()
    for line in block.strip().splitlines():
        words = shlex.split(line)
        words = words[words.index("fastlm") + 1:] if words[0] == "torchrun" else words[1:]
        args, extra = build_parser().parse_known_args(words)
        for option in ("tokenizer", "train", "valid", "encoder", "decoder", "model", "data"):
            value = getattr(args, option, None)
            if value is not None:
                assert value in made, f"{line!r}: {value} is made by no earlier command line"
        if words[0] == "plot":
            assert set(args.run_dirs) <= made, line
        made.update(value for value in (getattr(args, "output", None), getattr(args, "run_dir", None)) if value)
