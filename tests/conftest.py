"""Test-wide setup: Triton's CPU interpreter where no GPU exists, and hypothesis profiles."""

import os

import torch

# Must happen before anything imports triton: without a GPU, Triton kernels run only in interpreter mode.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

# "ci" keeps the whole suite well inside CI's budget on 2 cores; "dev" digs deeper when asked for.
settings.register_profile(
    "ci", max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True
)
settings.register_profile("dev", max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

SHARED_KO_EN = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "ko-en"

# Written here for the fallback only (no corpus text copied): used when ../shared/data/ko-en is absent.
_FALLBACK_PAIRS = [
    ("나는 학교에 갑니다.", "I go to school."),
    ("오늘 날씨가 좋네요.", "The weather is nice today."),
    ("이 책은 정말 재미있어요.", "This book is really interesting."),
    ("우리는 내일 서울에서 만날 거예요.", "We will meet in Seoul tomorrow."),
    ("그는 매일 아침 커피를 마신다.", "He drinks coffee every morning."),
    ("고양이가 창문 옆에서 자고 있다.", "The cat is sleeping by the window."),
    ("저녁으로 비빔밥을 먹었어요.", "I had bibimbap for dinner."),
    ("기차가 10분 늦게 도착했다.", "The train arrived 10 minutes late."),
]


@pytest.fixture(scope="session")
def ko_en_dir(tmp_path_factory) -> Path:
    """Directory with train/valid/test .ko/.en files: the shared corpus, or a small fixture made here."""
    if (SHARED_KO_EN / "train.ko").exists():
        return SHARED_KO_EN
    root = tmp_path_factory.mktemp("ko-en")
    for split, repeat in (("train", 40), ("valid", 4), ("test", 4)):
        pairs = _FALLBACK_PAIRS * repeat
        (root / f"{split}.ko").write_text("".join(ko + "\n" for ko, _ in pairs), encoding="utf-8")
        (root / f"{split}.en").write_text("".join(en + "\n" for _, en in pairs), encoding="utf-8")
    return root
