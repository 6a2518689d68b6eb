"""Held-out cross-entropy in bits per character: comparable across tokenizers (a token count is not)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from distill.batch import next_token_labels
from distill.data.batching import pad_batch


@torch.inference_mode()
def bits_per_char(model: nn.Module, rows: list[dict], pad_id: int, batch_size: int = 32) -> float:
    """Sum of next-token CE (bits) over trained positions / characters those tokens add.

    rows: cross-tokenizer rows (distill.xtok.encode_pair) carrying `target_chars`. Tokens that add no
    character (a chat template's end marker in a differently-templated pair, an appended eos) still count
    their bits: the measure charges the model for everything it is trained to predict.
    """
    model.eval()
    nats = 0.0
    chars = 0
    for start in range(0, len(rows), batch_size):
        batch = pad_batch(rows[start : start + batch_size], pad_id)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"].long()).logits
        mask = batch["loss_mask"]
        labels = next_token_labels(batch["input_ids"])[mask]
        nats += float(F.cross_entropy(logits[mask].float(), labels, reduction="sum"))
        chars += int(batch["target_chars"][mask].sum())
    return nats / math.log(2) / max(chars, 1)
