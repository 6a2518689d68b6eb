"""One call that evaluates a model on the held-out split: the metrics `distill eval` and every run report."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from distill.data import encode_prompt, pad_batch
from distill.eval.metrics import exact_match, heldout_metrics


def evaluate_model(
    model: nn.Module,
    tokenizer,
    heldout_rows: list[dict],
    heldout_examples: list[dict],
    *,
    teacher_logits: Callable[[dict[str, torch.Tensor]], torch.Tensor] | None,
    stop_id: int,
    batch_size: int,
    max_batches: int,
    generate_examples: int,
    max_new_tokens: int,
) -> dict[str, float]:
    """Held-out CE / perplexity / KL to the teacher / agreement, plus exact-match where answers are known."""
    n = len(heldout_rows) if not max_batches else min(len(heldout_rows), max_batches * batch_size)
    batches = [
        pad_batch(heldout_rows[i : i + batch_size], tokenizer.pad_token_id) for i in range(0, n, batch_size)
    ]
    result = heldout_metrics(model, batches, teacher_logits)
    with_answers = [ex for ex in heldout_examples if ex.get("answer") is not None][:generate_examples]
    if with_answers:
        prompts = [encode_prompt(tokenizer, ex) for ex in with_answers]
        result.update(
            exact_match(
                model,
                prompts,
                [int(ex["answer"]) for ex in with_answers],
                decode=lambda ids: tokenizer.decode(ids, skip_special_tokens=True),
                pad_id=tokenizer.pad_token_id,
                eos_id=stop_id,
                max_new_tokens=max_new_tokens,
                batch_size=batch_size,
            )
        )
        result["exact_match_n"] = len(with_answers)
    return result
