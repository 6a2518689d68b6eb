"""Tiny models with the real production architectures, for CPU tests and the demo.

The teacher is a DeepSeek-V3 (the DeepSeek-R1 architecture: MLA attention, sigmoid-routed MoE with a shared
expert, the first layer dense); the students are Qwen2 (GQA) and Phi-3 (MHA, fused qkv). They are built from the
real `transformers` config classes, so every code path (loading, TP plans, hidden states, generate) is the one a
production model takes; only the sizes shrink.

Default sizes (vocab 384): tiny_deepseek_v3 ≈ 3.27M params, tiny_qwen2 ≈ 0.63M, tiny_phi3 ≈ 0.66M, so the teacher
trains on the arithmetic task in a few CPU minutes and the students stay clearly weaker.

At the production vocabularies (REAL_VOCAB_ARCHS): tiny_r1 (DeepSeek-V3 layers on R1's tokenizer, 129,280 rows)
≈ 16.7M params and tiny_qwen2_5 (Qwen2 layers on Qwen2.5's tokenizer, 151,936 tied rows) ≈ 4.9M, nearly all of it
embedding and head: the production shape of the logits at tiny compute.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from typing import Any

import torch
from transformers import (
    AutoModelForCausalLM,
    DeepseekV3Config,
    Phi3Config,
    PretrainedConfig,
    PreTrainedModel,
    Qwen2Config,
)

from distill.errors import ConfigError
from distill.models.real_tokenizers import real_tokenizer

TINY_ARCHS = ("tiny_deepseek_v3", "tiny_qwen2", "tiny_phi3", "tiny_r1", "tiny_qwen2_5")

# Tiny models at a production vocabulary: each trains on that model's real tokenizer (distill/models/real_tokenizers.py)
# and has its embedding rows (padded past the tokenizer's last id, as the real checkpoints are), so heads, top-k, token
# maps and losses run at 129k / 152k columns while the layers stay tiny. arch -> tokenizer name.
REAL_VOCAB_ARCHS = {"tiny_r1": "deepseek_r1", "tiny_qwen2_5": "qwen2_5"}

# Token ids come from the tokenizer (via overrides). The class defaults (e.g. Phi-3's pad id 32000) would point
# outside a tiny vocabulary and break nn.Embedding(padding_idx=...), so they start unset.
_NO_SPECIAL_TOKENS = {"pad_token_id": None, "bos_token_id": None, "eos_token_id": None}

# The DeepSeek-V3 routing and layout both tiny DeepSeek teachers share. Experts (4) divide by 2; first_k_dense_replace=1:
# layer 0 has a dense MLP, the others MoE.
_DEEPSEEK_V3_LAYOUT: dict[str, Any] = {
    "n_routed_experts": 4,
    "num_experts_per_tok": 2,
    "n_shared_experts": 1,
    "n_group": 2,
    "topk_group": 1,
    "first_k_dense_replace": 1,
    "num_mtp_layers": 0,  # no multi-token-prediction head: the distilled signal is next-token only
    # Declared positions only (default RoPE computes any position, so the weights and outputs are the
    # same as at 512): lets the prepared demo teacher score 8k-token packed rows (experiment=packed_8k).
    # The tiny students declare theirs in hydra_configs/student/tiny_*.yaml.
    "max_position_embeddings": 8192,
}

_TINY_DEFAULTS: dict[str, tuple[type[PretrainedConfig], dict[str, Any]]] = {
    # Teacher, ~3M params. Heads (8) divide by TP sizes 2 and 4. MLA keeps the production ratios: nope = 2 x rope,
    # v = nope. Layers 1-3 are MoE.
    "tiny_deepseek_v3": (
        DeepseekV3Config,
        {
            **_DEEPSEEK_V3_LAYOUT,
            "hidden_size": 192,
            "num_hidden_layers": 4,
            "num_attention_heads": 8,
            "num_key_value_heads": 8,
            "q_lora_rank": 96,
            "kv_lora_rank": 64,
            "qk_rope_head_dim": 16,
            "qk_nope_head_dim": 32,
            "v_head_dim": 32,
            "intermediate_size": 512,
            "moe_intermediate_size": 256,
        },
    ),
    # DeepSeek-R1 shrunk: tiny_deepseek_v3's layout (MLA, first layer dense, sigmoid-routed MoE with a shared expert)
    # at hidden 64 and 2 layers, so the 129,280-row embedding and head (8.3M params each) dominate, not the layers.
    "tiny_r1": (
        DeepseekV3Config,
        {
            **_DEEPSEEK_V3_LAYOUT,
            "hidden_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 4,
            "q_lora_rank": 32,
            "kv_lora_rank": 32,
            "qk_rope_head_dim": 8,
            "qk_nope_head_dim": 16,
            "v_head_dim": 16,
            "intermediate_size": 128,
            "moe_intermediate_size": 64,
        },
    ),
    # Qwen2.5-3B shrunk: GQA (4 query heads share 2 KV heads) and tied input/output embeddings as in Qwen2.5-3B; the
    # 151,936 x 32 embedding (4.9M params) is most of the model.
    "tiny_qwen2_5": (
        Qwen2Config,
        {
            "hidden_size": 32,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "intermediate_size": 128,
            "tie_word_embeddings": True,
        },
    ),
    # Student, ~0.6M params: GQA (4 query heads share 2 KV heads) as in Qwen2.5.
    "tiny_qwen2": (
        Qwen2Config,
        {
            "hidden_size": 96,
            "num_hidden_layers": 4,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "intermediate_size": 384,
        },
    ),
    # Student, ~0.6M params: full multi-head attention with fused qkv / gate_up projections as in Phi-3-mini.
    "tiny_phi3": (
        Phi3Config,
        {
            "hidden_size": 96,
            "num_hidden_layers": 4,
            "num_attention_heads": 4,
            "num_key_value_heads": 4,
            "intermediate_size": 384,
        },
    ),
}

_COMMON_DEFAULTS = {"max_position_embeddings": 512, "tie_word_embeddings": False, **_NO_SPECIAL_TOKENS}


def tiny_config(arch: str, vocab_size: int, **overrides: Any) -> PretrainedConfig:
    """The config of a tiny `arch` model over `vocab_size` tokens; `overrides` set any config field.

    Pass the tokenizer's ids as overrides (`pad_token_id=`, `bos_token_id=`, `eos_token_id=`). An override that
    is not a field of the config class raises ConfigError (the HF classes would silently keep a typo). An arch of
    REAL_VOCAB_ARCHS has its production model's embedding rows whatever `vocab_size` says (callers pass the length
    of whichever tokenizer they hold; the rows belong to the arch).
    """
    if arch not in _TINY_DEFAULTS:
        raise ConfigError(f"unknown tiny architecture {arch!r}; valid names: {', '.join(TINY_ARCHS)}")
    config_class, defaults = _TINY_DEFAULTS[arch]
    _check_override_names(config_class, overrides)
    if arch in REAL_VOCAB_ARCHS:
        vocab_size = real_tokenizer(REAL_VOCAB_ARCHS[arch]).model_vocab
    values = {**_COMMON_DEFAULTS, **defaults, "vocab_size": vocab_size, **overrides}
    config = config_class(**values)
    if isinstance(config, DeepseekV3Config):
        check_moe_routing(config)
    return config


def _check_override_names(config_class: type[PretrainedConfig], overrides: dict[str, Any]) -> None:
    known = {f.name for f in dataclasses.fields(config_class)} | set(config_class.attribute_map)
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ConfigError(
            f"{config_class.__name__} has no field(s) {unknown}; valid fields: {', '.join(sorted(known))}"
        )


def check_moe_routing(config: DeepseekV3Config) -> None:
    """Group-limited routing must be satisfiable; HF does not check and fails later inside torch.topk."""
    experts, groups = config.n_routed_experts, config.n_group
    if experts % groups:
        raise ConfigError(f"n_routed_experts={experts} must be divisible by n_group={groups}")
    per_group = experts // groups
    # The router scores a group by the sum of its 2 best experts.
    if per_group < 2:
        raise ConfigError(
            f"n_routed_experts={experts} / n_group={groups} = {per_group} expert per group; the router needs >= 2"
        )
    if not 1 <= config.topk_group <= groups:
        raise ConfigError(f"topk_group={config.topk_group} must be in [1, n_group={groups}]")
    eligible = config.topk_group * per_group
    if config.num_experts_per_tok > eligible:
        raise ConfigError(
            f"num_experts_per_tok={config.num_experts_per_tok} exceeds the {eligible} experts reachable "
            f"(topk_group={config.topk_group} x {per_group} experts per group)"
        )


def build_model(
    config: PretrainedConfig, seed: int, *, attn_implementation: str | None = None
) -> PreTrainedModel:
    """A freshly initialised fp32 causal LM; the same `seed` gives bit-identical weights.

    The global torch RNG is forked, so building a model does not shift the random stream of the caller.
    `attn_implementation="eager"` is needed when attention maps are distilled.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(
            config, dtype=torch.float32, attn_implementation=attn_implementation
        )
    return model.eval()


def describe_model(model: PreTrainedModel) -> dict[str, Any]:
    """Parameter count and per-layer types, e.g. {"params": 3.1e6, "layer_types": ["mla+dense", "mla+moe", ...]}.

    Attention is "mla" (DeepSeek latent attention), "gqa" (fewer KV heads than query heads) or "mha"; the MLP is
    "moe" (routed experts) or "dense".
    """
    layers = model.get_decoder().layers
    layer_types = [
        f"{_attention_type(layer.self_attn, model.config)}+{_mlp_type(layer.mlp)}" for layer in layers
    ]
    counts = Counter(part for kind in layer_types for part in kind.split("+"))
    return {
        "model_type": model.config.model_type,
        "params": sum(p.numel() for p in model.parameters()),
        "num_layers": len(layers),
        "layer_types": layer_types,
        "mla_layers": counts["mla"],
        "moe_layers": counts["moe"],
        "dense_mlp_layers": counts["dense"],
    }


def _attention_type(attn: torch.nn.Module, config: PretrainedConfig) -> str:
    if hasattr(attn, "kv_a_proj_with_mqa"):
        return "mla"
    if config.num_key_value_heads < config.num_attention_heads:
        return "gqa"
    return "mha"


def _mlp_type(mlp: torch.nn.Module) -> str:
    return "moe" if hasattr(mlp, "experts") else "dense"
