"""The evidence for TrainConfig's weight-decay default: a short tiny-preset sweep of weight decay x peak lr for
the masked-LM encoder (Korean side) and the causal decoder (English side) of the ko-en corpus, through the same
`pretrain` the command line runs. Reports the validation loss after the run (lower is better).

    python benchmarks/weight_decay_sweep.py --corpus ../shared/data/ko-en --steps 400
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import Measurement, Row, base_parser, report  # noqa: E402

from fastlm.data.prepare import prepare_corpus  # noqa: E402
from fastlm.tokenizer import Tokenizer  # noqa: E402
from fastlm.train.config import TrainConfig  # noqa: E402
from fastlm.train.tasks import pretrain  # noqa: E402

WEIGHT_DECAYS = (0.0, 0.01, 0.1)
LEARNING_RATES = (1e-3, 3e-3)
TOKENIZER_LINES = 20000  # per language: enough for a 4k vocabulary, seconds to train


def head_lines(path: Path, count: int) -> list[str]:
    with open(path, encoding="utf-8") as f:
        return [line for _, line in zip(range(count), f)]


def main() -> None:
    parser = base_parser(__doc__.split("\n\n")[0])
    parser.add_argument("--corpus", type=Path, default=Path(__file__).resolve().parents[2] / "shared/data/ko-en")
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--vocab-size", type=int, default=4000)
    args = parser.parse_args()
    torch.set_num_threads(1)  # a shared CPU box: one core, and stable step times across runs
    steps = 60 if args.quick else args.steps
    with tempfile.TemporaryDirectory(prefix="wd-sweep-") as tmp:
        root = Path(tmp)
        sample = root / "tokenizer-sample.txt"
        sample.write_text("".join(head_lines(args.corpus / "train.ko", TOKENIZER_LINES)
                                  + head_lines(args.corpus / "train.en", TOKENIZER_LINES)), encoding="utf-8")
        tokenizer = Tokenizer.train(sample, vocab_size=args.vocab_size)
        tokenizer.save(root / "tok.json")
        for split in ("train", "valid"):
            for lang in ("ko", "en"):
                prepare_corpus(args.corpus / f"{split}.{lang}", tokenizer, root / f"{split}.{lang}", progress=False)
        rows = []
        for arch, lang in (("encoder", "ko"), ("decoder", "en")):
            for lr in LEARNING_RATES:
                row = Row(f"{arch} ({lang}), lr {lr:g}, {steps} steps", "valid loss", higher_is_better=False)
                for weight_decay in WEIGHT_DECAYS:
                    config = TrainConfig.preset("tiny", max_steps=steps, warmup_steps=steps // 10, lr=lr,
                                                weight_decay=weight_decay, eval_interval=0, eval_batches=20,
                                                checkpoint_interval=steps, progress=False)
                    run = root / f"{arch}-{lr:g}-{weight_decay:g}"
                    result = pretrain(arch, root / "tok.json", root / f"train.{lang}", root / f"valid.{lang}", run,
                                      config)
                    row.results.append(Measurement(f"wd={weight_decay:g}", result.metrics["loss"]))
                    print(f"{row.case} wd={weight_decay:g}: {result.metrics}", flush=True)
                rows.append(row)
    report("Weight decay x lr sweep (tiny preset, ko-en corpus)", rows, json_path=args.json,
           notes=f"Tokenizer: byte level, vocab {args.vocab_size}; batch 16 x max_len 64; cosine schedule, 10% "
                 "warmup; validation loss on 20 batches of the valid split.")


if __name__ == "__main__":
    main()
