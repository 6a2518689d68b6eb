"""The run's side of an offline teacher cache: what a cache must agree on with the run that reads it, and the
teacher source that reads it (`teacher.cache=<dir>`). `distill teacher-cache` writes such caches."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from distill.cache import CacheReader
from distill.errors import CheckpointError
from distill.models.fingerprint import model_fingerprint
from distill.models.tokenizer import tokenizer_hash
from distill.training.build import run_term_specs
from distill.training.objective import teacher_layers


def cache_identity(cfg: DictConfig, teacher_path: Path, tokenizer, mixes: list | None = None) -> dict:
    """What a cache must agree on with the run that reads it (checked by CacheReader's `expect`).

    mixes: the run stream's segments [(first position, end, shares)]: a curriculum's data mixes decide which
    rows each batch holds, so a cache is only valid for the same mixes."""
    specs = run_term_specs(cfg)
    data = OmegaConf.to_container(cfg.data, resolve=True)
    stream = {"data": data, "micro_batch_size": cfg.cluster.micro_batch_size, "mixes": mixes}
    return {
        "teacher_hash": model_fingerprint(teacher_path),
        "tokenizer_hash": tokenizer_hash(tokenizer),
        "k": int(cfg.teacher.topk),
        "data_hash": hashlib.sha256(json.dumps(stream, sort_keys=True).encode()).hexdigest()[:16],
        "hidden_layers": teacher_layers(specs, "hidden"),
        "attention_layers": teacher_layers(specs, "attention"),
    }


class CachedTeacher:
    """The teacher source of a run that trains from an offline cache: batch id -> TeacherBatch tensors."""

    def __init__(self, cfg: DictConfig, teacher_path: Path, tokenizer, needed_batches: int, stream) -> None:
        identity = cache_identity(cfg, teacher_path, tokenizer, stream_mixes(stream))
        self.reader = CacheReader(cfg.teacher.cache, expect=identity)
        if len(self.reader) < needed_batches:
            raise CheckpointError(
                f"teacher cache {cfg.teacher.cache} holds {len(self.reader)} batches but the run needs "
                f"{needed_batches} (train.steps x grad_accum_steps); rebuild it with more teacher_cache.epochs."
            )

    def __call__(self, batch_id, batch) -> dict[str, torch.Tensor | None]:
        cached = self.reader.read(tuple(batch_id))
        if not np.array_equal(cached.input_ids, batch["input_ids"].numpy().astype(cached.input_ids.dtype)):
            raise CheckpointError(
                f"teacher cache batch {batch_id} holds different tokens than the run's batch {batch_id}: the "
                "cache was built from other data or batching. Rebuild it with the run's data settings."
            )
        positions = batch.get("position_ids")
        if (cached.position_ids is None) != (positions is None) or (
            positions is not None and not np.array_equal(cached.position_ids, positions.numpy())
        ):
            raise CheckpointError(
                f"teacher cache batch {batch_id} was scored with other document boundaries than the run's batch "
                "(data.packing differs, or the cache predates per-document attention); rebuild the cache with "
                "the run's data settings."
            )
        return cached.to_torch()


def stream_mixes(stream) -> list:
    """The stream's segments as plain JSON values (for the cache identity)."""
    return [[seg.start, seg.end, dict(sorted(seg.shares.items()))] for seg in stream.segments]
