"""Held-out evaluation: cross-entropy, perplexity, KL to the teacher, top-1 agreement, exact-match, tokens/s."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from distill.batch import next_token_labels
from distill.data.task import extract_answer

Batch = dict[str, torch.Tensor]


@torch.inference_mode()
def heldout_metrics(
    model: nn.Module,
    batches: Iterable[Batch],
    teacher_logits: Callable[[Batch], torch.Tensor] | None = None,
) -> dict[str, float]:
    """Token-averaged metrics over trained positions (loss_mask) of the held-out batches.

    ce: mean next-token cross-entropy in nats; ppl = exp(ce); accuracy: share of positions where the student's
    argmax is the next token (the label). With a teacher: kl_to_teacher = mean KL(teacher || student) over the
    full vocabulary at T=1, agreement = share of positions where the student's argmax equals the teacher's.
    """
    model.eval()
    ce_sum = kl_sum = agree = correct = 0.0
    tokens = 0
    seconds = 0.0
    for batch in batches:
        start = time.perf_counter()
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"].long()).logits
        seconds += time.perf_counter() - start
        mask = batch["loss_mask"].bool()
        s_logp = F.log_softmax(logits[mask].float(), dim=-1)  # [n, V]
        labels = next_token_labels(batch["input_ids"])[mask]
        ce_sum += float(F.nll_loss(s_logp, labels, reduction="sum"))
        correct += float((s_logp.argmax(-1) == labels).sum())
        tokens += int(mask.sum())
        if teacher_logits is not None:
            t_logits = teacher_logits(batch)[mask].float()
            v = min(t_logits.shape[-1], s_logp.shape[-1])  # padded embedding rows never hold real tokens
            t_logp = F.log_softmax(t_logits[:, :v], dim=-1)
            kl_sum += float(F.kl_div(s_logp[:, :v], t_logp, log_target=True, reduction="sum"))
            agree += float((s_logp[:, :v].argmax(-1) == t_logp.argmax(-1)).sum())
    n = max(tokens, 1)
    out = {
        "ce": ce_sum / n,
        "ppl": math.exp(min(ce_sum / n, 50.0)),
        "accuracy": correct / n,
        "tokens": tokens,
    }
    out["tokens_per_s"] = tokens / max(seconds, 1e-9)
    if teacher_logits is not None:
        out["kl_to_teacher"] = kl_sum / n
        out["agreement"] = agree / n
    return out


@torch.inference_mode()
def exact_match(
    model: nn.Module,
    prompts: Sequence[list[int]],
    answers: Sequence[int],
    *,
    decode: Callable[[list[int]], str],
    pad_id: int,
    eos_id: int,
    max_new_tokens: int,
    batch_size: int = 32,
) -> dict[str, float]:
    """Greedy-decode each prompt and compare the parsed final answer (`#### N`) to the reference."""
    model.eval()
    correct = 0
    generated_tokens = 0
    greedy = dict(max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad_id, eos_token_id=eos_id)
    start = time.perf_counter()
    for i in range(0, len(prompts), batch_size):
        chunk = prompts[i : i + batch_size]
        width = max(len(p) for p in chunk)
        # Left padding so every prompt ends where generation starts.
        ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        attn = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, p in enumerate(chunk):
            ids[row, width - len(p) :] = torch.tensor(p)
            attn[row, width - len(p) :] = 1
        out = model.generate(input_ids=ids, attention_mask=attn, **greedy)
        for row, seq in enumerate(out[:, width:].tolist()):
            if eos_id in seq:
                seq = seq[: seq.index(eos_id)]
            generated_tokens += len(seq)
            correct += int(extract_answer(decode(seq)) == answers[i + row])
    seconds = time.perf_counter() - start
    return {
        "exact_match": correct / max(len(prompts), 1),
        "generate_tokens_per_s": generated_tokens / max(seconds, 1e-9),
    }
