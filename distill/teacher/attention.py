"""SDPA that keeps torch's fused attention kernel when value heads are narrower than query/key heads.

DeepSeek's multi-head latent attention (MLA) has q/k heads of qk_nope + qk_rope dims and narrower v heads (48
and 32 in the tiny DeepSeek-V3 teacher). torch's fused CPU kernel needs one head size for q, k and v, so
`scaled_dot_product_attention` falls back to its unfused math path there: about 3x slower per call here, and
the reason the teacher actor was the slower half of the online pipeline (bench/vs_trl.py). Padding v with
zeros to the q/k size and dropping the padded columns of the output gives the same attention output (those
columns are weighted sums of zeros) on the fused kernel. transformers pads the same way for flash-attention;
this registers it for SDPA under its own name, with SDPA's masks. Pure pass-through when the sizes agree.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

PADDED_SDPA = "sdpa_padded_v"


def sdpa_padded_v(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers' SDPA attention with value [B, H, T, Dv] zero-padded to query's head size Dq when Dv < Dq.

    Returns the attention output [B, T, H, Dv] (a view of the padded kernel output) and no weights.
    """
    dv, dq = value.shape[-1], query.shape[-1]
    if dv >= dq:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    out, weights = sdpa_attention_forward(
        module, query, key, F.pad(value, (0, dq - dv)), attention_mask, **kwargs
    )
    return out[..., :dv], weights


AttentionInterface.register(PADDED_SDPA, sdpa_padded_v)
AttentionMaskInterface.register(PADDED_SDPA, sdpa_mask)


def use_padded_sdpa(model) -> None:
    """Switch a model loaded with SDPA to `sdpa_padded_v` (eager models, which return attention maps, stay)."""
    if model.config._attn_implementation == "sdpa":
        model.set_attn_implementation(PADDED_SDPA)
