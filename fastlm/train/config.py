"""TrainConfig: every knob of a training run, with commented defaults, presets and type-checked overrides.

A run is described by a preset name plus `--key value` overrides; the resolved config is saved in the run
directory and in every checkpoint, so a run can always be explained and resumed.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import json
import re
import types
import typing
from dataclasses import dataclass
from pathlib import Path

from fastlm.train.selection import LOWER_IS_BETTER

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
    # A resume may change max_steps (RESUMABLE_CHANGES): the lr then follows the schedule of the new length from the
    # step reached on (warmup not repeated), so extending a finished cosine run raises its lr back from the floor.
    max_steps: int = 2000  # optimizer steps (skipped non-finite steps do not count)
    # Training steps only: validation loss stays plain cross-entropy (comparable across settings), while the "loss"
    # of train records is the smoothed objective. 0 for fine-tuning too, as measured: on ko-en (Rnd2Rnd, 3 epochs)
    # 0.1 lowered chrF on the news valid split from 11.2 to 8.3 (paired bootstrap p = 0.001; docs/RESULTS.md, 6).
    label_smoothing: float = 0.0  # eps of F.cross_entropy's label smoothing, in training steps only

    # --- batching (per process; global batch = batch_size * grad_accum * world_size sequences) ---
    # 32 pairs for fine-tuning too: 16 (twice the steps for the same 3 epochs of ko-en) scored the same on the valid
    # split (BLEU +0.06, p = 0.16; chrF -0.15, p = 0.13; docs/RESULTS.md, 6).
    batch_size: int = 32  # sequences (translation: pairs) per micro-batch, unless max_tokens is set
    # Off by default: runs keep the batches they always had. The padding a budget saves: docs/PERFORMANCE.md
    # (Batches). A causal LM's blocks all have max_len tokens: there it means max_tokens // max_len blocks.
    max_tokens: int = 0  # > 0: micro-batches of <= max_tokens padded tokens, length-bucketed, not batch_size rows
    # Off by default: runs keep the batches they always had, and a packed batch holds more sentences than a padded one
    # of batch_size rows (a new recipe). Validation batches stay one sentence (pair) per row, so that every run is
    # scored on the same batches, and its loss stays comparable. Throughput: docs/PERFORMANCE.md (Packed batches).
    packing: bool = False  # MLM, finetune: whole sentences (pairs) packed in rows of max_len; batch_size counts rows
    grad_accum: int = 1  # micro-batches per optimizer step and process
    max_len: int = 128  # MLM max length / causal block length / translation max source and target length
    # 0.4, not BERT's 0.15: on ko-en at the tiny scale the encoder stayed on the unigram plateau with 15% and left it
    # with 40% (docs/RESULTS.md, section 2).
    mask_prob: float = 0.4  # MLM: fraction of tokens selected for prediction

    # --- evaluation, logging, checkpoints ---
    eval_interval: int = 200  # steps between evaluations (0: only at the end)
    # A prefix of the validation batches would be biased: translation batches are sorted by length, so the first 20
    # were the shortest pairs. The sample is drawn with a fixed seed, not the run's: every evaluation of every run on
    # a validation corpus scores the same items (and, for the encoder, the same masks).
    eval_batches: int = 0  # 0: evaluate the whole validation split; N: a fixed random sample of N * batch_size items
    log_interval: int = 10  # steps between progress-bar refreshes when stderr is not a terminal
    checkpoint_interval: int = 200  # steps between checkpoints (a final one is always written)
    keep_last: int = 2  # step checkpoints kept besides best.pt (`fastlm average --last K` needs K of them)
    max_bad_steps: int = 5  # consecutive non-finite losses tolerated before the run stops
    # Loss by default: every run with validation data has it, and it is measured on eval_batches batches where BLEU
    # sees a sample of bleu_sentences pairs; which picks the better translator here is pending measurement.
    select_by: str = "loss"  # validation metric of best.pt, the weights run_dir/model gets: "loss" | "bleu" (finetune)
    # Off by default: a run trains its max_steps unless asked to stop; a fine-tuning value is pending measurement.
    patience: int = 0  # stop after this many evaluations in a row without a better select_by (0: never stop early)

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
        positive = ("lr", "max_steps", "batch_size", "grad_accum", "max_len", "log_interval",
                    "checkpoint_interval", "keep_last", "max_bad_steps")
        for name in positive:
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name}={getattr(self, name)!r}: expected a value > 0")
        non_negative = ("weight_decay", "grad_clip", "warmup_steps", "eval_interval", "eval_batches", "seed",
                        "max_tokens", "patience")
        for name in non_negative:
            if getattr(self, name) < 0:
                raise ConfigError(f"{name}={getattr(self, name)!r}: expected a value >= 0")
        for name in ("beta1", "beta2", "min_lr_ratio", "label_smoothing"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ConfigError(f"{name}={getattr(self, name)!r}: expected a value in [0, 1]")
        if not 0.0 < self.mask_prob < 1.0:
            raise ConfigError(f"mask_prob={self.mask_prob!r}: expected a value in (0, 1)")
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"schedule={self.schedule!r}: expected one of {', '.join(SCHEDULES)}")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"precision={self.precision!r}: expected one of {', '.join(PRECISIONS)}")
        if self.select_by not in LOWER_IS_BETTER:
            raise ConfigError(f"select_by={self.select_by!r}: expected one of {', '.join(LOWER_IS_BETTER)}")

    @classmethod
    def preset(cls, name: str, task: str | None = None, **overrides) -> TrainConfig:
        """The named preset, then the task's defaults (TASK_DEFAULTS; none without a task), then `overrides`
        (already typed); unknown keys are errors."""
        if name not in PRESETS:
            raise ConfigError(f"preset={name!r}: expected one of {', '.join(PRESETS)}")
        if task is not None and task not in TASK_DEFAULTS:
            raise ConfigError(f"task={task!r}: expected one of {', '.join(TASK_DEFAULTS)}")
        values = {**PRESETS[name], **TASK_DEFAULTS.get(task, {}), **overrides}
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
                 checkpoint_interval=100, model_preset="tiny"),
    "small": dict(max_steps=5000, warmup_steps=300, batch_size=32, max_len=128, lr=6e-4, model_preset="small"),
    # BERT-base / GPT-2-small shapes on one GPU.
    "base": dict(max_steps=20000, warmup_steps=1000, batch_size=32, max_len=512, lr=3e-4, eval_interval=1000,
                 checkpoint_interval=1000, model_preset="base"),
}

# Where a task's conventional value differs from the field's default: applied over the preset, under the overrides.
TASK_DEFAULTS: dict[str, dict] = {
    "pretrain": {},
    # None: the conventional label smoothing 0.1 for translation (Vaswani et al. 2017) lost to 0 on ko-en at the
    # budget measured (label_smoothing's comment), and the recipe's other settings (dropout 0.3) lost too.
    "finetune": {},
}


# The settings a resumed run may change: how long it runs (max_steps, and patience, which only ends it sooner),
# when it evaluates, checkpoints and reports, and how it is
# laid out on its machines (checkpoints fit any layout). grad_accum may change with the number of processes as long
# as grad_accum * world_size, the micro-batches of a step, stays. Any other change would make the resumed run
# another run than the one it continues, so resuming with one is refused.
RESUMABLE_CHANGES = ("max_steps", "patience", "eval_interval", "checkpoint_interval", "log_interval", "keep_last",
                     "max_bad_steps", "progress", "fsdp", "compile")


def field_defaults(cls: type) -> dict[str, object]:
    """Field name -> its default. Also what a field missing from a saved config counts as: a field added since the
    config was saved had that value in effect, so a new setting never makes an older run's files unreadable."""
    return {f.name: f.default for f in dataclasses.fields(cls)}


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


@functools.cache  # parsing a class's source costs ~10 ms, and every command's parser asks for it again
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

    `--key=value` works too; a key without a value is an error, and so is a key given twice (`--max-steps` and
    `--max_steps` are one key): which of the two values was meant is not for the parser to guess.
    """
    pairs: dict[str, str] = {}
    spelled: dict[str, str] = {}  # key -> how it was first given, for the message
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
        name = key.replace("-", "_")
        if name in pairs:
            raise ConfigError(f"--{key} {value!r}: {spelled[name]} {pairs[name]!r} was given already: give each "
                              "setting once")
        pairs[name], spelled[name] = value, f"--{key}"
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


def resolve(preset: str, overrides: dict[str, str], task: str | None = None) -> TrainConfig:
    """The TrainConfig of a run: the preset, then the task's defaults, then the command-line overrides (train keys
    only)."""
    return TrainConfig.preset(preset, task, **typed_overrides(TrainConfig, overrides))
