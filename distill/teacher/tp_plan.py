"""The tensor-parallel layout of a teacher, as pure functions of its config: checks, plan rules, KV heads.

Nothing here starts a process or touches weights, so every rule is tested without torch.distributed.

The plan extends the model's own transformers plan (`base_model_tp_plan`, which shards MLPs and experts):
- MLA attention (DeepSeek-V2/V3/R1) is sharded by heads: `q_b_proj` (or `q_proj` without a q LoRA) and
  `kv_b_proj` column-parallel, so each rank computes the queries, keys and values of its own heads; `o_proj`
  row-parallel, so the per-head outputs are summed by one all-reduce. The low-rank `q_a_proj`,
  `kv_a_proj_with_mqa` and their norms stay replicated: they are small and every head reads them.
- Llama/Qwen2-style attention keeps the model's q/o rules; K and V are sharded by KV head when TP divides
  the KV heads, otherwise replicated at load and trimmed to the KV heads the rank's query heads read.
- `lm_head` is column-parallel *without* the gather, so each rank keeps logits for its vocabulary slice.
The teacher is inference-only: training through this plan would also need transformers' `mla_kv_a_proj` rule
(the replicated rope key gets a partial gradient on each rank), which costs a split + cat per layer here.
"""

from __future__ import annotations

from typing import Any

from distill.errors import ConfigError, TopologyError

EXPERT_MODES = ("expert_parallel", "tensor_parallel")
"""expert_parallel: each rank holds n_experts / tp whole experts (TP must divide the routed experts).
tensor_parallel: each rank holds a 1/tp slice of every expert's intermediate dim (transformers' default)."""

# Style names of transformers' parallel-style registry (transformers.distributed.parallel_utils).
COLWISE, ROWWISE, REPLICATE = "colwise", "rowwise", "replicate"

_EXPERT_COUNT_FIELDS = ("n_routed_experts", "num_local_experts", "num_experts")


def num_routed_experts(config: Any) -> int:
    """Routed experts per MoE layer (0 for a dense model); HF families name the field differently."""
    for name in _EXPERT_COUNT_FIELDS:
        value = getattr(config, name, None)
        if value:
            return int(value)
    return 0


def is_mla(config: Any) -> bool:
    """DeepSeek multi-head latent attention: keys and values come from a shared low-rank latent."""
    return getattr(config, "kv_lora_rank", None) is not None


def num_kv_heads(config: Any) -> int:
    return getattr(config, "num_key_value_heads", None) or config.num_attention_heads


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def check_tp_size(config: Any, tp_size: int, experts: str = "expert_parallel") -> None:
    """Raise TopologyError unless `tp_size` shards this model evenly (heads, and experts for an MoE).

    KV heads never fail here: they are sharded when TP divides them and replicated otherwise.
    """
    if experts not in EXPERT_MODES:
        raise ConfigError(f"unknown experts mode {experts!r}; valid: {', '.join(EXPERT_MODES)}")
    if tp_size < 1:
        raise TopologyError(f"teacher TP size must be >= 1, got {tp_size}")
    heads = config.num_attention_heads
    if heads % tp_size:
        raise TopologyError(
            f"teacher TP size {tp_size} does not divide num_attention_heads={heads} (attention is sharded by "
            f"heads); use a TP size in {_divisors(heads)}"
        )
    n_experts = num_routed_experts(config)
    if not n_experts:
        return
    if experts == "expert_parallel" and n_experts % tp_size:
        raise TopologyError(
            f"teacher TP size {tp_size} does not divide the {n_experts} routed experts (expert parallel: each rank "
            f"holds n_experts / tp whole experts); use a TP size in {_divisors(n_experts)}"
        )
    inner = getattr(config, "moe_intermediate_size", None) or config.intermediate_size
    if experts == "tensor_parallel" and inner % tp_size:
        raise TopologyError(
            f"teacher TP size {tp_size} does not divide the expert intermediate size {inner} (experts='tensor_parallel' "
            f"slices every expert); use a TP size in {_divisors(inner)} or experts='expert_parallel'"
        )


def kv_heads_sharded(config: Any, tp_size: int) -> bool:
    """True when each rank holds its own KV heads (TP divides them); otherwise they are replicated."""
    return num_kv_heads(config) % tp_size == 0


def tp_plan_overrides(config: Any, tp_size: int, *, prefix: str = "model") -> dict[str, str]:
    """Rules merged over the model's own transformers TP plan (a module glob -> a parallel style name).

    prefix   the causal LM's `base_model_prefix` ("model" for DeepSeek, Qwen2, Llama): the keys name modules of
             the causal LM, where the decoder layers live under `{prefix}.layers`.
    """
    attn = f"{prefix}.layers.*.self_attn"
    plan = {"lm_head": COLWISE}  # keep the vocabulary shard: the top-k is vocab-parallel, never gathered
    if is_mla(config):
        q_proj = "q_b_proj" if getattr(config, "q_lora_rank", None) else "q_proj"
        plan |= {f"{attn}.{q_proj}": COLWISE, f"{attn}.kv_b_proj": COLWISE, f"{attn}.o_proj": ROWWISE}
    elif "layers.*.self_attn.k_proj" in (config.base_model_tp_plan or {}):
        kv_style = COLWISE if kv_heads_sharded(config, tp_size) else REPLICATE
        plan |= {f"{attn}.k_proj": kv_style, f"{attn}.v_proj": kv_style}
    return plan


def kv_heads_for_rank(num_heads: int, num_kv: int, tp_size: int, rank: int) -> tuple[list[int], int]:
    """KV heads a rank keeps when the KV projections are replicated, and the rank's query-per-KV group size.

    The rank holds query heads [rank * h, (rank + 1) * h), h = num_heads / tp; query head q reads KV head
    q // (num_heads / num_kv). If those KV heads repeat uniformly (e.g. MQA: one KV head for all local
    queries) each is kept once and the group size is h / len(kept); otherwise (e.g. 6 heads, 3 KV heads, TP 2:
    rank 0 reads KV 0, 0, 1) one KV head is kept per query head and the group size is 1.
    Returns (global KV head indices in local order, num_key_value_groups).
    """
    local = num_heads // tp_size
    group = num_heads // num_kv
    reads = [q // group for q in range(rank * local, (rank + 1) * local)]
    kept = sorted(set(reads))
    per_kv = local // len(kept)
    if local % len(kept) == 0 and reads == [kv for kv in kept for _ in range(per_kv)]:
        return kept, per_kv
    return reads, 1
