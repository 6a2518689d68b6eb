"""A local teacher engine built beside `teacher.*` (the Ray path builds the same engine inside its actors)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from distill.models.loading import resolve_dtype
from distill.teacher.engine import TeacherEngine


def build_teacher_engine(
    cfg,
    path: Path,
    *,
    hidden_layers: Sequence[int] = (),
    attention_layers: Sequence[int] = (),
    device: str = "cpu",
) -> TeacherEngine:
    """A local teacher shipping the given hidden-state and attention layers (what the objective reads)."""
    t = cfg.teacher
    return TeacherEngine.from_pretrained(
        path,
        t.topk,
        dtype=t.dtype,
        attn_implementation=t.attn_implementation,
        hidden_layers=list(hidden_layers),
        attention_layers=list(attention_layers),
        logits_dtype=resolve_dtype(t.logits_dtype),
        device=device,
        length_groups=t.length_groups,
    )
