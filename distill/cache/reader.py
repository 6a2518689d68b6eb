"""CacheReader: random access and shard-by-shard streaming of a teacher cache, with checksum verification."""

from __future__ import annotations

import hashlib
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import load as safetensors_load

from distill.batch import BatchId, TeacherBatch
from distill.cache import manifest as mf
from distill.cache.encoding import Encoding, decode
from distill.errors import CheckpointError, ConfigError


class CacheReader:
    """Reads the TeacherBatches of a cache folder written by CacheWriter.

    root    the cache folder
    expect  values the run needs, e.g. {"teacher_hash": ..., "tokenizer_hash": ..., "k": 64}; any key of the
            manifest's meta may be given, and a differing value raises CheckpointError

    At most one shard is held in memory: `read` keeps the last shard it opened, `iter_batches` streams them.
    Each shard's sha256 is checked against the manifest when it is opened.
    """

    def __init__(self, root: str | Path, *, expect: dict[str, Any] | None = None) -> None:
        self.root = Path(root)
        manifest = mf.read_manifest(self.root) if self.root.is_dir() else None
        if manifest is None:
            what = "has no manifest.json" if self.root.is_dir() else "does not exist"
            raise CheckpointError(
                f"teacher cache {self.root} {what}; {mf.BUILD_HINT} (or fix the cache path)."
            )
        self.manifest = manifest
        self._check_expected(expect or {})
        encoding = Encoding(self.meta["ids_encoding"], self.meta["logits_encoding"])
        mf.check_encoding(self.root, manifest, encoding.describe())
        if not manifest["complete"]:
            warnings.warn(
                f"teacher cache {self.root} is incomplete ({manifest['num_batches']} batches stored, writer not "
                f"closed); finish it with `distill teacher-cache`, which resumes where it stopped.",
                stacklevel=2,
            )
        self._where = {
            (int(e), int(i)): (s, j)
            for s, shard in enumerate(manifest["shards"])
            for j, (e, i) in enumerate(shard["batch_ids"])
        }
        self._open: tuple[int, dict[str, np.ndarray]] | None = None  # (shard index, its arrays)

    @property
    def meta(self) -> dict[str, Any]:
        return self.manifest["meta"]

    @property
    def complete(self) -> bool:
        return bool(self.manifest["complete"])

    @property
    def num_tokens(self) -> int:
        """Loss-masked tokens over all batches."""
        return int(self.manifest["num_tokens"])

    def __len__(self) -> int:
        return int(self.manifest["num_batches"])

    def batch_ids(self) -> list[BatchId]:
        return mf.manifest_batch_ids(self.manifest)

    def read(self, batch_id: BatchId) -> TeacherBatch:
        """One batch by id (opens, verifies and keeps its shard)."""
        key = (int(batch_id[0]), int(batch_id[1]))
        if key not in self._where:
            raise KeyError(f"batch {key} is not in teacher cache {self.root} ({len(self)} batches)")
        shard, position = self._where[key]
        if self._open is None or self._open[0] != shard:
            self._open = (shard, self._load_shard(shard))
        return self._decode(self._open[1], position, key)

    def has(self, batch_id: BatchId) -> bool:
        return (int(batch_id[0]), int(batch_id[1])) in self._where

    def read_matching(
        self, batch_id: BatchId, input_ids: np.ndarray, position_ids: np.ndarray | None
    ) -> TeacherBatch:
        """`read`, after checking that the cached batch was scored on exactly these inputs (the run's batch of
        the same id): the same tokens and the same document boundaries (packing)."""
        cached = self.read(batch_id)
        if not np.array_equal(cached.input_ids, np.asarray(input_ids).astype(cached.input_ids.dtype)):
            raise CheckpointError(
                f"teacher cache batch {batch_id} holds different tokens than the run's batch {batch_id}: the "
                "cache was built from other data or batching. Rebuild it with the run's data settings."
            )
        if (cached.position_ids is None) != (position_ids is None) or (
            position_ids is not None and not np.array_equal(cached.position_ids, position_ids)
        ):
            raise CheckpointError(
                f"teacher cache batch {batch_id} was scored with other document boundaries than the run's batch "
                "(data.packing differs, or the cache predates per-document attention); rebuild the cache with "
                "the run's data settings."
            )
        return cached

    def iter_batches(self) -> Iterator[TeacherBatch]:
        """Every batch in batch-id order, one shard in memory at a time."""
        for s, shard in enumerate(self.manifest["shards"]):
            arrays = self._load_shard(s)
            for position, (e, i) in enumerate(shard["batch_ids"]):
                yield self._decode(arrays, position, (int(e), int(i)))
            del arrays  # let the shard go before the next one is read

    def verify(self) -> None:
        """Check every shard's checksum (CheckpointError naming the first bad file)."""
        for s in range(len(self.manifest["shards"])):
            self._load_shard(s)

    # -------------------------------------------------------------------------------------------- internals

    def _check_expected(self, expect: dict[str, Any]) -> None:
        unknown = sorted(set(expect) - set(self.meta))
        if unknown:
            raise ConfigError(
                f"expect has keys {unknown} that the cache meta lacks; valid: {sorted(self.meta)}."
            )
        problems = mf.meta_mismatches(self.meta, expect, label="expected")
        if problems:
            raise CheckpointError(
                f"teacher cache {self.root} does not match this run: {'; '.join(problems)}. "
                f"Point to the cache built for this teacher/tokenizer, or rebuild it with `distill teacher-cache`."
            )

    def _load_shard(self, index: int) -> dict[str, np.ndarray]:
        """Read a shard's bytes once, check their sha256, and parse those same bytes (no re-read race)."""
        entry = self.manifest["shards"][index]
        path = self.root / entry["file"]
        try:
            data = path.read_bytes()
        except OSError as e:
            raise CheckpointError(f"teacher cache shard {path} is unreadable ({e}); {mf.BUILD_HINT}.") from e
        found = hashlib.sha256(data).hexdigest()
        if found != entry["sha256"]:
            raise CheckpointError(
                f"teacher cache shard {path} is corrupt: sha256 expected {entry['sha256']}, found {found}. "
                f"Delete the cache and rebuild it with `distill teacher-cache`."
            )
        return safetensors_load(data)

    def _decode(self, arrays: dict[str, np.ndarray], position: int, batch_id: BatchId) -> TeacherBatch:
        prefix = f"{position}/"
        fields = {name[len(prefix) :]: a for name, a in arrays.items() if name.startswith(prefix)}
        dtypes = self.manifest["dtypes"]
        meta = {
            "ids": self.meta["ids_encoding"],
            "logits": self.meta["logits_encoding"],
            "k": self.meta["k"],
            "batch_id": list(batch_id),
            "float_dtypes": {name: dtypes[name] for name in ("hidden", "attention") if name in dtypes},
        }
        return decode(fields, meta)
