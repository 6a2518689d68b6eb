"""Teacher: TeacherEngine (forward -> TeacherBatch, no Ray); TeacherBatch itself lives in the leaf
`distill.batch` and is re-exported here.

TeacherEngine is imported lazily: importing this package should not pay for importing transformers.
"""

from typing import Any

from distill.batch import TeacherBatch

__all__ = ["TeacherBatch", "TeacherEngine", "topk_with_normalizer"]


def __getattr__(name: str) -> Any:
    if name in ("TeacherEngine", "topk_with_normalizer"):
        from distill.teacher import engine

        return getattr(engine, name)
    raise AttributeError(f"module 'distill.teacher' has no attribute {name!r}")
