"""Held-out evaluation: cross-entropy, perplexity, KL to the teacher, top-1 agreement, exact-match, tokens/s."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from distill import losses
from distill.batch import ROUTE, BatchId, left_pad, next_token_labels
from distill.data.task import answer_matches
from distill.losses import MappedTopKTeacher

Batch = dict[str, torch.Tensor]
TeacherOutputs = Callable[[BatchId, Batch], Mapping[str, torch.Tensor]]
"""(held-out batch id, batch) -> the teacher's `topk_ids`, `topk_logits`, `log_normalizer` for it [B, T, ...]."""

HELDOUT_EPOCH = -1
"""Held-out batch i is batch (-1, i) wherever teacher outputs are named by batch id (teacher actors, caches)."""


@torch.inference_mode()
def heldout_metrics(
    model: nn.Module,
    batches: Iterable[Batch],
    teacher: TeacherOutputs | None = None,
) -> dict[str, float]:
    """Token-averaged metrics over trained positions (loss_mask) of the held-out batches.

    ce: mean next-token cross-entropy in nats; ppl = exp(ce); accuracy: share of positions where the student's
    argmax is the next token (the label). With the teacher's outputs for the batches (what its actors, an offline
    cache or an engine ship: top-k ids and logits with the log-normaliser; never a teacher model here):
    agreement = share of positions where the student's argmax is the teacher's (its top-1 id, exact), and
    kl_to_teacher = mean KL(teacher || student) at T=1 over the teacher's top-k ids plus the tail bucket (the
    training loss's own divergence; the full-vocabulary KL at k = V, a lower bound of it below).
    Batches of several teachers (a `teacher` route per row) add the same figures per route value:
    `by_route/<index>/{ce,agreement,kl_to_teacher,tokens}` (index -1: the ensemble's rows).
    """
    model.eval()
    ce_sum = kl_sum = agree = correct = 0.0
    tokens = 0
    routes: dict[int, torch.Tensor] = {}  # route -> [ce, kl, agree, tokens] sums
    seconds = 0.0
    for index, batch in enumerate(batches):
        start = time.perf_counter()
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"].long()).logits
        seconds += time.perf_counter() - start
        mask = batch["loss_mask"].bool()
        s_logp = F.log_softmax(logits[mask].float(), dim=-1)  # [n, V]
        labels = next_token_labels(batch["input_ids"])[mask]
        token_ce = F.nll_loss(s_logp, labels, reduction="none")
        ce_sum += float(token_ce.sum())
        correct += float((s_logp.argmax(-1) == labels).sum())
        tokens += int(mask.sum())
        if teacher is not None:
            top = teacher((HELDOUT_EPOCH, index), batch)
            # Mapped: a mixture of several teachers has empty (-1) slots; with every id present it is TopKTeacher.
            t = MappedTopKTeacher(
                ids=top["topk_ids"][mask].long(),
                logits=top["topk_logits"][mask].float(),
                log_normalizer=top["log_normalizer"][mask].float(),
            )
            everywhere = torch.ones(t.num_rows, dtype=torch.bool)
            kl_sum += float(losses.get("forward_kl")(logits[mask].float(), t, everywhere, temperature=1.0)[0])
            agrees = s_logp.argmax(-1) == t.ids[:, 0]
            agree += float(agrees.sum())
            if batch.get(ROUTE) is not None:
                token_route = batch[ROUTE][:, None].expand_as(mask)[mask]
                _add_by_route(routes, token_route, token_ce, agrees, logits[mask], t)
    n = max(tokens, 1)
    out = {
        "ce": ce_sum / n,
        "ppl": math.exp(min(ce_sum / n, 50.0)),
        "accuracy": correct / n,
        "tokens": tokens,
    }
    out["tokens_per_s"] = tokens / max(seconds, 1e-9)
    if teacher is not None:
        out["kl_to_teacher"] = kl_sum / n
        out["agreement"] = agree / n
    return out | _by_route(routes)


def _add_by_route(routes: dict, token_route, token_ce, agrees, logits, teacher) -> None:
    """Add each route value's [ce, kl, agreement, tokens] sums over one batch's trained tokens to `routes`."""
    for r in token_route.unique().tolist():
        at = token_route == r
        kl = losses.get("forward_kl")(logits.float(), teacher, at, temperature=1.0)[0]
        sums = torch.tensor([float(token_ce[at].sum()), float(kl), float(agrees[at].sum()), float(at.sum())])
        routes[r] = routes.get(r, torch.zeros(4, dtype=torch.float64)) + sums


def _by_route(routes: dict) -> dict[str, float]:
    out: dict[str, float] = {}
    for r, (ce, kl, agree, n) in sorted((r, v.tolist()) for r, v in routes.items()):
        m = max(n, 1.0)
        prefix = f"by_route/{r}"
        out |= {f"{prefix}/ce": ce / m, f"{prefix}/kl_to_teacher": kl / m, f"{prefix}/agreement": agree / m}
        out[f"{prefix}/tokens"] = int(n)
    return out


@torch.inference_mode()
def exact_match(
    model: nn.Module,
    prompts: Sequence[list[int]],
    answers: Sequence[int | str],
    *,
    decode: Callable[[list[int]], str],
    pad_id: int,
    eos_id: int,
    max_new_tokens: int,
    batch_size: int = 32,
) -> dict[str, float]:
    """Greedy-decode each prompt and compare its final answer to the reference (`task.answer_matches`: the last
    `\\boxed{...}` after `</think>`, else `#### N`; numbers by value)."""
    model.eval()
    correct = ended = 0
    generated_tokens = 0
    greedy = dict(max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad_id, eos_token_id=eos_id)
    start = time.perf_counter()
    for i in range(0, len(prompts), batch_size):
        ids, attn = left_pad(prompts[i : i + batch_size], pad_id)
        out = model.generate(input_ids=ids, attention_mask=attn, **greedy)
        for row, seq in enumerate(out[:, ids.shape[1] :].tolist()):
            if eos_id in seq:
                seq = seq[: seq.index(eos_id)]
                ended += 1
            generated_tokens += len(seq)
            correct += int(answer_matches(decode(seq), answers[i + row]))
    seconds = time.perf_counter() - start
    n = max(len(prompts), 1)
    return {
        "exact_match": correct / n,
        # A student that stops early or never stops (a known failure of reverse-KL / on-policy students):
        "completion_tokens": generated_tokens / n,
        "eos_rate": ended / n,
        "generate_tokens_per_s": generated_tokens / max(seconds, 1e-9),
    }
