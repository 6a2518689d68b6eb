"""Teacher distributions as the loss sees them: top-k with a tail bucket, or dense.

Top-k-with-tail semantics
-------------------------
A `TopKTeacher` row holds the teacher's k most likely ids, their raw logits at T=1 and the full-vocab
logsumexp at T=1 (`log_normalizer`). That tells how much probability lies outside the top-k, but not how it
is spread, so teacher and student are compared over k+1 buckets: the k ids plus one "tail" bucket.

* Teacher tail at T=1: log m_tail = log1mexp(logsumexp(logits) - log_normalizer) = log(1 - sum_topk p_i).
* Temperature T: every bucket logit, tail included (tail logit = log_normalizer + log m_tail), is divided
  by T and renormalised: teacher buckets = log_softmax([logits, tail_logit] / T). The tail acts as one
  pseudo-token; the true tempered tail mass cannot be known from the top-k alone.
* Student: full-vocab log_softmax(z / T), gather the k ids, student tail = log1mexp(logsumexp(gathered)).
* Negligible tail: when the teacher's tail mass is below 1e-6 (or below the fp32 rounding noise of
  `logsumexp(logits) - log_normalizer`, which grows with |log_normalizer|), e.g. k == V, the tail bucket
  is -inf on both sides, so k == V reproduces the exact full-vocab divergence.

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
        """Collapse student fp32 logits [N, V] onto the teacher's buckets: [N, k+1] log-probs."""
        log_q = torch.log_softmax(_tempered(student_logits, temperature), dim=-1)
        return self.student_buckets(log_q.gather(-1, self.gather_ids()))

    def gather_ids(self) -> Tensor:
        """[N, k] long: the student vocabulary ids whose log-probs `student_buckets` reads."""
        return self.ids.long()

    def student_buckets(self, gathered: Tensor) -> Tensor:
        """The student's [N, k+1] bucket log-probs from its log-probs at `gather_ids()` [N, k]: the buckets
        depend on the student only through those, which is what lets the chunked loss skip autograd over the
        vocabulary (distill.losses.chunked.GatheredRowLoss)."""
        _, negligible = self.tail()
        tail = torch.where(negligible, -torch.inf, log1mexp(torch.logsumexp(gathered, dim=-1)))
        return torch.cat([gathered, tail[:, None]], dim=-1)

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

    def student_buckets(self, gathered: Tensor) -> Tensor:
        """The student's buckets (mapped ids + rest) from its log-probs at `gather_ids()`: [N, k+1]."""
        mapped = self.mapped
        # Unmapped slots sit at a huge finite floor, not -inf: an all-(-inf) logsumexp has a NaN gradient.
        mass = torch.logsumexp(gathered.masked_fill(~mapped, _LOG_FLOOR), dim=-1)
        _, negligible = self.tail()
        rest = torch.where(negligible, -torch.inf, log1mexp(mass))
        return torch.cat([gathered.masked_fill(~mapped, -torch.inf), rest[:, None]], dim=-1)

    def unmapped_probs(self, temperature: float = 1.0) -> Tensor:
        """Tempered teacher probabilities of the unmapped top-k entries, 0 elsewhere: [N, k] fp32.

        Buckets are all k entries plus the true tail, at temperature T (same convention as TopKTeacher).
        """
        # A plain TopKTeacher: its tail is the true tail (self.tail() is the rest bucket, unmapped entries included).
        probs = TopKTeacher(self.ids, self.logits, self.log_normalizer).log_probs(temperature)[:, :-1].exp()
        return probs.masked_fill(self.mapped, 0.0)


Teacher = TopKTeacher | DenseTeacher | MappedTopKTeacher
