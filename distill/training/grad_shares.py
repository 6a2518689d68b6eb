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

from collections.abc import Callable, Mapping, Sequence

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


def measures_shares(step: int, every: int) -> bool:
    """Whether `step` measures the gradient shares: the logged steps, when shares are on (`every` > 0)."""
    return every > 0 and (step + 1) % every == 0


def shares_of(norms: Mapping[str, float]) -> dict[str, float]:
    """Norms -> shares summing to 1 (all zero: equal shares)."""
    total = sum(norms.values())
    if total <= 0.0:
        return {label: 1.0 / len(norms) for label in norms} if norms else {}
    return {label: n / total for label, n in norms.items()}


def measure_shares(weighted: Mapping[str, Tensor], params: Sequence[nn.Parameter]) -> dict[str, float]:
    """Each term's share of the gradient norm on this micro-batch (see the module docstring)."""
    return shares_of(term_grad_norms(weighted, params))


def measure_shares_on_aliases(
    module: nn.Module, weighted_terms: Callable[[nn.Module, dict[str, Tensor]], Mapping[str, Tensor]]
) -> dict[str, float]:
    """The shares through a second forward of `module` on parameter aliases (`p.detach()`: the same storage, no
    copy, but none of the hooks a wrapper put on `p`). For an engine that reduces gradients from parameter
    hooks (DeepSpeed ZeRO-1/2), where a per-term autograd.grad on the parameters themselves would feed its
    buckets. weighted_terms(module, aliases) -> {label: weighted term} runs that forward (functional_call).
    The RNG is forked, so the training forward after it draws what it would have drawn (dropout)."""
    aliases = {name: p.detach().requires_grad_(p.requires_grad) for name, p in module.named_parameters()}
    devices = sorted({p.device.index or 0 for p in aliases.values() if p.device.type == "cuda"})
    with torch.random.fork_rng(devices=devices):
        return measure_shares(weighted_terms(module, aliases), list(aliases.values()))
