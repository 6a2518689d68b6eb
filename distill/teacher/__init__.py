"""Teacher: TeacherBatch (the wire format) and TeacherEngine (forward -> TeacherBatch, no Ray).

TeacherEngine is imported lazily: the cache and loss code import TeacherBatch and should not pay for
importing transformers.
"""

from typing import Any

from distill.batch import TeacherBatch

__all__ = ["TeacherBatch", "TeacherEngine", "topk_with_normalizer"]


def __getattr__(name: str) -> Any:
    if name in ("TeacherEngine", "topk_with_normalizer"):
        from distill.teacher import engine

        return getattr(engine, name)
    raise AttributeError(f"module 'distill.teacher' has no attribute {name!r}")
