"""TrainConfig: every knob of a training run, with commented defaults, presets and type-checked overrides.

A run is described by a preset name plus `--key value` overrides; the resolved config is saved in the run
directory and in every checkpoint, so a run can always be explained and resumed.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import re
import types
import typing
from dataclasses import dataclass
from pathlib import Path

SCHEDULES = ("cosine", "linear", "constant")
PRECISIONS = ("auto", "bf16", "fp32")


class ConfigError(ValueError):
    """A user-facing configuration mistake (unknown key, wrong type, value out of range)."""


@dataclass
class TrainConfig:
    # --- optimisation ---
    lr: float = 1e-3  # peak learning rate, reached at the end of warmup
    # Weight decay neither causes nor cures the stall that was blamed on it: on ko-en at the tiny scale (encoder MLM,
    # 1000 steps) 0, 1e-4, 1e-3, 1e-2 and 0.1 end within 0.01 nats of each other at lr 3e-4 and 1e-3, and within
    # 0.07 at 3e-3 (0.1 the best), while the lr decides: 3e-3 stays near the unigram plateau, 1e-3 is best
    # (docs/RESULTS.md, section 5). 0.1, the usual BERT/GPT value for long runs, costs nothing here.
    weight_decay: float = 0.1  # decoupled AdamW weight decay (weight matrices only: not biases, norms, embeddings)
    beta1: float = 0.9  # AdamW decay of the gradient's running mean
    beta2: float = 0.98  # 0.98 rather than 0.999: steadier with short warmups on small batches (as in RoBERTa)
    grad_clip: float = 1.0  # max global gradient norm; 0 disables clipping (the norm is still reported)
    schedule: str = "cosine"  # decay after warmup: "cosine" | "linear" | "constant"
    warmup_steps: int = 100  # linear warmup from 0 to lr
    min_lr_ratio: float = 0.1  # the schedule decays to lr * min_lr_ratio at max_steps
    max_steps: int = 2000  # optimizer steps (skipped non-finite steps do not count)

    # --- batching (per process; global batch = batch_size * grad_accum * world_size sequences) ---
    batch_size: int = 32  # sequences per micro-batch (translation: pairs per micro-batch)
    grad_accum: int = 1  # micro-batches per optimizer step and process
    max_len: int = 128  # MLM max length / causal block length / translation max source and target length
    # 0.4, not BERT's 0.15: on ko-en at the tiny scale the encoder stayed on the unigram plateau with 15% and left it
    # with 40% (docs/RESULTS.md, section 2).
    mask_prob: float = 0.4  # MLM: fraction of tokens selected for prediction

    # --- evaluation, logging, checkpoints ---
    eval_interval: int = 200  # steps between evaluations (0: only at the end)
    eval_batches: int = 20  # validation micro-batches per evaluation
    log_interval: int = 10  # steps between progress-bar refreshes when stderr is not a terminal
    checkpoint_interval: int = 200  # steps between checkpoints (a final one is always written)
    keep_last: int = 2  # step checkpoints kept besides best.pt
    max_bad_steps: int = 5  # consecutive non-finite losses tolerated before the run stops

    # --- runtime ---
    seed: int = 0  # seeds data order, masking, dropout and initialisation
    # bf16 autocast keeps fp32 master weights and optimizer state. On a CPU with AVX-512 BF16 it fine-tuned the tiny
    # translation model 1.4x as fast as fp32 (the small one 1.7x) with the same loss curves (docs/PERFORMANCE.md);
    # without native bf16 dot products the CPU would emulate them, so "auto" stays fp32 there.
    precision: str = "auto"  # "auto": bf16 autocast on CUDA and on CPUs with native bf16, else fp32 | "bf16" | "fp32"
    compile: bool = False  # torch.compile the model's forward
    fsdp: bool = False  # shard parameters and optimizer state with FSDP2 (under torchrun) instead of DDP
    model_preset: str = "tiny"  # ModelConfig preset ("tiny" | "small" | "base"); --model.KEY overrides it
    progress: bool = True  # show a progress bar on stderr

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        positive = ("lr", "max_steps", "batch_size", "grad_accum", "max_len", "eval_batches", "log_interval",
                    "checkpoint_interval", "keep_last", "max_bad_steps")
        for name in positive:
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name}={getattr(self, name)!r}: expected a value > 0")
        non_negative = ("weight_decay", "grad_clip", "warmup_steps", "eval_interval", "seed")
        for name in non_negative:
            if getattr(self, name) < 0:
                raise ConfigError(f"{name}={getattr(self, name)!r}: expected a value >= 0")
        for name in ("beta1", "beta2", "min_lr_ratio"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ConfigError(f"{name}={getattr(self, name)!r}: expected a value in [0, 1]")
        if not 0.0 < self.mask_prob < 1.0:
            raise ConfigError(f"mask_prob={self.mask_prob!r}: expected a value in (0, 1)")
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"schedule={self.schedule!r}: expected one of {', '.join(SCHEDULES)}")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"precision={self.precision!r}: expected one of {', '.join(PRECISIONS)}")

    @classmethod
    def preset(cls, name: str, **overrides) -> TrainConfig:
        """The named preset with `overrides` (already typed) applied; unknown keys are errors."""
        if name not in PRESETS:
            raise ConfigError(f"preset={name!r}: expected one of {', '.join(PRESETS)}")
        values = {**PRESETS[name], **overrides}
        _check_known_keys(cls, values)
        return cls(**values)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> TrainConfig:
        _check_known_keys(cls, values)
        return cls(**values)

    def save_json(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n", encoding="utf-8")


# Presets differ in run length and batch shape; optimiser defaults stay those validated above.
PRESETS: dict[str, dict] = {
    # CPU tests and `fastlm demo`: a few hundred small steps. lr 1e-3, because at 3e-3 the masked-LM encoder never
    # leaves the unigram loss. Tiny encoder on ko (ko-en corpus, 4k byte vocab, warmup 80), valid loss against the
    # unigram cross-entropy of the masked targets, 7.24:
    #   step            200    400    600    800
    #   lr 3e-3       7.43   7.30   7.25   7.25   (warmup 300: 7.42 7.30 7.24 7.19)
    #   lr 1e-3       7.36   7.19   7.04   7.01
    #   lr 5e-4       7.32   7.15   7.03   7.00
    # A 1k vocab at lr 1e-3: 6.11 6.03 5.84 5.83 against a unigram 6.06. On a synthetic copy-the-twin task (rows
    # `a a b b ...`, unigram 4.09) lr 1e-3 reaches 0.77 (accuracy 0.86, about the ceiling) by step 400, while 2e-3
    # and 3e-3 (warmup 30 or 100) stay at ~4.1 for 400-600 steps with fastlm, sdpa and eager attention alike:
    # early steps above ~1e-3 lock the encoder into predicting the unigram distribution. The decoder alone prefers
    # 3e-3 (5.68 against 5.84 at 400 steps in the sweep above): pass `--lr 3e-3` for decoder-only runs.
    "tiny": dict(max_steps=300, warmup_steps=30, batch_size=16, max_len=64, lr=1e-3, eval_interval=100,
                 eval_batches=5, checkpoint_interval=100, model_preset="tiny"),
    "small": dict(max_steps=5000, warmup_steps=300, batch_size=32, max_len=128, lr=6e-4, model_preset="small"),
    # BERT-base / GPT-2-small shapes on one GPU.
    "base": dict(max_steps=20000, warmup_steps=1000, batch_size=32, max_len=512, lr=3e-4, eval_interval=1000,
                 checkpoint_interval=1000, model_preset="base"),
}


def _check_known_keys(cls: type, values: dict) -> None:
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"unknown config key {unknown[0]!r}: expected one of {', '.join(sorted(known))}")


def field_types(cls: type) -> dict[str, type]:
    """Field name -> its annotated type (resolved from the string annotations)."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


_FIELD_COMMENT = re.compile(r"^\s+(\w+):[^=\n]+=[^#\n]*#\s*(.+?)\s*$", re.MULTILINE)


def field_help(cls: type) -> dict[str, str]:
    """Field name -> the comment beside its default in the class body: each setting is explained in one place,
    and `--help` shows that same text ("" where the source is not shipped)."""
    try:
        source = inspect.getsource(cls)
    except (OSError, TypeError):
        return {}
    return {match[1]: match[2] for match in _FIELD_COMMENT.finditer(source)}


_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


def parse_value(key: str, text: str, expected: type) -> object:
    """Convert the command-line string `text` for field `key` to `expected` (bool, int, float, str, a Literal of
    strings, or an optional of them), naming the key, the text and the type on failure."""
    if typing.get_origin(expected) in (typing.Union, types.UnionType):
        options = [t for t in typing.get_args(expected) if t is not type(None)]
        if text.lower() == "none":
            return None
        expected = options[0]
    if typing.get_origin(expected) is typing.Literal:
        choices = typing.get_args(expected)
        if text not in choices:
            raise ConfigError(f"--{key} {text!r}: expected one of {', '.join(map(str, choices))}")
        return text
    if expected is bool:
        if text.lower() in _TRUE:
            return True
        if text.lower() in _FALSE:
            return False
        raise ConfigError(f"--{key} {text!r}: expected a boolean (true/false)")
    if expected in (int, float):
        try:
            return expected(text)
        except ValueError:
            raise ConfigError(f"--{key} {text!r}: expected {expected.__name__}") from None
    if expected is str:
        return text
    raise ConfigError(f"--{key}: values of type {expected} cannot be given on the command line")


def parse_overrides(args: list[str]) -> dict[str, str]:
    """['--lr', '3e-4', '--model.d_model', '64'] -> {'lr': '3e-4', 'model.d_model': '64'} (values still strings).

    `--key=value` works too; a key without a value is an error.
    """
    pairs: dict[str, str] = {}
    i = 0
    while i < len(args):
        token = args[i]
        if not token.startswith("--") or len(token) == 2:
            raise ConfigError(f"unexpected argument {token!r}: expected --key value")
        key, eq, value = token[2:].partition("=")
        if not eq:
            if i + 1 >= len(args) or args[i + 1].startswith("--"):
                raise ConfigError(f"--{key}: missing value")
            value = args[i + 1]
            i += 1
        pairs[key.replace("-", "_")] = value
        i += 1
    return pairs


def typed_overrides(cls: type, overrides: dict[str, str], prefix: str = "") -> dict[str, object]:
    """String overrides -> typed values for the dataclass `cls`; unknown keys are errors. `prefix` is how the
    keys were spelled on the command line ("model." for --model.KEY), so that messages repeat what the user typed."""
    expected = field_types(cls)
    typed = {}
    for key, text in overrides.items():
        if key not in expected:
            known = ", ".join(prefix + name for name in sorted(expected))
            raise ConfigError(f"unknown config key {prefix + key!r}: expected one of {known}")
        typed[key] = parse_value(prefix + key, text, expected[key])
    return typed


def resolve(preset: str, overrides: dict[str, str]) -> TrainConfig:
    """The TrainConfig of a run: the preset, then the command-line overrides (train keys only)."""
    return TrainConfig.preset(preset, **typed_overrides(TrainConfig, overrides))
