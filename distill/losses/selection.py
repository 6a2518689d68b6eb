"""Selective distillation: keep only the tokens where the teacher is (un)sure enough.

The statistic is computed on the teacher's own buckets at T=1 (see teachers.py): "confidence" is the
probability of the teacher's most likely token, "entropy" is the entropy over the buckets (for a top-k
teacher the tail counts as one bucket, so it is a lower bound of the full-vocab entropy).
"""

from __future__ import annotations

import torch
from torch import Tensor

from distill.losses.chunked import DEFAULT_CHUNK_SIZE, row_chunks
from distill.losses.divergences import entropy
from distill.losses.registry import SELECT_BY, check_param_values
from distill.losses.teachers import Teacher


@torch.no_grad()
def teacher_statistic(teacher: Teacher, by: str, chunk_size: int = DEFAULT_CHUNK_SIZE) -> Tensor:
    """Per-token teacher "confidence" or "entropy" at T=1: [N] fp32.

    Walks rows in chunks so a dense teacher never gets a full [N, V] fp32 copy.
    """
    assert by in SELECT_BY, by
    parts = []
    for rows in row_chunks(teacher.num_rows, chunk_size):
        chunk = teacher.select(rows)
        parts.append(chunk.top1_prob() if by == "confidence" else entropy(chunk.log_probs(1.0)))
    if not parts:
        return torch.zeros(0, dtype=torch.float32, device=_device(teacher))
    return torch.cat(parts)


def select_tokens(teacher: Teacher, mask: Tensor, *, by: str, threshold: float, keep: str) -> Tensor:
    """mask [N] bool AND (statistic >= threshold if keep == "above" else statistic < threshold)."""
    check_param_values("select_tokens", {"select_by": by, "select_threshold": threshold, "select_keep": keep})
    stat = teacher_statistic(teacher, by)
    chosen = stat >= threshold if keep == "above" else stat < threshold
    return mask & chosen


def _device(teacher: Teacher) -> torch.device:
    return teacher.logits.device
