"""The run's token-space wiring, built beside `teacher.token_map.*`: how rows are encoded and how a batch is
scored into the student's token space, with or without a token map."""

from __future__ import annotations

import functools

import numpy as np

from distill.data.build import RowEncoder
from distill.data.formatting import encode_example
from distill.errors import ConfigError
from distill.teacher.engine import TeacherEngine
from distill.xtok.encode import encode_pairs
from distill.xtok.teacher import CrossTokenizerTeacher
from distill.xtok.vocab_map import load_or_build_token_map


def row_encoder(cfg, tokenizer, teacher_tokenizer=None) -> RowEncoder:
    """Examples -> rows on the student's tokenizer; with a token map each row also carries the teacher's tokens
    and the alignment of the two."""
    if not cfg.teacher.token_map.enabled:
        return lambda examples: [encode_example(tokenizer, ex, cfg.data.max_length) for ex in examples]
    if teacher_tokenizer is None:
        raise ConfigError("a cross-tokenizer run needs the teacher's tokenizer to encode its rows.")
    # On-policy stages re-encode the student's replies from the examples (distill/xtok/rollout.py).
    keep = any(stage.get("on_policy") for stage in cfg.curriculum.stages)
    return functools.partial(
        encode_pairs, tokenizer, teacher_tokenizer, max_length=cfg.data.max_length, keep_example=keep
    )


def batch_scorer(cfg, engine: TeacherEngine, teacher_tokenizer, tokenizer):
    """(batch_id, micro-batch) -> TeacherBatch in the student's token space: the engine itself, or with a
    token map the cross-tokenizer teacher (map built once per tokenizer pair, cached on disk)."""
    table = token_table(cfg, teacher_tokenizer, tokenizer)
    if table is None:
        return engine.score_batch
    return CrossTokenizerTeacher(engine, table).score


def token_table(cfg, teacher_tokenizer, tokenizer) -> np.ndarray | None:
    """teacher id -> student id (-1: none) when `teacher.token_map.enabled` (built once per tokenizer pair,
    cached on disk), else None."""
    if not cfg.teacher.token_map.enabled:
        return None
    return load_or_build_token_map(teacher_tokenizer, tokenizer, cfg.teacher.token_map.cache_dir).ids
