"""The teacher side of a cross-tokenizer run: score the teacher's own tokens, then move the top-k into the
student's positions and vocabulary. The student's training step sees an ordinary TeacherBatch.

`project_topk` is the pure part (torch, vectorised, no Python loop over tokens); `CrossTokenizerTeacher`
wraps a `TeacherEngine` and a token map around it.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
from torch import Tensor

from distill.batch import BatchId, TeacherBatch
from distill.teacher.engine import TeacherEngine


def project_topk(
    topk_ids: Tensor, topk_logits: Tensor, log_normalizer: Tensor, align: Tensor, table: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """Teacher top-k at teacher positions -> mapped top-k at student positions.

    topk_ids, topk_logits [B, T_t, k]; log_normalizer [B, T_t]; align [B, T_s] long (teacher position per
    student position, -1: none); table [V_t] long (teacher id -> student id, -1: none).
    Returns ids [B, T_s, k] int32 (student ids, -1 unmapped), logits [B, T_s, k] (topk_logits' dtype; -inf
    where merged away or unaligned), log_normalizer [B, T_s] fp32 (0 where unaligned).

    Several teacher tokens mapped to one student id become one entry (the first, i.e. the most likely):
    its logit is the logsumexp of theirs, so the student id receives their summed probability.
    """
    b, t_s = align.shape
    k = topk_ids.shape[-1]
    aligned = align >= 0
    index = align.clamp(min=0)
    ids = topk_ids.long().gather(1, index[..., None].expand(b, t_s, k))
    logits = topk_logits.float().gather(1, index[..., None].expand(b, t_s, k))
    lse = log_normalizer.float().gather(1, index)
    ids = torch.where(aligned[..., None], table[ids], -1)
    mapped = ids >= 0
    same = (ids[..., :, None] == ids[..., None, :]) & mapped[..., :, None]  # [B, T_s, k, k]
    earlier = torch.ones(k, k, dtype=torch.bool, device=ids.device).tril(-1)
    duplicate = (same & earlier).any(dim=-1)
    merged = torch.logsumexp(torch.where(same, logits[..., None, :], -torch.inf), dim=-1)
    logits = torch.where(mapped, merged, logits)
    logits = logits.masked_fill(duplicate | ~aligned[..., None], -torch.inf)
    ids = ids.masked_fill(duplicate, -1)
    return ids.to(torch.int32), logits.to(topk_logits.dtype), torch.where(aligned, lse, 0.0)


def project_features(
    hidden: Tensor | None, attention: Tensor | None, align: Tensor
) -> tuple[Tensor | None, Tensor | None]:
    """Teacher hidden states and attention maps at teacher positions -> at the aligned student positions.

    hidden [B, T_t, L, H] -> [B, T_s, L, H]: student position s gets the teacher's state at align[s] (the
    position that predicts the same next text: both have read the same prefix), zeros where unaligned.
    attention [B, L, T_t, T_t] -> [B, L, T_s, T_s]: rows and columns at the aligned positions; a student query
    row keeps the teacher's weights on the keys that have a student counterpart (the attention term renormalises
    each row), zeros at unaligned rows or columns.
    """
    aligned = align >= 0
    index = align.clamp(min=0)
    if hidden is not None:
        b, t_s = align.shape
        gathered = hidden.gather(1, index[:, :, None, None].expand(b, t_s, *hidden.shape[2:]))
        hidden = gathered * aligned[:, :, None, None].to(hidden.dtype)
    if attention is not None:
        b, layers, t_t, _ = attention.shape
        t_s = align.shape[1]
        rows = attention.gather(2, index[:, None, :, None].expand(b, layers, t_s, t_t))
        both = rows.gather(3, index[:, None, None, :].expand(b, layers, t_s, t_s))
        keep = aligned[:, None, :, None] & aligned[:, None, None, :]
        attention = both * keep.to(both.dtype)
    return hidden, attention


class CrossTokenizerTeacher:
    """A TeacherEngine whose TeacherBatches are in the student's positions and vocabulary.

    engine  the teacher (scores teacher token ids)
    table   teacher id -> student id, -1 for none (`TokenMap.ids`; padded with -1 to the engine's vocabulary)
    """

    def __init__(self, engine: TeacherEngine, table: np.ndarray) -> None:
        self.engine = engine
        table = torch.tensor(np.asarray(table), dtype=torch.long)  # a copy: Ray hands actors read-only arrays
        # A teacher lm_head wider than its tokenizer: the extra ids have no text, so no student counterpart.
        pad = max(0, engine.vocab_size - len(table))
        self.table = torch.cat([table, table.new_full((pad,), -1)])

    def score(self, batch_id: BatchId, batch: Mapping[str, Tensor]) -> TeacherBatch:
        """batch: a cross-tokenizer micro-batch (student input_ids/attention_mask/loss_mask [B, T_s],
        teacher_input_ids/teacher_attention_mask [B, T_t], align [B, T_s]) -> student-space TeacherBatch."""
        t_ids = batch["teacher_input_ids"]
        t_mask = batch["teacher_attention_mask"]
        # Packed rows: the teacher's documents restart their positions too (a per-document mask, as the student's).
        scored = self.engine.score(
            batch_id, t_ids, t_mask, t_mask, position_ids=batch.get("teacher_position_ids")
        )
        align = batch["align"].long()
        ids, logits, lse = project_topk(
            scored.tensor("topk_ids"),
            scored.tensor("topk_logits"),
            scored.tensor("log_normalizer"),
            align,
            self.table,
        )
        hidden, attention = project_features(scored.tensor("hidden"), scored.tensor("attention"), align)
        features = hidden is not None or attention is not None
        return TeacherBatch.from_torch(
            batch_id,
            input_ids=batch["input_ids"].to(torch.int32),
            attention_mask=batch["attention_mask"].bool(),
            loss_mask=batch["loss_mask"].bool(),
            topk_ids=ids,
            topk_logits=logits,
            log_normalizer=lse,
            hidden=hidden,
            attention=attention,
            aligned=(align >= 0) if features else None,
            position_ids=batch.get("position_ids"),  # packed rows: the student's per-document mask
        )

    def logits(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        raise NotImplementedError(
            "a cross-tokenizer teacher's full logits are over another vocabulary; evaluate the student alone"
        )
