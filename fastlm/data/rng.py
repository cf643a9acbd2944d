"""Random streams derived from integer keys such as (seed, epoch, index).

Batch sources draw every random choice from a stream keyed by where it is used, never from a global or stateful
generator: a batch is then a pure function of (seed, epoch, index), so a resumed run, another DDP rank or a
re-run of one batch sees exactly the same draws.
"""

from __future__ import annotations

import hashlib
import numbers
import struct

import numpy as np
import torch


def derive_seed(*keys: int) -> int:
    """A 63-bit seed from integer keys; hashing (rather than e.g. seed + epoch) keeps (1, 2) and (2, 1) unrelated."""
    # numpy integers are welcome (an index read from an array); floats and bools are a caller's mistake.
    if any(isinstance(key, bool) or not isinstance(key, numbers.Integral) for key in keys):
        raise ValueError(f"random stream keys {keys!r}: expected integers (such as seed, epoch, batch index)")
    packed = struct.pack(f"<{len(keys)}q", *keys)
    digest = hashlib.blake2b(packed, digest_size=8).digest()
    # 63 bits: torch.Generator.manual_seed and numpy both take it without sign questions.
    return int.from_bytes(digest, "little") >> 1


def torch_generator(*keys: int) -> torch.Generator:
    """A CPU torch.Generator seeded from the keys."""
    generator = torch.Generator()
    generator.manual_seed(derive_seed(*keys))
    return generator


def numpy_generator(*keys: int) -> np.random.Generator:
    """A numpy Generator seeded from the keys."""
    return np.random.default_rng(derive_seed(*keys))
