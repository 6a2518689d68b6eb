"""TeacherBatch from a served engine's prompt log-probs (vLLM's `prompt_logprobs`, the completions API's).

Pure functions: no vLLM import, so the conversion is tested here against the hf engine and shared by the
in-actor vLLM engine (distill/teacher/vllm_engine.py) and the HTTP endpoint client (distill/teacher/endpoint.py).

The served engine returns, for every prompt position i >= 1, the k most likely tokens at position i with their
log-probs (log_softmax over the whole vocabulary at T=1) and ranks, plus the actual token i if it is outside
them. That is the distribution *after* position i-1: TeacherBatch position i-1. The last position of a prompt
has no prompt entry; it comes from the one generated step's log-probs (`SamplingParams(logprobs=k)`).

Temperature semantics: the engine ships raw log-probs at T=1 (vLLM's prompt log-probs never see the sampling
parameters; the generated step's are `logprobs_mode=raw_logprobs`, vLLM's default). They go into
`topk_logits` with `log_normalizer` = 0, so the tail mass is 1 - sum(exp(top-k)). Raw logits z and log-probs
z - logsumexp(z) differ by one constant per position, and the loss tempers the k + 1 buckets (top-k and tail)
with a log_softmax (distill.losses.teachers.TopKTeacher.log_probs), which is shift invariant: every loss term
at every temperature is the same as from the hf backend's raw logits. Processed (tempered) log-probs are not
used: they would apply the temperature twice.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from distill.batch import BatchId, TeacherBatch
from distill.errors import ConfigError

Entries = Mapping[int, tuple[float, int]]
"""One position's served log-probs: token id -> (log-prob, rank), rank 1 the most likely."""


@dataclass(frozen=True)
class Segment:
    """A run of positions [start, end) of batch row `row` scored as one prompt (a row, or one packed document)."""

    row: int
    start: int
    end: int


def segments(attention_mask: np.ndarray, position_ids: np.ndarray | None = None) -> list[Segment]:
    """The prompts a [B, T] batch is scored as: each maximal run of real tokens (attention_mask True), split
    again wherever packed rows' position_ids restart at 0, so no document attends across a boundary (the
    per-document mask the hf engine builds from position_ids; distill.batch.model_inputs)."""
    out = []
    mask = np.asarray(attention_mask, dtype=bool)
    for b in range(mask.shape[0]):
        start = None
        for t in range(mask.shape[1]):
            restart = position_ids is not None and int(position_ids[b, t]) == 0
            if start is not None and (not mask[b, t] or restart):
                out.append(Segment(b, start, t))
                start = None
            if mask[b, t] and start is None:
                start = t
        if start is not None:
            out.append(Segment(b, start, mask.shape[1]))
    return out


def top_entries(entries: Entries, k: int) -> tuple[list[int], list[float]]:
    """The k best entries of one position by rank (the actual token, shipped beside them when it ranks below k,
    is dropped): (ids, log-probs), most likely first. ConfigError when the engine sent fewer than k."""
    ranked = sorted(entries.items(), key=lambda item: (item[1][1], -item[1][0]))
    if len(ranked) < k:
        raise ConfigError(
            f"the served teacher returned {len(ranked)} log-probs for a position but teacher.topk={k}; raise the "
            f"engine's max_logprobs to at least {k} (vLLM: --max-logprobs {k}) or lower teacher.topk"
        )
    best = ranked[:k]
    return [token for token, _ in best], [lp for _, (lp, _) in best]


def batch_from_logprobs(
    batch_id: BatchId,
    inputs: Mapping[str, np.ndarray],
    scored: Sequence[tuple[Segment, Sequence[Entries]]],
    k: int,
    *,
    logits_dtype: torch.dtype = torch.float32,
) -> TeacherBatch:
    """A TeacherBatch of the same shapes and dtypes as the hf engine's from served log-probs.

    inputs    the stream micro-batch: input_ids, attention_mask, loss_mask [B, T], optional position_ids
    scored    per `segments()` prompt, its n = end - start positions' entries in order: TeacherBatch position
              start + i gets entries[i] (prompt log-probs of token i + 1, the generated step's for the last)
    Positions outside every segment (padding) get the hf engine's placeholder (distill.teacher.engine.fill_padding):
    ids 0..k-1, logits 0, log-normaliser log k; no loss reads them.
    """
    input_ids = np.asarray(inputs["input_ids"])
    b, t = input_ids.shape
    ids = np.broadcast_to(np.arange(k, dtype=np.int32), (b, t, k)).copy()
    values = np.zeros((b, t, k), dtype=np.float32)
    lse = np.full((b, t), math.log(k), dtype=np.float32)
    for seg, entries in scored:
        if len(entries) != seg.end - seg.start:
            raise ValueError(
                f"segment {seg} has {seg.end - seg.start} positions but {len(entries)} log-prob entries"
            )
        for i, position in enumerate(entries):
            top_ids, top_values = top_entries(position, k)
            ids[seg.row, seg.start + i] = top_ids
            values[seg.row, seg.start + i] = top_values
            lse[seg.row, seg.start + i] = 0.0  # log-probs are normalised: the tail is 1 - sum(exp(values))
    position_ids = inputs.get("position_ids")
    return TeacherBatch.from_torch(
        batch_id,
        input_ids=torch.from_numpy(input_ids.astype(np.int32)),
        attention_mask=torch.from_numpy(np.asarray(inputs["attention_mask"]).astype(bool)),
        loss_mask=torch.from_numpy(np.asarray(inputs["loss_mask"]).astype(bool)),
        topk_ids=torch.from_numpy(ids),
        topk_logits=torch.from_numpy(values).to(logits_dtype),
        log_normalizer=torch.from_numpy(lse),
        position_ids=None
        if position_ids is None
        else torch.from_numpy(np.asarray(position_ids).astype(np.int32)),
    )


def prompt_token_ids(inputs: Mapping[str, np.ndarray], segs: Sequence[Segment]) -> list[list[int]]:
    """Each segment's token ids, the prompts sent to the engine."""
    input_ids = np.asarray(inputs["input_ids"])
    return [input_ids[s.row, s.start : s.end].astype(np.int64).tolist() for s in segs]


def score_served_batch(
    score_prompts: Callable[[list[list[int]]], list],
    batch_id: BatchId,
    batch: Mapping[str, torch.Tensor | np.ndarray | None],
    topk: int,
    logits_dtype: torch.dtype,
) -> TeacherBatch:
    """A stream micro-batch (input_ids, attention_mask, loss_mask, optional position_ids) scored by a served
    teacher: each segment (row, or document of a packed row) as one prompt through `score_prompts` (per prompt,
    its positions' log-prob entries), assembled into the TeacherBatch the hf engine would give."""
    inputs = {k: np.asarray(v) for k, v in batch.items() if v is not None}
    segs = segments(inputs["attention_mask"], inputs.get("position_ids"))
    scored = score_prompts(prompt_token_ids(inputs, segs))
    return batch_from_logprobs(
        batch_id, inputs, list(zip(segs, scored, strict=True)), topk, logits_dtype=logits_dtype
    )
