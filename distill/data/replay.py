"""The continual-distillation replay buffer: sequences of earlier increments with their teacher outputs.

Rows of consumed TeacherBatches are offered in stream order; reservoir sampling keeps a bounded, uniform
sample (Algorithm R), optionally with a quota per increment so every increment keeps an equal share. Every
random decision draws from its own generator keyed by counters only (`[seed, increment, n]`), so the same
offers always give the same buffer, and a buffer saved and loaded mid-way continues exactly as the
uninterrupted one. Replay batches come from a frozen `snapshot` and are a pure function of the position.

Saved as one safetensors file (tensors `"{slot}.{field}"`, state as JSON metadata), written atomically.
"""

from __future__ import annotations

import copy
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load_file, save_file

from distill.errors import CheckpointError, ConfigError
from distill.teacher.batch import BatchId, TeacherBatch

SCHEMA_VERSION = 1
_ROW_FIELDS = (
    "input_ids",
    "attention_mask",
    "loss_mask",
    "topk_ids",
    "topk_logits",
    "log_normalizer",
    "hidden",
)
_PAD_FIELD = "input_ids"
_REPLAY_TAG = 7  # separates the replay-batch generators from the reservoir's


@dataclass
class _Sample:
    increment: int
    arrays: dict[str, np.ndarray]
    """Per-row arrays trimmed to the row's real length t: [t], [t, k], [t, L, H]; attention [L, t, t]."""


def _trim(batch: TeacherBatch, row: int) -> dict[str, np.ndarray]:
    t = int(batch.attention_mask[row].sum())  # right padding: the real tokens come first
    out = {}
    for name in _ROW_FIELDS:
        a = getattr(batch, name)
        if a is not None:
            out[name] = np.array(a[row, :t])
    if batch.attention is not None:
        out["attention"] = np.array(batch.attention[row, :, :t, :t])
    return out


class ReplaySnapshot:
    """A frozen view of the buffer: what one increment replays from."""

    def __init__(self, samples: list[_Sample], seed: int, float_dtypes: dict[str, str]) -> None:
        self._samples, self.seed, self.float_dtypes = samples, seed, float_dtypes

    def __len__(self) -> int:
        return len(self._samples)

    def counts(self) -> dict[int, int]:
        out: dict[int, int] = {}
        for s in self._samples:
            out[s.increment] = out.get(s.increment, 0) + 1
        return dict(sorted(out.items()))

    def batch(self, batch_id: BatchId, position: int, batch_size: int, *, pad_id: int) -> TeacherBatch:
        """`batch_size` samples chosen by `position` (without replacement when there are enough), right-padded
        to the longest: input_ids with pad_id, masks False, everything else 0."""
        n = len(self._samples)
        if n == 0:
            raise ValueError(
                "the replay snapshot is empty: replay needs at least one earlier increment's samples "
                "(increment 0 has nothing to replay; check continual.replay.capacity)"
            )
        rng = np.random.default_rng([self.seed, _REPLAY_TAG, position])
        picked = [self._samples[i] for i in rng.choice(n, size=batch_size, replace=n < batch_size)]
        width = max(len(s.arrays["input_ids"]) for s in picked)
        fields: dict[str, np.ndarray] = {}
        for name, first in picked[0].arrays.items():
            if name == "attention":
                shape = (len(picked), first.shape[0], width, width)
            else:
                shape = (len(picked), width, *first.shape[1:])
            fill = pad_id if name == _PAD_FIELD else 0
            out = np.full(shape, fill, dtype=first.dtype)
            for i, s in enumerate(picked):
                a, t = s.arrays[name], len(s.arrays["input_ids"])
                if name == "attention":
                    out[i, :, :t, :t] = a
                else:
                    out[i, :t] = a
            fields[name] = out
        return TeacherBatch(batch_id=tuple(batch_id), float_dtypes=dict(self.float_dtypes), **fields)


class ReplayBuffer:
    """Bounded reservoir of sequences with their teacher outputs (see the module docstring).

    capacity: sequences kept (0: disabled). quota: > 0 keeps at most min(quota, capacity) per increment, each
    increment its own reservoir; when the buffer is full, a newer increment below its quota evicts a random
    sample of the increment holding the most (ties: the oldest).
    """

    def __init__(self, capacity: int, *, seed: int, quota: int = 0) -> None:
        if capacity < 0:
            raise ConfigError(f"continual.replay.capacity={capacity} is negative; use 0 (no replay) or more.")
        if quota < 0:
            raise ConfigError(f"continual.replay.quota={quota} is negative; use 0 (no quota) or more.")
        self.capacity, self.seed, self.quota = capacity, seed, quota
        self._samples: list[_Sample] = []
        self._offered: dict[int, int] = {}
        self._total = 0
        self.float_dtypes: dict[str, str] = {}

    def __len__(self) -> int:
        return len(self._samples)

    def counts(self) -> dict[int, int]:
        return ReplaySnapshot(self._samples, self.seed, self.float_dtypes).counts()

    def offered(self) -> dict[int, int]:
        return dict(self._offered)

    def snapshot(self) -> ReplaySnapshot:
        return ReplaySnapshot(copy.deepcopy(self._samples), self.seed, dict(self.float_dtypes))

    # ---- offers ----------------------------------------------------------------------------------------------
    def offer(self, batch: TeacherBatch, increment: int) -> int:
        """Offer every row of `batch` (in row order) as a sample of `increment`; returns how many were kept."""
        if self._offered and increment < max(self._offered):
            raise ValueError(
                f"increment {increment} offered after increment {max(self._offered)}: increments come in order"
            )
        self.float_dtypes.update(batch.float_dtypes)
        kept = 0
        for row in range(batch.input_ids.shape[0]):
            self._total += 1
            n_inc = self._offered[increment] = self._offered.get(increment, 0) + 1
            slot = self._place(increment, n_inc)
            if slot is None:
                continue
            sample = _Sample(increment, _trim(batch, row))
            if slot == len(self._samples):
                self._samples.append(sample)
            else:
                self._samples[slot] = sample
            kept += 1
        return kept

    def _place(self, increment: int, n_inc: int) -> int | None:
        """The slot the new sample goes to (len = append), or None to drop it."""
        if self.capacity == 0:
            return None
        if not self.quota:  # Algorithm R over everything offered
            if len(self._samples) < self.capacity:
                return len(self._samples)
            j = int(np.random.default_rng([self.seed, increment, self._total]).integers(0, self._total))
            return j if j < self.capacity else None
        q = min(self.quota, self.capacity)
        mine = [i for i, s in enumerate(self._samples) if s.increment == increment]
        rng = np.random.default_rng([self.seed, increment, n_inc])
        if len(mine) < q:
            if len(self._samples) < self.capacity:
                return len(self._samples)
            held = self.counts()
            largest = max(held, key=lambda inc: (held[inc], -inc))
            victims = [i for i, s in enumerate(self._samples) if s.increment == largest]
            return victims[int(rng.integers(0, len(victims)))]
        j = int(rng.integers(0, n_inc))  # Algorithm R within the increment's own q slots
        return mine[j] if j < q else None

    # ---- files -----------------------------------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        """One safetensors file, written to a temporary name and renamed into place."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {
            f"{slot}.{name}": np.ascontiguousarray(a)
            for slot, s in enumerate(self._samples)
            for name, a in s.arrays.items()
        }
        state = {
            "schema": SCHEMA_VERSION,
            "capacity": self.capacity,
            "quota": self.quota,
            "seed": self.seed,
            "total": self._total,
            "offered": {str(k): v for k, v in self._offered.items()},
            "increments": [s.increment for s in self._samples],
            "float_dtypes": self.float_dtypes,
        }
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.close(fd)
        try:
            save_file(tensors, tmp, metadata={"distill_replay": json.dumps(state)})
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        return path

    @classmethod
    def load(cls, path: str | Path, *, capacity: int, seed: int, quota: int = 0) -> ReplayBuffer:
        """The buffer saved at `path`; CheckpointError if it is missing, damaged or saved with other settings."""
        path = Path(path)
        try:
            from safetensors import safe_open

            with safe_open(str(path), framework="numpy") as f:
                state = json.loads((f.metadata() or {})["distill_replay"])
            tensors = load_file(str(path))
        except (OSError, SafetensorError, KeyError, ValueError) as err:
            raise CheckpointError(f"replay buffer {path} is missing or damaged ({err!r})") from err
        for name, want in (("capacity", capacity), ("seed", seed), ("quota", quota)):
            if state[name] != want:
                raise CheckpointError(
                    f"replay buffer {path} was saved with {name}={state[name]}, but this run has {name}={want}; "
                    "resume with the same continual.replay settings and train.seed."
                )
        buf = cls(capacity, seed=seed, quota=quota)
        buf._total, buf.float_dtypes = state["total"], state["float_dtypes"]
        buf._offered = {int(k): v for k, v in state["offered"].items()}
        for slot, increment in enumerate(state["increments"]):
            prefix = f"{slot}."
            arrays = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
            buf._samples.append(_Sample(increment, arrays))
        return buf
