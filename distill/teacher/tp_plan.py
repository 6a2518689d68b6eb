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


# ------------------------------------------------------------------------------- the plan handed to the loader
# Expert parameters are named by the model's expert-parallel plan (`base_model_ep_plan`): grouped_gemm rules name the
# fused [E, ...] parameters, the ep_dispatch_experts rule names the experts module itself.
GROUPED_GEMM, EP_DISPATCH, LOCAL_PARAMS = "grouped_gemm", "ep_dispatch_experts", "local_params"
_EXPERT_TP_STYLES = {"gate_up_proj": "packed_colwise", "down_proj": ROWWISE}
# The MLA low-rank projections every head reads; transformers >= 5.25 names kv_a_proj_with_mqa "mla_kv_a_proj"
# (replicated weight, split gradient): for an inference-only teacher plain replication is the same forward.
_MLA_REPLICATED = ("q_a_proj", "kv_a_proj_with_mqa")


def expert_rules(ep_plan: dict[str, str]) -> tuple[dict[str, str], str | None]:
    """(fused expert parameter glob -> its EP style, the experts module glob) from a model's expert-parallel plan."""
    params = {name: style for name, style in ep_plan.items() if style == GROUPED_GEMM}
    modules = [name for name, style in ep_plan.items() if style == EP_DISPATCH]
    return params, (modules[0] if modules else None)


def teacher_tp_plan(
    config: Any,
    tp_size: int,
    *,
    experts: str = "expert_parallel",
    prefix: str = "model",
    model_plans: tuple[dict[str, str], dict[str, str]],
    names: set[str],
) -> tuple[dict[str, str], dict[str, str]]:
    """(the TP plan handed to transformers' loader, the layout it must produce), both module/param glob -> style.

    The plan states every rule this teacher relies on instead of trusting the model's own plan to keep them across
    transformers releases (5.25 dropped the expert rules from DeepSeek-V3's TP plan, which silently replicated every
    expert under experts='tensor_parallel'): the model's own rules first, then ours over them.
    model_plans  the model's resolved (TP plan, EP plan), keyed like its parameter names (`model._tp_plan`,
                 `model._ep_plan`: class rules, config rules, the embedding rule transformers adds).
    names        the model's module and parameter names with layer numbers as `*`; rules matching nothing are dropped.
    The expected layout adds what the loader applies outside the TP plan (the expert-parallel grouped_gemm shards),
    so `sharding_mismatches` can check every parameter after loading.
    """
    model_tp, model_ep = model_plans
    plan = dict(model_tp) | tp_plan_overrides(config, tp_size, prefix=prefix)
    if is_mla(config):
        plan |= {f"{prefix}.layers.*.self_attn.{proj}": REPLICATE for proj in _MLA_REPLICATED}
    expert_params, experts_module = expert_rules(model_ep)
    for name in [*expert_params, *([experts_module] if experts_module else [])]:
        plan.pop(name, None)  # experts are ours to place, below
    expected = dict(plan)
    if num_routed_experts(config) and expert_params:
        if experts == "expert_parallel":
            expected |= expert_params  # applied by the loader's EP plan (ep_size = tp_size)
        else:
            sliced = {name: _expert_tp_style(name) for name in expert_params}
            plan |= sliced | ({experts_module: LOCAL_PARAMS} if experts_module else {})
            expected |= sliced
    return {n: s for n, s in plan.items() if n in names}, {n: s for n, s in expected.items() if n in names}


def _expert_tp_style(name: str) -> str:
    leaf = name.rsplit(".", 1)[-1]
    if leaf not in _EXPERT_TP_STYLES:
        raise ConfigError(
            f"experts='tensor_parallel' does not know how to slice the expert parameter {name!r} (it slices "
            f"{sorted(_EXPERT_TP_STYLES)}); use experts='expert_parallel'"
        )
    return _EXPERT_TP_STYLES[leaf]


# ------------------------------------------------------------------------------------- checking the loaded shards
# style -> the dimension a >= 2-D parameter is sharded on (negative: from the end). 1-D parameters (biases) are
# sharded on their only dimension by the column-wise styles and replicated by the others.
_WEIGHT_SHARD_DIM = {
    COLWISE: -2,
    "colwise_rep": -2,
    "colwise_gather_output": -2,
    "packed_colwise": -2,
    ROWWISE: -1,
    "rowwise_rep": -1,
    "rowwise_split_input": -1,
    "packed_rowwise": -1,
    GROUPED_GEMM: 0,
    "embedding_rowwise": 0,
    "embedding_colwise": 1,
}
_BIAS_SHARDED = {COLWISE, "colwise_rep", "colwise_gather_output", "packed_colwise", GROUPED_GEMM}
_UNSHARDED = {
    REPLICATE,
    LOCAL_PARAMS,
    "mla_kv_a_proj",
    "all_reduce",
    "replicated_with_grad_allreduce",
    EP_DISPATCH,
}


def layer_glob(name: str) -> str:
    """`model.layers.3.mlp.experts.0.w` -> `model.layers.*.mlp.experts.*.w` (numbers between dots, as transformers)."""
    return ".".join("*" if part.isdigit() else part for part in name.split("."))


def rule_for(name: str, plan: dict[str, str]) -> str | None:
    """The style a plan gives parameter `name`: its own rule, else its module's (transformers' lookup order)."""
    glob = layer_glob(name)
    if glob in plan:
        return plan[glob]
    return plan.get(glob.rsplit(".", 1)[0]) if "." in glob else None


def shard_length(size: int, tp_size: int, rank: int) -> int:
    """Rows a rank holds of a dimension of `size` under torch's Shard chunking (ceil(size / tp) each, last short)."""
    chunk = -(-size // tp_size)
    return max(0, min(chunk, size - rank * chunk))


def expected_local_shape(
    full: tuple[int, ...], style: str | None, tp_size: int, rank: int
) -> tuple[int, ...]:
    if style is None or style in _UNSHARDED:
        return full
    if style not in _WEIGHT_SHARD_DIM:
        raise ConfigError(f"cannot check the teacher's shards: unknown parallel style {style!r}")
    if len(full) == 1 and style not in _BIAS_SHARDED:
        return full
    dim = 0 if len(full) == 1 else _WEIGHT_SHARD_DIM[style] % len(full)
    return (*full[:dim], shard_length(full[dim], tp_size, rank), *full[dim + 1 :])


def sharding_mismatches(
    local: dict[str, tuple[int, ...]],
    full: dict[str, tuple[int, ...]],
    expected: dict[str, str],
    tp_size: int,
    rank: int,
    tied: list[set[str]] = (),
) -> list[str]:
    """One line per parameter whose local shape on `rank` is not what the expected layout gives it.

    tied   groups of names of one shared parameter (tied embeddings): a rule on any of them shards all.
    """
    group_of = {name: group for group in tied for name in group}
    problems = [f"{name}: missing after loading" for name in full if name not in local]
    for name, shape in local.items():
        if name not in full:
            problems.append(f"{name}: not a parameter of the model's architecture")
            continue
        rules = (rule_for(alias, expected) for alias in sorted(group_of.get(name, {name})))
        style = next((rule for rule in rules if rule is not None), None)
        want = expected_local_shape(full[name], style, tp_size, rank)
        if tuple(shape) != want:
            problems.append(
                f"{name}: rule {style or 'none (replicated)'} expects local shape {want} (full {full[name]}), "
                f"loaded {tuple(shape)}"
            )
    return problems
