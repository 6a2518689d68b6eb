"""The student's output head fused with every logit term: no [N, V] tensor ever exists.

    sums = fused_head_loss_sums(hidden [N, H], weight [V, H], bias [V] | None, row_terms, weights,
                                chunk_size=c, softcap=None)        # [n_terms] fp32 loss sums

Per block of rows (the rows any term reads): logits = hidden @ weight^T (+ bias) in the hidden states' dtype;
per chunk of c rows of the block, the logits upcast to fp32 (and soft-capped where the architecture does), every
term's loss from `chunk_losses` with ONE gradient for the weighted sum of the terms; then the block's gradient
goes through the head at once: d hidden rows = g @ weight, d weight += g^T @ hidden, and the block is freed. What survives the forward is d hidden [N, H] and d weight [V, H] (fp32,
accumulated over chunks), not the logits [N, V] and one [N, V] gradient per term of the unfused path.

The forward needs the weights of the sum it will be differentiated for: the step's plan knows them. Backward
gets one gradient per term sum; when they are proportional to `weights` (the trainer's weighted total over any
normaliser: the usual case) the stored gradient is scaled; otherwise (a per-term gradient measurement,
distill.training.grad_shares) the chunks are recomputed for the weights the backward asks for.

The idea is Liger's fused linear cross-entropy; this one serves sparse top-k teacher targets with a tail
bucket and cross-tokenizer terms as well, all from one softmax pass per chunk and temperature.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from distill.errors import ConfigError
from distill.losses.chunked import RowPlan, RowTerm, backward_is_retained, chunk_losses

# Rows per matmul block: the head's three products (logits, d hidden, d weight) run per block of rows, the
# softmax work per chunk of `chunk_size` rows inside it (an fp32 [chunk, V] working set that stays in cache).
# A block holds its logits and their gradient in the compute dtype, [block, V] each: at least 2^24 elements
# (64 MiB in bf16 whatever V), more when the head is so wide that the block's logits should match the hidden
# states [N, H] (Liger's rule, c ~ N H / V): small blocks would re-read the [V, H] weight once per block and
# turn d weight into a sum of thin outer products. Measured by bench/student_memory.py.
BLOCK_ELEMENTS = 2**24


def fused_block_rows(num_rows: int, hidden_size: int, vocab_size: int, chunk_size: int) -> int:
    """Rows per matmul block: max(2^24 / V, next power of 2 of N H / V), a multiple of chunk_size."""
    wide = math.ceil(num_rows * hidden_size / max(vocab_size, 1))
    rows = max(BLOCK_ELEMENTS // max(vocab_size, 1), 1 << max(wide - 1, 0).bit_length(), chunk_size)
    return math.ceil(rows / chunk_size) * chunk_size


def fused_head_loss_sums(
    hidden: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    row_terms: Sequence[RowTerm],
    weights: Sequence[float],
    *,
    chunk_size: int,
    softcap: float | None = None,
) -> Tensor:
    """Each logit term's loss sum [n_terms] fp32, computed from the last hidden states through the head.

    hidden [N, H] (the rows the terms' masks index), weight [V, H] (the output embedding, possibly tied),
    bias [V] or None, weights: the coefficient of each term in the sum the caller will differentiate (the
    step's plan). softcap: logits -> softcap * tanh(logits / softcap) (Gemma 2), None for none.
    Differentiable w.r.t. hidden, weight and bias (the teacher tensors the terms hold are constants).
    """
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ConfigError(
            f"fused head: hidden must be [N, H] and weight [V, H] with the same H; got {tuple(hidden.shape)} "
            f"and {tuple(weight.shape)}."
        )
    if len(row_terms) != len(weights) or not row_terms:
        raise ConfigError(
            f"fused head: {len(row_terms)} terms but {len(weights)} weights; pass one per term."
        )
    for term in row_terms:
        if term.mask.shape != hidden.shape[:1]:
            raise ConfigError(
                f"fused head: a term's mask is {tuple(term.mask.shape)} but hidden has {hidden.shape[0]} rows; "
                "flatten [B, T] masks and [B, T, H] hidden states the same way."
            )
    spec = _Spec(row_terms, [float(w) for w in weights], chunk_size, softcap)
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (hidden, weight, bias)
    )
    if needs_grad:
        return _FusedHeadLoss.apply(hidden, weight, bias, spec)
    with torch.no_grad():
        sums, _ = _run(hidden, weight, bias, spec, spec.weights, want=(False, False, False))
    return sums


class _Spec:
    """What the autograd function carries besides tensors: the terms, their weights and the chunking."""

    def __init__(
        self, row_terms: Sequence[RowTerm], weights: list[float], chunk_size: int, softcap: float | None
    ) -> None:
        self.row_terms, self.weights, self.chunk_size, self.softcap = (
            list(row_terms),
            weights,
            chunk_size,
            softcap,
        )
        self.plan = RowPlan.of([t.mask for t in row_terms])


def _run(
    hidden: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    spec: _Spec,
    weights: Sequence[float],
    *,
    want: tuple[bool, bool, bool],
) -> tuple[Tensor, tuple[Tensor | None, Tensor | None, Tensor | None]]:
    """(loss sums [n] fp32, (d hidden, d weight fp32, d bias fp32) of sum_i weights[i] * loss_i, each None unless
    `want`ed)."""
    want_grad = any(want)
    grad_hidden = torch.zeros_like(hidden) if want[0] else None
    # fp32 accumulators: a bf16 sum over many blocks would round away the small contributions.
    grad_weight = torch.zeros_like(weight, dtype=torch.float32) if want[1] else None
    grad_bias = torch.zeros_like(bias, dtype=torch.float32) if want[2] and bias is not None else None
    sums = hidden.new_zeros(len(spec.row_terms), dtype=torch.float32)
    row_losses = [t.row_loss for t in spec.row_terms]
    w, b = weight.detach(), None if bias is None else bias.detach()
    block_rows = fused_block_rows(hidden.shape[0], hidden.shape[1], weight.shape[0], spec.chunk_size)
    for block in _blocks(spec.plan.chunks(spec.chunk_size), block_rows):
        idx = torch.cat([chunk[0] for chunk in block]) if len(block) > 1 else block[0][0]
        span = _joined_span([chunk[1] for chunk in block])
        h = (hidden[span] if span is not None else hidden.index_select(0, idx)).detach()
        logits = F.linear(h, w, b)  # [r, V] in the compute dtype
        grad_logits = torch.empty_like(logits) if want_grad else None
        start = 0
        for chunk_idx, _, picks in block:
            part = slice(start, start + len(chunk_idx))
            start = part.stop
            x = logits[part].float()
            capped = None
            if spec.softcap is not None:
                capped = torch.tanh(x / spec.softcap)
                x = capped * spec.softcap
            losses, g = chunk_losses(x, chunk_idx, picks, row_losses, weights, want_grad=want_grad)
            sums += torch.stack(losses)
            if g is None:
                continue
            if capped is not None:  # d(cap * tanh(z / cap)) / dz = 1 - tanh^2
                g.mul_(1.0 - capped.square_())
            if grad_bias is not None:
                grad_bias.add_(g.sum(dim=0))
            grad_logits[part].copy_(g)  # type: ignore[index]
        del logits
        if grad_logits is None:
            continue
        if grad_hidden is not None:
            rows_grad = grad_logits @ w
            if span is not None:
                grad_hidden[span].copy_(rows_grad)
            else:
                grad_hidden.index_copy_(0, idx, rows_grad.to(grad_hidden.dtype))
        if grad_weight is not None:
            if w.dtype == torch.float32:
                grad_weight.addmm_(grad_logits.t(), h)
            else:  # the low-precision product (tensor cores), accumulated in fp32
                grad_weight.add_(grad_logits.t() @ h)
    return sums, (grad_hidden, grad_weight, grad_bias)


def _blocks(chunks: Iterator[tuple], block_rows: int) -> Iterator[list[tuple]]:
    """Consecutive chunks grouped into blocks of at most block_rows rows."""
    block: list[tuple] = []
    rows = 0
    for chunk in chunks:
        if block and rows + len(chunk[0]) > block_rows:
            yield block
            block, rows = [], 0
        block.append(chunk)
        rows += len(chunk[0])
    if block:
        yield block


def _joined_span(spans: Sequence[slice | None]) -> slice | None:
    """One slice for chunks that are each a slice and follow each other, else None."""
    if any(s is None for s in spans):
        return None
    if any(a.stop != b.start for a, b in itertools.pairwise(spans)):  # type: ignore[union-attr]
        return None
    return slice(spans[0].start, spans[-1].stop)  # type: ignore[union-attr]


def _proportion(grads: Sequence[float], weights: Sequence[float]) -> float | None:
    """c with grads == c * weights (within fp32 rounding), or None when they are not proportional."""
    j = max(range(len(weights)), key=lambda i: abs(weights[i]))
    if weights[j] == 0.0:
        return None
    c = grads[j] / weights[j]
    tol = 1e-6 * max(abs(g) for g in grads) + 1e-30
    return c if all(abs(g - c * w) <= tol for g, w in zip(grads, weights, strict=True)) else None


class _FusedHeadLoss(torch.autograd.Function):
    """Forward computes the losses and the gradient of the weighted sum; backward scales it (or recomputes)."""

    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, bias: Tensor | None, spec: _Spec) -> Tensor:
        want = (hidden.requires_grad, weight.requires_grad, bias is not None and bias.requires_grad)
        sums, grads = _run(hidden, weight, bias, spec, spec.weights, want=want)
        ctx.spec, ctx.want, ctx.grads = spec, want, grads
        ctx.save_for_backward(hidden, weight, bias)
        return sums

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_sums: Tensor):
        hidden, weight, bias = ctx.saved_tensors
        asked = grad_sums.tolist()  # one small sync: which weighted sum backward wants decides the path
        scale = _proportion(asked, ctx.spec.weights)
        if scale is not None and ctx.grads is not None:
            grads = ctx.grads
            if not backward_is_retained():  # the graph is not used again: scale in place, free the buffers
                ctx.grads = None
                out = [None if g is None else g.mul_(scale) for g in grads]
            else:
                out = [None if g is None else g * scale for g in grads]
        else:
            _, out = _run(hidden, weight, bias, ctx.spec, asked, want=ctx.want)
        grad_hidden, grad_weight, grad_bias = out
        return (
            grad_hidden,
            None if grad_weight is None else grad_weight.to(weight.dtype),
            None if grad_bias is None else grad_bias.to(bias.dtype),
            None,
        )
