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
# A public clone has no ../shared: FASTLM_NO_SHARED_DATA=1 makes the tests run as they do there (CI runs both ways).
USE_SHARED_DATA = os.environ.get("FASTLM_NO_SHARED_DATA") != "1" and (SHARED_KO_EN / "train.ko").exists()
# The fallback: the package's own demo sample (378 distinct pairs), split like the shared corpus.
DEMO_SAMPLE = Path(__file__).resolve().parents[1] / "fastlm" / "demo_data"
FALLBACK_SPLITS = {"train": slice(0, 330), "valid": slice(330, 354), "test": slice(354, None)}
SHARED_CORPUS_MARK = "shared_corpus"


def pytest_collection_modifyitems(items):
    """Mark every test that reads the corpus (through `ko_en_dir`), so CI can rerun them without ../shared."""
    for item in items:
        if "ko_en_dir" in getattr(item, "fixturenames", ()):
            item.add_marker(SHARED_CORPUS_MARK)


@pytest.fixture(scope="session")
def ko_en_dir(tmp_path_factory) -> Path:
    """Directory with train/valid/test .ko/.en files: the shared corpus, or the demo sample split the same way."""
    if USE_SHARED_DATA:
        return SHARED_KO_EN
    root = tmp_path_factory.mktemp("ko-en")
    for lang in ("ko", "en"):
        lines = (DEMO_SAMPLE / f"sample.{lang}").read_text(encoding="utf-8").splitlines(keepends=True)
        for split, part in FALLBACK_SPLITS.items():
            (root / f"{split}.{lang}").write_text("".join(lines[part]), encoding="utf-8")
    return root
