"""The one chunking mechanism every logit term goes through, with or without the student's output head.

A logit term is a `RowTerm`: the rows it reads (a mask) and either `row_loss(logits_fp32 [c, V], rows [c]) ->
per-row loss [c]` or, when it reads the student only through a few log-probs per row (CE, every top-k teacher
term), a `GatheredRowLoss`. Rows are walked in chunks of `chunk_size`; each chunk is upcast to fp32 on its own,
and its loss and gradient are computed right away (`chunk_losses`: autograd on the chunk alone, or the
GatheredRowLoss closed form), so the full [N, V] fp32 logits, log-probs and gradients of a naive implementation
never exist.

Two drivers share `chunk_losses`:
- `chunked_loss_sum` (here) takes materialised logits [N, V]: the peak is one [chunk, V] fp32 working set plus
  the [N, V] gradient in the logits' dtype, which the head's backward needs anyway.
- `distill.losses.fused.fused_head_loss_sums` takes the last hidden states and the head weight: it also
  computes each chunk's logits and pushes the chunk's gradient through the head at once, so no [N, V] tensor
  exists at all, and every term of the step shares one softmax pass per chunk and temperature.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from distill.errors import ConfigError

# Rows per chunk. bench/loss_memory.py (V=151936, 4096 bf16 tokens, k=64, CPU, --chunk-sizes 16,64): 16 rows
# peak at 1/9.4 of the naive version (1260 MiB, most of it the [N, V] bf16 gradient itself) in 0.20x its time;
# 64 rows 1/8.4 in 0.34x; 1024 rows need 1/3.3 (2.4 GiB fp32 working set). A chunk that stays in cache wins.
DEFAULT_CHUNK_SIZE = 16

RowLoss = Callable[[Tensor, Tensor], Tensor]
"""(student logits of the chunk [c, V] fp32, their row indices [c] long) -> per-row loss [c] fp32. The chunk may
be a view of the caller's logits: a row loss reads it, never writes it."""


@dataclass(frozen=True)
class GatheredRowLoss:
    """A row loss that reads the student only through its log-softmax at temperature T at a few ids per row:

        loss(rows) = fn(log_softmax(z[rows] / T).gather(-1, ids(rows)), rows)

    CE (the label's log-prob) and every divergence over a top-k teacher's buckets (the k ids plus a tail made
    from their mass) have this form. Its [c, V] gradient then has a closed form through the softmax Jacobian,

        d loss / d z_j = sum_i u_i (1[j = id_i] - q_j) / T,   u = d fn / d gathered,  q = softmax(z / T),

    so autograd only runs on the small [c, m] function `fn` (its clamps and floors stay exact) and the
    vocabulary-wide work is one softmax and one scaled copy, shared by every such term at the same T. CE +
    top-64 forward KL at T 2 over 1024 rows of V 32064 (CPU, 1 thread, forward + backward): 505 ms through
    autograd, ~415 ms in closed form; the KD step of bench/student_overhead.py went from 1.74 to 1.57 s.
    """

    temperature: float
    ids: Callable[[Tensor], Tensor]  # row indices [c] -> vocabulary ids [c, m] long
    fn: Callable[[Tensor, Tensor], Tensor]  # (gathered student log-probs [c, m], row indices [c]) -> loss [c]


@dataclass(frozen=True)
class RowTerm:
    """One logit term's work: the rows it reads (`mask` [N] bool) and its row loss over them."""

    mask: Tensor
    row_loss: RowLoss | GatheredRowLoss


def row_chunks(num_rows: int, chunk_size: int) -> Iterator[slice]:
    """Consecutive slices covering range(num_rows), each at most chunk_size long."""
    if chunk_size < 1:
        raise ConfigError(f"chunk_size={chunk_size} must be >= 1 (rows per chunk); e.g. chunk_size=256.")
    for start in range(0, num_rows, chunk_size):
        yield slice(start, min(start + chunk_size, num_rows))


@dataclass(frozen=True)
class RowPlan:
    """The rows any term reads, on the host, and which of them each term reads (one device sync, up front)."""

    rows: Tensor  # [R] long, sorted, on the device
    host_rows: np.ndarray  # the same, on the host
    in_term: list[np.ndarray]  # per term: [R] bool, whether the term reads each row

    @classmethod
    def of(cls, masks: Sequence[Tensor]) -> RowPlan:
        union = masks[0].clone()
        for m in masks[1:]:
            union |= m
        rows = union.nonzero().squeeze(1)  # a CPU-GPU sync point, once per call: the chunking depends on it
        in_term = [m[rows].cpu().numpy() for m in masks] if len(masks) > 1 else [np.ones(len(rows), bool)]
        return cls(rows, rows.cpu().numpy(), in_term)

    def chunks(self, chunk_size: int) -> Iterator[tuple[Tensor, slice | None, list[Tensor | bool | None]]]:
        """Per chunk: (row indices [c], the same as a slice of the full rows when they are consecutive, and per
        term the chunk-local rows it reads: None for all of them, False for none, else an index tensor)."""
        for part in row_chunks(len(self.host_rows), chunk_size):
            idx, host = self.rows[part], self.host_rows[part]
            first, last = int(host[0]), int(host[-1])
            span = slice(first, last + 1) if last - first + 1 == len(host) else None
            picks: list[Tensor | bool | None] = []
            for flags in self.in_term:
                chunk_flags = flags[part]
                if chunk_flags.all():
                    picks.append(None)
                elif not chunk_flags.any():
                    picks.append(False)
                else:
                    picks.append(torch.as_tensor(np.flatnonzero(chunk_flags), device=idx.device))
            yield idx, span, picks


def chunk_losses(
    x: Tensor,
    rows: Tensor,
    picks: Sequence[Tensor | bool | None],
    terms: Sequence[RowLoss | GatheredRowLoss],
    weights: Sequence[float],
    *,
    want_grad: bool,
) -> tuple[list[Tensor], Tensor | None]:
    """Each term's loss sum over one chunk, and the gradient of sum_i weights[i] * loss_i w.r.t. the chunk.

    x: fp32 student logits of the chunk [c, V] (left untouched); rows: their row indices [c]; picks: per term,
    the chunk-local rows it reads (None: all, False: none, else an index tensor). Returns ([0-d fp32 per term],
    fp32 [c, V] or None). The GatheredRowLoss terms at one temperature share one softmax pass.
    """
    losses: list[Tensor] = [x.new_zeros(()) for _ in terms]
    grad: Tensor | None = None
    by_temperature: dict[float, list[int]] = {}
    for i, term in enumerate(terms):
        if picks[i] is not False and isinstance(term, GatheredRowLoss):
            by_temperature.setdefault(term.temperature, []).append(i)
    for temperature, members in by_temperature.items():
        group = [(picks[i], terms[i], weights[i]) for i in members]
        group_losses, group_grad = _gathered_group(x, rows, temperature, group, want_grad=want_grad)  # type: ignore[arg-type]
        for i, loss in zip(members, group_losses, strict=True):
            losses[i] = loss
        grad = group_grad if grad is None else grad.add_(group_grad)
    for i, term in enumerate(terms):
        if picks[i] is False or isinstance(term, GatheredRowLoss):
            continue
        pick = picks[i]
        sub_x = x if pick is None else x.index_select(0, pick)
        sub_rows = rows if pick is None else rows[pick]
        if not want_grad:
            losses[i] = term(sub_x, sub_rows).sum()
            continue
        leaf = sub_x.detach().requires_grad_()
        with torch.enable_grad():
            loss = term(leaf, sub_rows).sum()
            (term_grad,) = torch.autograd.grad(loss, leaf)
        losses[i] = loss.detach()
        if grad is None:
            grad = torch.zeros_like(x)
        if pick is None:
            grad.add_(term_grad, alpha=weights[i])
        else:
            grad.index_add_(0, pick, term_grad, alpha=weights[i])
    if want_grad and grad is None:
        grad = torch.zeros_like(x)
    return losses, grad


def _gathered_group(
    x: Tensor,
    rows: Tensor,
    temperature: float,
    group: Sequence[tuple[Tensor | None, GatheredRowLoss, float]],
    *,
    want_grad: bool,
) -> tuple[list[Tensor], Tensor | None]:
    """Losses of GatheredRowLoss terms at one temperature and the gradient of their weighted sum (see
    GatheredRowLoss): one softmax over the chunk, then per term a gather, its small `fn`, a per-row scale of the
    softmax and a scatter at its ids."""
    inv_t = 1.0 / temperature
    shifted = x - x.amax(dim=-1, keepdim=True)  # (z - max z) / T <= 0: exp cannot overflow
    if inv_t != 1.0:
        shifted.mul_(inv_t)
    gathered, ids_of = [], []
    for pick, spec, _ in group:
        sub_rows = rows if pick is None else rows[pick]
        ids = spec.ids(sub_rows).long()
        gathered.append(shifted.gather(-1, ids) if pick is None else shifted[pick[:, None], ids])
        ids_of.append((sub_rows, ids))
    exp = shifted.exp_()  # in place: the shifted logits are not needed any more
    mass = exp.sum(dim=-1, keepdim=True)
    log_mass = mass.log()
    losses: list[Tensor] = []
    # Per-row coefficient of the softmax in the gradient: -sum_terms w * sum(u) / T, and the id scatters.
    coef = x.new_zeros(x.shape[0], 1) if want_grad else None
    scatters = []
    for (pick, spec, weight), picked, (sub_rows, ids) in zip(group, gathered, ids_of, strict=True):
        log_probs = picked - (log_mass if pick is None else log_mass.index_select(0, pick))
        if not want_grad:
            losses.append(spec.fn(log_probs, sub_rows).sum())
            continue
        leaf = log_probs.detach().requires_grad_()
        with torch.enable_grad():
            loss = spec.fn(leaf, sub_rows)
            (u,) = torch.autograd.grad(loss.sum(), leaf)
        losses.append(loss.detach().sum())
        u = u * (weight * inv_t)
        row_coef = -u.sum(dim=-1, keepdim=True)
        coef = coef.add_(row_coef) if pick is None else coef.index_add_(0, pick, row_coef)  # type: ignore[union-attr]
        scatters.append((pick, ids, u))
    if not want_grad:
        return losses, None
    # softmax(z / T) = exp / mass, times the row coefficients in the same pass; then + w u / T at the ids
    # (scatter_add sums repeated ids, as the chain rule does).
    grad = exp.mul_(coef / mass)  # type: ignore[operator]
    for pick, ids, u in scatters:
        if pick is None:
            grad.scatter_add_(-1, ids, u)
        else:
            flat = (pick[:, None] * grad.shape[1] + ids).reshape(-1)
            grad.view(-1).index_add_(0, flat, u.reshape(-1))
    return losses, grad


def chunked_loss_sum(
    logits: Tensor, mask: Tensor, row_loss: RowLoss | GatheredRowLoss, chunk_size: int
) -> Tensor:
    """Sum of `row_loss` over the rows of `logits` [N, V] where `mask` [N] is True: a 0-d fp32 tensor.

    Masked-out rows are never computed. With no selected row the result is 0 and the gradient is 0.
    Differentiable w.r.t. `logits` only (teacher tensors captured by `row_loss` are constants).
    """
    plan = RowPlan.of([mask])
    if torch.is_grad_enabled() and logits.requires_grad:
        return _ChunkedLoss.apply(logits, plan, row_loss, chunk_size)
    with torch.no_grad():
        return _run_chunks(logits, plan, row_loss, chunk_size, grad_buf=None)


def _run_chunks(
    logits: Tensor,
    plan: RowPlan,
    row_loss: RowLoss | GatheredRowLoss,
    chunk_size: int,
    grad_buf: Tensor | None,
) -> Tensor:
    """Loss sum over the plan's rows; when `grad_buf` [N, V] is given, also fill its rows with d(loss)/d(logits)."""
    total = torch.zeros((), dtype=torch.float32, device=logits.device)
    for idx, span, picks in plan.chunks(chunk_size):
        # A chunk of consecutive rows, the usual case, is read as a view and its gradient written as a slice.
        chunk = logits[span] if span is not None else logits.index_select(0, idx)
        (loss,), grad = chunk_losses(
            chunk.detach().float(), idx, picks, [row_loss], [1.0], want_grad=grad_buf is not None
        )
        if grad_buf is not None and span is not None:
            grad_buf[span].copy_(grad)  # copy_ casts to the buffer's dtype
        elif grad_buf is not None:
            grad_buf.index_copy_(0, idx, grad.to(grad_buf.dtype))  # type: ignore[union-attr]
        total += loss
    return total


_retained = threading.local()


@contextmanager
def retained_backward() -> Iterator[None]:
    """Backward passes inside keep the stored gradients (a copy per pass instead of the in-place scaling), so
    one graph can be differentiated again: what a per-term gradient measurement before the real backward needs."""
    _retained.on = True
    try:
        yield
    finally:
        _retained.on = False


def backward_is_retained() -> bool:
    """Whether a backward runs inside `retained_backward()`."""
    return getattr(_retained, "on", False)


class _ChunkedLoss(torch.autograd.Function):
    """Forward computes loss and gradient chunk by chunk; backward only scales the stored gradient."""

    @staticmethod
    def forward(ctx, logits: Tensor, plan: RowPlan, row_loss: RowLoss, chunk_size: int) -> Tensor:
        grad_buf = torch.zeros_like(logits)  # masked rows keep a zero gradient
        total = _run_chunks(logits, plan, row_loss, chunk_size, grad_buf)
        ctx.grad_buf = grad_buf
        return total

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output: Tensor):
        if backward_is_retained() and ctx.grad_buf is not None:
            return ctx.grad_buf * grad_output, None, None, None
        grad, ctx.grad_buf = ctx.grad_buf, None
        if grad is None:
            raise RuntimeError(
                "chunked loss: backward ran twice through the same graph; the gradient buffer is scaled "
                "in place to save an [N, V] copy, so retain_graph=True is not supported. Recompute the loss."
            )
        # In place: a second [N, V] buffer would double the term's memory.
        return grad.mul_(grad_output), None, None, None
