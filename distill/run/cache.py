"""The run's side of an offline teacher cache: what a cache must agree on with the run that reads it, and the
teacher source that reads it (`teacher.cache=<dir>`). `distill teacher-cache` writes such caches."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from distill.cache import CacheReader
from distill.errors import CheckpointError
from distill.models.fingerprint import model_fingerprint
from distill.models.tokenizer import tokenizer_hash
from distill.training.build import run_term_specs
from distill.training.objective import teacher_layers


def cache_identity(
    cfg: DictConfig, teacher_path: Path, tokenizer, mixes: list | None = None, teacher_tokenizer=None
) -> dict:
    """What a cache must agree on with the run that reads it (checked by CacheReader's `expect`).

    tokenizer: the student's (the batches' token ids). With a token map the cache holds the teacher's top-k
    already projected into the student's positions and vocabulary, so the teacher's tokenizer is part of it too.
    mixes: the run stream's segments [(first position, end, shares)]: a curriculum's data mixes decide which
    rows each batch holds, so a cache is only valid for the same mixes."""
    specs = run_term_specs(cfg)
    data = OmegaConf.to_container(cfg.data, resolve=True)
    stream = {"data": data, "micro_batch_size": cfg.cluster.micro_batch_size, "mixes": mixes}
    mapped = bool(cfg.teacher.token_map.enabled)
    return {
        "teacher_hash": model_fingerprint(teacher_path),
        "tokenizer_hash": tokenizer_hash(tokenizer),
        "token_map": mapped,
        "teacher_tokenizer_hash": tokenizer_hash(teacher_tokenizer) if mapped else None,
        "k": int(cfg.teacher.topk),
        "data_hash": hashlib.sha256(json.dumps(stream, sort_keys=True).encode()).hexdigest()[:16],
        "hidden_layers": teacher_layers(specs, "hidden"),
        "attention_layers": teacher_layers(specs, "attention"),
    }


def open_run_cache(
    cfg: DictConfig, teacher_path: Path, tokenizer, stream, teacher_tokenizer=None
) -> dict | None:
    """The identity a run's `teacher.cache` must have (None without one), checked against the cache now, before
    any process starts: the same teacher, tokenizers, top-k, data, batching and mixes, and enough batches."""
    if not cfg.teacher.cache:
        return None
    identity = cache_identity(cfg, teacher_path, tokenizer, stream_mixes(stream), teacher_tokenizer)
    reader = CacheReader(cfg.teacher.cache, expect=identity)
    needed = cfg.train.steps * cfg.cluster.grad_accum_steps * cfg.cluster.student_world_size
    stored = sum(1 for epoch, _ in reader.batch_ids() if epoch >= 0)  # training batches; held-out ones are -1
    if stored < needed:
        raise CheckpointError(
            f"teacher cache {cfg.teacher.cache} holds {stored} training batches but the run needs {needed} "
            "(train.steps x grad_accum_steps x student_world_size); rebuild it with this run's train.steps (`distill "
            "teacher-cache` caches what they read) or more teacher_cache.epochs."
        )
    return identity


class CachedTeacher:
    """The teacher source of a single-process run that trains from an offline cache: batch id -> tensors."""

    def __init__(self, path: str | Path, identity: dict) -> None:
        self.reader = CacheReader(path, expect=identity)

    def __call__(self, batch_id, batch) -> dict[str, torch.Tensor | None]:
        positions = batch.get("position_ids")
        return self.reader.read_matching(
            tuple(batch_id), batch["input_ids"].numpy(), None if positions is None else positions.numpy()
        ).to_torch()


def stream_mixes(stream) -> list:
    """The stream's segments as plain JSON values (for the cache identity)."""
    return [[seg.start, seg.end, dict(sorted(seg.shares.items()))] for seg in stream.segments]
