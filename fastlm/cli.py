"""The `fastlm` command line (also `python -m fastlm`, and `torchrun ... -m fastlm pretrain ...`).

Subcommands: tokenizer train|encode|decode, prepare, pretrain, finetune, average, translate, eval, export, plot,
demo.
Training commands take a preset (`--preset tiny|small|base`) and `--key value` overrides of TrainConfig fields;
`--model.KEY value` overrides a ModelConfig field. Every mistake a user can make ends in one line on stderr and
exit code 2 (set FASTLM_DEBUG=1 for the traceback).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import sys
import types
import typing
import warnings
from pathlib import Path

from fastlm.generation import GENERATION_DEFAULTS
from fastlm.models.seq2seq import CROSS_ATTENTION_INITS, DEFAULT_CROSS_ATTENTION_INIT
from fastlm.train.config import PRESETS, ConfigError, parse_overrides, resolve
from fastlm.train.plot import DEFAULT_SMOOTHING
from fastlm.train.tasks import RANDOM
from fastlm.train.trainer import TrainingDiverged, TrainingInterrupted
from fastlm.translation import DecodingSettings

USAGE_ERROR = 2
MODEL_PREFIX = "model."
PLAIN_TEXT_SUFFIXES = ("", ".txt", ".ko", ".en")
# Off a terminal (in a log), translate reports progress only on inputs this long: minutes of work on a CPU.
LONG_INPUT_SENTENCES = 1000


class UsageError(Exception):
    """A command-line mistake: reported as one line, exit code 2."""


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Every option's default in --help (None and False mean "not given": not shown); epilogs kept as written."""

    def _get_help_string(self, action: argparse.Action) -> str:
        shown = action.option_strings and not any(action.default is hidden
                                                  for hidden in (None, False, argparse.SUPPRESS))
        return f"{action.help} (default: %(default)s)" if shown else action.help


class OneLineParser(argparse.ArgumentParser):
    def __init__(self, *args, **kwargs):
        # No abbreviations: `--re 1` must stay an unknown override, not become --resume.
        super().__init__(*args, **{"allow_abbrev": False, "formatter_class": HelpFormatter, **kwargs})

    def error(self, message: str):  # argparse's default prints the whole usage block first
        raise UsageError(f"{self.prog}: {message} (see --help)")


# ----- tokenizer -----

def _sentences(paths: list[str]):
    """Every sentence of the input files, both sides of parallel formats (.tsv, .csv, .xlsx)."""
    from fastlm.data.readers import open_reader

    for path in paths:
        for item in open_reader(path):
            yield from (item if isinstance(item, tuple) else (item,))


def cmd_tokenizer_train(args) -> None:
    from fastlm.tokenizer import Tokenizer

    _require_files(args.input, "--input")
    if Path(args.output).exists() and not args.overwrite:
        # Corpora and models name their tokenizer by hash: a retrained one would orphan them.
        raise FileExistsError(f"tokenizer train: --output {args.output} exists: pass --overwrite to replace it")
    plain = all(Path(p).suffix.lower() in PLAIN_TEXT_SUFFIXES for p in args.input)
    if plain:
        from fastlm.data.readers import check_utf8

        # Byte-level BPE takes any bytes, so nothing downstream would refuse a binary file: refused here, as by
        # `prepare` and the readers of the other formats.
        for path in args.input:
            check_utf8(path)
    source = list(args.input) if plain else _sentences(args.input)  # plain files are read natively, in parallel
    tokenizer = Tokenizer.train(source, vocab_size=args.vocab_size, level=args.level,
                                min_frequency=args.min_frequency, progress=not args.quiet)
    tokenizer.save(args.output)
    print(f"tokenizer: {tokenizer.vocab_size} tokens ({args.level} level) -> {args.output}")


def _lines(data: bytes, source: str) -> list[str]:
    """The lines of UTF-8 text, split at "\n" only (a "\r" before it dropped), as `wc -l` counts them: str.splitlines()
    also splits at U+2028, U+0085, form feeds..., and outputs would no longer match their inputs line for line."""
    try:
        lines = data.decode("utf-8").split("\n")
    except UnicodeDecodeError as error:
        raise ValueError(f"{source}: not UTF-8 text ({error.reason} at byte {error.start})") from None
    if lines[-1] == "":
        lines.pop()  # after the newline that ends the last line
    return [line.removesuffix("\r") for line in lines]


def _text_lines(texts: list[str]) -> list[str]:
    return texts if texts else _lines(sys.stdin.buffer.read(), "stdin")


def cmd_tokenizer_encode(args) -> None:
    from fastlm.train.tasks import load_tokenizer

    tokenizer = load_tokenizer(args.tokenizer)
    for text in _text_lines(args.text):
        print(" ".join(map(str, tokenizer.encode(text))))


def cmd_tokenizer_decode(args) -> None:
    from fastlm.train.tasks import load_tokenizer

    tokenizer = load_tokenizer(args.tokenizer)
    lines = [" ".join(args.ids)] if args.ids else _text_lines([])
    for line in lines:
        try:
            ids = [int(token) for token in line.split()]
        except ValueError:
            raise UsageError(f"tokenizer decode: {line!r}: expected token ids separated by spaces") from None
        print(tokenizer.decode(ids))


# ----- data -----

def cmd_prepare(args) -> None:
    from fastlm.data.prepare import prepare_corpus, prepare_parallel_corpus
    from fastlm.data.readers import open_reader
    from fastlm.train.tasks import load_tokenizer

    _require_files(args.input, "--input")
    tokenizer = load_tokenizer(args.tokenizer)
    reader = open_reader(*args.input)
    options = dict(num_threads=args.threads, progress=not args.quiet, overwrite=args.overwrite)
    if args.shard_size:
        options["shard_size"] = args.shard_size
    if getattr(reader, "parallel", False):
        corpus = prepare_parallel_corpus(reader, tokenizer, args.output, **options)
        print(f"prepared {len(corpus)} sentence pairs -> {args.output} (src/, tgt/)")
    else:
        corpus = prepare_corpus(reader, tokenizer, args.output, **options)
        print(f"prepared {len(corpus)} sentences, {corpus.num_tokens} tokens -> {args.output}")


# ----- training -----

def _configs(args, extra: list[str], task: str | None = None):
    """(TrainConfig, model overrides) from the preset, the task's defaults and the `--key value` pairs argparse did
    not consume."""
    overrides = parse_overrides(extra)
    model_overrides = {k[len(MODEL_PREFIX):]: v for k, v in overrides.items() if k.startswith(MODEL_PREFIX)}
    train_overrides = {k: v for k, v in overrides.items() if not k.startswith(MODEL_PREFIX)}
    return resolve(args.preset, train_overrides, task), model_overrides


def _report(result, label: str) -> None:
    shown = "".join(f"{k} {v:.4g}, " for k, v in result.metrics.items() if isinstance(v, (int, float)))
    stopped = (f"stopped early after step {result.step}: no better validation value in --patience evaluations; "
               if result.stopped_early else "")
    print(f"{label}: {shown}{result.seconds:.0f} s; {stopped}model ({result.model_weights}) -> {result.model_dir}, "
          f"curves -> {result.run_dir / 'loss.png'}")


def default_threads() -> int:
    """Torch threads per process when neither --threads nor OMP_NUM_THREADS says: the cores this process may run on,
    less those the load average of the last minute says other work keeps busy; at least 1. Torch's own default (a
    thread per physical core) spins at every parallel region while another process holds one of those cores: a
    60-step pretrain took 158 s on 2 cores shared with other work, 9.4 s on idle ones."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    busy = round(os.getloadavg()[0]) if hasattr(os, "getloadavg") else 0
    return max(1, cores - busy)


def _use_threads(requested: int | None) -> None:
    """Set torch's threads from --threads, else OMP_NUM_THREADS (which torch has read; torchrun sets it to 1 for
    several processes), else default_threads(); say the count once (rank 0), on stdout."""
    import torch

    if requested is not None and requested < 1:
        raise UsageError(f"--threads {requested}: expected a number of threads >= 1")
    if requested is not None:
        count, source = requested, "--threads"
    elif os.environ.get("OMP_NUM_THREADS"):
        count, source = torch.get_num_threads(), "OMP_NUM_THREADS"
    else:
        count, source = default_threads(), "the idle cores; --threads N to choose"
    torch.set_num_threads(count)
    if os.environ.get("RANK", "0") == "0":
        print(f"torch threads: {count} per process ({source})", flush=True)


def _distributed(run):
    """Run `run(world)` inside the process group torchrun describes (a world of one otherwise)."""
    from fastlm.train.distributed import close_world, init_world

    world = init_world()
    try:
        result = run(world)
    finally:
        close_world(world)
    return result if world.is_main else None


def cmd_pretrain(args, extra: list[str]) -> None:
    from fastlm.train.tasks import pretrain

    config, model_overrides = _configs(args, extra, "pretrain")
    _use_threads(args.threads)
    result = _distributed(lambda world: pretrain(args.arch, args.tokenizer, args.train, args.valid, args.run_dir,
                                                 config, model_overrides=model_overrides, resume=args.resume,
                                                 overwrite=args.overwrite, world=world))
    if result is not None:
        _report(result, f"pretrain {args.arch}")


def cmd_finetune(args, extra: list[str]) -> None:
    from fastlm.train.tasks import finetune

    config, model_overrides = _configs(args, extra, "finetune")
    _use_threads(args.threads)
    result = _distributed(lambda world: finetune(
        args.encoder, args.decoder, args.tokenizer, args.train, args.valid, args.run_dir, config,
        cross_attention_init=args.cross_attention_init, share_embeddings=args.share_embeddings,
        bleu_sentences=args.bleu_sentences, decoding=_decoding(args), model_overrides=model_overrides,
        resume=args.resume, overwrite=args.overwrite, world=world))
    if result is not None:
        _report(result, "finetune")


def cmd_average(args) -> None:
    from fastlm.train.averaging import newest_checkpoints
    from fastlm.train.tasks import average

    if args.run_dir is not None and args.last is None:
        raise UsageError("average --run-dir: give --last K, how many of its newest step checkpoints to average")
    if args.checkpoints and args.last is not None:
        raise UsageError("average: --last counts the checkpoints of --run-dir; --checkpoints names them itself")
    paths = newest_checkpoints(args.run_dir, args.last) if args.run_dir else args.checkpoints
    steps = average(paths, args.output, overwrite=args.overwrite)
    print(f"averaged {len(steps)} checkpoint(s), steps {', '.join(map(str, steps))} -> {args.output}")


# ----- using models -----

def _decoding(args) -> DecodingSettings:
    return DecodingSettings(num_beams=args.beam, length_penalty=args.length_penalty,
                            no_repeat_ngram_size=args.no_repeat_ngram_size, max_len_a=args.max_len_a,
                            max_len_b=args.max_len_b)


def cmd_translate(args) -> None:
    import torch

    from fastlm.models import Seq2SeqLM
    from fastlm.progress import Progress
    from fastlm.train.tasks import check_tokenizer, check_vocab, load_model, load_tokenizer
    from fastlm.translation import translations

    tokenizer = load_tokenizer(args.tokenizer)
    model = load_model(args.model, map_location="cuda" if torch.cuda.is_available() else "cpu")
    if not isinstance(model, Seq2SeqLM):
        raise UsageError(f"translate --model {args.model}: a {type(model).__name__}, expected a fine-tuned Seq2SeqLM")
    check_vocab(model, tokenizer, f"translate --model {args.model}")
    check_tokenizer(args.model, tokenizer)
    if args.text and args.input:
        raise UsageError("translate: give sentences or --input FILE, not both")
    if args.input:
        _require_files([args.input], "--input")
        texts = _lines(Path(args.input).read_bytes(), f"--input {args.input}")
    else:
        texts = _text_lines(args.text)
    progress = Progress(f"translate {len(texts):,} sentences", ("sentences",),
                        enabled=not args.quiet and (sys.stderr.isatty() or len(texts) >= LONG_INPUT_SENTENCES))
    written = 0
    try:
        for translation in translations(model, tokenizer, texts, _decoding(args), max_new_tokens=args.max_new_tokens,
                                        batch_size=args.batch_size):
            # One output line per input line, whatever the model writes: its line breaks become spaces.
            print(" ".join(translation.splitlines()), flush=True)
            written += 1
            progress.update(sentences=1)
    except KeyboardInterrupt:
        raise KeyboardInterrupt(f"the translations of the first {written} of {len(texts)} sentences were "
                                "written") from None
    finally:
        progress.close()


def cmd_eval(args, extra: list[str]) -> None:
    from fastlm.train.config import TrainConfig, typed_overrides
    from fastlm.train.tasks import evaluate, run_train_config

    overrides = parse_overrides(extra)
    if any(key.startswith(MODEL_PREFIX) for key in overrides):
        raise UsageError("eval: --model.* overrides do not apply to a saved model")
    # The run's own settings by default: then the loss is the one its last evaluation logged.
    saved = run_train_config(args.model) if args.preset is None else None
    if saved is not None:
        config = TrainConfig.from_dict({**saved[0], **typed_overrides(TrainConfig, overrides)})
        settings = f"the run's, from {saved[1]}"
    else:
        config = resolve(args.preset or "tiny", overrides)
        settings = f"preset {args.preset or 'tiny'}"
    settings += f" with {' '.join(extra)}" if extra else ""
    result = evaluate(args.model, args.tokenizer, args.data, config, bleu_sentences=args.bleu_sentences,
                      decoding=_decoding(args))
    if args.json:
        print(json.dumps({**result.metrics, "items": result.items, "total": result.total, "unit": result.unit,
                          "bleu_pairs": result.bleu_pairs, "settings": settings}))
    else:
        print(_evaluation_summary(args, config, settings, result))


def _evaluation_summary(args, config, settings: str, result) -> str:
    """`fastlm eval`'s report for a reader: what was scored, with which settings, and the scores."""
    if result.items == result.total:
        scored = f"all {result.total} {result.unit}"
    else:
        scored = (f"a fixed random sample of {result.items} of {result.total} {result.unit} (eval_batches "
                  f"{config.eval_batches} x batch_size {config.batch_size}; --eval_batches 0 scores them all)")
    metrics = result.metrics
    scores = [f"loss {_shown(metrics['loss'], '.4f')}", f"perplexity {_shown(metrics['perplexity'], '.4g')}",
              f"accuracy {_shown(metrics['accuracy'], '.2%')}"]
    if result.bleu_pairs:
        scores.append(f"BLEU {_shown(metrics['bleu'], '.2f')} on the first {result.bleu_pairs} pairs "
                      f"(beam {args.beam})")
    return "\n".join([f"{args.model} on {args.data}: {scored}",
                      f"settings: batch_size {config.batch_size}, max_len {config.max_len} ({settings})",
                      ", ".join(scores)])


def _shown(value: float | None, spec: str) -> str:
    return "not finite" if value is None else format(value, spec)


def cmd_export(args) -> None:
    from fastlm.hf import REMOTE_SEQ2SEQ, export_model, export_model_type
    from fastlm.train.tasks import check_tokenizer, check_vocab, load_model, load_tokenizer

    model = load_model(args.model)
    tokenizer = load_tokenizer(args.tokenizer)
    check_vocab(model, tokenizer, f"export --model {args.model}")
    check_tokenizer(args.model, tokenizer)
    output = export_model(model, tokenizer, args.output, overwrite=args.overwrite)
    how = "transformers' Auto classes"
    if export_model_type(model) == REMOTE_SEQ2SEQ:
        how += ", trust_remote_code=True (rotary positions: the directory carries fastlm's model file)"
    print(f"exported {type(model).__name__} -> {output} (load it with {how})")


def cmd_plot(args) -> None:
    from fastlm.train.plot import plot_runs

    print(plot_runs(args.run_dirs, args.output, smoothing=args.smoothing))


def cmd_demo(args) -> None:
    from fastlm.demo import run_demo

    _use_threads(args.threads)
    run_demo(args.workdir, scale=args.scale)


# ----- parser -----

def _require_files(paths: list[str], option: str) -> None:
    for path in paths:
        if not Path(path).is_file():
            raise FileNotFoundError(f"{option} {path}: no such file")


def _type_name(expected: type) -> str:
    if typing.get_origin(expected) is typing.Literal:
        return "{" + ",".join(typing.get_args(expected)) + "}"
    if typing.get_origin(expected) in (typing.Union, types.UnionType):
        expected = next(option for option in typing.get_args(expected) if option is not type(None))
    return expected.__name__.upper()


def _settings_help(title: str, cls: type, prefix: str, presets: dict[str, dict], default_preset: str,
                   task_defaults: dict | None = None) -> str:
    """One entry per dataclass field: its flag, type, meaning (the comment on the field) and its value in each
    preset (under `task_defaults`), generated from the dataclass so that --help never drifts from the code."""
    import textwrap

    from fastlm.train.config import field_defaults, field_help, field_types

    defaults = field_defaults(cls)
    values = {name: {**defaults, **preset, **(task_defaults or {})} for name, preset in presets.items()}
    comments = field_help(cls)
    lines = [title]
    for name, expected in field_types(cls).items():
        default = values[default_preset][name]
        others = "".join(f"; {preset}: {values[preset][name]}" for preset in presets
                         if preset != default_preset and values[preset][name] != default)
        flag = f"--{prefix}{name} {_type_name(expected)}"
        text = f"{comments.get(name, '')} (default: {default}{others})"
        indent = " " * 36
        if len(flag) > 32:  # as argparse does: a long flag on its own line
            lines.append(f"  {flag}")
            lines.append(textwrap.fill(text, width=118, initial_indent=indent, subsequent_indent=indent))
        else:
            lines.append(textwrap.fill(text, width=118, initial_indent=f"  {flag:<34}", subsequent_indent=indent))
    return "\n".join(lines)


def _training_settings_help(with_model: bool, task: str | None = None) -> str:
    from fastlm.models.config import PRESETS as MODEL_PRESETS
    from fastlm.models.config import ModelConfig
    from fastlm.train.config import TASK_DEFAULTS, TrainConfig

    text = _settings_help("training settings, as --KEY VALUE (defaults of --preset tiny; other presets where they "
                          "differ):", TrainConfig, "", PRESETS, "tiny", TASK_DEFAULTS.get(task))
    if with_model:
        text += "\n\n" + _settings_help("model settings, as --model.KEY VALUE (defaults of model_preset tiny; "
                                         "vocab_size and the special ids come from the tokenizer):",
                                         ModelConfig, MODEL_PREFIX, MODEL_PRESETS, "tiny")
    return text


def _add_decoding_options(parser: argparse.ArgumentParser, beam_help: str) -> None:
    """The options of DecodingSettings, with its defaults (whose reasons its field comments give)."""
    defaults = DecodingSettings()
    parser.add_argument("--beam", type=int, default=defaults.num_beams, help=beam_help)
    parser.add_argument("--length-penalty", type=float, default=defaults.length_penalty, metavar="P",
                        help="beam search ranks a finished translation by sum(log p) / length ** P (0: by the sum, "
                             "which favours short ones; above 1: longer ones)")
    parser.add_argument("--no-repeat-ngram-size", type=int, default=defaults.no_repeat_ngram_size, metavar="N",
                        help="never generate the same N tokens twice in a translation (0: off)")
    parser.add_argument("--max-len-a", type=float, default=defaults.max_len_a, metavar="A",
                        help="a translation stops after A x its source's tokens (<s> and </s> included) + B tokens "
                             "(--max-len-b), as in fairseq")
    parser.add_argument("--max-len-b", type=int, default=defaults.max_len_b, metavar="B", help="B of --max-len-a")


def _add_training_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tokenizer", required=True, help="tokenizer file (from `fastlm tokenizer train`)")
    parser.add_argument("--train", required=True, help="prepared training corpus (from `fastlm prepare`)")
    parser.add_argument("--valid", help="prepared validation corpus (evaluated every eval_interval steps)")
    parser.add_argument("--run-dir", required=True, help="where config, metrics, checkpoints and the model go")
    parser.add_argument("--preset", default="tiny", choices=sorted(PRESETS), help="TrainConfig preset")
    parser.add_argument("--resume", action="store_true", help="continue exactly from the run's last checkpoint")
    parser.add_argument("--overwrite", action="store_true",
                        help="start over in a run directory that holds a run, removing that run's files (only those)")
    _add_threads_option(parser)


def _add_threads_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--threads", type=int,
                        help="torch threads per process (default: OMP_NUM_THREADS if set, else the cores this "
                             "process may use less those the last minute's load average keeps busy, at least 1; "
                             "the count is printed)")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="fastlm", description=__doc__.split("\n\n")[0],
                           epilog="Training commands accept --KEY VALUE overrides of TrainConfig (e.g. --lr 3e-4 "
                                  "--max_steps 500) and --model.KEY VALUE overrides of ModelConfig; `fastlm "
                                  "pretrain --help` lists them all with their defaults.")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=OneLineParser)

    tokenizer = commands.add_parser("tokenizer", help="train a BPE tokenizer, encode or decode text")
    tokenizer_commands = tokenizer.add_subparsers(dest="tokenizer_command", required=True, parser_class=OneLineParser)
    train = tokenizer_commands.add_parser("train", help="train a tokenizer on text files")
    train.add_argument("--input", nargs="+", required=True, help="text files (.tsv/.csv/.xlsx pairs: both sides)")
    train.add_argument("--output", required=True, help="tokenizer file to write")
    train.add_argument("--vocab-size", type=int, default=32000, help="tokens in the vocabulary, special ones included")
    train.add_argument("--level", choices=("byte", "char"), default="byte",
                       help="byte: GPT-4-style byte-level BPE; char: code points with byte fallback")
    train.add_argument("--min-frequency", type=int, default=2, help="fewest occurrences of a pair to merge it")
    train.add_argument("--overwrite", action="store_true", help="replace --output if it exists")
    train.add_argument("--quiet", action="store_true", help="no progress report")
    train.set_defaults(run=cmd_tokenizer_train)
    encode = tokenizer_commands.add_parser("encode", help="print token ids of each sentence (arguments or stdin)")
    encode.add_argument("--tokenizer", required=True, help="tokenizer file")
    encode.add_argument("text", nargs="*", help="sentences (default: one per line from stdin)")
    encode.set_defaults(run=cmd_tokenizer_encode)
    decode = tokenizer_commands.add_parser("decode", help="print the text of space-separated ids (args or stdin)")
    decode.add_argument("--tokenizer", required=True, help="tokenizer file")
    decode.add_argument("ids", nargs="*", help="token ids (default: a line of ids per sentence from stdin)")
    decode.set_defaults(run=cmd_tokenizer_decode)

    prepare = commands.add_parser("prepare", help="tokenise a corpus into memory-mapped shards")
    prepare.add_argument("--tokenizer", required=True, help="tokenizer file")
    prepare.add_argument("--input", nargs="+", required=True,
                         help="one text file; or two line-aligned files (x.ko x.en), a .tsv, or an AI-hub "
                              ".xlsx/.csv for sentence pairs")
    prepare.add_argument("--output", required=True, help="corpus directory to write")
    prepare.add_argument("--shard-size", type=int, help="sentences per shard")
    prepare.add_argument("--threads", type=int, help="encoder threads (default: all cores)")
    prepare.add_argument("--quiet", action="store_true", help="no progress bar")
    prepare.add_argument("--overwrite", action="store_true",
                         help="replace a corpus --output holds from other inputs or settings (removes only its files)")
    prepare.set_defaults(run=cmd_prepare)

    pretrain = commands.add_parser("pretrain", help="pre-train an encoder (masked LM) or a decoder (causal LM)",
                                   epilog=_training_settings_help(with_model=True, task="pretrain"))
    pretrain.add_argument("--arch", required=True, choices=("encoder", "decoder"),
                          help="encoder: masked LM (BERT-like); decoder: causal LM (GPT-like)")
    _add_training_options(pretrain)
    pretrain.set_defaults(run=cmd_pretrain, takes_overrides=True)

    finetune = commands.add_parser("finetune", help="merge a pre-trained encoder and decoder and train on pairs",
                                   epilog=_training_settings_help(with_model=True, task="finetune"))
    finetune.add_argument("--encoder", required=True,
                          help="pre-trained encoder (run or model directory, or transformers BERT / XLM-RoBERTa-XL), "
                          f"or {RANDOM!r}: randomly initialised with the decoder's model settings (both random: the "
                          "preset's, with --model.KEY overrides)")
    finetune.add_argument("--decoder", required=True,
                          help="pre-trained decoder (run or model directory, or transformers GPT-2), or "
                          f"{RANDOM!r}: randomly initialised with the encoder's model settings")
    _add_training_options(finetune)
    finetune.add_argument("--cross-attention-init", choices=CROSS_ATTENTION_INITS, default=DEFAULT_CROSS_ATTENTION_INIT,
                          help="the decoder's new cross-attention: random, copied from self-attention, or random "
                          "with a zero output projection (the merged decoder starts as the pre-trained LM)")
    finetune.add_argument("--share-embeddings", action="store_true",
                          help="one embedding table for encoder, decoder and output layer")
    finetune.add_argument("--bleu-sentences", type=int, default=64,
                          help="the first N validation pairs (corpus order) translated for BLEU at each evaluation")
    _add_decoding_options(finetune, "beam width of those translations")
    finetune.set_defaults(run=cmd_finetune, takes_overrides=True)

    average = commands.add_parser(
        "average", help="average the weights of a run's newest checkpoints into a model",
        description="Write the mean of the model weights of checkpoints of one run (Vaswani et al. average their\n"
                    "last 5 or 20) as a model directory. RUN/model holds the best checkpoint's weights; --last 1\n"
                    "gives the last ones.")
    sources = average.add_mutually_exclusive_group(required=True)
    sources.add_argument("--run-dir", help="training run whose newest step checkpoints are averaged (with --last)")
    sources.add_argument("--checkpoints", nargs="+", help="checkpoint files of one run (RUN/checkpoints/step-*.pt)")
    average.add_argument("--last", type=int, metavar="K",
                         help="how many of the run's newest step checkpoints (the run keeps keep_last of them); "
                         "--last 1 writes the last weights as a model")
    average.add_argument("--output", required=True, help="model directory to write (for translate, eval, export)")
    average.add_argument("--overwrite", action="store_true", help="replace the model in --output if it exists")
    average.set_defaults(run=cmd_average)

    translate = commands.add_parser("translate", help="translate sentences (arguments, --input FILE, or stdin)")
    translate.add_argument("--model", required=True, help="fine-tuned model (run or model directory)")
    translate.add_argument("--tokenizer", required=True, help="the tokenizer the model was trained with")
    translate.add_argument("--input", help="file with one sentence per line (an empty line: an empty translation)")
    _add_decoding_options(translate, "beam width (1: greedy)")
    translate.add_argument("--max-new-tokens", type=int, default=GENERATION_DEFAULTS.max_new_tokens, help="longest translation, in tokens")
    translate.add_argument("--batch-size", type=int, default=32, help="sentences translated together")
    translate.add_argument("--quiet", action="store_true",
                           help=f"no progress report (given on a terminal, or for {LONG_INPUT_SENTENCES}+ sentences)")
    translate.add_argument("text", nargs="*", help="sentences (default: one per line from stdin)")
    translate.set_defaults(run=cmd_translate)

    evaluate = commands.add_parser("eval", help="loss, perplexity, accuracy (and BLEU) of a model on a corpus",
                                   epilog=_training_settings_help(with_model=False))
    evaluate.add_argument("--model", required=True, help="model (run or model directory)")
    evaluate.add_argument("--tokenizer", required=True, help="the tokenizer the model was trained with")
    evaluate.add_argument("--data", required=True, help="prepared corpus (parallel for a translation model)")
    evaluate.add_argument("--preset", choices=sorted(PRESETS),
                          help="batch settings preset (default: the settings of the run that made --model, as its "
                          "own evaluations used them; tiny for a model without its run)")
    evaluate.add_argument("--bleu-sentences", type=int, default=0,
                          help="the first N pairs (corpus order) translated for BLEU (translation models; 0: no BLEU)")
    _add_decoding_options(evaluate, "beam width of those translations")
    evaluate.add_argument("--json", action="store_true", help="print the scores as one JSON object, for machines")
    evaluate.set_defaults(run=cmd_eval, takes_overrides=True)

    export = commands.add_parser(
        "export", help="write a model as a Hugging Face transformers directory",
        description="Write a model as the transformers architecture that computes its function: BERT,\n"
                    "XLM-RoBERTa-XL or ESM (rotary) for an encoder, GPT-2 or GPT-NeoX (rotary) for a decoder, an\n"
                    "EncoderDecoderModel for a translator, or for a translator with rotary positions fastlm's own\n"
                    "model file, loaded with trust_remote_code=True. Sinusoidal positions, SwiGLU and grouped-query\n"
                    "attention have no equivalent and are refused.")
    export.add_argument("--model", required=True, help="model (run or model directory)")
    export.add_argument("--tokenizer", required=True, help="the tokenizer the model was trained with")
    export.add_argument("--output", required=True, help="directory to write (model, tokenizer, generation config)")
    export.add_argument("--overwrite", action="store_true", help="replace --output if it is not empty")
    export.set_defaults(run=cmd_export)

    plot = commands.add_parser("plot", help="draw the loss curves of runs to PNG, several runs overlaid")
    plot.add_argument("run_dirs", nargs="+", metavar="run_dir", help="run directories (with metrics.jsonl)")
    plot.add_argument("--output", help="PNG path (default: RUN_DIR/loss.png for one run, ./loss.png for several)")
    plot.add_argument("--smoothing", type=float, default=DEFAULT_SMOOTHING,
                      help="weight of the past in the moving average of the training loss, in [0, 1) (0: raw only)")
    plot.set_defaults(run=cmd_plot)

    demo = commands.add_parser("demo", help="the whole pipeline on the bundled ko-en sample (~3 min on 2 cores)")
    demo.add_argument("--workdir", help="keep the outputs here (default: a temporary directory)")
    demo.add_argument("--scale", type=float, default=1.0, help="multiply every step count (0.1: a smoke test)")
    _add_threads_option(demo)
    demo.set_defaults(run=cmd_demo)
    return parser


def _resume_command(argv: list[str]) -> str:
    """The command line that continues an interrupted run: this one, with --resume instead of --overwrite."""
    args = [arg for arg in argv if arg != "--overwrite"]
    launcher = "fastlm" if os.environ.get("WORLD_SIZE", "1") == "1" else "torchrun [the same options] -m fastlm"
    return f"{launcher} {shlex.join(args + ([] if '--resume' in args else ['--resume']))}"


def _one_line_warning(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"fastlm: warning: {message}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    with warnings.catch_warnings():
        warnings.showwarning = _one_line_warning  # the style of the errors, not Python's two-line format
        return _main(argv)


def _main(argv: list[str]) -> int:
    parser = build_parser()
    try:
        args, extra = parser.parse_known_args(argv)
        if extra and not getattr(args, "takes_overrides", False):
            raise UsageError(f"fastlm {args.command}: unrecognized arguments: {' '.join(extra)}")
        if getattr(args, "takes_overrides", False):
            args.run(args, extra)
        else:
            args.run(args)
    except (UsageError, ConfigError, ValueError, OSError, ImportError) as error:
        if os.environ.get("FASTLM_DEBUG"):
            raise
        message = str(error)
        print(message if message.startswith("fastlm") else f"fastlm: error: {message}", file=sys.stderr)
        return USAGE_ERROR
    except TrainingDiverged as error:  # not a usage error, but still a message rather than a traceback
        if os.environ.get("FASTLM_DEBUG"):
            raise
        print(f"fastlm: {error}", file=sys.stderr)
        return 1
    except TrainingInterrupted as error:  # every rank stops at the same step; one of them says how to go on
        if os.environ.get("RANK", "0") == "0":
            print(f"fastlm: {error}; resume with: {_resume_command(argv)}", file=sys.stderr)
        return 128 + error.signal_number
    except KeyboardInterrupt as interrupt:  # a second Ctrl-C, or one outside a training loop
        print(f"fastlm: interrupted ({interrupt})" if str(interrupt) else "fastlm: interrupted", file=sys.stderr)
        return 128 + signal.SIGINT
    return 0
