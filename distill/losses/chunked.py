"""The one chunking mechanism every logit term goes through.

A logit term supplies either `row_loss(logits_fp32 [c, V], rows [c]) -> per-row loss [c]` or, when it reads
the student only through a few log-probs per row (CE, every top-k teacher term), a `GatheredRowLoss`. This
module walks the selected rows in chunks of `chunk_size`, upcasts one chunk at a time to fp32, and computes the
chunk's gradient right away (autograd on the chunk alone, or the GatheredRowLoss closed form), writing it into
a buffer of the logits' own dtype. The full [N, V] fp32 logits, log-probs and gradients of a naive
implementation never exist: the peak is one [chunk_size, V] fp32 working set plus the [N, V] gradient in the
logits' dtype, which backward needs anyway.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

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
    vocabulary-wide work is one softmax and one scaled copy. CE + top-64 forward KL at T 2 over 1024 rows of
    V 32064 (CPU, 1 thread, forward + backward): 505 ms through autograd, ~415 ms in closed form; the KD
    step of bench/student_overhead.py went from 1.74 to 1.57 s.
    """

    temperature: float
    ids: Callable[[Tensor], Tensor]  # row indices [c] -> vocabulary ids [c, m] long
    fn: Callable[[Tensor, Tensor], Tensor]  # (gathered student log-probs [c, m], row indices [c]) -> loss [c]


def row_chunks(num_rows: int, chunk_size: int) -> Iterator[slice]:
    """Consecutive slices covering range(num_rows), each at most chunk_size long."""
    if chunk_size < 1:
        raise ConfigError(f"chunk_size={chunk_size} must be >= 1 (rows per chunk); e.g. chunk_size=256.")
    for start in range(0, num_rows, chunk_size):
        yield slice(start, min(start + chunk_size, num_rows))


def chunked_loss_sum(
    logits: Tensor, mask: Tensor, row_loss: RowLoss | GatheredRowLoss, chunk_size: int
) -> Tensor:
    """Sum of `row_loss` over the rows of `logits` [N, V] where `mask` [N] is True: a 0-d fp32 tensor.

    Masked-out rows are never computed. With no selected row the result is 0 and the gradient is 0.
    Differentiable w.r.t. `logits` only (teacher tensors captured by `row_loss` are constants).
    """
    # nonzero() is a CPU-GPU sync point, once per call: the number of chunks depends on it.
    rows = mask.nonzero().squeeze(1)
    if torch.is_grad_enabled() and logits.requires_grad:
        return _ChunkedLoss.apply(logits, rows, row_loss, chunk_size)
    with torch.no_grad():
        return _run_chunks(logits, rows, row_loss, chunk_size, grad_buf=None)


def _run_chunks(
    logits: Tensor,
    rows: Tensor,
    row_loss: RowLoss | GatheredRowLoss,
    chunk_size: int,
    grad_buf: Tensor | None,
) -> Tensor:
    """Loss sum over `rows`; when `grad_buf` [N, V] is given, also fill its rows with d(loss)/d(logits)."""
    total = torch.zeros((), dtype=torch.float32, device=logits.device)
    # Row numbers on the host once (nonzero() has synced already): a chunk of consecutive rows, the usual case,
    # is then read as a view and its gradient written as a slice, with no [c, V] gather copy.
    host_rows = rows.tolist()
    for part in row_chunks(len(host_rows), chunk_size):
        idx = rows[part]
        first, last = host_rows[part.start], host_rows[part.stop - 1]
        span = slice(first, last + 1) if last - first + 1 == part.stop - part.start else None
        # [c, V] in the logits' dtype, detached: a leaf of its own when differentiated below.
        chunk = (logits[span] if span is not None else logits.index_select(0, idx)).detach()
        if isinstance(row_loss, GatheredRowLoss):
            chunk_loss, grad = _gathered_chunk(chunk.float(), idx, row_loss, want_grad=grad_buf is not None)
            chunk_loss = chunk_loss.sum()
        elif grad_buf is None:
            chunk_loss, grad = row_loss(chunk.float(), idx).sum(), None
        else:
            # Differentiate w.r.t. the chunk in its own dtype: the fp32 upcast is then an intermediate that no
            # backward formula keeps (log_softmax saves its output), so it is freed before backward runs.
            chunk.requires_grad_()
            with torch.enable_grad():
                chunk_loss = row_loss(chunk.float(), idx).sum()
                (grad,) = torch.autograd.grad(chunk_loss, chunk)
            chunk_loss = chunk_loss.detach()
        if grad_buf is not None and span is not None:
            grad_buf[span].copy_(grad)  # copy_ casts to the buffer's dtype
        elif grad_buf is not None:
            grad_buf.index_copy_(0, idx, grad.to(grad_buf.dtype))
        total += chunk_loss
    return total
    for part in row_chunks(rows.numel(), chunk_size):
        idx = rows[part]
        chunk = logits.index_select(0, idx)  # [c, V] in the logits' dtype
        if grad_buf is None:
            total += row_loss(chunk.float(), idx).sum()
            continue
        # Differentiate w.r.t. the chunk in its own dtype: the fp32 upcast is then an intermediate that no
        # backward formula keeps (log_softmax saves its output), so it is freed before backward runs.
        chunk.requires_grad_()
        with torch.enable_grad():
            chunk_loss = row_loss(chunk.float(), idx).sum()
            (grad,) = torch.autograd.grad(chunk_loss, chunk)
        grad_buf.index_copy_(0, idx, grad)
        total += chunk_loss.detach()
    return total


def _gathered_chunk(
    x: Tensor, rows: Tensor, spec: GatheredRowLoss, *, want_grad: bool
) -> tuple[Tensor, Tensor | None]:
    """(per-row loss [c], d loss / d x [c, V] fp32 or None) of one chunk; x (fp32 [c, V]) is left untouched."""
    inv_t = 1.0 / spec.temperature
    ids = spec.ids(rows).long()
    shifted = x - x.amax(dim=-1, keepdim=True)  # (z - max z) / T <= 0: exp cannot overflow
    if inv_t != 1.0:
        shifted.mul_(inv_t)
    picked = shifted.gather(-1, ids)
    exp = shifted.exp_()  # in place: the shifted logits are not needed any more
    mass = exp.sum(dim=-1, keepdim=True)
    gathered = picked - mass.log()  # log_softmax(z / T) at ids
    if not want_grad:
        return spec.fn(gathered, rows), None
    leaf = gathered.detach().requires_grad_()
    with torch.enable_grad():
        loss = spec.fn(leaf, rows)
        (u,) = torch.autograd.grad(loss.sum(), leaf)
    # softmax(z / T) = exp / mass, scaled by -sum(u) / T in the same pass; then + u / T at the ids (scatter_add
    # sums repeated ids, as the chain rule does).
    grad = exp.mul_(-u.sum(dim=-1, keepdim=True) * inv_t / mass)
    grad.scatter_add_(-1, ids, u * inv_t)
    return loss.detach(), grad


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


class _ChunkedLoss(torch.autograd.Function):
    """Forward computes loss and gradient chunk by chunk; backward only scales the stored gradient."""

    @staticmethod
    def forward(ctx, logits: Tensor, rows: Tensor, row_loss: RowLoss, chunk_size: int) -> Tensor:
        grad_buf = torch.zeros_like(logits)  # masked rows keep a zero gradient
        total = _run_chunks(logits, rows, row_loss, chunk_size, grad_buf)
        ctx.grad_buf = grad_buf
        return total

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output: Tensor):
        if getattr(_retained, "on", False) and ctx.grad_buf is not None:
            return ctx.grad_buf * grad_output, None, None, None
        grad, ctx.grad_buf = ctx.grad_buf, None
        if grad is None:
            raise RuntimeError(
                "chunked loss: backward ran twice through the same graph; the gradient buffer is scaled "
                "in place to save an [N, V] copy, so retain_graph=True is not supported. Recompute the loss."
            )
        # In place: a second [N, V] buffer would double the term's memory.
        return grad.mul_(grad_output), None, None, None
