"""The ko->en experiment's grid: its stages, scales, settings and jobs, defined once for the script that runs them
(experiments/ko_en.py) and the page that reports them (experiments/report.py)."""

from __future__ import annotations

import fnmatch
import math
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

STAGES = ("tokenizers", "plateau", "pretrain", "finetune", "datasize", "sweep", "recipe")
LEVELS = ("char", "byte")  # the first study favoured char: it is pre-trained and fine-tuned first
VOCAB_SIZES = (8000, 16000, 32000)
TRAIN_VOCAB = 8000  # the vocabulary of every pre-training and translation run (the plateau stage also tries others)
CROSS_ATTENTION_INITS = ("random", "copy-self", "zero-out")
# The four starting points; the pre-trained sides come from the pretrain stage.
STARTS = {"Rnd2Rnd": ("random", "random"), "Enc2Rnd": ("encoder", "random"), "Rnd2Dec": ("random", "decoder"),
          "Enc2Dec": ("encoder", "decoder")}
MISPAIRED = "valid-mispaired"  # the valid pairs with the Korean side shifted by one sentence (see Experiment.source)
MAIN_SEEDS = (0, 1)  # seeds of the main comparison (the four starts, default cross-attention init)
SEEDED_FIRST = ("Rnd2Rnd", "Enc2Dec")  # the starts whose second seed runs before the other grid jobs
BEAMS = (1, 4)  # greedy and beam 4 on each test set
SAMPLES = 3  # good and bad sample translations kept per test result

# Steps and batch size of each stage per --preset (the TrainConfig preset; its model preset sizes the models).
# tiny: sized for a 2-core CPU, where a tiny-model step on 32 sentences takes ~0.75 s (MLM, one thread, a busy box);
# small/base: a GPU.
# Every configuration compared within a stage gets the same steps and batch: the same token budget.
# max_len: the longest MLM row, causal block and translation side, in tokens: 128 keeps whole all but a few of the
# news sentences (char level 8k: 43 tokens on average), where the preset's 64 cut the longer ones.
# tiny's pre-training runs 10000 steps (6.8 epochs of the Korean side for the encoder), five times the first study's
# 2000 (1.4 epochs), after which both pre-trainings were still improving (docs/RESULTS.md).
# Translation runs train until the valid loss stops improving: at most finetune_epochs epochs (the cosine schedule's
# length), stopped after `patience` evaluations without a new best. tiny: the recipe's 3-epoch runs were still
# improving by 0.03-0.04 nats per 500 steps at the end (docs/RESULTS.md); 20 epochs (29000 steps, about 2.2 hours on
# one core) with patience 6 (3000 steps, two epochs) leaves room to converge.
# translate_batch: sentences translated together when scoring (fastlm translate --batch-size); tiny has none, so its
# test commands stay those it ran (translate's 32). On a GPU a decoding step costs about the same for 32 sentences as
# for 256, so 256 takes an eighth of the steps.
SCALES = {
    "tiny": dict(batch_size=32, max_len=128, pretrain=10000, plateau=1000, finetune_epochs=20, patience=6,
                 sweep=1000, recipe_epochs=3, eval_interval=500),
    "small": dict(batch_size=64, max_len=128, pretrain=10000, plateau=3000, finetune_epochs=30, patience=6,
                  sweep=3000, recipe_epochs=10, eval_interval=500, translate_batch=256),
    "base": dict(batch_size=64, max_len=512, pretrain=20000, plateau=5000, finetune_epochs=30, patience=6,
                 sweep=5000, recipe_epochs=10, eval_interval=1000, translate_batch=256),
}
# `ko_en.py --scale KEY=VALUE`: the entries a run may replace, and those that may be fractional.
SCALE_KEYS = tuple(dict.fromkeys(key for scale in SCALES.values() for key in scale))
FRACTIONAL_SCALE_KEYS = ("finetune_epochs", "recipe_epochs")
# --quick: every stage in minutes, on a few hundred lines, a micro model and a handful of steps.
QUICK_LINES = {"train": 300, "valid": 24, "test": 24}
# The in-domain test: pairs drawn (seeded) from the train split and removed from it before any tokenizer,
# pre-training or fine-tuning sees it, scored beside the news test so that "cannot translate" and "wrong domain"
# can be told apart (65% of train is Bible, the news test none).
HELDOUT = "heldout"
HELDOUT_PAIRS = 1000
QUICK_HELDOUT_PAIRS = 24
HELDOUT_SEED = 0
TEST_SETS = ("test", HELDOUT)  # what every translation model is scored on: the news test split, the held-out pairs
# Ten everyday sentences, written for this study (not drawn from any corpus) with our reference translations: what
# a user tries first, unlike the news of the test split or the Bible verses of most of train. Every translation model
# translates them (beam 4) for the report's samples; ten sentences are too few for a score to mean much.
EVERYDAY = "everyday"
EVERYDAY_PAIRS = (
    ("오늘 날씨가 정말 좋네요.", "The weather is really nice today."),
    ("지하철역이 어디에 있나요?", "Where is the subway station?"),
    ("저는 매일 아침 커피를 마셔요.", "I drink coffee every morning."),
    ("내일 친구와 영화를 보러 갈 거예요.", "Tomorrow I am going to see a movie with a friend."),
    ("이 책은 아주 재미있어요.", "This book is very interesting."),
    ("배가 고파서 점심을 먹으러 가요.", "I am hungry, so I am going to eat lunch."),
    ("우리 가족은 서울에 살고 있습니다.", "My family lives in Seoul."),
    ("회의는 오후 세 시에 시작합니다.", "The meeting starts at three in the afternoon."),
    ("도와주셔서 정말 감사합니다.", "Thank you very much for your help."),
    ("아이들이 공원에서 놀고 있어요.", "The children are playing in the park."),
)
QUICK_VOCAB_SIZES = (1100,)  # above the char level's alphabet of a few hundred lines (~940)
QUICK_STARTS = ("Rnd2Rnd", "Enc2Dec")  # a random and a pre-trained side each (the CLI tests cover the mixed ones)
QUICK_MODEL = {"d_model": "32", "n_layers": "1", "n_heads": "2", "d_ff": "64"}
QUICK_SCALE = dict(batch_size=8, max_len=64, pretrain=4, plateau=4, finetune_epochs=0.1, patience=2, sweep=4,
                   recipe_epochs=0.1, eval_interval=2)

# Plateau variants: TrainConfig (--KEY) and ModelConfig (--model.KEY) overrides of the baseline, which is the
# issue's stalled run (byte level 8k, lr 1e-3, warmup 30, mask 15%, pre-norm, learned positions); "vocab" picks
# the tokenizer (byte level). The baseline's mask rate is given explicitly: this study made 40% the default.
PLATEAU_BASELINE = {"mask_prob": "0.15"}
PLATEAU = {
    "baseline": {},
    "lr3e-4": {"lr": "3e-4"},
    "warmup300": {"warmup_steps": "300"},
    "mask40": {"mask_prob": "0.4"},
    "rope": {"model.positional": "rope"},
    "post-norm": {"model.norm_position": "post"},
    "dropout0": {"model.dropout": "0"},
    "vocab2k": {"vocab": "2000"},
    # The three changes that moved the loss fastest in the first 600 steps, together.
    "combined": {"mask_prob": "0.4", "model.norm_position": "post", "model.positional": "rope"},
    # The same without post-norm, with which a decoder stayed on its plateau (docs/RESULTS.md).
    "mask40-rope": {"mask_prob": "0.4", "model.positional": "rope"},
    "steps4000": {"max_steps": "4000"},  # the length of training: the baseline, four times longer
}
QUICK_PLATEAU = ("baseline", "mask40")
# The encoder's settings in the pretrain and sweep stages (the plateau stage's finding; see docs/RESULTS.md).
# One architecture (--model.KEY settings) for every model trained from scratch outside the plateau stage (both
# pre-trainings, the sweep, Rnd2Rnd; Enc2Rnd and Rnd2Dec copy it from the pre-trained side), so that the four
# starts differ in their initial weights only.
# Rotary positions (pre-norm) and, for the encoder, 40% masking: the "mask40-rope" plateau variant. Post-norm
# ("combined") moved the encoder further, but a post-norm decoder stayed on its own plateau (valid loss 7.21,
# accuracy 2.3% at step 300, training loss flat at ~6.3 from step 50) where a pre-norm one learned at once: the
# four starts need one architecture, so pre-norm it is (docs/RESULTS.md).
MODEL_SETTINGS = {"model.positional": "rope"}
ENCODER_SETTINGS = {"mask_prob": "0.4"}
# The preset's lr 1e-3, with which the decoder learned in the issue (perplexity 205 after 1000 steps). 3e-3 was
# better for the decoder alone at 400 steps (TrainConfig's comments) but is untried with rope.
DECODER_SETTINGS: dict[str, str] = {}
# The recipe stage: which of the low-resource settings of Sennrich & Zhang (2019, "Revisiting Low-Resource NMT")
# help on this data: dropout in more places and higher, smaller batches, a smaller vocabulary, label smoothing.
# Each is one change to the base (Rnd2Rnd, char level, the grid's architecture, batch 32, dropout 0.1), trained for
# the same number of epochs and scored on the valid split (news dev; the test splits stay unseen). "vocab" picks
# the tokenizer (char level). RECIPE_BASE: each run keeps its best checkpoint by the loss on a fixed random sample of
# 20 batches (640 pairs) of valid, as the measured runs did; score_valid then scores the whole split. The base has no
# label smoothing: the fine-tuning default (0) that this stage chose.
RECIPE_BASE = {"eval_batches": "20"}
RECIPE = {
    "base": {},
    "ls0.1": {"label_smoothing": "0.1"},
    "dropout0.3": {"model.dropout": "0.3", "model.attn_dropout": "0.1"},
    "batch16": {"batch_size": "16"},
    "vocab4k": {"vocab": "4000"},
}
QUICK_RECIPE = ("base", "ls0.1")
# What `ko_en.py --translator` makes: the best start at convergence (docs/RESULTS.md): Enc2Dec had the lowest valid
# loss, the best chrF on both test sets and the best held-out BLEU at seed 0, its news BLEU level with Enc2Rnd's.
TRANSLATOR = ("char", "Enc2Dec", "random", 0)
# The datasize stage: what more translation pairs would give. DATASIZE_START fine-tuned on part of the train pairs,
# nested subsets drawn with SUBSET_SEED (the pairs of a smaller one are all in the larger), with the same tokenizer,
# pre-trained sides, step cap, schedule and early stopping as on all of them; scored at beam 4 on both test sets.
# The full-data point is the finetune stage's run of that start.
# Enc2Rnd, not the TRANSLATOR (Enc2Dec): early stopping keeps the checkpoint of lowest valid loss, and a pre-trained
# decoder's loss is lowest before the model reads its source. Enc2Dec on a quarter of the pairs measured 4.717 at
# step 500, then 4.75-4.89 up to step 2500, so early stopping would have kept a model that does not translate yet;
# a random decoder's loss falls as it learns to translate. Enc2Rnd has the best news BLEU of seed 0 (2.21).
DATASIZE_START = ("char", "Enc2Rnd", "random", 0)
DATA_FRACTIONS = (0.25, 0.5)
QUICK_DATASIZE_START = ("char", "Enc2Dec", "random", 0)  # a start of --quick's grid, which has no Enc2Rnd
QUICK_DATA_FRACTIONS = (0.5,)
SUBSET_SEED = 0
WEIGHT_DECAYS = ("0", "1e-4", "1e-3", "1e-2", "1e-1")
SWEEP_LRS = ("3e-4", "1e-3", "3e-3")
QUICK_SWEEP = (("0", "1e-3"),)


@dataclass
class Grid:
    """The jobs of the grid at a preset, or of its --quick smoke version; `only` (STAGE/NAME globs) selects some of
    them, `scale_overrides` replaces entries of the preset's scale (ko_en.py --only, --scale)."""
    preset: str
    quick: bool
    # A report can show the levels that have results only: the others are named once instead of as pending rows.
    shown_levels: tuple[str, ...] | None = field(default=None, kw_only=True)
    only: list[str] = field(default_factory=list, kw_only=True)
    scale_overrides: dict[str, int | float] = field(default_factory=dict, kw_only=True)

    @property
    def scale(self) -> dict:
        return {**(QUICK_SCALE if self.quick else SCALES[self.preset]), **self.scale_overrides}

    def wanted(self, job: str) -> bool:
        return not self.only or any(fnmatch.fnmatch(job, pattern) for pattern in self.only)

    @property
    def heldout_pairs(self) -> int:
        return QUICK_HELDOUT_PAIRS if self.quick else HELDOUT_PAIRS

    @property
    def data_fractions(self) -> tuple[float, ...]:
        return QUICK_DATA_FRACTIONS if self.quick else DATA_FRACTIONS

    @property
    def subset_splits(self) -> tuple[str, ...]:
        return tuple(map(subset_split, self.data_fractions))

    @property
    def datasize_start(self) -> tuple[str, str, str, int]:
        return QUICK_DATASIZE_START if self.quick else DATASIZE_START

    def datasize_name(self, fraction: float) -> str:
        """The datasize stage's run of its start on a fraction of the train pairs."""
        return f"{finetune_name(*self.datasize_start)}-{subset_split(fraction)}"

    @property
    def vocab_sizes(self) -> tuple[int, ...]:
        return QUICK_VOCAB_SIZES if self.quick else VOCAB_SIZES

    @property
    def levels(self) -> tuple[str, ...]:
        """The levels with a selected pre-training or translation job."""
        if self.shown_levels is not None:
            return self.shown_levels
        return tuple(level for level in (LEVELS[:1] if self.quick else LEVELS)
                     if any(self.wanted(f"pretrain/{level}-{arch}") for arch in ("encoder", "decoder"))
                     or self.level_finetune_jobs(level))

    @property
    def train_vocab(self) -> int:
        return self.vocab_sizes[0] if self.quick else TRAIN_VOCAB

    @property
    def plateau_names(self) -> tuple[str, ...]:
        return QUICK_PLATEAU if self.quick else tuple(PLATEAU)

    @property
    def sweep_cells(self) -> list[tuple[str, str]]:
        return list(QUICK_SWEEP) if self.quick else [(wd, lr) for lr in SWEEP_LRS for wd in WEIGHT_DECAYS]

    def finetune_jobs(self) -> list[tuple[str, str, str, int]]:
        """(level, start, cross-attention init, seed) of every selected translation run: level by level (a level's
        pre-training is done before the next level's starts)."""
        return [job for level in self.levels for job in self.level_finetune_jobs(level)]

    def level_finetune_jobs(self, level: str) -> list[tuple[str, str, str, int]]:
        """The selected translation runs of a level: the main comparison's first seed, the second seed of
        SEEDED_FIRST, the cross-attention inits, then the other starts' second seed."""
        seeds = MAIN_SEEDS[:1] if self.quick else MAIN_SEEDS
        starts = QUICK_STARTS if self.quick else tuple(STARTS)
        inits = () if self.quick else tuple(init for init in CROSS_ATTENTION_INITS if init != "random")
        jobs = [(level, start, "random", seeds[0]) for start in starts]
        later = [(level, start, "random", seed) for seed in seeds[1:] for start in starts]
        jobs += [job for job in later if job[1] in SEEDED_FIRST]
        jobs += [(level, "Enc2Dec", init, seeds[0]) for init in inits]
        jobs += [job for job in later if job[1] not in SEEDED_FIRST]
        return [job for job in jobs if self.wanted(f"finetune/{finetune_name(*job)}")]


def scale_override(text: str) -> tuple[str, int | float]:
    """(key, value) of a --scale KEY=VALUE: a key of SCALE_KEYS and a number > 0, whole but for the
    FRACTIONAL_SCALE_KEYS. A ValueError says what is wrong."""
    key, equals, value = text.partition("=")
    if not equals:
        raise ValueError(f"{text!r}: expected KEY=VALUE, e.g. pretrain=3000")
    if key not in SCALE_KEYS:
        raise ValueError(f"{key!r} is not a scale entry: expected one of {', '.join(SCALE_KEYS)}")
    kinds = (int, float) if key in FRACTIONAL_SCALE_KEYS else (int,)
    for kind in kinds:
        try:
            number = kind(value)
        except ValueError:
            continue
        if 0 < number < math.inf:
            return key, number
    raise ValueError(f"{key}={value!r}: expected a {'number' if float in kinds else 'whole number'} > 0")


def finetune_name(level: str, start: str, init: str, seed: int) -> str:
    return f"{level}-{start}-{init}-seed{seed}"


def subset_split(fraction: float) -> str:
    """The split of the first `fraction` of the train pairs in the datasize stage's draw, e.g. "train25"."""
    return f"train{round(fraction * 100)}"


def overrides(*settings: dict) -> list[str]:
    """--KEY VALUE options of the merged `settings`: a key of a later dict replaces an earlier one in place, as
    fastlm refuses a setting given twice (a plateau variant's max_steps, a recipe's batch_size)."""
    merged = {key: value for each in settings for key, value in each.items()}
    return [arg for key, value in merged.items() for arg in (f"--{key}", str(value))]


def test_name(name: str, test_set: str, beam: int) -> str:
    """The test result of translation run `name` on a test set at a beam width (the news test's kept the name it
    had before the held-out set was scored too, so its finished results stay valid)."""
    return f"{name}-beam{beam}" if test_set == "test" else f"{name}-{test_set}-beam{beam}"


def translation_path(out: Path, result_name: str) -> Path:
    """Where the translations of a test result are kept, one line per source sentence."""
    return out / "translations" / f"{result_name}.en"
