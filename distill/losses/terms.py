"""The registered loss terms. Each returns (loss_sum, num_tokens); the trainer divides once by the global count.

Logit terms (kind "logits") share one signature:

    term(student_logits [N, V], teacher: TopKTeacher | DenseTeacher | None, mask [N] bool, *,
         temperature=1.0, labels=None, chunk_size=64, **params) -> (loss_sum 0-d fp32, num_tokens 0-d)

| name            | per token (t = teacher, s = student, both at temperature T)  | params                   |
|-----------------|--------------------------------------------------------------|--------------------------|
| forward_kl      | T^2 KL(t || s)                                               | select_*                 |
| reverse_kl      | T^2 KL(s || t)                                               | select_*                 |
| jsd             | T^2 [beta KL(t || m) + (1-beta) KL(s || m)], m = beta t + (1-beta) s | beta=0.5, select_* |
| skew_forward_kl | T^2 KL(t || alpha t + (1-alpha) s)                           | alpha=0.1, select_*      |
| skew_reverse_kl | T^2 KL(s || alpha s + (1-alpha) t)                           | alpha=0.1, select_*      |
| tv              | 0.5 sum |t - s|   (no T^2: a bounded distance, not a KL)     | select_*                 |
| ce              | -log softmax(z)[label] (teacher and temperature ignored)     | none                     |
| uld             | sum_j |sort(t_unmapped)_j - sort(s_outside_mapped)_j|, j < n_unmapped (no T^2) | none |
| reverse_kl_k1   | T^2 [log s(y) - log t(y)], y = the label (the student's sample); gradient k1 * d log s(y) | none |
| reverse_kl_k3   | T^2 [(r - 1) - log r], r = t(y) / s(y) (y as above)          | none                     |

The T^2 factor (Hinton et al.) keeps KL gradients the same size as T changes. With a top-k teacher (mapped or
not), "at temperature T" means the k+1 buckets tempered as pseudo-tokens on both sides (teachers.py): the
student's buckets are formed at T=1, then tempered exactly like the teacher's, so the minimum is the teacher.
select_by ("confidence" | "entropy"), select_threshold, select_keep ("above" | "below") restrict the term to the
tokens where the teacher statistic at T=1 passes the threshold; num_tokens then counts the kept tokens.

Cross-tokenizer runs pass a `MappedTopKTeacher` (teacher top-k mapped into the student's vocabulary): the KL
family then compares the mapped mass (see teachers.py), and `uld` (universal logit distillation, Boizard et
al. 2024, as GOLD's hybrid loss uses it) compares the mass that has no student counterpart by distribution
shape alone: the teacher's unmapped top-k probabilities sorted, against the student's largest probabilities
outside the mapped ids, sorted, over as many places as the row has unmapped entries.

The sampled-token estimators (`sampled_reverse_kl`) read one token per position, the one the student sampled
(on-policy batches, distill/training/onpolicy.py): through a top-k teacher in its k+1 buckets, so a sample outside
the teacher's top-k is scored as the tail bucket. Unbiased for the (bucketed) reverse KL when the rollouts sample
at the loss temperature.

Feature terms (kind "hidden") and the attention term (kind "attention") are documented on their functions.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from distill.errors import ConfigError
from distill.losses import divergences
from distill.losses.chunked import DEFAULT_CHUNK_SIZE, GatheredRowLoss, RowTerm, chunked_loss_sum
from distill.losses.registry import get, register
from distill.losses.selection import select_tokens
from distill.losses.teachers import DenseTeacher, MappedTopKTeacher, Teacher, TopKTeacher
from distill.losses.validation import check_temperature

# ---------------------------------------------------------------------------------------------- logit terms


def _logits_shape(name: str, student_logits: Tensor, mask: Tensor) -> int:
    """The vocabulary size of [N, V] logits, after checking them against the [N] mask (host-side, no sync)."""
    if student_logits.dim() != 2:
        raise ConfigError(
            f"{name}: student_logits must be [N, V]; got {tuple(student_logits.shape)}. "
            "Flatten [B, T, V] to [B*T, V] (and the mask to [B*T])."
        )
    if mask.shape != student_logits.shape[:1]:
        raise ConfigError(
            f"{name}: mask must be a bool tensor of shape [{student_logits.shape[0]}] (one per logits row); "
            f"got {mask.dtype} {tuple(mask.shape)}."
        )
    return student_logits.shape[1]


def _check_logit_inputs(name: str, mask: Tensor, vocab: int, teacher: Teacher | None) -> None:
    """Shape and type checks of a logit term's inputs (host-side only, no device sync)."""
    if mask.dim() != 1 or mask.dtype != torch.bool:
        raise ConfigError(
            f"{name}: mask must be a 1-D bool tensor [N]; got {mask.dtype} {tuple(mask.shape)}."
        )
    n = mask.shape[0]
    if teacher is None:
        return
    if teacher.num_rows != n:
        raise ConfigError(
            f"{name}: teacher has {teacher.num_rows} rows but the student has {n}; flatten both the same way."
        )
    if isinstance(teacher, DenseTeacher) and teacher.vocab_size != vocab:
        raise ConfigError(
            f"{name}: teacher vocabulary {teacher.vocab_size} != student vocabulary {vocab}; "
            "use a shared tokenizer or slice both logits to the common vocabulary."
        )
    if isinstance(teacher, TopKTeacher) and teacher.k > vocab:
        raise ConfigError(f"{name}: teacher top-k k={teacher.k} exceeds the student vocabulary {vocab}.")


_SHARED_ROW_ARGS = ("vocab_size", "temperature", "labels")


def _register_logit_term(name: str, rows: Callable[..., tuple[RowTerm, Tensor]], **own_params) -> None:
    """Register logit term `name` from its row form `rows(teacher, mask, *, vocab_size, temperature, labels,
    **params) -> (RowTerm, num_tokens)`: the call on materialised logits chunks them (chunked_loss_sum); the
    fused head (distill.losses.fused) runs the same RowTerm from the hidden states."""

    def term(
        student_logits: Tensor,
        teacher: Teacher | None,
        mask: Tensor,
        *,
        temperature: float = 1.0,
        labels: Tensor | None = None,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        **params,
    ) -> tuple[Tensor, Tensor]:
        vocab = _logits_shape(name, student_logits, mask)
        row_term, num_tokens = rows(
            teacher, mask, vocab_size=vocab, temperature=temperature, labels=labels, **params
        )
        return chunked_loss_sum(student_logits, row_term.mask, row_term.row_loss, chunk_size), num_tokens

    declared = {
        p.name: p.default
        for p in inspect.signature(rows).parameters.values()
        if p.kind is p.KEYWORD_ONLY and p.default is not p.empty and p.name not in _SHARED_ROW_ARGS
    }
    term.__name__ = term.__qualname__ = name
    term.__doc__ = f"Logit term {name!r}: see the table in distill.losses.terms."
    register(name, "logits", params={**declared, **own_params}, rows=rows)(term)


def _teacher_rows(name: str, divergence: Callable[..., Tensor], *, hinton: bool) -> Callable[..., Any]:
    """The row form of a term that compares the student with the teacher through `divergence`."""

    def rows(
        teacher: Teacher | None,
        mask: Tensor,
        *,
        vocab_size: int,
        temperature: float = 1.0,
        labels: Tensor | None = None,
        select_by: str | None = None,
        select_threshold: float | None = None,
        select_keep: str = "above",
        **div_params: float,
    ) -> tuple[RowTerm, Tensor]:
        check_temperature(temperature)
        _check_logit_inputs(name, mask, vocab_size, teacher)
        if teacher is None:
            raise ConfigError(f"loss term {name!r} needs a teacher (TopKTeacher or DenseTeacher); got None.")
        if select_by is not None:
            mask = select_tokens(teacher, mask, by=select_by, threshold=select_threshold, keep=select_keep)
        div = partial(divergence, **div_params)
        scale = temperature**2 if hinton else 1.0

        if isinstance(teacher, TopKTeacher):  # the student is read at the teacher's ids only (mapped too)
            ids = teacher.gather_ids()

            # The student's log-probs are gathered at T=1 and its buckets tempered like the teacher's (one
            # pseudo-token per bucket, teachers.py), so the gathered softmax runs at T=1 whatever T is.
            def bucket_loss(gathered: Tensor, rows: Tensor) -> Tensor:
                t = teacher.select(rows)
                return scale * div(t.log_probs(temperature), t.student_buckets(gathered, temperature))

            return RowTerm(mask, GatheredRowLoss(1.0, ids=ids.__getitem__, fn=bucket_loss)), mask.sum()

        def dense_loss(x: Tensor, rows: Tensor) -> Tensor:  # x: fp32 student logits [c, V] of `rows`
            t = teacher.select(rows)
            return scale * div(t.log_probs(temperature), t.student_log_probs(x, temperature))

        return RowTerm(mask, dense_loss), mask.sum()

    return rows


_register_logit_term("forward_kl", _teacher_rows("forward_kl", divergences.forward_kl, hinton=True))
_register_logit_term("reverse_kl", _teacher_rows("reverse_kl", divergences.reverse_kl, hinton=True))
_register_logit_term("jsd", _teacher_rows("jsd", divergences.generalized_jsd, hinton=True), beta=0.5)
_register_logit_term(
    "skew_forward_kl", _teacher_rows("skew_forward_kl", divergences.skew_forward_kl, hinton=True), alpha=0.1
)
_register_logit_term(
    "skew_reverse_kl", _teacher_rows("skew_reverse_kl", divergences.skew_reverse_kl, hinton=True), alpha=0.1
)
_register_logit_term("tv", _teacher_rows("tv", divergences.total_variation, hinton=False))


def _ce_rows(
    teacher: Teacher | None,
    mask: Tensor,
    *,
    vocab_size: int,
    temperature: float = 1.0,
    labels: Tensor | None = None,
) -> tuple[RowTerm, Tensor]:
    """Hard-label cross-entropy -log softmax(z)[label], summed over masked rows.

    `labels` [N] long is required; teacher and temperature are ignored (the data term stays at T=1).
    """
    _check_logit_inputs("ce", mask, vocab_size, None)
    if labels is None or labels.shape != mask.shape:
        got = None if labels is None else tuple(labels.shape)
        raise ConfigError(f"loss term 'ce' needs labels of shape [{mask.shape[0]}]; got {got}.")
    # -log softmax(z)[label]: the student's log-prob gathered at one id per row.
    row_loss = GatheredRowLoss(
        1.0, ids=labels[:, None].__getitem__, fn=lambda gathered, _rows: -gathered[:, 0]
    )
    return RowTerm(mask, row_loss), mask.sum()


def _uld_rows(
    teacher: Teacher | None,
    mask: Tensor,
    *,
    vocab_size: int,
    temperature: float = 1.0,
    labels: Tensor | None = None,
) -> tuple[RowTerm, Tensor]:
    """Universal logit distillation on the teacher mass that has no student token (see the table).

    Reads a `MappedTopKTeacher`; a row whose top-k is fully mapped contributes 0 (identical tokenizers give
    0 everywhere, and so does a plain TopKTeacher or DenseTeacher, which are in the student's vocabulary). Both
    sides at temperature T; an L1 distance, so no T^2 factor.
    """
    check_temperature(temperature)
    _check_logit_inputs("uld", mask, vocab_size, teacher)
    if teacher is None:
        raise ConfigError("loss term 'uld' needs a teacher (a MappedTopKTeacher from a cross-tokenizer run).")

    def row_loss(x: Tensor, rows: Tensor) -> Tensor:
        t = teacher.select(rows)
        p_t = t.unmapped_probs(temperature).sort(dim=-1, descending=True).values  # [c, k]
        n_unmapped = (p_t > 0).sum(dim=-1, keepdim=True)
        q = torch.softmax(_tempered_logits(x, temperature), dim=-1)
        q = _zero_mapped(q, t)
        q_top = q.topk(t.k, dim=-1).values  # sorted descending
        place = torch.arange(t.k, device=x.device)[None, :]
        return torch.where(place < n_unmapped, (p_t - q_top).abs(), 0.0).sum(dim=-1)

    if not isinstance(teacher, MappedTopKTeacher):
        # A teacher already in the student's vocabulary has no unmapped mass: the term is exactly 0 (config
        # validation refuses a weighted uld term without teacher.token_map.enabled, so this is not silent).
        return RowTerm(torch.zeros_like(mask), row_loss), mask.sum()
    # Rows whose top-k is fully mapped contribute exactly 0: skip their [V]-wide softmax and top-k (with a good
    # token map that is nearly every row).
    has_unmapped = (teacher.unmapped_probs(temperature) > 0).any(dim=-1)
    return RowTerm(mask & has_unmapped, row_loss), mask.sum()


# A log-prob below this is -inf in fp32 terms; the sampled-token estimators floor the teacher's at it, so a token
# the teacher gives (numerically) no mass costs a large finite amount instead of inf.
_LOG_TINY = math.log(torch.finfo(torch.float32).tiny)
# k3's ratio exp(log t - log s) is clamped to e^±20, as reinforcement-learning KL penalties clamp it: beyond that
# the estimate is noise and its gradient would swamp the batch.
_K3_LOG_RATIO_MAX = 20.0


def sampled_reverse_kl(log_s: Tensor, log_t: Tensor, estimator: str) -> Tensor:
    """Per-token estimate of KL(s || t) from the sampled token's log-probs under student and teacher [n].

    k1 = log s(y) - log t(y), unbiased when y ~ s. As a loss its value is k1 and its gradient k1 * d log s(y) (the
    score-function gradient of the reverse KL; differentiating k1 itself would give d log s(y), zero in
    expectation). k3 = (r - 1) - log r, r = t(y) / s(y) (Schulman's low-variance estimator, always >= 0),
    differentiated directly as reinforcement-learning KL penalties do: in expectation its gradient is that of
    the forward KL(t || s), the mode-covering direction.
    """
    log_t = log_t.clamp(min=_LOG_TINY)
    if estimator == "k1":
        k1 = (log_s - log_t).detach()
        return k1 * log_s - (k1 * log_s).detach() + k1
    log_r = (log_t - log_s).clamp(-_K3_LOG_RATIO_MAX, _K3_LOG_RATIO_MAX)
    return log_r.exp() - 1.0 - log_r


def _sampled_rows(name: str, estimator: str) -> Callable[..., Any]:
    """The row form of a sampled-token estimator: the label at each position is the token the student sampled
    (an on-policy batch), read in the k+1 buckets of a top-k teacher (the tail when the teacher's top-k does not
    hold it), both sides tempered as in the KL terms, times T^2."""

    def rows(
        teacher: Teacher | None,
        mask: Tensor,
        *,
        vocab_size: int,
        temperature: float = 1.0,
        labels: Tensor | None = None,
    ) -> tuple[RowTerm, Tensor]:
        check_temperature(temperature)
        _check_logit_inputs(name, mask, vocab_size, teacher)
        if teacher is None:
            raise ConfigError(f"loss term {name!r} needs a teacher (TopKTeacher or DenseTeacher); got None.")
        if labels is None or labels.shape != mask.shape:
            got = None if labels is None else tuple(labels.shape)
            raise ConfigError(
                f"loss term {name!r} needs the sampled tokens as labels [{mask.shape[0]}]; got {got}."
            )
        scale = temperature**2
        if isinstance(teacher, TopKTeacher):
            ids = teacher.gather_ids()
            match = ids == labels[:, None]
            bucket = torch.where(match.any(dim=-1), match.int().argmax(dim=-1), teacher.k)[:, None]

            def bucket_loss(gathered: Tensor, rows: Tensor) -> Tensor:
                t, b = teacher.select(rows), bucket[rows]
                log_s = t.student_buckets(gathered, temperature).gather(-1, b)[:, 0]
                log_t = t.log_probs(temperature).gather(-1, b)[:, 0]
                return scale * sampled_reverse_kl(log_s, log_t, estimator)

            return RowTerm(mask, GatheredRowLoss(1.0, ids=ids.__getitem__, fn=bucket_loss)), mask.sum()

        def dense_loss(x: Tensor, rows: Tensor) -> Tensor:
            t, y = teacher.select(rows), labels[rows][:, None]
            log_s = t.student_log_probs(x, temperature).gather(-1, y)[:, 0]
            return scale * sampled_reverse_kl(log_s, t.log_probs(temperature).gather(-1, y)[:, 0], estimator)

        return RowTerm(mask, dense_loss), mask.sum()

    return rows


_register_logit_term("ce", _ce_rows)
_register_logit_term("uld", _uld_rows)
_register_logit_term("reverse_kl_k1", _sampled_rows("reverse_kl_k1", "k1"))
_register_logit_term("reverse_kl_k3", _sampled_rows("reverse_kl_k3", "k3"))
ce = get("ce")
uld = get("uld")


def _tempered_logits(x: Tensor, temperature: float) -> Tensor:
    return x if temperature == 1.0 else x / temperature


def _zero_mapped(q: Tensor, t: MappedTopKTeacher) -> Tensor:
    """q [c, V] with the row's mapped student ids set to 0; unmapped slots (id -1) touch nothing.

    scatter_add of 0/1 counts, not a scatter of flags: unmapped slots share index 0 with a possibly mapped
    id 0, and scatter's order among duplicate indices is undefined.
    """
    hits = torch.zeros_like(q).scatter_add_(-1, t.ids.long().clamp(min=0), t.mapped.to(q.dtype))
    return q.masked_fill(hits > 0, 0.0)


# -------------------------------------------------------------------------------------------- feature terms


def _masked_pair(
    name: str, student: Tensor, teacher: Tensor, mask: Tensor, fix: str
) -> tuple[Tensor, Tensor]:
    """Entries of both tensors where the bool mask (a leading-dims prefix of their shape) is True, in fp32."""
    if (
        student.shape != teacher.shape
        or mask.shape != student.shape[: mask.dim()]
        or mask.dtype != torch.bool
    ):
        raise ConfigError(
            f"{name}: student {tuple(student.shape)} and teacher {tuple(teacher.shape)} must have the same shape "
            f"and the bool mask ({mask.dtype} {tuple(mask.shape)}) must match their leading dims; {fix}."
        )
    return student[mask].float(), teacher[mask].float()


_PROJECT = "project the student features to [N, L, H_t] with HiddenProjector first"


@register("hidden_mse", "hidden")
def hidden_mse(student_feats: Tensor, teacher_feats: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """Per token: sum over layers of the mean over H_t of (student - teacher)^2.

    student_feats [N, L, H_t] (already projected), teacher_feats [N, L, H_t], mask [N] bool.
    Returns (sum over masked tokens, number of masked tokens). Mean over H keeps the scale independent
    of the hidden size; the sum over layers makes each mapped layer count fully.
    """
    s, t = _masked_pair("hidden_mse", student_feats, teacher_feats, mask, _PROJECT)
    return (s - t).pow(2).mean(dim=-1).sum(), mask.sum()


@register("hidden_cosine", "hidden")
def hidden_cosine(student_feats: Tensor, teacher_feats: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """Per token: sum over layers of 1 - cos(student, teacher) along H_t.

    Shapes as hidden_mse. Returns (sum over masked tokens, number of masked tokens).
    """
    s, t = _masked_pair("hidden_cosine", student_feats, teacher_feats, mask, _PROJECT)
    return (1.0 - F.cosine_similarity(s, t, dim=-1)).sum(), mask.sum()


@register("attention_transfer", "attention")
def attention_transfer(
    student_attn: Tensor, teacher_attn: Tensor, mask: Tensor, *, metric: str = "kl"
) -> tuple[Tensor, Tensor]:
    """Match attention maps row by row.

    student_attn, teacher_attn [B, L, T, T] (query rows, key columns; rows are softmax outputs),
    mask [B, T] bool: the query rows to use. Per query row and layer: "kl" = KL(teacher row || student
    row), each row renormalised to sum 1 (bf16 maps drift off 1); "mse" = mean over keys of the squared
    difference. Returns (sum over masked query rows and layers, number of masked query rows).
    """
    if student_attn.dim() != 4:
        raise ConfigError(
            f"attention_transfer: expected attention [B, L, T, T]; got {tuple(student_attn.shape)}."
        )
    # [B, L, T, T] -> [B, T, L, T] so the [B, T] mask picks query rows: [n, L, T].
    s, t = _masked_pair(
        "attention_transfer",
        student_attn.transpose(1, 2),
        teacher_attn.transpose(1, 2),
        mask,
        "pass [B, L, T, T] maps of the mapped layers (head-averaged) and a [B, T] query mask",
    )
    if metric == "mse":
        per_row = (s - t).pow(2).mean(dim=-1)
    else:
        per_row = divergences.forward_kl(_row_log_dist(t), _row_log_dist(s))
    return per_row.sum(), mask.sum()


def _row_log_dist(p: Tensor) -> Tensor:
    """log of rows renormalised to sum 1, clamped at the smallest normal float.

    The clamp keeps a student zero where the teacher has mass finite (about -87 in fp32) and gives log(0)
    no infinite gradient; a clamped teacher zero weighs ~1e-38, i.e. nothing.
    """
    tiny = torch.finfo(p.dtype).tiny
    p = p / p.sum(dim=-1, keepdim=True).clamp(min=tiny)
    return p.clamp(min=tiny).log()
