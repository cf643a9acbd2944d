"""The declared dependency floors cover the APIs the code uses."""

import re
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")  # Python 3.11+; the floor is the same on 3.10

ROOT = Path(__file__).resolve().parents[1]

# The first torch release that has each API the package calls (by the name that appears in the source).
TORCH_API_SINCE = {
    "torch.library.custom_op": (2, 4),
    "register_fake": (2, 4),
    "get_autocast_dtype": (2, 4),
    "enable_gqa": (2, 5),
    "fully_shard": (2, 6),
}


def declared_torch_floor() -> tuple[int, ...]:
    dependencies = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]["dependencies"]
    (torch_requirement,) = [d for d in dependencies if re.match(r"torch\b", d)]
    floor = re.search(r">=\s*([\d.]+)", torch_requirement)
    assert floor, f"pyproject.toml: {torch_requirement!r} declares no torch floor"
    return tuple(int(part) for part in floor.group(1).split("."))


def test_torch_floor_covers_every_api_the_package_uses():
    source = "\n".join(path.read_text(encoding="utf-8") for path in (ROOT / "fastlm").rglob("*.py"))
    used = {api: since for api, since in TORCH_API_SINCE.items() if api in source}
    assert "enable_gqa" in used and "fully_shard" in used  # the table is about this code, not hypothetical
    needed = max(used.values())
    assert declared_torch_floor() >= needed, f"torch>={'.'.join(map(str, needed))} needed by {used}"
