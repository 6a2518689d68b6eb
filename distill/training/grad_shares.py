"""Each loss term's share of the gradient: which term actually moves the student.

A loss value says little about influence (a feature term of 34 may move the weights less than a KL of 2, or
far more), so on a measured step every active term is backpropagated on its own through one micro-batch and
its gradient norm over the trainable parameters is taken:

    share_i = ||grad(w_i L_i)|| / sum_j ||grad(w_j L_j)||        (shares sum to 1)

Norms, not squared norms, so two terms of equal pull get equal shares whatever the angle between them. It costs
one extra backward per active term on the measured micro-batch, paid only on logged steps (`train.log_every`,
with `tracking.grad_shares`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

from distill.losses.chunked import retained_backward


def term_grad_norms(weighted: Mapping[str, Tensor], params: Sequence[nn.Parameter]) -> dict[str, float]:
    """||d(term)/d(params)|| for each weighted term (a 0-d tensor of one micro-batch's graph, kept for the
    caller's own backward)."""
    trainable = [p for p in params if p.requires_grad]
    norms: dict[str, float] = {}
    for label, loss in weighted.items():
        if not loss.requires_grad:
            norms[label] = 0.0
            continue
        with retained_backward():  # the caller's backward reuses the graph and the chunked losses' gradients
            grads = torch.autograd.grad(loss, trainable, retain_graph=True, allow_unused=True)
        squares = [g.detach().float().pow(2).sum() for g in grads if g is not None]
        norms[label] = float(torch.stack(squares).sum().sqrt()) if squares else 0.0
    return norms


def shares_of(norms: Mapping[str, float]) -> dict[str, float]:
    """Norms -> shares summing to 1 (all zero: equal shares)."""
    total = sum(norms.values())
    if total <= 0.0:
        return {label: 1.0 / len(norms) for label in norms} if norms else {}
    return {label: n / total for label, n in norms.items()}


def measure_shares(weighted: Mapping[str, Tensor], params: Sequence[nn.Parameter]) -> dict[str, float]:
    """Each term's share of the gradient norm on this micro-batch (see the module docstring)."""
    return shares_of(term_grad_norms(weighted, params))
