"""`distill teacher-cache`: run the teacher once over the run's batch stream and store its outputs on disk.

The cached batch ids are the training stream's ids, so `distill teacher.cache=<dir>` trains from the cache
exactly as it would with the online teacher. A killed run resumes after the last complete shard.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from distill.cache import CacheReader, CacheWriter
from distill.cache.encoding import packed_ids_name
from distill.config.validate import validate_run
from distill.data.mixing import DATA
from distill.errors import CheckpointError, ConfigError
from distill.models.fingerprint import model_fingerprint
from distill.models.loading import load_tokenizer
from distill.models.tokenizer import tokenizer_hash
from distill.teacher.batch import TeacherBatch
from distill.training.objective import teacher_layers
from launch import builders
from launch.app import hydra_app


def cache_identity(cfg: DictConfig, teacher_path: Path, tokenizer, mixes: list | None = None) -> dict:
    """What a cache must agree on with the run that reads it (checked by CacheReader's `expect`).

    mixes: the run stream's segments [(first position, end, shares)]: a curriculum's data mixes decide which
    rows each batch holds, so a cache is only valid for the same mixes."""
    specs = builders.run_term_specs(cfg)
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


def build_cache(cfg: DictConfig) -> Path:
    teacher_path = builders.require_teacher(cfg)
    tokenizer = load_tokenizer(teacher_path)
    validate_run(cfg, builders.pair_facts(cfg, tokenizer))
    c = cfg.teacher_cache
    if c.epochs < 1:
        raise ConfigError(f"teacher_cache.epochs={c.epochs} must be >= 1.")
    data = builders.build_data(cfg, tokenizer)
    _, stream = builders.run_stream(cfg, data, tokenizer)
    identity = cache_identity(cfg, teacher_path, tokenizer, stream_mixes(stream))
    vocab = builders.model_facts(cfg.teacher, len(tokenizer)).vocab_size
    ids_encoding = packed_ids_name(vocab) if c.ids_encoding == "auto" else c.ids_encoding
    meta = {
        **identity,
        "vocab_size": vocab,
        "ids_encoding": ids_encoding,
        "logits_encoding": c.logits_encoding,
    }
    # The run's own stream (its curriculum's data mixes) for `epochs` x the train split's batches; past the
    # run's end the last stage's mix continues (longer runs with the same stages read the same batches).
    end = c.epochs * stream.num_batches
    stream = stream.extended(end)
    order = [stream.batch_id(g) for g in range(end) if stream.locate(g).source == DATA]
    with CacheWriter(
        c.dir, manifest_meta=meta, shard_batches=c.shard_batches, overwrite=c.overwrite
    ) as writer:
        todo = order[writer.next_batch_index :]
        bar = tqdm(
            total=len(order),
            initial=len(order) - len(todo),
            desc="teacher-cache",
            dynamic_ncols=True,
            disable=not cfg.tracking.progress,
        )
        for batch in _score(cfg, teacher_path, identity, ((bid, stream.batch(*bid)) for bid in todo)):
            writer.write(batch)
            bar.update(1)
        bar.close()
    print(f"teacher cache complete: {c.dir} ({len(order)} batches)")
    return Path(c.dir)


def _score(cfg, teacher_path: Path, identity: dict, batches) -> Iterator[TeacherBatch]:
    """Teacher outputs in batch order: the Ray TeacherGroup for cluster.mode=ray, else one local engine."""
    if cfg.cluster.mode == "ray":
        from distill.cluster.runtime import connect, fetched_outputs, teacher_group_from_config

        connect(cfg.cluster)
        group = teacher_group_from_config(
            cfg, teacher_path, identity["hidden_layers"], identity["attention_layers"]
        )
        try:
            arrays = ((bid, {k: v.numpy() for k, v in b.items()}) for bid, b in batches)
            yield from fetched_outputs(group, arrays)
        finally:
            group.shutdown()
        return
    engine = builders.build_teacher_engine(
        cfg,
        teacher_path,
        None,
        hidden_layers=identity["hidden_layers"],
        attention_layers=identity["attention_layers"],
    )
    for bid, b in batches:
        yield engine.score(bid, b["input_ids"], b["attention_mask"], b["loss_mask"])


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
        return cached.to_torch()


def stream_mixes(stream) -> list:
    """The stream's segments as plain JSON values (for the cache identity)."""
    return [[seg.start, seg.end, dict(sorted(seg.shares.items()))] for seg in stream.segments]


@hydra_app
def main(cfg: DictConfig) -> None:
    build_cache(cfg)
