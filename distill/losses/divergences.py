"""Divergences between two distributions given as log-probs over the same support.

Every function takes teacher log-probs `t` and student log-probs `s` of shape [..., S] and returns the
per-row value [...], reducing over the last dimension. Conventions:

* 0 * log 0 = 0: buckets where the weighting distribution has no mass contribute nothing.
* -inf log-probs (a dropped tail bucket, a masked vocabulary entry) are floored to a huge negative finite
  number first, so no -inf - -inf (NaN) reaches a value or a gradient; exp() of the floor is still 0.
* Mixtures are formed in log space with logaddexp, never by exp-ing and logging again.

Inputs are expected in fp32 (the caller upcasts); the functions work in any float dtype.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

_LOG_FLOOR = -1e30  # exp() is 0 in fp32 and fp64, differences with real log-probs stay finite


def _finite(log_p: Tensor) -> Tensor:
    return log_p.clamp(min=_LOG_FLOOR)


def _kl(log_p: Tensor, log_q: Tensor) -> Tensor:
    """KL(p || q) = sum p (log p - log q) over the last dim, on floored inputs, with 0 log 0 = 0."""
    p = log_p.exp()
    # where() keeps rows with p == 0 out of both value and gradient (their log ratio may be meaningless).
    ratio = torch.where(p > 0, log_p - log_q, 0.0)
    return (p * ratio).sum(dim=-1)


def _log_mix(log_p: Tensor, log_q: Tensor, w: float) -> Tensor:
    """log(w * p + (1 - w) * q) for 0 <= w <= 1, in log space."""
    if w == 0.0:
        return log_q
    if w == 1.0:
        return log_p
    return torch.logaddexp(log_p + math.log(w), log_q + math.log1p(-w))


def forward_kl(t: Tensor, s: Tensor) -> Tensor:
    """KL(teacher || student): mode-covering. [..., S] x2 -> [...]."""
    return _kl(_finite(t), _finite(s))


def reverse_kl(t: Tensor, s: Tensor) -> Tensor:
    """KL(student || teacher): mode-seeking. [..., S] x2 -> [...]."""
    return _kl(_finite(s), _finite(t))


def generalized_jsd(t: Tensor, s: Tensor, beta: float) -> Tensor:
    """GKD generalized JSD: beta * KL(t || m) + (1 - beta) * KL(s || m), m = beta t + (1 - beta) s.

    0 < beta < 1; beta = 0.5 is the symmetric Jensen-Shannon divergence. [..., S] x2 -> [...].
    """
    t, s = _finite(t), _finite(s)
    m = _log_mix(t, s, beta)
    return beta * _kl(t, m) + (1.0 - beta) * _kl(s, m)


def skew_forward_kl(t: Tensor, s: Tensor, alpha: float) -> Tensor:
    """DistiLLM skew KL: KL(t || alpha t + (1 - alpha) s), 0 <= alpha < 1. [..., S] x2 -> [...]."""
    t, s = _finite(t), _finite(s)
    return _kl(t, _log_mix(t, s, alpha))


def skew_reverse_kl(t: Tensor, s: Tensor, alpha: float) -> Tensor:
    """DistiLLM skew reverse KL: KL(s || alpha s + (1 - alpha) t), 0 <= alpha < 1. [..., S] x2 -> [...]."""
    t, s = _finite(t), _finite(s)
    return _kl(s, _log_mix(s, t, alpha))


def total_variation(t: Tensor, s: Tensor) -> Tensor:
    """0.5 * sum |p - q|, in [0, 1]. [..., S] x2 -> [...]."""
    return 0.5 * (t.exp() - s.exp()).abs().sum(dim=-1)


def entropy(log_p: Tensor) -> Tensor:
    """-sum p log p with 0 log 0 = 0. [..., S] -> [...]."""
    log_p = _finite(log_p)
    p = log_p.exp()
    return -(p * torch.where(p > 0, log_p, 0.0)).sum(dim=-1)
