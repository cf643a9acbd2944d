"""File permissions shared by every writer: a file fastlm writes gets the mode a plain `open()` would give it.

`tempfile.mkstemp` (behind atomic writes) and safetensors create files owner-only (0o600) whatever the umask, which
hides models and tokenizers from the other users of a shared machine; `respect_umask` gives them 0o666 less the umask.
"""

from __future__ import annotations

import os


def current_umask() -> int:
    # /proc gives it without changing it; os.umask can only read it by setting it, a brief race with other threads.
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def respect_umask(file: int | str | os.PathLike) -> None:
    """Set the mode of `file` (an open descriptor or a path) to 0o666 less the process's umask."""
    mode = 0o666 & ~current_umask()
    if isinstance(file, int):
        os.fchmod(file, mode)
    else:
        os.chmod(file, mode)
