"""Training throughput on packed rows (TrainConfig.packing) against padded rows of the same sentences or pairs.

--task mlm: the first --sentences lines of a corpus (the shared ko-en train.ko, else fastlm's demo sample.ko),
each `<s> sentence </s>` of at most --max-len tokens, served by MaskedLMBatches to an EncoderLM. --task translation:
its first --sentences pairs (train.ko and train.en, else the demo sample.ko and sample.en), each side of at most
--max-len tokens, served by TranslationBatches to a Seq2SeqLM (encoder and decoder of the preset), as finetune
serves them. Tokenised by a BPE trained on the corpus's first TOKENIZER_LINES lines (of each language), served the
way the Trainer gets them, three ways:
  packed           rows of --max-len tokens (a side) holding several whole sentences (pairs), --rows rows a batch
  padded           --rows sentences (pairs) a batch, padded to the longest: the task's default batches. MLM: in
                   random order. Translation: length-bucketed (TranslationBatches always sorts pairs by length
                   within chunks of 16384), as finetune's default (batch_size, max_tokens 0) serves them
  padded-bucketed  length-bucketed batches of at most --rows x --max-len padded tokens (--max_tokens)
One training step = forward under the Trainer's default precision, backward, AdamW step, on the model of the
preset with attn_impl="fastlm": the varlen Triton kernel (packed) or the padded one on CUDA; SDPA with a
block-diagonal mask (packed) or a padding mask on the CPU. Each source trains its own copy of one initialisation.
Each repeat is one pass over the sentences per source, the sources' steps taken in turns (a, b, c, a, b, c, ...) so
that all see the same load; tokens/s = the pass's real tokens (both sides of pairs, as the Trainer counts them) /
its seconds, median over the repeats. The real tokens are the same for all three, but for packed pairs cut at
--max-len: a packed side keeps max_len - 1 tokens (TranslationBatches). Batches are built before timing, as the
Trainer's prefetcher builds them off the step's path.

    python benchmarks/packing.py --threads 1                       # CPU: tiny preset, rows of 64 tokens
    python benchmarks/packing.py --threads 1 --task translation --sentences 512
    python benchmarks/packing.py --preset base --max-len 512 --rows 32 --sentences 8192     # CUDA
"""

from __future__ import annotations

import contextlib
import copy
import functools
import itertools
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import Measurement, Row, base_parser, report, sync  # noqa: E402

from fastlm.data import MaskedLMBatches, TranslationBatches, prepare_corpus, prepare_parallel_corpus  # noqa: E402
from fastlm.data.batches import padding_fraction  # noqa: E402
from fastlm.models import EncoderLM, ModelConfig, Seq2SeqLM  # noqa: E402
from fastlm.tokenizer import Tokenizer  # noqa: E402
from fastlm.train.config import PRECISIONS, TrainConfig  # noqa: E402
from fastlm.train.precision import autocast_for  # noqa: E402
from fastlm.train.trainer import count_tokens  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
# Where the text comes from: the first corpus whose files exist, {stem}.{language}.
CORPORA = (REPO.parent / "shared" / "data" / "ko-en" / "train", REPO / "fastlm" / "demo_data" / "sample")
LANGUAGES = {"mlm": ("ko",), "translation": ("ko", "en")}
SOURCES = ("packed", "padded", "padded-bucketed")
TOKENIZER_LINES = 20000  # enough text for the vocabularies of the experiments (4k-8k) to be reached


def first_lines(count: int, languages: tuple[str, ...]) -> tuple[Path, list[tuple[str, ...]]]:
    """The corpus's stem and its first `count` lines in each language, as tuples (one per line number), those with
    an empty side left out."""
    stem = next(stem for stem in CORPORA if all(Path(f"{stem}.{language}").is_file() for language in languages))
    with contextlib.ExitStack() as stack:
        files = [stack.enter_context(open(f"{stem}.{language}", encoding="utf-8")) for language in languages]
        groups = zip(*(itertools.islice(f, count) for f in files))
        return stem, [tuple(line.rstrip("\n") for line in group) for group in groups if all(map(str.strip, group))]


def prepared(task: str, lines: list[tuple[str, ...]], tokenizer: Tokenizer, directory: Path):
    """The sentences (MLM) or pairs (translation) prepared as fastlm prepare would."""
    if task == "mlm":
        return prepare_corpus(iter([group[0] for group in lines]), tokenizer, directory, progress=False)
    return prepare_parallel_corpus(lines, tokenizer, directory, progress=False)


def batch_sources(task: str, corpus, tokenizer: Tokenizer, args) -> dict:
    """The three sources of SOURCES over one corpus, as the Trainer's tasks would build them."""
    if task == "mlm":
        source = functools.partial(MaskedLMBatches, corpus, max_len=args.max_len, mask_id=tokenizer.mask_id,
                                   vocab_size=tokenizer.vocab_size, special_ids=tokenizer.special_ids,
                                   mask_prob=TrainConfig.mask_prob, seed=0)
    else:
        source = functools.partial(TranslationBatches, corpus.src, corpus.tgt, max_src_len=args.max_len,
                                   max_tgt_len=args.max_len, bos_id=tokenizer.bos_id, eos_id=tokenizer.eos_id,
                                   pad_id=tokenizer.pad_id, seed=0)
    return {"packed": source(batch_size=args.rows, packed=True), "padded": source(batch_size=args.rows),
            "padded-bucketed": source(max_tokens=args.rows * args.max_len)}


def new_model(task: str, config: ModelConfig):
    return EncoderLM(config) if task == "mlm" else Seq2SeqLM(config, config)


def passes(models: dict, batches: dict, device: torch.device, precision: str, repeat: int) -> dict[str, list]:
    """Seconds of each source's pass over its batches, `repeat` times, the sources' steps in turns."""
    optimizers = {name: model.configure_optimizers(weight_decay=0.1, lr=1e-4) for name, model in models.items()}

    def step(name: str, batch: dict) -> float:
        started = time.perf_counter()
        optimizers[name].zero_grad(set_to_none=True)
        with autocast_for(device, precision):
            out = models[name](**batch)
        (out.loss * out.n_targets).backward()  # the Trainer's summed loss
        optimizers[name].step()
        sync()
        return time.perf_counter() - started

    seconds = {name: [] for name in models}
    for _ in range(repeat):
        spent = dict.fromkeys(models, 0.0)
        for turn in itertools.zip_longest(*([(name, batch) for batch in batches[name]] for name in models)):
            for name, batch in filter(None, turn):
                spent[name] += step(name, batch)
        for name, value in spent.items():
            seconds[name].append(value)
    return seconds


def main() -> None:
    parser = base_parser(__doc__.split("\n\n")[0])
    parser.add_argument("--task", choices=tuple(LANGUAGES), default="mlm",
                        help="mlm: EncoderLM on sentences; translation: Seq2SeqLM on pairs (default: mlm)")
    parser.add_argument("--preset", help="model preset (default: base on CUDA, tiny on CPU)")
    parser.add_argument("--sentences", type=int, default=1024, help="sentences (pairs) of a pass (default: 1024)")
    parser.add_argument("--max-len", type=int, help="tokens a row holds (default: 512 on CUDA, 64 on CPU, as the "
                        "presets' max_len)")
    parser.add_argument("--rows", type=int, help="rows a batch (default: 32 on CUDA, 16 on CPU)")
    parser.add_argument("--vocab", type=int, default=4000, help="BPE vocabulary trained on the sentences "
                        "(default: 4000)")
    parser.add_argument("--precision", choices=PRECISIONS, default="auto",
                        help="as TrainConfig.precision (default: auto, the Trainer's default)")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads before measuring (default: torch's)")
    parser.add_argument("--repeat", type=int, default=5, help="timed passes per source (default: 5)")
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    on_cuda = device.type == "cuda"
    args.preset = args.preset or ("base" if on_cuda else "tiny")
    args.max_len = args.max_len or (512 if on_cuda else 64)
    args.rows = args.rows or (32 if on_cuda else 16)
    if args.quick:
        args.sentences, args.repeat = min(args.sentences, 256), min(args.repeat, 2)

    stem, lines = first_lines(max(args.sentences, TOKENIZER_LINES), LANGUAGES[args.task])
    tokenizer = Tokenizer.train(itertools.chain.from_iterable(lines), vocab_size=args.vocab)
    lines = lines[:args.sentences]
    with tempfile.TemporaryDirectory() as scratch:
        corpus = prepared(args.task, lines, tokenizer, Path(scratch) / "corpus")
        sources = batch_sources(args.task, corpus, tokenizer, args)
        batches = {name: [{key: value.to(device) for key, value in source.batch(0, index).items()}
                          for index in range(source.num_batches(0))] for name, source in sources.items()}
        padding = {name: padding_fraction(source) for name, source in sources.items()}
    config = ModelConfig.preset(args.preset, vocab_size=tokenizer.vocab_size, pad_id=tokenizer.pad_id,
                                bos_id=tokenizer.bos_id, eos_id=tokenizer.eos_id, attn_impl="fastlm")
    torch.manual_seed(0)
    initial = new_model(args.task, config).to(device).train()
    models = {name: copy.deepcopy(initial) for name in SOURCES}
    passes(models, batches, device, args.precision, repeat=1)  # warm-up: allocator, kernels' tuning
    seconds = passes(models, batches, device, args.precision, repeat=args.repeat)

    tokens = {name: sum(count_tokens(batch) for batch in batches[name]) for name in SOURCES}
    task_name, items = {"mlm": ("MLM", "sentences"), "translation": ("Translation", "pairs")}[args.task]
    case = f"{task_name} {args.preset}, {len(lines)} {items}, rows of {args.max_len}, {args.rows} rows a batch"
    rows = [Row(case, "tokens/s", True, [Measurement(name, tokens[name] / statistics.median(seconds[name]))
                                         for name in SOURCES])]
    threads = torch.get_num_threads()
    load = os.getloadavg()
    notes = (f"Corpus {stem.name}.{'+'.join(LANGUAGES[args.task])} (vocab {tokenizer.vocab_size}); "
             + ", ".join(f"{name}: {tokens[name]} real tokens and {len(batches[name])} steps a pass, "
                         f"{100 * padding[name]:.1f}% padding" for name in SOURCES)
             + f". {threads} thread{'s' if threads > 1 else ''}, precision {args.precision}; passes timed in turns, "
             f"median of {args.repeat}; load average at the end {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}.")
    report(f"{task_name} training on packed rows vs padded rows of the same {items}", rows, json_path=args.json,
           notes=notes, ours="packed")


if __name__ == "__main__":
    main()
