"""A local teacher engine built beside `teacher.*` (the Ray path builds the same engine inside its actors)."""

from __future__ import annotations

import os
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
    """A local teacher shipping the given hidden-state and attention layers (what the objective reads).

    teacher.backend=endpoint gives a client of the running server instead (same `score_batch`); backend=vllm has
    no local engine (vLLM lives in its own environment: distill/run/validate.py sends it to the Ray path)."""
    t = cfg.teacher
    if t.backend == "endpoint":
        from distill.teacher.endpoint import EndpointTeacher

        return EndpointTeacher(  # type: ignore[return-value]  # the scoring protocol, not the hf class
            t.endpoint_url,
            t.endpoint_model or str(path),
            t.topk,
            api=t.endpoint_api,
            api_key=os.environ.get(t.endpoint_api_key_env),
            logits_dtype=resolve_dtype(t.logits_dtype),
        )
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
