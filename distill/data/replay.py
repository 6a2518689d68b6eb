"""The continual-distillation replay buffer: sequences of earlier increments with their teacher outputs.

Rows of consumed TeacherBatches are offered in stream order; reservoir sampling keeps a bounded, uniform
sample (Algorithm R), optionally with a quota per increment so every increment keeps an equal share. Every
random decision draws from its own generator keyed by counters only (`[seed, increment, n]`), so the same
offers always give the same buffer, and a buffer saved and loaded mid-way continues exactly as the
uninterrupted one. Replay batches come from a frozen `snapshot` and are a pure function of the position.

Stored samples are immutable (read-only arrays, replaced whole), so snapshots and deep copies share them:
freezing the buffer at every increment costs the slot lists, not a second copy of the sequences.

Saved as one safetensors file (tensors `"{slot}.{field}"`, state as JSON metadata), written atomically.
"""

from __future__ import annotations

import bisect
import copy
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load as safetensors_load
from safetensors.numpy import save_file

from distill.batch import BatchId, TeacherBatch
from distill.errors import CheckpointError, ConfigError

SCHEMA_VERSION = 1
_META_KEY = "distill_replay"
# Fields indexed [B, T, ...]; `attention` is [B, L, T, T] and trimmed on its last two axes.
_ROW_FIELDS = (
    "input_ids",
    "attention_mask",
    "loss_mask",
    "topk_ids",
    "topk_logits",
    "log_normalizer",
    "hidden",
    "position_ids",  # packed rows: a replayed row keeps its per-document attention
)
# Keys the replay-batch generators apart from the reservoir's `[seed, increment, n]`: no increment gets here.
_REPLAY_TAG = 2**32 - 1


@dataclass(frozen=True)
class _Sample:
    """One stored row, trimmed to its real length t: [t], [t, k], hidden [t, L, H], attention [L, t, t]."""

    increment: int
    arrays: dict[str, np.ndarray]

    @property
    def length(self) -> int:
        return len(self.arrays["input_ids"])


def _readonly(a: np.ndarray) -> np.ndarray:
    a.flags.writeable = False
    return a


def _trim(batch: TeacherBatch, row: int, t: int) -> dict[str, np.ndarray]:
    out = {}
    for name in _ROW_FIELDS:
        a = getattr(batch, name)
        if a is not None:
            out[name] = _readonly(np.array(a[row, :t]))
    if batch.attention is not None:
        out["attention"] = _readonly(np.array(batch.attention[row, :, :t, :t]))
    return out


def _layout(arrays: dict[str, np.ndarray], float_dtypes: dict[str, str]) -> dict[str, tuple]:
    """What every stored sample must share to be padded into one batch: field -> (dtype, tag, per-token dims).

    `arrays` are one sample's (trimmed) arrays; the token axes are left out, so rows of any length compare equal.
    """
    out = {}
    for name, a in arrays.items():
        dims = a.shape[:1] if name == "attention" else a.shape[1:]
        out[name] = (a.dtype.str, float_dtypes.get(name, a.dtype.name), tuple(dims))
    return out


def _right_padded_lengths(batch: TeacherBatch) -> np.ndarray:
    """Real length of each row [B]; ValueError if a row's real tokens are not a prefix (left padding)."""
    mask = np.asarray(batch.attention_mask, dtype=bool)
    lengths = mask.sum(axis=1)
    if not np.array_equal(mask, np.arange(mask.shape[1]) < lengths[:, None]):
        raise ValueError(
            f"batch {batch.batch_id} is not right-padded (some attention_mask row has a gap or leading padding); "
            f"the replay buffer trims each row to its first attention_mask.sum() tokens."
        )
    return lengths


class ReplaySnapshot:
    """A frozen view of the buffer: what one increment replays from."""

    def __init__(self, samples: list[_Sample], seed: int, float_dtypes: dict[str, str]) -> None:
        self._samples, self.seed, self.float_dtypes = samples, seed, float_dtypes

    def __len__(self) -> int:
        return len(self._samples)

    def counts(self) -> dict[int, int]:
        """Samples held per increment, by increment."""
        out: dict[int, int] = {}
        for s in self._samples:
            out[s.increment] = out.get(s.increment, 0) + 1
        return dict(sorted(out.items()))

    def batch(self, batch_id: BatchId, position: int, batch_size: int, *, pad_id: int) -> TeacherBatch:
        """The replay batch of stream `position`: `batch_size` samples (without replacement when there are
        enough), right-padded to the longest T: input_ids with pad_id, masks False, everything else 0 (position_ids
        0 too: each padding token is then a segment of its own, which no real token attends to).

        Returns a TeacherBatch [batch_size, T, ...] with the offered batches' fields, dtypes and float_dtypes.
        """
        n = len(self._samples)
        if n == 0:
            raise ValueError(
                "the replay snapshot is empty: replay needs at least one earlier increment's samples "
                "(increment 0 has nothing to replay; check continual.replay.capacity)"
            )
        if batch_size < 1:
            raise ValueError(f"a replay batch needs batch_size >= 1; got {batch_size}")
        rng = np.random.default_rng([self.seed, _REPLAY_TAG, position])
        picked = [self._samples[i] for i in rng.choice(n, size=batch_size, replace=n < batch_size)]
        width = max(s.length for s in picked)
        fields: dict[str, np.ndarray] = {}
        for name, first in picked[0].arrays.items():
            if name == "attention":
                out = np.zeros((batch_size, first.shape[0], width, width), dtype=first.dtype)
            else:
                fill = pad_id if name == "input_ids" else 0  # 0 is also False for the masks
                out = np.full((batch_size, width, *first.shape[1:]), fill, dtype=first.dtype)
            for i, s in enumerate(picked):
                t = s.length
                if name == "attention":
                    out[i, :, :t, :t] = s.arrays[name]
                else:
                    out[i, :t] = s.arrays[name]
            fields[name] = out
        return TeacherBatch(batch_id=tuple(batch_id), float_dtypes=dict(self.float_dtypes), **fields)


class ReplayBuffer:
    """Bounded reservoir of sequences with their teacher outputs (see the module docstring).

    capacity  sequences kept (`continual.replay.capacity`; 0 disables the buffer: offers keep nothing)
    seed      keys every random decision (the run's seed)
    quota     0: Algorithm R over everything offered, so an increment's share follows its share of the offers.
              > 0: each increment keeps its own reservoir of at most min(quota, capacity); when the buffer is
              full, a newer increment below its quota evicts a random sample of the increment holding the most
              (ties: the oldest); once it holds the most itself, it samples within its share instead.
              quota = capacity // increments gives every increment an equal share.
    """

    def __init__(self, capacity: int, *, seed: int, quota: int = 0) -> None:
        if capacity < 0:
            raise ConfigError(f"continual.replay.capacity={capacity} is negative; use 0 (no replay) or more.")
        if quota < 0:
            raise ConfigError(f"continual.replay.quota={quota} is negative; use 0 (no quota) or more.")
        self.capacity, self.seed, self.quota = capacity, seed, quota
        self._samples: list[_Sample] = []
        self._slots: dict[int, list[int]] = {}  # increment -> its slots, ascending (the eviction order)
        self._offered: dict[int, int] = {}
        self._total = 0  # samples offered over all increments: Algorithm R's n
        self.float_dtypes: dict[str, str] = {}
        self._layout: dict[str, tuple] | None = None  # fixed by the first stored sample

    def __len__(self) -> int:
        return len(self._samples)

    def counts(self) -> dict[int, int]:
        """Samples held per increment, by increment."""
        return {inc: len(slots) for inc, slots in sorted(self._slots.items())}

    def offered(self) -> dict[int, int]:
        """Samples offered per increment so far (stored or not)."""
        return dict(self._offered)

    def snapshot(self) -> ReplaySnapshot:
        """A frozen view: later offers replace slots of the live list, never a stored sample's arrays."""
        return ReplaySnapshot(list(self._samples), self.seed, dict(self.float_dtypes))

    def __deepcopy__(self, memo: dict[int, Any]) -> ReplayBuffer:
        # Samples are immutable, so a copy shares them (the continual run freezes a copy every increment).
        new = copy.copy(self)
        new._samples = list(self._samples)
        new._slots = {inc: list(slots) for inc, slots in self._slots.items()}
        new._offered, new.float_dtypes = dict(self._offered), dict(self.float_dtypes)
        return new

    # ---- offers ----------------------------------------------------------------------------------------------
    def offer(self, batch: TeacherBatch, increment: int) -> int:
        """Offer every row of `batch` (in row order) as a sample of `increment`; returns how many were kept.

        Rows are right-padded; each is stored trimmed to its attention_mask.sum() real tokens.
        """
        last = max(self._offered, default=0)
        if increment < last:
            raise ValueError(
                f"increment {increment} offered after increment {last}: increments come in order"
            )
        lengths = _right_padded_lengths(batch)
        if not len(lengths):
            return 0
        # Checked before any counter moves, so a rejected batch leaves the buffer as it was. A zero-length
        # trim of row 0 has the batch's fields and per-token dims, which is all a layout compares.
        layout = _layout(_trim(batch, 0, 0), batch.float_dtypes)
        if self._layout is not None and layout != self._layout:
            raise ConfigError(
                f"batch {batch.batch_id} carries teacher outputs {layout}, but the replay buffer holds "
                f"{self._layout}; every offered batch needs the same fields, dtypes, k and feature layers."
            )
        kept = 0
        for row, t in enumerate(lengths.tolist()):
            self._total += 1
            n_inc = self._offered[increment] = self._offered.get(increment, 0) + 1
            slot = self._place(increment, n_inc)
            if slot is not None:
                self._store(slot, _Sample(increment, _trim(batch, row, t)))
                kept += 1
        if kept and self._layout is None:
            self._layout, self.float_dtypes = layout, dict(batch.float_dtypes)
        return kept

    def _place(self, increment: int, n_inc: int) -> int | None:
        """The slot the new sample goes to (len(self) = append), or None to drop it."""
        if self.capacity == 0:
            return None
        full = len(self._samples) >= self.capacity
        if not self.quota:  # Algorithm R over everything offered
            if not full:
                return len(self._samples)
            j = int(np.random.default_rng([self.seed, increment, self._total]).integers(0, self._total))
            return j if j < self.capacity else None
        mine = self._slots.get(increment, [])
        rng = np.random.default_rng([self.seed, increment, n_inc])
        if len(mine) < min(self.quota, self.capacity):
            if not full:
                return len(self._samples)
            largest = max(self._slots, key=lambda inc: (len(self._slots[inc]), -inc))
            if largest != increment:
                victims = self._slots[largest]
                return victims[int(rng.integers(0, len(victims)))]
            # This increment already holds the most: growing further would only take from smaller shares, and
            # evicting its own samples unconditionally would favour its latest ones. Its share is set: fall
            # through to Algorithm R on the slots it has, which keeps them a uniform sample of its offers.
        j = int(rng.integers(0, n_inc))  # Algorithm R within the increment's own slots
        return mine[j] if j < len(mine) else None

    def _store(self, slot: int, sample: _Sample) -> None:
        """Put `sample` in `slot` (len(self) = append), keeping each increment's slot list ascending."""
        if slot == len(self._samples):
            self._samples.append(sample)
            self._slots.setdefault(sample.increment, []).append(slot)  # the highest slot yet
            return
        old = self._samples[slot].increment
        self._samples[slot] = sample
        if old != sample.increment:
            slots = self._slots[old]
            del slots[bisect.bisect_left(slots, slot)]
            if not slots:
                del self._slots[old]
            bisect.insort(self._slots.setdefault(sample.increment, []), slot)

    # ---- files -----------------------------------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        """One safetensors file, written to a temporary name and renamed into place (never half a file)."""
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
            # One metadata key: safetensors writes the metadata map in hash order, several keys would make the
            # same buffer give different bytes.
            save_file(tensors, tmp, metadata={_META_KEY: json.dumps(state, sort_keys=True)})
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        return path

    @classmethod
    def load(cls, path: str | Path, *, capacity: int, seed: int, quota: int = 0) -> ReplayBuffer:
        """The buffer saved at `path`; CheckpointError if it is missing, damaged or saved with other settings."""
        path = Path(path)
        state, tensors = _read(path)
        for name, want in (("capacity", capacity), ("seed", seed), ("quota", quota)):
            if state[name] != want:
                raise CheckpointError(
                    f"replay buffer {path} was saved with {name}={state[name]}, but this run has {name}={want}; "
                    "resume with the same continual.replay settings and train.seed."
                )
        buf = cls(capacity, seed=seed, quota=quota)
        try:
            buf._total, buf.float_dtypes = int(state["total"]), dict(state["float_dtypes"])
            buf._offered = {int(k): int(v) for k, v in state["offered"].items()}
            grouped: dict[int, dict[str, np.ndarray]] = {}
            for key, a in tensors.items():
                slot, name = key.split(".", 1)
                grouped.setdefault(int(slot), {})[name] = _readonly(a)
            if sorted(grouped) != list(range(len(state["increments"]))):
                raise ValueError(
                    f"tensors for slots {sorted(grouped)}, {len(state['increments'])} slots listed"
                )
            for slot, increment in enumerate(state["increments"]):
                buf._samples.append(_Sample(int(increment), grouped[slot]))
                buf._slots.setdefault(int(increment), []).append(slot)
            if buf._samples:
                buf._layout = _layout(buf._samples[0].arrays, buf.float_dtypes)
        except (KeyError, TypeError, ValueError, AttributeError) as err:
            raise CheckpointError(
                f"replay buffer {path} is damaged: {err!r}; delete it or resume from another checkpoint."
            ) from err
        return buf


def _read(path: Path) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """The JSON state and the tensors of a saved buffer, from one read of the file."""
    try:
        data = path.read_bytes()
    except OSError as err:
        raise CheckpointError(
            f"replay buffer {path} is missing or unreadable ({err}); resume from a checkpoint "
            f"that holds it, or start the run over."
        ) from err
    try:
        tensors = safetensors_load(data)
        header_len = int.from_bytes(data[:8], "little")
        state = json.loads(json.loads(data[8 : 8 + header_len])["__metadata__"][_META_KEY])
        if not isinstance(state, dict) or state.get("schema") != SCHEMA_VERSION:
            raise ValueError(
                f"schema {state.get('schema') if isinstance(state, dict) else state!r}, "
                f"this code reads {SCHEMA_VERSION}"
            )
        for key in ("capacity", "seed", "quota", "total", "offered", "increments", "float_dtypes"):
            if key not in state:
                raise ValueError(f"no {key!r} in the saved state")
    except (SafetensorError, KeyError, TypeError, ValueError) as err:
        raise CheckpointError(
            f"replay buffer {path} is damaged ({err!r}); delete it or resume from another checkpoint."
        ) from err
    return state, tensors
