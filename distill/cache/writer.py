"""CacheWriter: TeacherBatches in batch-id order -> safetensors shards + manifest.json, resumable after a kill.

Crash safety comes from ordering: a shard is written under a temp name and renamed into place, and only then
is the manifest (itself written atomically) updated to list it. The manifest is the truth: a writer killed at
any point leaves listed shards that are complete, plus at most one unlisted shard or temp file, which the next
writer removes. Batches buffered for an unfinished shard are lost and recomputed; at most `shard_batches - 1`.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np
from safetensors.numpy import save as safetensors_bytes

from distill.batch import BatchId, TeacherBatch
from distill.cache import manifest as mf
from distill.cache.encoding import PLAIN_LOGITS, Encoding, encode
from distill.errors import CheckpointError, ConfigError
from distill.io import atomic_write_bytes, atomic_write_json


def shard_bytes(batches: list[tuple[BatchId, dict[str, np.ndarray]]]) -> bytes:
    """One shard as safetensors bytes: tensors `<j>/<field>` for the j-th batch, plus `batch_ids` [n, 2] int64."""
    tensors = {
        f"{j}/{name}": array for j, (_, arrays) in enumerate(batches) for name, array in arrays.items()
    }
    tensors["batch_ids"] = np.array([batch_id for batch_id, _ in batches], dtype=np.int64).reshape(-1, 2)
    # One metadata key only: safetensors serialises the metadata map in hash order, so with several keys
    # the same batches would give different bytes (and sha256) from run to run.
    return safetensors_bytes(tensors, metadata={"format": f"{mf.FORMAT}/v{mf.SCHEMA_VERSION}"})


class CacheWriter:
    """Writes TeacherBatches, in increasing batch-id order, into a cache folder.

    root           the cache folder (created if missing)
    manifest_meta  the cache's identity: teacher_hash, tokenizer_hash, k, vocab_size, ids_encoding (e.g.
                   "packed17"), logits_encoding (e.g. "gap7"), plus any other JSON values (a dataset hash,
                   the sequence length, ...). Every key is compared when resuming.
    shard_batches  batches per shard: the unit of atomic write, of loss on a kill, and of reader memory
    overwrite      delete this cache's files in `root` and start over instead of resuming

    Resuming: opening a folder whose manifest has the same meta continues it; `done_batches()` lists what is
    already stored so the caller skips those batches without recomputing them. Use as a context manager, or
    call `close()` at the end (which marks the cache complete).
    """

    def __init__(
        self, root: str | Path, *, manifest_meta: dict[str, Any], shard_batches: int, overwrite: bool = False
    ) -> None:
        if shard_batches < 1:
            raise ConfigError(f"shard_batches must be >= 1; got {shard_batches}.")
        self.root = Path(root)
        self.shard_batches = shard_batches
        self.meta = mf.normalise_meta(manifest_meta)
        self.encoding = Encoding(self.meta["ids_encoding"], self.meta["logits_encoding"])
        self.encoding.check_vocab(int(self.meta["vocab_size"]))
        self.root.mkdir(parents=True, exist_ok=True)
        if overwrite:
            self._remove_cache_files()
        existing = mf.read_manifest(self.root)
        mf.remove_stray_files(self.root, existing)
        if existing is None:
            self._manifest = mf.new_manifest(self.meta, self.encoding.describe())
            self._save_manifest()  # the identity is on disk before any shard, so a resume can check it
        else:
            self._check_resumable(existing)
            mf.check_encoding(self.root, existing, self.encoding.describe())
            self._manifest = existing
        self._buffer: list[tuple[BatchId, dict[str, np.ndarray], int]] = []
        done = mf.manifest_batch_ids(self._manifest)
        self._last_id: BatchId | None = done[-1] if done else None

    # ----------------------------------------------------------------------------------------- resume state

    def done_batches(self) -> list[BatchId]:
        """Batch ids already stored in complete shards, in order (buffered batches are not done yet)."""
        return mf.manifest_batch_ids(self._manifest)

    @property
    def next_batch_index(self) -> int:
        """How many batches are stored: the position in the caller's ordered batch stream to resume from."""
        return int(self._manifest["num_batches"])

    # ------------------------------------------------------------------------------------------------ write

    def write(self, batch: TeacherBatch) -> None:
        """Encode `batch` and buffer it; a full buffer becomes the next shard."""
        batch_id = (int(batch.batch_id[0]), int(batch.batch_id[1]))
        self._check_batch(batch, batch_id)
        arrays = encode(batch, self.encoding.ids, self.encoding.logits)
        self._buffer.append((batch_id, arrays, batch.num_tokens))
        self._last_id = batch_id
        if len(self._buffer) >= self.shard_batches:
            self.flush()

    def flush(self) -> None:
        """Write the buffered batches (if any) as one shard, then list it in the manifest."""
        if not self._buffer:
            return
        shards = self._manifest["shards"]
        name = mf.shard_name(len(shards))
        data = shard_bytes([(batch_id, arrays) for batch_id, arrays, _ in self._buffer])
        atomic_write_bytes(self.root / name, data)
        shards.append(
            {
                "file": name,
                "sha256": hashlib.sha256(data).hexdigest(),
                "bytes": len(data),
                "batch_ids": [list(batch_id) for batch_id, _, _ in self._buffer],
                "num_tokens": [tokens for _, _, tokens in self._buffer],
            }
        )
        self._manifest["num_batches"] += len(self._buffer)
        self._manifest["num_tokens"] += sum(tokens for _, _, tokens in self._buffer)
        self._manifest["complete"] = False
        self._save_manifest()
        self._buffer = []

    def close(self) -> None:
        """Flush the last (possibly short) shard and mark the cache complete."""
        self.flush()
        self._manifest["complete"] = True
        self._save_manifest()

    def __enter__(self) -> CacheWriter:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        # On an error, keep the finished batches but leave the cache marked incomplete.
        if exc_type is None:
            self.close()
        elif self._buffer:
            self.flush()

    # -------------------------------------------------------------------------------------------- internals

    def _save_manifest(self) -> None:
        atomic_write_json(self.root / mf.MANIFEST_NAME, self._manifest)

    def _remove_cache_files(self) -> None:
        """overwrite=True: delete the manifest, shards and temp files; leave anything else in the folder."""
        for path in self.root.iterdir():
            if path.is_file() and (path.name == mf.MANIFEST_NAME or mf.is_stray(path, None)):
                path.unlink()

    def _check_resumable(self, existing: dict[str, Any]) -> None:
        problems = mf.meta_mismatches(existing["meta"], self.meta)
        extra = sorted(set(existing["meta"]) - set(self.meta))
        problems += [f"{key}: cached {existing['meta'][key]!r}, requested (absent)" for key in extra]
        if problems:
            raise CheckpointError(
                f"teacher cache {self.root} was built for a different run: {'; '.join(problems)}. "
                f"Write to a new folder, or pass overwrite=True (`--overwrite`) to rebuild this one."
            )

    def _check_batch(self, batch: TeacherBatch, batch_id: BatchId) -> None:
        k = int(self.meta["k"])
        if batch.k != k:
            raise ConfigError(f"batch {batch_id} has k={batch.k}; this cache stores k={k}.")
        vocab = int(self.meta["vocab_size"])
        # A token-mapped cache holds student ids, -1 where a teacher token has no student counterpart.
        lowest = -1 if self.meta.get("token_map") else 0
        if batch.topk_ids.size and (batch.topk_ids.min() < lowest or batch.topk_ids.max() >= vocab):
            raise ConfigError(
                f"batch {batch_id} has top-k ids in [{batch.topk_ids.min()}, {batch.topk_ids.max()}], outside "
                f"[{lowest}, {vocab}) of the cache's vocab_size {vocab}."
            )
        if self._last_id is not None and batch_id <= self._last_id:
            raise ConfigError(
                f"batch {batch_id} arrives after {self._last_id}: write batches in increasing batch-id order, "
                f"skipping the ids in done_batches() ({self.next_batch_index} stored)."
            )
        dtypes = _decoded_dtypes(batch, self.encoding)
        if self._manifest["dtypes"] is None:
            self._manifest["dtypes"] = dtypes
        elif dtypes != self._manifest["dtypes"]:
            raise ConfigError(
                f"batch {batch_id} has fields/dtypes {dtypes}, but this cache holds {self._manifest['dtypes']}; "
                f"every batch of a cache must carry the same fields."
            )


def _decoded_dtypes(batch: TeacherBatch, encoding: Encoding) -> dict[str, str]:
    """{field: dtype name} of the TeacherBatch a reader will decode (what the manifest's `dtypes` lists)."""
    dtypes = {name: batch.float_dtypes.get(name, array.dtype.name) for name, array in batch.arrays().items()}
    dtypes["topk_ids"] = "int32"
    dtypes["log_normalizer"] = "float32"
    dtypes["topk_logits"] = PLAIN_LOGITS.get(encoding.logits, "float32")  # gap codes decode to fp32
    return dtypes
