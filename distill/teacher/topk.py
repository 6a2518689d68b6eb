"""The teacher's compact output: top-k of the next-token logits plus the full-vocabulary log-normaliser.

A tensor-parallel teacher combines per-rank results of this function across its vocabulary shards
(distill/teacher/parallel.py); the engine calls it on full logits.
"""

from __future__ import annotations

import torch

# Rows of the [B*T, V] logits turned into fp32 at a time: bounds the fp32 copy of a bf16 teacher's logits
# (129k vocab x 4096 rows x 4 B = 2 GiB) instead of materialising all B*T rows at once.
LSE_CHUNK_ROWS = 4096


def topk_with_normalizer(
    logits: torch.Tensor, k: int, *, chunk_rows: int = LSE_CHUNK_ROWS
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-k of the next-token logits plus the full-vocabulary log-normaliser.

    logits [B, T, V] (any float dtype) -> ids [B, T, k] int32, values [B, T, k] (logits' dtype, sorted
    descending), log_normalizer [B, T] fp32 = logsumexp over all V at temperature 1.
    """
    values, ids = torch.topk(logits, k, dim=-1)
    rows = logits.reshape(-1, logits.shape[-1])
    lse = torch.cat([torch.logsumexp(chunk.float(), dim=-1) for chunk in rows.split(chunk_rows)])
    return ids.to(torch.int32), values, lse.view(logits.shape[:-1])
