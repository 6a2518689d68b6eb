"""`distill teacher-cache`: run the teacher once over the run's batch stream and store its outputs on disk.

The cached batch ids are the training stream's ids, so `distill teacher.cache=<dir>` trains from the cache
exactly as it would with the online teacher. A killed run resumes after the last complete shard.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from omegaconf import DictConfig
from tqdm.auto import tqdm

from distill.batch import TeacherBatch
from distill.cache import CacheWriter
from distill.cache.encoding import IDS_INT32, packed_ids_name
from distill.data.build import build_data
from distill.data.mixing import DATA
from distill.errors import ConfigError
from distill.eval.runs import run_heldout_batches
from distill.models.loading import load_tokenizer
from distill.models.resolve import model_facts, pair_facts, require_teacher, student_tokenizer
from distill.run.cache import cache_identity, stream_mixes
from distill.run.validate import validate_run
from distill.teacher.build import build_teacher_engine
from distill.teacher.teacher_set import require_one_teacher
from distill.training.build import run_stream
from distill.xtok.build import batch_scorer, row_encoder, token_table
from launch.app import hydra_app


def build_cache(cfg: DictConfig) -> Path:
    require_one_teacher(cfg, "teacher-cache")
    teacher_path = require_teacher(cfg)
    teacher_tokenizer = load_tokenizer(teacher_path)
    facts = pair_facts(cfg, teacher_tokenizer)
    topology = validate_run(cfg, facts)
    c = cfg.teacher_cache
    if c.epochs is not None and c.epochs < 1:
        raise ConfigError(f"teacher_cache.epochs={c.epochs} must be >= 1 (or null: what train.steps reads).")
    mapped = bool(cfg.teacher.token_map.enabled)
    # The run's own batches: the student's tokens (with a token map, its own tokenizer's plus the teacher's).
    tokenizer = student_tokenizer(cfg, teacher_tokenizer)
    data = build_data(cfg, row_encoder(cfg, tokenizer, teacher_tokenizer))
    _, stream = run_stream(cfg, data, tokenizer, topology.batches_per_step)
    identity = cache_identity(cfg, teacher_path, tokenizer, stream_mixes(stream), teacher_tokenizer)
    vocab = facts.student_vocab if mapped else model_facts(cfg.teacher, len(tokenizer)).vocab_size
    ids_encoding, logits_encoding = _encodings(cfg, vocab)
    meta = {
        **identity,
        "vocab_size": vocab,
        "ids_encoding": ids_encoding,
        "logits_encoding": logits_encoding,
    }
    # The run's own stream (its curriculum's data mixes) for `epochs` x the train split's batches; past the
    # run's end the last stage's mix continues (longer runs with the same stages read the same batches).
    epochs = c.epochs or -(-cfg.train.steps * topology.batches_per_step // stream.num_batches)
    end = epochs * stream.num_batches
    stream = stream.extended(end)
    # First the held-out batches of the run's eval.* settings, as (HELDOUT_EPOCH = -1, i): the evaluation reads
    # the teacher's side from here too, so a run trained from the cache never needs the teacher model.
    # (None across tokenizers: the student is evaluated on its own vocabulary, without the teacher's side.)
    heldout = {} if mapped else dict(run_heldout_batches(cfg, tokenizer, data))
    order = [*heldout, *(stream.batch_id(g) for g in range(end) if stream.locate(g).source == DATA)]
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
        inputs = ((bid, heldout[bid] if bid in heldout else stream.batch(*bid)) for bid in todo)
        for batch in _score(cfg, teacher_path, identity, inputs):
            writer.write(batch)
            bar.update(1)
        bar.close()
    print(f"teacher cache complete: {c.dir} ({len(order) - len(heldout)} batches + {len(heldout)} held-out)")
    return Path(c.dir)


def _encodings(cfg: DictConfig, vocab: int) -> tuple[str, str]:
    """(ids, logits) encodings of the cache. A token-mapped cache stores student ids with -1 for teacher tokens
    that have none, and -inf logits where tokens merged or positions did not align: int32 ids and fp32 logits."""
    c = cfg.teacher_cache
    if not cfg.teacher.token_map.enabled:
        return (packed_ids_name(vocab) if c.ids_encoding == "auto" else c.ids_encoding), c.logits_encoding
    if c.ids_encoding not in ("auto", IDS_INT32) or c.logits_encoding != "fp32":
        raise ConfigError(
            f"teacher_cache.ids_encoding={c.ids_encoding!r} / logits_encoding={c.logits_encoding!r}: a cache "
            "with teacher.token_map.enabled holds unmapped ids (-1) and -inf logits, which only int32 ids and fp32 "
            "logits keep exactly; set teacher_cache.ids_encoding=auto teacher_cache.logits_encoding=fp32."
        )
    return IDS_INT32, "fp32"


def _score(cfg, teacher_path: Path, identity: dict, batches) -> Iterator[TeacherBatch]:
    """Teacher outputs in batch order (in the student's positions and vocabulary with a token map): the Ray
    TeacherGroup for cluster.mode=ray, else one local engine."""
    teacher_tokenizer = load_tokenizer(teacher_path)
    tokenizer = student_tokenizer(cfg, teacher_tokenizer)
    if cfg.cluster.mode == "ray":
        from distill.cluster.runtime import connect, fetched_outputs, teacher_group_from_config

        connect(cfg.cluster)
        group = teacher_group_from_config(
            cfg,
            teacher_path,
            identity["hidden_layers"],
            identity["attention_layers"],
            token_table(cfg, teacher_tokenizer, tokenizer),
        )
        try:
            arrays = ((bid, {k: v.numpy() for k, v in b.items()}) for bid, b in batches)
            yield from fetched_outputs(group, arrays)
        finally:
            group.shutdown()
        return
    engine = build_teacher_engine(
        cfg,
        teacher_path,
        hidden_layers=identity["hidden_layers"],
        attention_layers=identity["attention_layers"],
    )
    score = batch_scorer(cfg, engine, teacher_tokenizer, tokenizer)
    for bid, b in batches:
        yield score(bid, b)


@hydra_app
def main(cfg: DictConfig) -> None:
    build_cache(cfg)
