"""ModelFacts: the numbers of a model that topology and memory checks need, read from its config alone.

The production architectures ship as HF `config.json` files under `arch_configs/` so a production run can be
validated (TP divides the heads, the experts split over EP ranks, memory per GPU) on a laptop, without weights.
They describe the architecture only: the real DeepSeek-R1 folder also carries an fp8 `quantization_config`,
which belongs to its weights, not to its shape.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from transformers import AutoConfig, PretrainedConfig

from distill.errors import CheckpointError, ConfigError

ARCH_CONFIG_DIR = Path(__file__).parent / "arch_configs"
ARCH_CONFIGS = ("deepseek_r1", "qwen2_5_3b", "phi3_mini")


def arch_config_path(name: str) -> Path:
    """Path of the shipped config.json of a production architecture (`deepseek_r1`, `qwen2_5_3b`, `phi3_mini`)."""
    if name not in ARCH_CONFIGS:
        raise ConfigError(f"unknown production architecture {name!r}; valid names: {', '.join(ARCH_CONFIGS)}")
    return ARCH_CONFIG_DIR / f"{name}.json"


def load_config(path: str | Path) -> PretrainedConfig:
    """Parse a config.json (a file, or a model folder holding one) into its transformers config class."""
    path = Path(path)
    file = path / "config.json" if path.is_dir() else path
    if not file.is_file():
        raise CheckpointError(f"no config file at {file}; expected a HF model folder or a config.json file")
    values: dict[str, Any] = json.loads(file.read_text())
    if "model_type" not in values:
        raise CheckpointError(f"{file} has no 'model_type'; it is not a transformers config.json")
    model_type = values.pop("model_type")
    try:
        return AutoConfig.for_model(model_type, **values)
    except ValueError as err:  # transformers does not know this model_type
        raise CheckpointError(f"{file}: {err}") from err


@dataclass(frozen=True)
class ModelFacts:
    """Shape of a decoder-only LM. MoE fields are 0 for dense models.

    num_experts          routed experts per MoE layer
    num_experts_per_tok  experts each token is routed to
    num_shared_experts   always-on experts per MoE layer (DeepSeek)
    num_dense_layers     leading layers with a dense MLP in an MoE model (DeepSeek first_k_dense_replace)
    param_count          total parameters (embeddings and lm_head included; shared weights counted once)
    active_param_count   parameters one token touches (only its routed experts)
    """

    model_type: str
    architecture: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    intermediate_size: int
    max_position_embeddings: int
    tie_word_embeddings: bool
    is_mla: bool
    num_experts: int
    num_experts_per_tok: int
    num_shared_experts: int
    moe_intermediate_size: int
    num_dense_layers: int
    param_count: int
    active_param_count: int

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    @property
    def num_moe_layers(self) -> int:
        return self.num_layers - self.num_dense_layers if self.is_moe else 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_path(cls, path: str | Path) -> ModelFacts:
        """Facts of a model folder (or a config.json file); reads only the config, never the weights."""
        return cls.from_config(load_config(path))

    @classmethod
    def from_arch(cls, name: str) -> ModelFacts:
        """Facts of a shipped production architecture, e.g. `ModelFacts.from_arch("deepseek_r1")`."""
        return cls.from_path(arch_config_path(name))

    @classmethod
    def from_config(cls, config: PretrainedConfig) -> ModelFacts:
        """Facts of a DeepSeek-V3, Qwen2, Phi-3 or Llama-like config.

        HF configs name MoE fields differently per family (n_routed_experts, num_local_experts, num_experts), so
        this reads them with getattr fallbacks; the Llama-style core fields are required.
        """
        heads = config.num_attention_heads
        num_experts = _first_attr(config, ("n_routed_experts", "num_local_experts", "num_experts"), 0) or 0
        num_dense = (getattr(config, "first_k_dense_replace", 0) or 0) if num_experts else 0
        facts = dict(
            model_type=config.model_type,
            architecture=(config.architectures or ["?"])[0],
            vocab_size=config.vocab_size,
            hidden_size=config.hidden_size,
            num_layers=config.num_hidden_layers,
            num_attention_heads=heads,
            num_key_value_heads=getattr(config, "num_key_value_heads", None) or heads,
            intermediate_size=config.intermediate_size,
            max_position_embeddings=config.max_position_embeddings,
            tie_word_embeddings=bool(config.tie_word_embeddings),
            is_mla=getattr(config, "kv_lora_rank", None) is not None,
            num_experts=num_experts,
            num_experts_per_tok=(getattr(config, "num_experts_per_tok", 0) or 0) if num_experts else 0,
            num_shared_experts=(getattr(config, "n_shared_experts", 0) or 0) if num_experts else 0,
            moe_intermediate_size=(getattr(config, "moe_intermediate_size", 0) or 0) if num_experts else 0,
            num_dense_layers=num_dense,
        )
        total, active = _param_counts(config, facts)
        return cls(**facts, param_count=total, active_param_count=active)


def _first_attr(config: PretrainedConfig, names: tuple[str, ...], default: Any) -> Any:
    for name in names:
        if getattr(config, name, None) is not None:
            return getattr(config, name)
    return default


def _param_counts(config: PretrainedConfig, f: dict[str, Any]) -> tuple[int, int]:
    """(total, active-per-token) parameter counts. Exact for DeepSeek-V3, Qwen2, Phi-3 and Llama in transformers."""
    h, layers = f["hidden_size"], f["num_layers"]
    attention = _mla_params(config) if f["is_mla"] else _gqa_params(config, f)
    norms = 2 * h
    dense_mlp = 3 * h * f["intermediate_size"]  # gate, up, down (Phi-3 fuses gate+up: same count)
    per_layer_dense = attention + norms + dense_mlp
    total = active = layers * per_layer_dense
    if f["num_experts"]:
        expert = 3 * h * f["moe_intermediate_size"]
        shared = expert * f["num_shared_experts"]
        router = f["num_experts"] * h
        moe_layers = layers - f["num_dense_layers"]
        base = attention + norms + shared + router
        total = f["num_dense_layers"] * per_layer_dense + moe_layers * (base + f["num_experts"] * expert)
        active = f["num_dense_layers"] * per_layer_dense + moe_layers * (
            base + f["num_experts_per_tok"] * expert
        )
    embeddings = f["vocab_size"] * h * (1 if f["tie_word_embeddings"] else 2)
    return total + embeddings + h, active + embeddings + h  # + h: the final norm


def _gqa_params(config: PretrainedConfig, f: dict[str, Any]) -> int:
    h, heads, kv = f["hidden_size"], f["num_attention_heads"], f["num_key_value_heads"]
    head_dim = getattr(config, "head_dim", None) or h // heads
    q_out, kv_out = heads * head_dim, 2 * kv * head_dim
    weights = h * (q_out + kv_out) + q_out * h
    # Qwen2 always has q/k/v biases; Llama-likes follow `attention_bias` (which also biases o_proj).
    if config.model_type == "qwen2":
        return weights + q_out + kv_out
    if getattr(config, "attention_bias", False):
        return weights + q_out + kv_out + h
    return weights


def _mla_params(config: PretrainedConfig) -> int:
    """DeepSeek multi-head latent attention: low-rank q, compressed kv latent plus a shared rope key."""
    h, heads = config.hidden_size, config.num_attention_heads
    qk_head = config.qk_nope_head_dim + config.qk_rope_head_dim
    bias = bool(config.attention_bias)
    if config.q_lora_rank is None:
        q = h * heads * qk_head
    else:
        r = config.q_lora_rank
        q = h * r + bias * r + r + r * heads * qk_head  # q_a_proj, q_a_layernorm, q_b_proj
    kv_a = config.kv_lora_rank + config.qk_rope_head_dim
    kv = h * kv_a + bias * kv_a + config.kv_lora_rank  # kv_a_proj_with_mqa, kv_a_layernorm
    kv += config.kv_lora_rank * heads * (config.qk_nope_head_dim + config.v_head_dim)  # kv_b_proj
    o = heads * config.v_head_dim * h + bias * h
    return q + kv + o
