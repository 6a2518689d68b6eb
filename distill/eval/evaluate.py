"""One call that evaluates a model on the held-out split: the metrics `distill eval` and every run report."""

from __future__ import annotations

from torch import nn

from distill.data import encode_prompt, pad_batch
from distill.eval.metrics import TeacherOutputs, exact_match, heldout_metrics


def heldout_batches(rows: list[dict], pad_id: int, batch_size: int, max_batches: int) -> list[dict]:
    """The padded held-out batches, in order (batch i is HELDOUT_EPOCH, i): the same for the evaluation and for
    whatever scores them for it beforehand (the teacher actors, `distill teacher-cache`)."""
    n = len(rows) if not max_batches else min(len(rows), max_batches * batch_size)
    return [pad_batch(rows[i : i + batch_size], pad_id) for i in range(0, n, batch_size)]


def evaluate_model(
    model: nn.Module,
    tokenizer,
    heldout_rows: list[dict],
    heldout_examples: list[dict],
    *,
    teacher: TeacherOutputs | None,
    stop_id: int,
    batch_size: int,
    max_batches: int,
    generate_examples: int,
    max_new_tokens: int,
) -> dict[str, float]:
    """Held-out CE / perplexity / KL to the teacher / agreement, plus exact-match where answers are known.
    teacher: the teacher's outputs for held-out batch (HELDOUT_EPOCH, i) of `heldout_batches`, or None."""
    batches = heldout_batches(heldout_rows, tokenizer.pad_token_id, batch_size, max_batches)
    result = heldout_metrics(model, batches, teacher)
    with_answers = [ex for ex in heldout_examples if ex.get("answer") is not None][:generate_examples]
    if with_answers:
        prompts = [encode_prompt(tokenizer, ex) for ex in with_answers]
        result.update(
            exact_match(
                model,
                prompts,
                [ex["answer"] for ex in with_answers],  # answer_matches normalises numbers and LaTeX
                decode=lambda ids: tokenizer.decode(ids, skip_special_tokens=True),
                pad_id=tokenizer.pad_token_id,
                eos_id=stop_id,
                max_new_tokens=max_new_tokens,
                batch_size=batch_size,
            )
        )
        result["exact_match_n"] = len(with_answers)
    return result
