"""The three training jobs (masked-LM encoder, causal decoder, ko->en fine-tuning) wired from their parts:
tokenizer, prepared corpora, batch sources, model, Trainer. The command line and the demo both call these."""

from __future__ import annotations

import functools
import json
import math
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from fastlm import hf
from fastlm.data.batches import CausalLMBatches, MaskedLMBatches, TranslationBatches
from fastlm.data.corpus import ParallelCorpus, TokenizedCorpus, corpus_fingerprint, tokenizer_sha256
from fastlm.models import DecoderLM, EncoderLM, ModelConfig, Seq2SeqLM
from fastlm.models.seq2seq import DEFAULT_CROSS_ATTENTION_INIT
from fastlm.tokenizer import Tokenizer
from fastlm.train.averaging import average_checkpoints
from fastlm.train.config import TrainConfig, typed_overrides
from fastlm.train.distributed import World
from fastlm.train.evaluation import corpus_bleu, evaluate_loss
from fastlm.train.precision import autocast_for
from fastlm.train.plot import plot_runs
from fastlm.train.trainer import Trainer
from fastlm.translation import DecodingSettings, translate_texts

MODEL_CLASSES = {cls.__name__: cls for cls in (EncoderLM, DecoderLM, Seq2SeqLM)}
ARCHS = {"encoder": EncoderLM, "decoder": DecoderLM}
RANDOM = "random"  # finetune's --encoder/--decoder value for a randomly initialised side instead of a directory
# Validation sources draw their sample (and the encoder's masks) from this seed, not the run's: every run evaluated on
# a validation corpus is scored on the same items, whatever its training seed.
VALIDATION_SEED = 0


@dataclass
class RunResult:
    run_dir: Path
    model_dir: Path
    metrics: dict  # the last evaluation
    seconds: float
    model_weights: str  # which weights model_dir holds, in words: "best validation loss, step 400"
    stopped_early: bool  # ended before max_steps for want of a better select_by in `patience` evaluations
    step: int  # the last step trained


@dataclass
class Evaluation:
    """What `evaluate` measured, and on what."""
    metrics: dict  # loss, perplexity, accuracy (and bleu); None where not finite
    items: int  # the sentences (pairs, blocks) scored for the loss
    total: int  # those the corpus holds
    unit: str  # "pairs", "sentences" or "blocks of N tokens"
    bleu_pairs: int  # the first pairs translated for BLEU (0: no BLEU)


def load_tokenizer(path: str | Path) -> Tokenizer:
    if not Path(path).is_file():
        raise FileNotFoundError(f"tokenizer file {str(path)!r} does not exist (make one with `fastlm tokenizer train`)")
    return Tokenizer.load(path)


def model_dir_of(path: str | Path) -> Path:
    """A model directory (config.json + model.safetensors), given it or the run directory that holds it."""
    path = Path(path)
    for candidate in (path, path / "model"):
        if (candidate / "config.json").is_file() and (candidate / "model.safetensors").is_file():
            return candidate
    raise FileNotFoundError(f"{str(path)!r} is neither a model directory nor a run directory with model/ in it")


def load_model(path: str | Path, map_location: str | torch.device | None = None):
    """Whatever model a directory holds, by its config.json: fastlm's EncoderLM, DecoderLM or Seq2SeqLM, or a
    transformers model of a type fastlm.hf imports (hf.MODEL_TYPES: BERT, ESM, GPT-2, GPT-NeoX, ...)."""
    directory = model_dir_of(path)
    model_type = json.loads((directory / "config.json").read_text(encoding="utf-8")).get("model_type")
    if model_type in hf.MODEL_TYPES:
        model = hf.import_model(directory)
        return model.to(map_location) if map_location is not None else model
    if model_type not in MODEL_CLASSES:
        raise ValueError(f"{directory}/config.json: model_type={model_type!r}, expected one of "
                         f"{', '.join([*MODEL_CLASSES, *hf.MODEL_TYPES])}")
    return MODEL_CLASSES[model_type].load(directory, map_location=map_location)


def check_vocab(model, tokenizer: Tokenizer, where: str) -> None:
    if model.config.vocab_size != tokenizer.vocab_size:
        raise ValueError(f"{where}: the model's vocab_size={model.config.vocab_size} differs from the tokenizer's "
                         f"vocab_size={tokenizer.vocab_size}: use the tokenizer the model was trained with")


def check_tokenizer(model_dir: str | Path, tokenizer: Tokenizer) -> None:
    """Raise ValueError unless the model in `model_dir` (or its run directory) was trained with exactly `tokenizer`,
    by the tokenizer hash saved with it. A model saved before fastlm recorded the hash only gets a warning."""
    directory = model_dir_of(model_dir)
    metadata = json.loads((directory / "config.json").read_text(encoding="utf-8")).get("metadata") or {}
    recorded = metadata.get("tokenizer_sha256")
    if recorded is None:
        warnings.warn(f"{directory} records no tokenizer hash (saved by an older fastlm): cannot check that the "
                      "tokenizer given is the one it was trained with", stacklevel=2)
        return
    actual = tokenizer_sha256(tokenizer)
    if actual != recorded:
        raise ValueError(f"{directory}: trained with tokenizer sha256={recorded[:12]}..., but the tokenizer given has "
                         f"sha256={actual[:12]}...: use the tokenizer the model was trained with (its run's "
                         "config.json names it)")


def model_config(config: TrainConfig, tokenizer: Tokenizer, overrides: dict[str, str]) -> ModelConfig:
    """The preset named by the train config, sized to the tokenizer and its special ids, plus --model.* overrides."""
    specials = {"pad_id": tokenizer.pad_id, "bos_id": tokenizer.bos_id, "eos_id": tokenizer.eos_id}
    missing = [name for name, value in specials.items() if value is None]
    if missing:
        raise ValueError(f"the tokenizer has no {', '.join(missing)}: train it with the default special tokens")
    given = typed_overrides(ModelConfig, overrides, prefix="model.")
    values = {"vocab_size": tokenizer.vocab_size, **specials, **given}
    result = ModelConfig.preset(config.model_preset, **values)
    if config.max_len > result.max_seq_len:
        raise ValueError(f"max_len={config.max_len}: longer than the model's max_seq_len={result.max_seq_len}")
    return result


def open_corpus(path: str | Path, tokenizer: Tokenizer) -> TokenizedCorpus:
    if not (Path(path) / "meta.json").is_file():
        raise FileNotFoundError(f"{str(path)!r} is not a prepared corpus (make one with `fastlm prepare`)")
    corpus = TokenizedCorpus(path)
    corpus.check_tokenizer(tokenizer)
    return corpus


def open_parallel(path: str | Path, tokenizer: Tokenizer) -> ParallelCorpus:
    for side in ("src", "tgt"):
        if not (Path(path) / side / "meta.json").is_file():
            raise FileNotFoundError(f"{str(path)!r} is not a prepared parallel corpus (no {side}/meta.json; make one "
                                    "from two line-aligned files: `fastlm prepare --tokenizer TOK --input train.ko "
                                    "train.en --output DIR`)")
    corpus = ParallelCorpus(path)
    corpus.src.check_tokenizer(tokenizer)
    return corpus


def batch_shape(config: TrainConfig) -> dict[str, int]:
    """What decides a padded source's batches: {"max_tokens": N} when the config sets it, else {"batch_size": N}."""
    return {"max_tokens": config.max_tokens} if config.max_tokens else {"batch_size": config.batch_size}


def _ordering(config: TrainConfig, validation: bool) -> dict:
    """Training batches: a new order every epoch, from the run's seed. Validation batches: the items of
    config.eval_batches (0: all; N: a fixed sample of N * batch_size, drawn from VALIDATION_SEED), in corpus order;
    the in-training evaluation and `fastlm eval` both build them here."""
    if validation:
        return {"seed": VALIDATION_SEED, "shuffle": False, "sample": config.eval_batches * config.batch_size}
    return {"seed": config.seed, "shuffle": True}


# The tasks whose training batches pack (TrainConfig.packing); causal blocks hold no padding to save.
PACKING_TASKS = ("pretrain-encoder", "finetune")


def check_packing(config: TrainConfig, task: str) -> None:
    if config.packing and task not in PACKING_TASKS:
        raise ValueError(f"packing=True with {task}: only encoder pre-training (masked LM) and finetune pack "
                         "sentences; causal blocks hold no padding to save, leave packing off")


def lm_batches(arch: str, corpus: TokenizedCorpus, tokenizer: Tokenizer, config: TrainConfig, *, validation: bool):
    if arch == "encoder":
        return MaskedLMBatches(corpus, **batch_shape(config), max_len=config.max_len,
                               mask_id=tokenizer.mask_id, vocab_size=tokenizer.vocab_size,
                               special_ids=tokenizer.special_ids, mask_prob=config.mask_prob,
                               packed=config.packing and not validation, **_ordering(config, validation))
    # Every causal block holds max_len tokens: a budget is a number of blocks (one at least, as a too-long item is).
    blocks = max(1, config.max_tokens // config.max_len) if config.max_tokens else config.batch_size
    return CausalLMBatches(corpus, batch_size=blocks, block_len=config.max_len, eos_id=tokenizer.eos_id,
                           **_ordering(config, validation))


def translation_batches(corpus: ParallelCorpus, tokenizer: Tokenizer, config: TrainConfig, *, validation: bool):
    return TranslationBatches(corpus.src, corpus.tgt, **batch_shape(config), max_src_len=config.max_len,
                              max_tgt_len=config.max_len, bos_id=tokenizer.bos_id, eos_id=tokenizer.eos_id,
                              pad_id=tokenizer.pad_id, packed=config.packing and not validation,
                              **_ordering(config, validation))


def _train(model, train_batches, valid_batches, config: TrainConfig, run_dir: Path, *, world: World | None,
           resume: bool, overwrite: bool, tokenizer: Tokenizer, run_info: dict, extra_eval=None) -> RunResult:
    if resume and overwrite:
        raise ValueError("--resume continues the run, --overwrite starts it over: give one of them")
    started = time.perf_counter()
    trainer = Trainer(model, train_batches, config, run_dir, valid_batches=valid_batches, extra_eval=extra_eval,
                      world=world, run_info=run_info, overwrite=overwrite)
    if resume:
        if not trainer.resume():
            raise FileNotFoundError(f"--resume: {run_dir}/checkpoints holds no checkpoint to resume from (start "
                                    "over with --overwrite)")
        if trainer.world.is_main:
            stopped = " (it stopped early: nothing more to train)" if trainer.stopped_early else ""
            print(f"resuming {run_dir} from step {trainer.step} of {config.max_steps}{stopped}", file=sys.stderr)
    metrics = trainer.fit()
    weights = trainer.export_model(run_dir / "model", {"tokenizer_sha256": tokenizer_sha256(tokenizer)})
    if trainer.world.is_main:
        plot_runs([run_dir])
    return RunResult(run_dir, run_dir / "model", metrics, time.perf_counter() - started, weights,
                     trainer.stopped_early, trainer.step)


def pretrain(arch: str, tokenizer_path: str | Path, train_dir: str | Path, valid_dir: str | Path | None,
             run_dir: str | Path, config: TrainConfig, *, model_overrides: dict[str, str] | None = None,
             resume: bool = False, overwrite: bool = False, world: World | None = None) -> RunResult:
    """Pre-train an EncoderLM (masked LM) or a DecoderLM (causal LM) on prepared corpora. A `run_dir` holding an
    earlier run needs `resume` (continue it) or `overwrite` (remove its files and start over)."""
    if arch not in ARCHS:
        raise ValueError(f"arch={arch!r}: expected one of {', '.join(ARCHS)}")
    check_packing(config, f"pretrain-{arch}")
    tokenizer = load_tokenizer(tokenizer_path)
    train = lm_batches(arch, open_corpus(train_dir, tokenizer), tokenizer, config, validation=False)
    valid = None
    if valid_dir:
        valid = lm_batches(arch, open_corpus(valid_dir, tokenizer), tokenizer, config, validation=True)
    architecture = model_config(config, tokenizer, model_overrides or {})
    torch.manual_seed(config.seed)  # the same initial weights on every rank and in every run with this seed
    model = ARCHS[arch](architecture)
    run_info = {"task": f"pretrain-{arch}", "model": architecture.to_dict(),
                "tokenizer_sha256": tokenizer_sha256(tokenizer),
                "data": {"tokenizer": str(tokenizer_path), "train": str(train_dir), "valid": str(valid_dir)},
                "corpora": {"train": corpus_fingerprint(train_dir), "valid": corpus_fingerprint(valid_dir)}}
    return _train(model, train, valid, config, Path(run_dir), world=world, resume=resume, overwrite=overwrite,
                  tokenizer=tokenizer, run_info=run_info)


def starting_models(encoder: str | Path, decoder: str | Path, tokenizer: Tokenizer, config: TrainConfig,
                    model_overrides: dict[str, str]) -> tuple[EncoderLM, DecoderLM]:
    """The encoder and decoder a fine-tuning starts from: each loaded from its directory, or, where given as
    RANDOM, freshly initialised (seeded by config.seed) with the other side's ModelConfig, or with the preset's
    (plus `model_overrides`) when both are random. Overrides apply only then: a pre-trained side fixes the shape."""
    sides = {"encoder": str(encoder), "decoder": str(decoder)}
    random_sides = [side for side, path in sides.items() if path == RANDOM]
    if model_overrides and len(random_sides) < 2:
        raise ValueError(f"--model.* overrides apply only with --encoder {RANDOM} --decoder {RANDOM}: a pre-trained "
                         "side fixes the architecture")
    loaded = {}
    for side, path in sides.items():
        if side not in random_sides:
            loaded[side] = load_model(path)
            expected = ARCHS[side]
            if not isinstance(loaded[side], expected):
                raise ValueError(f"finetune --{side} {path}: holds a {type(loaded[side]).__name__}, expected "
                                 f"{expected.__name__} (or {RANDOM!r} for a randomly initialised one)")
            check_vocab(loaded[side], tokenizer, f"finetune --{side} {path}")
            check_tokenizer(path, tokenizer)
    if len(random_sides) == 2:
        architecture = model_config(config, tokenizer, model_overrides)
    else:
        architecture = next(iter(loaded.values())).config
    torch.manual_seed(config.seed)  # the same random side in every run with this seed
    for side in random_sides:
        loaded[side] = ARCHS[side](architecture)
    return loaded["encoder"], loaded["decoder"]


def finetune(encoder: str | Path, decoder: str | Path, tokenizer_path: str | Path, train_dir: str | Path,
             valid_dir: str | Path | None, run_dir: str | Path, config: TrainConfig, *,
             cross_attention_init: str = DEFAULT_CROSS_ATTENTION_INIT, share_embeddings: bool = False,
             bleu_sentences: int = 64, decoding: DecodingSettings = DecodingSettings(),
             model_overrides: dict[str, str] | None = None, resume: bool = False, overwrite: bool = False,
             world: World | None = None) -> RunResult:
    """Merge an encoder and a decoder (pre-trained directories, or RANDOM for a fresh one: Rnd2Rnd, Enc2Rnd,
    Rnd2Dec) into a Seq2SeqLM and train it on prepared sentence pairs; BLEU and sample translations on the first
    `bleu_sentences` validation pairs (translated with `decoding`) at every evaluation (see bleu_on_pairs)."""
    check_packing(config, "finetune")
    tokenizer = load_tokenizer(tokenizer_path)
    encoder_model, decoder_model = starting_models(encoder, decoder, tokenizer, config, model_overrides or {})
    model = Seq2SeqLM.from_pretrained(encoder_model, decoder_model, cross_attention_init=cross_attention_init,
                                      share_embeddings=share_embeddings)
    train = translation_batches(open_parallel(train_dir, tokenizer), tokenizer, config, validation=False)
    valid, extra_eval = None, None
    if valid_dir:
        pairs = open_parallel(valid_dir, tokenizer)
        valid = translation_batches(pairs, tokenizer, config, validation=True)
        if bleu_sentences:
            extra_eval = functools.partial(bleu_on_pairs, tokenizer=tokenizer, pairs=pairs, count=bleu_sentences,
                                           decoding=decoding, max_new_tokens=config.max_len)
    run_info = {"task": "finetune", "model": model.config_dict(), "tokenizer_sha256": tokenizer_sha256(tokenizer),
                "data": {"tokenizer": str(tokenizer_path), "train": str(train_dir), "valid": str(valid_dir),
                         "encoder": str(encoder), "decoder": str(decoder)},
                "corpora": {"train": corpus_fingerprint(train_dir), "valid": corpus_fingerprint(valid_dir)}}
    return _train(model, train, valid, config, Path(run_dir), world=world, resume=resume, overwrite=overwrite,
                  tokenizer=tokenizer, run_info=run_info, extra_eval=extra_eval)


def model_of_run(run_info: dict):
    """A model of the architecture a run's checkpoints hold (freshly initialised), from their run_info: pretrain
    records the ModelConfig, finetune the Seq2SeqLM's config_dict."""
    task = run_info.get("task")
    if task == "finetune":
        return Seq2SeqLM.from_config_dict(run_info["model"])
    arch = task.removeprefix("pretrain-") if isinstance(task, str) else None
    if arch not in ARCHS:
        raise ValueError(f"run_info task={task!r}: expected finetune, {', '.join('pretrain-' + a for a in ARCHS)}")
    return ARCHS[arch].from_config_dict({"config": run_info["model"]})


def average(checkpoints: list[str | Path], output: str | Path, *, overwrite: bool = False) -> list[int]:
    """Write the mean of the model weights of `checkpoints` (of one run) as a model directory, what translate, eval
    and export load; returns the steps averaged. An `output` that exists is replaced only with `overwrite`."""
    output = Path(output)
    if output.exists() and not overwrite and (not output.is_dir() or any(output.iterdir())):
        raise FileExistsError(f"--output {output} exists: choose another directory, or pass --overwrite to replace "
                              "the model in it")
    weights, run_info, steps = average_checkpoints(checkpoints)
    model = model_of_run(run_info)
    model.load_state_dict(weights)  # tied names both hold the same mean: the model's one tensor stays tied
    model.save(output, {"tokenizer_sha256": run_info["tokenizer_sha256"], "averaged_steps": steps})
    return steps


def bleu_on_pairs(model: Seq2SeqLM, tokenizer: Tokenizer, pairs: ParallelCorpus, count: int,
                  decoding: DecodingSettings, *, max_new_tokens: int, shown: int = 3) -> dict:
    """BLEU of the model's translations of the first `count` pairs, and `shown` of them as "source => output".

    The first pairs in corpus order, not a random sample: the same sentences for every run and seed on a corpus,
    whatever its batching, and no length bias where the corpus is not sorted by length (a news dev set is not)."""
    count = min(count, len(pairs))
    sources = [tokenizer.decode(pairs.src[i]) for i in range(count)]
    references = [tokenizer.decode(pairs.tgt[i]) for i in range(count)]
    hypotheses = translate_texts(model, tokenizer, sources, decoding, max_new_tokens=max_new_tokens)
    samples = [f"{source}  =>  {output}" for source, output in zip(sources[:shown], hypotheses[:shown])]
    return {"bleu": corpus_bleu(hypotheses, references), "samples": samples}


def run_train_config(model_path: str | Path) -> tuple[dict, Path] | None:
    """The training settings saved by the run that made a model (`model_path`: the run directory, or the model
    directory inside it) and the file they are in; None for a model kept without its run."""
    path = model_dir_of(model_path).parent / "config.json"
    if not path.is_file():
        return None
    saved = json.loads(path.read_text(encoding="utf-8"))
    return (saved["train"], path) if isinstance(saved, dict) and "train" in saved else None


def evaluate(model_path: str | Path, tokenizer_path: str | Path, data_dir: str | Path, config: TrainConfig, *,
             bleu_sentences: int = 0, decoding: DecodingSettings = DecodingSettings()) -> Evaluation:
    """Loss, perplexity and accuracy of a saved model on a prepared corpus (parallel for a Seq2SeqLM, which also
    gets BLEU on its first `bleu_sentences` pairs), computed as the in-training evaluation computes them: the same
    validation batches (config.eval_batches: the whole corpus, or the same fixed sample), the same autocast. Given
    the run's own config, it reproduces the run's last evaluation."""
    tokenizer = load_tokenizer(tokenizer_path)
    model = load_model(model_path)
    check_vocab(model, tokenizer, f"eval --model {model_path}")
    check_tokenizer(model_path, tokenizer)
    world = World(0, 1, torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    model.to(world.device)
    autocast = functools.partial(autocast_for, world.device, config.precision)
    bleu_pairs = 0
    if isinstance(model, Seq2SeqLM):
        pairs = open_parallel(data_dir, tokenizer)
        batches = translation_batches(pairs, tokenizer, config, validation=True)
        unit, total = "pairs", len(pairs)
        bleu_pairs = min(bleu_sentences, total)
    else:
        arch = "encoder" if isinstance(model, EncoderLM) else "decoder"
        corpus = open_corpus(data_dir, tokenizer)
        batches = lm_batches(arch, corpus, tokenizer, config, validation=True)
        unit, total = ("sentences", len(corpus)) if arch == "encoder" else \
            (f"blocks of {config.max_len} tokens", batches.num_blocks)
    metrics = evaluate_loss(model, batches, world=world, autocast=autocast)
    if bleu_pairs:
        with torch.no_grad(), autocast():
            metrics["bleu"] = bleu_on_pairs(model, tokenizer, pairs, bleu_pairs, decoding,
                                            max_new_tokens=config.max_len)["bleu"]
    return Evaluation({key: (value if math.isfinite(value) else None) for key, value in metrics.items()},
                      items=len(batches.items), total=total, unit=unit, bleu_pairs=bleu_pairs)
