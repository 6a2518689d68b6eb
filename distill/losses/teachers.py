"""Teacher distributions as the loss sees them: top-k with a tail bucket, or dense.

Top-k-with-tail semantics
-------------------------
A `TopKTeacher` row holds the teacher's k most likely ids, their raw logits at T=1 and the full-vocab
logsumexp at T=1 (`log_normalizer`). That tells how much probability lies outside the top-k, but not how it
is spread, so teacher and student are compared over k+1 buckets: the k ids plus one "tail" bucket.

* Teacher tail at T=1: log m_tail = log1mexp(logsumexp(logits) - log_normalizer) = log(1 - sum_topk p_i).
* Student at T=1: full-vocab log_softmax(z), gather the k ids, student tail = log1mexp(logsumexp(gathered)).
* Temperature T: both sides are tempered the same way, bucket by bucket: every bucket logit, tail included
  (teacher tail logit = log_normalizer + log m_tail, student tail logit = its log tail mass), is divided by T
  and renormalised: buckets(T) = log_softmax(buckets(1) / T). The tail acts as one pseudo-token on BOTH sides:
  the teacher's true tempered tail cannot be known from the top-k alone, and the student's must then be
  tempered the same way, or the loss is not minimised at the teacher. (Tempering the student over its full
  vocabulary instead gives its tail sum_j q_j^(1/T), far more than the teacher's (sum_j p_j)^(1/T): on the
  cross-tokenizer demo pair a student equal to the teacher paid forward KL 4.2 nats per token at T 3 (T^2
  included; a 0.02% rest spread over ~300 student ids), and every step at T > 1 pushed the tail, under a token
  map all of the student's vocabulary outside the mapped ids, towards 0.)
* Negligible tail: when the teacher's tail mass is below 1e-6 (or below the fp32 rounding noise of
  `logsumexp(logits) - log_normalizer`, which grows with |log_normalizer|), e.g. k == V, the tail bucket
  is -inf on both sides. At T != 1 the student's tail still enters the normaliser of its tempered buckets (so
  its mass is still pushed down) unless it is below 1e-6 too (e.g. k == V, where 1 - sum q is fp32 noise),
  so k == V reproduces the exact full-vocab divergence at every T.

`DenseTeacher` holds full [N, V] logits; its support is the vocabulary itself.

Both classes give the same three things to a loss: `log_probs(T)` (teacher log-probs on the support,
[n, S]), `student_log_probs(z, T)` (the student's fp32 logits collapsed onto the same support, [n, S]) and
`select(rows)` (the same teacher restricted to some rows, used per chunk).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import TypeVar

import torch
from torch import Tensor

from distill.errors import ConfigError

_LN2 = math.log(2.0)
_TAIL_MIN_MASS = 1e-6  # below this the tail bucket is dropped on both sides
_LOG_FLOOR = -1e30  # finite stand-in for log 0 where a gradient flows (as in divergences)


def log1mexp(x: Tensor) -> Tensor:
    """log(1 - exp(x)) for x <= 0, elementwise; finite, with finite derivatives, for every input.

    x is first clamped just below 0 (log(0) would be -inf with an infinite derivative). Then the two
    classic branches (Maechler 2012): log(-expm1(x)) near 0, log1p(-exp(x)) further out. Each branch
    gets its input clamped into its own safe range, because autograd still differentiates the branch
    torch.where did not pick, and an infinite local derivative there would turn 0 * inf into NaN.
    """
    x = x.clamp(max=-torch.finfo(x.dtype).eps)
    near_zero = torch.log(-torch.expm1(x.clamp(min=-_LN2)))
    far = torch.log1p(-torch.exp(x.clamp(max=-_LN2)))
    return torch.where(x > -_LN2, near_zero, far)


def _tempered(x: Tensor, temperature: float) -> Tensor:
    """x / T without the [n, V] copy when T == 1 (the usual case for LLM distillation)."""
    return x if temperature == 1.0 else x / temperature


def tempered_student_buckets(
    entries: Tensor, log_rest: Tensor, rest_dropped: Tensor, temperature: float
) -> Tensor:
    """The student's bucket log-probs at temperature T from its buckets at T=1: [N, k+1] (rest last).

    entries [N, k]: the student's log-probs at T=1 of the teacher's entries (-inf for a slot with no student id);
    log_rest [N]: its log mass outside them; rest_dropped [N] bool: the teacher's rest is negligible (its bucket
    is -inf on both sides). Each bucket is tempered as one pseudo-token, exactly as the teacher's buckets are
    (`TopKTeacher.log_probs`), so the student equal to the teacher gives zero divergence at every T.
    """
    if temperature == 1.0:  # the buckets are normalised already; the common case stays bit for bit as it was
        return torch.cat([entries, log_rest.masked_fill(rest_dropped, -torch.inf)[:, None]], dim=-1)
    # Where the teacher's rest is dropped the student's still counts in the normaliser (so it is pushed down),
    # unless it is below what fp32 resolves of 1 - sum q (k == V, a student with all mass on the entries).
    in_normaliser = ~rest_dropped | (log_rest > math.log(_TAIL_MIN_MASS))
    tempered = torch.cat([entries, log_rest.masked_fill(~in_normaliser, -torch.inf)[:, None]], dim=-1)
    log_probs = torch.log_softmax(tempered / temperature, dim=-1)
    return torch.cat(
        [log_probs[:, :-1], log_probs[:, -1:].masked_fill(rest_dropped[:, None], -torch.inf)], dim=-1
    )


_Rows = TypeVar("_Rows", bound="_PerRowTensors")


class _PerRowTensors:
    """What every teacher dataclass shares: each of its fields holds one row per token ([N, ...]), so the teacher
    restricted to some rows is every field indexed by them (one rule, so no subclass can drop or retype a field)."""

    @property
    def num_rows(self) -> int:
        return getattr(self, fields(self)[0].name).shape[0]

    def select(self: _Rows, rows: Tensor | slice) -> _Rows:
        """The same teacher restricted to `rows` (a LongTensor of row indices or a slice)."""
        return type(self)(*(getattr(self, f.name)[rows] for f in fields(self)))


@dataclass
class TopKTeacher(_PerRowTensors):
    """Teacher top-k per token, with the full-vocab normaliser so the tail mass is known.

    ids            [N, k] integer  the teacher's k most likely next-token ids (int32 on the wire is fine)
    logits         [N, k] float    their raw logits at T=1 (any float dtype; upcast to fp32 here)
    log_normalizer [N] float       full-vocab logsumexp of the teacher logits at T=1
    """

    ids: Tensor
    logits: Tensor
    log_normalizer: Tensor

    def __post_init__(self) -> None:
        if self.ids.dim() != 2 or self.logits.shape != self.ids.shape:
            raise ConfigError(
                f"TopKTeacher needs ids and logits of the same shape [N, k]; got ids {tuple(self.ids.shape)} "
                f"and logits {tuple(self.logits.shape)}. Flatten [B, T, k] to [B*T, k] before building it."
            )
        if self.log_normalizer.shape != self.ids.shape[:1]:
            raise ConfigError(
                f"TopKTeacher.log_normalizer must be [N] = [{self.ids.shape[0]}]; got "
                f"{tuple(self.log_normalizer.shape)}. Flatten [B, T] to [B*T]."
            )

    @property
    def k(self) -> int:
        return self.ids.shape[1]

    def tail(self) -> tuple[Tensor, Tensor]:
        """(log tail mass at T=1 [N] fp32, -inf where negligible; negligible [N] bool)."""
        log_z = self.log_normalizer.float()
        gap = torch.logsumexp(self.logits.float(), dim=-1) - log_z  # log(top-k mass), <= 0 up to rounding
        # Both terms of `gap` are O(|log_z|) fp32 numbers, so their difference carries ~eps*|log_z| noise:
        # a tail smaller than that is not a measurement, drop it like a truly empty one.
        noise = 16 * torch.finfo(torch.float32).eps * (1 + log_z.abs())
        negligible = gap >= -(_TAIL_MIN_MASS + noise)
        log_tail = torch.where(negligible, -torch.inf, log1mexp(gap))
        return log_tail, negligible

    def log_probs(self, temperature: float = 1.0) -> Tensor:
        """Teacher log-probs over the k+1 buckets at temperature T: [N, k+1] fp32 (tail last)."""
        log_tail, _ = self.tail()
        tail_logit = self.log_normalizer.float() + log_tail
        buckets = torch.cat([self.logits.float(), tail_logit[:, None]], dim=-1)
        return torch.log_softmax(_tempered(buckets, temperature), dim=-1)

    def student_log_probs(self, student_logits: Tensor, temperature: float = 1.0) -> Tensor:
        """Collapse student fp32 logits [N, V] onto the teacher's buckets at T=1, then temper: [N, k+1]."""
        log_q = torch.log_softmax(student_logits, dim=-1)
        return self.student_buckets(log_q.gather(-1, self.gather_ids()), temperature)

    def gather_ids(self) -> Tensor:
        """[N, k] long: the student vocabulary ids whose log-probs `student_buckets` reads."""
        return self.ids.long()

    def student_buckets(self, gathered: Tensor, temperature: float = 1.0) -> Tensor:
        """The student's [N, k+1] bucket log-probs at T from its log-probs at T=1 at `gather_ids()` [N, k]: the
        buckets depend on the student only through those, which is what lets the chunked loss skip autograd over
        the vocabulary (distill.losses.chunked.GatheredRowLoss, at temperature 1)."""
        _, negligible = self.tail()
        rest = log1mexp(torch.logsumexp(gathered, dim=-1))
        return tempered_student_buckets(gathered, rest, negligible, temperature)

    def top1_prob(self) -> Tensor:
        """Probability of the teacher's most likely token at T=1: [N] fp32 (the tail is not a token)."""
        return self.log_probs(1.0)[:, :-1].max(dim=-1).values.exp()


@dataclass
class DenseTeacher(_PerRowTensors):
    """Full teacher logits per token: logits [N, V] (any float dtype; upcast per chunk)."""

    logits: Tensor

    def __post_init__(self) -> None:
        if self.logits.dim() != 2:
            raise ConfigError(
                f"DenseTeacher.logits must be [N, V]; got {tuple(self.logits.shape)}. "
                "Flatten [B, T, V] to [B*T, V] before building it."
            )

    @property
    def vocab_size(self) -> int:
        return self.logits.shape[1]

    def log_probs(self, temperature: float = 1.0) -> Tensor:
        """Teacher log-probs over the vocabulary at temperature T: [N, V] fp32."""
        return torch.log_softmax(_tempered(self.logits.float(), temperature), dim=-1)

    def student_log_probs(self, student_logits: Tensor, temperature: float = 1.0) -> Tensor:
        """Student log-probs over the vocabulary at temperature T: [N, V] fp32 (no collapsing needed)."""
        return torch.log_softmax(_tempered(student_logits, temperature), dim=-1)

    def top1_prob(self) -> Tensor:
        """Probability of the teacher's most likely token at T=1: [N] fp32."""
        return self.log_probs(1.0).max(dim=-1).values.exp()


@dataclass
class MappedTopKTeacher(TopKTeacher):
    """A teacher top-k whose ids were mapped into the student's vocabulary (cross-tokenizer distillation).

    ids            [N, k] integer  student ids; -1 where the teacher token has no student counterpart
    logits         [N, k] float    raw teacher logits at T=1; -inf for an entry merged into an earlier one
                                   (several teacher tokens mapped to one student id: their mass is summed
                                   into the first) and for rows with no aligned teacher position
    log_normalizer [N] float       the teacher's full-vocab logsumexp at T=1

    KL-family terms see buckets = the mapped student ids + one "rest" bucket, exactly like `TopKTeacher`'s
    top-k + tail: the teacher's rest is everything not mapped (its tail and its unmapped top-k entries), the
    student's rest is its mass outside the mapped ids. With every id mapped (identical tokenizers) this is
    `TopKTeacher` to the last bit. A row with nothing mapped is one bucket on both sides: zero loss, zero
    gradient. The unmapped entries are what the `uld` term compares.
    """

    @property
    def mapped(self) -> Tensor:
        """[N, k] bool: the entry has a student id."""
        return self.ids >= 0

    def _mapped_logits(self) -> Tensor:
        return self.logits.float().masked_fill(~self.mapped, -torch.inf)

    def tail(self) -> tuple[Tensor, Tensor]:
        """(log rest mass at T=1 [N] fp32, -inf where negligible; negligible [N] bool). See TopKTeacher.tail."""
        return TopKTeacher(self.ids, self._mapped_logits(), self.log_normalizer).tail()

    def log_probs(self, temperature: float = 1.0) -> Tensor:
        """Teacher log-probs over the mapped ids + rest: [N, k+1] fp32 (unmapped slots -inf, rest last)."""
        return TopKTeacher(self.ids, self._mapped_logits(), self.log_normalizer).log_probs(temperature)

    def gather_ids(self) -> Tensor:
        """[N, k] long: the mapped student ids; unmapped slots read id 0, which `student_buckets` ignores."""
        return self.ids.long().clamp(min=0)

    def student_buckets(self, gathered: Tensor, temperature: float = 1.0) -> Tensor:
        """The student's buckets (mapped ids + rest) at T from its log-probs at T=1 at `gather_ids()`:
        [N, k+1]. Both rests (the teacher's: its tail and unmapped entries; the student's: all its other ids)
        are tempered as one pseudo-token each: see the module docstring."""
        mapped = self.mapped
        # Unmapped slots sit at a huge finite floor, not -inf: an all-(-inf) logsumexp has a NaN gradient.
        mass = torch.logsumexp(gathered.masked_fill(~mapped, _LOG_FLOOR), dim=-1)
        _, negligible = self.tail()
        entries = gathered.masked_fill(~mapped, -torch.inf)
        return tempered_student_buckets(entries, log1mexp(mass), negligible, temperature)

    def unmapped_probs(self, temperature: float = 1.0) -> Tensor:
        """Tempered teacher probabilities of the unmapped top-k entries, 0 elsewhere: [N, k] fp32.

        Buckets are all k entries plus the true tail, at temperature T (same convention as TopKTeacher).
        """
        # A plain TopKTeacher: its tail is the true tail (self.tail() is the rest bucket, unmapped entries included).
        probs = TopKTeacher(self.ids, self.logits, self.log_normalizer).log_probs(temperature)[:, :-1].exp()
        return probs.masked_fill(self.mapped, 0.0)


Teacher = TopKTeacher | DenseTeacher | MappedTopKTeacher
