"""Constants and helpers shared by the fixture scripts in tools/ (run as
`python3 tools/<script>.py`, so this folder is on sys.path)."""
from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

# bitsandbytes' NF4 code table (../shared/docs/nf4.md), as checkpoints store it.
NF4_CODE = np.array([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0], dtype=np.float32)


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as source:
        for chunk in iter(lambda: source.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
