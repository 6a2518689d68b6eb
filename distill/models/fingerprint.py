"""Cheap, stable identities of a model folder, so caches and checkpoints can refuse a different teacher.

Hashing every byte of a 700 GB checkpoint would take longer than the job; the architecture (config.json), the
weight files' names and sizes and each file's safetensors header (tensor names, shapes, dtypes, offsets)
plus its first MiB of data identify a checkpoint in practice.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from distill.errors import CheckpointError

_HEAD_BYTES = 2**20


def model_fingerprint(path: str | Path) -> str:
    folder = Path(path)
    config = folder / "config.json"
    if not config.is_file():
        raise CheckpointError(f"{folder} has no config.json; cannot fingerprint it as a model folder.")
    h = hashlib.sha256(config.read_bytes())
    for weights in sorted(folder.glob("*.safetensors")):
        h.update(weights.name.encode())
        h.update(str(weights.stat().st_size).encode())
        with weights.open("rb") as f:
            h.update(f.read(_HEAD_BYTES))
    return h.hexdigest()[:16]
