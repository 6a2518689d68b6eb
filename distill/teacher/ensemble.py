"""Several teachers' top-k at the same tokens -> one teacher: their weighted mixture in probability space.

Every teacher arrives in the student's vocabulary (a teacher with another tokenizer is projected first,
distill/xtok/teacher.py): per token, entries `(student id or -1, logit)` and its full-vocab log-normaliser, so
p_t(i) = exp(logit - log_z_t) on its mapped entries and everything else (its tail, its unmapped entries) is its
rest, rest_t = 1 - sum p_t(mapped). With weights w_t (>= 0, summing to 1 per token) the mixture is

    m(i)    = sum over the teachers that list i of w_t p_t(i)      for i in U, the union of their mapped ids
    m(rest) = 1 - sum_U m(i) = sum_t w_t rest_t                    (the tails combined exactly)

What a teacher puts on an id of U outside its own top-k is unknown: it is somewhere in that teacher's rest, and
stays counted there, so no probability is invented and none is lost. The result is a top-k teacher like any other
(ids = U, most likely first, padded with -1; logits = log m; log-normaliser 0), and every loss term reads it
unchanged (distill.losses.MappedTopKTeacher: the rest is one bucket on both sides).

Exactness. With k = V for every teacher each rest is 0 and U is the vocabulary: the mixture is the dense one,
sum_t w_t softmax(z_t), exactly. With top-k, against the true mixture coarsened onto the same buckets (U and the
rest of the vocabulary), each id i of U is short by sum over the teachers that did not list i of w_t p_t(i), and
the rest bucket is long by the same total,

    eps = sum_t w_t p_t(U minus top-k_t)  <=  sum_t w_t min(rest_t, |U minus top-k_t| * p_t(k-th entry)),

so the two bucket distributions are within 2 * eps in L1 (`unplaced_mass_bound` computes the right side per
token). For a term of the form sum_b g(P_b) (every divergence here, at fixed student), the loss moves by at most
sum_b |P_b - P'_b| * max |g'| on the segment between them (tests/test_ensemble.py checks forward KL against a
float64 dense mixture this way). At a temperature T the mixture is formed at T = 1 and tempered as one
distribution, bucket by bucket (the dense reference: softmax(log m / T)).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from distill.errors import ConfigError

WEIGHTINGS = ("static", "confidence")


def entry_probs(ids: Tensor, logits: Tensor, log_normalizer: Tensor) -> Tensor:
    """Each entry's probability at T = 1 in float64 [N, k]: 0 for an entry without a student id or at -inf."""
    log_p = logits.double() - log_normalizer.double()[:, None]
    return torch.where(ids >= 0, log_p.exp(), 0.0)


def mix_topk(
    ids: Sequence[Tensor], logits: Sequence[Tensor], log_normalizers: Sequence[Tensor], weights: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """The weighted mixture of M teachers' top-k at N tokens (see the module docstring).

    ids[t] [N, k_t] integer (student ids, -1: none), logits[t] [N, k_t] float, log_normalizers[t] [N];
    weights [N, M] >= 0 (normalised here per token; a teacher at 0 does not enter that token).
    Returns ids [N, K] int32 (K <= sum k_t: the widest union; most likely first, -1 after it), logits [N, K] fp32
    (log m, -inf after the union), log_normalizer [N] fp32 (zeros: the entries are log-probabilities).
    """
    if not (len(ids) == len(logits) == len(log_normalizers) == weights.shape[-1]):
        raise ConfigError(
            f"mix_topk got {len(ids)} id, {len(logits)} logit and {len(log_normalizers)} normaliser arrays for "
            f"{weights.shape[-1]} weights; pass one of each per teacher."
        )
    w = weights.double()
    total = w.sum(-1, keepdim=True)
    if bool((total <= 0).any()):
        raise ConfigError("a token has no teacher with a weight > 0; every scored token needs one.")
    w = w / total
    all_ids = torch.cat([i.long() for i in ids], dim=-1)
    probs = torch.cat(
        [
            w[:, t : t + 1] * entry_probs(i, z, lz)
            for t, (i, z, lz) in enumerate(zip(ids, logits, log_normalizers, strict=True))
        ],
        dim=-1,
    )
    # Sum the probability of each distinct id: sort the ids, number the runs of equal ids, add per run.
    keyed = torch.where(probs > 0, all_ids, -1)
    sorted_ids, order = keyed.sort(dim=-1)
    sorted_probs = probs.gather(-1, order)
    starts = torch.ones_like(sorted_ids, dtype=torch.bool)
    starts[:, 1:] = sorted_ids[:, 1:] != sorted_ids[:, :-1]
    run = starts.long().cumsum(-1) - 1
    merged = torch.zeros_like(sorted_probs).scatter_add_(-1, run, sorted_probs)
    merged_ids = torch.full_like(sorted_ids, -1).scatter_(-1, run, sorted_ids)
    merged = torch.where(merged_ids >= 0, merged, 0.0)
    # Most likely first, as a teacher's own top-k: what reads entry 0 as the teacher's argmax still may.
    merged, rank = merged.sort(dim=-1, descending=True)
    merged_ids = merged_ids.gather(-1, rank)
    present = merged > 0
    width = max(1, int(present.sum(-1).max()))  # the widest union; the columns after it are empty everywhere
    out_ids = torch.where(present, merged_ids, -1)[:, :width].to(torch.int32)
    out_logits = torch.where(present, merged.clamp(min=1e-300).log(), -torch.inf)[:, :width].float()
    return out_ids, out_logits, torch.zeros(out_ids.shape[0], dtype=torch.float32)


def confidence(ids: Tensor, logits: Tensor, log_normalizer: Tensor) -> Tensor:
    """The teacher's top-1 probability at T = 1 per token [N] (float64), over its mapped entries."""
    return entry_probs(ids, logits, log_normalizer).max(dim=-1).values


def token_weights(static: Tensor, confidences: Tensor | None = None) -> Tensor:
    """Per-token teacher weights [N, M]: `static` [N, M] (0 where a teacher does not score the token), times
    each teacher's confidence [N, M] with weighting=confidence; normalised by `mix_topk`."""
    return static if confidences is None else static * confidences


def unplaced_mass_bound(
    ids: Sequence[Tensor], logits: Sequence[Tensor], log_normalizers, weights: Tensor
) -> Tensor:
    """Per token [N] (float64): an upper bound on eps, the mass the teachers put on ids of the union they did not
    list (sum_t w_t min(rest_t, |U minus top-k_t| * smallest listed p_t)); the mixture's buckets are within 2 eps
    of the true mixture's in L1."""
    w = weights.double() / weights.double().sum(-1, keepdim=True)
    union = [set() for _ in range(w.shape[0])]
    listed = []
    for i in ids:
        rows = [set(r[r >= 0].tolist()) for r in i]
        listed.append(rows)
        for u, r in zip(union, rows, strict=True):
            u |= r
    bound = torch.zeros(w.shape[0], dtype=torch.float64)
    for t, (i, z, lz) in enumerate(zip(ids, logits, log_normalizers, strict=True)):
        p = entry_probs(i, z, lz)
        rest = (1 - p.sum(-1)).clamp(min=0)
        smallest = torch.where(p > 0, p, torch.inf).min(-1).values.nan_to_num(posinf=0.0)
        missing = torch.tensor(
            [len(u - r) for u, r in zip(union, listed[t], strict=True)], dtype=torch.float64
        )
        bound += w[:, t] * torch.minimum(rest, missing * smallest)
    return bound


def check_weighting(weighting: str) -> None:
    if weighting not in WEIGHTINGS:
        raise ConfigError(f"ensemble.weighting={weighting!r} is not one of {list(WEIGHTINGS)}.")
