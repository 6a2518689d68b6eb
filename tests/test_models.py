"""Tiny real-architecture models, production architecture facts, local loading and saving."""

from __future__ import annotations

import json
import re

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import DeepseekV3Config, Phi3Config, PreTrainedTokenizerFast, Qwen2Config

from distill.errors import CheckpointError, ConfigError
from distill.models import (
    ARCH_CONFIGS,
    TINY_ARCHS,
    ModelFacts,
    arch_config_path,
    build_model,
    describe_model,
    load_causal_lm,
    load_config,
    load_tokenizer,
    save_model,
    tiny_config,
)

VOCAB = 64
SPECIAL = {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}


def make_tokenizer(vocab_size: int = VOCAB) -> PreTrainedTokenizerFast:
    """A word-level tokenizer over `vocab_size` made-up words; enough to test saving and loading."""
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, vocab_size)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>")


@pytest.fixture(scope="module")
def tiny_models():
    return {arch: build_model(tiny_config(arch, VOCAB, **SPECIAL), seed=0) for arch in TINY_ARCHS}


# ------------------------------------------------------------------------------------------------ tiny
def test_tiny_deepseek_v3_has_mla_attention(tiny_models):
    model = tiny_models["tiny_deepseek_v3"]
    for layer in model.model.layers:
        attn = layer.self_attn
        assert attn.q_proj is None  # queries go through the low-rank q_a -> norm -> q_b path
        assert attn.q_a_proj.out_features == model.config.q_lora_rank
        c = model.config
        assert attn.kv_a_proj_with_mqa.out_features == c.kv_lora_rank + c.qk_rope_head_dim
        assert attn.kv_b_proj.in_features == c.kv_lora_rank
    assert describe_model(model)["mla_layers"] == model.config.num_hidden_layers


def test_tiny_deepseek_v3_has_moe_after_first_dense_layer(tiny_models):
    model = tiny_models["tiny_deepseek_v3"]
    c = model.config
    assert c.first_k_dense_replace == 1
    assert not hasattr(model.model.layers[0].mlp, "experts")
    for layer in model.model.layers[1:]:
        experts = layer.mlp.experts
        # Fused 3-D expert weights: [E, 2I, H] and [E, H, I].
        assert experts.gate_up_proj.shape == (c.n_routed_experts, 2 * c.moe_intermediate_size, c.hidden_size)
        assert experts.down_proj.shape == (c.n_routed_experts, c.hidden_size, c.moe_intermediate_size)
        assert layer.mlp.shared_experts.gate_proj.out_features == c.moe_intermediate_size * c.n_shared_experts
    info = describe_model(model)
    assert info["layer_types"] == ["mla+dense", "mla+moe", "mla+moe", "mla+moe"]
    assert (info["moe_layers"], info["dense_mlp_layers"]) == (3, 1)


def test_tiny_sizes_are_tp_friendly_and_teacher_is_bigger(tiny_models):
    c = tiny_models["tiny_deepseek_v3"].config
    assert c.num_attention_heads % 4 == 0 and c.n_routed_experts % 2 == 0
    params = {arch: describe_model(m)["params"] for arch, m in tiny_models.items()}
    assert 2e6 <= params["tiny_deepseek_v3"] <= 4e6
    for student in ("tiny_qwen2", "tiny_phi3"):
        assert 0.5e6 <= params[student] <= 1.5e6
        assert params["tiny_deepseek_v3"] > 3 * params[student]


def test_tiny_config_uses_real_classes_and_overrides():
    assert isinstance(tiny_config("tiny_deepseek_v3", VOCAB), DeepseekV3Config)
    assert isinstance(tiny_config("tiny_qwen2", VOCAB), Qwen2Config)
    c = tiny_config("tiny_phi3", VOCAB, hidden_size=64, **SPECIAL)
    assert isinstance(c, Phi3Config)
    assert (c.hidden_size, c.pad_token_id, c.eos_token_id, c.max_position_embeddings) == (64, 0, 2, 512)
    assert not c.tie_word_embeddings


def test_tiny_config_rejects_bad_names_and_routing():
    with pytest.raises(ConfigError, match="tiny_qwen2"):
        tiny_config("tiny_llama", VOCAB)
    with pytest.raises(ConfigError, match="hiden_size"):
        tiny_config("tiny_qwen2", VOCAB, hiden_size=64)
    with pytest.raises(ConfigError, match="n_routed_experts=6 must be divisible by n_group=4"):
        tiny_config("tiny_deepseek_v3", VOCAB, n_routed_experts=6, n_group=4)
    with pytest.raises(ConfigError, match="num_experts_per_tok=3"):
        tiny_config("tiny_deepseek_v3", VOCAB, num_experts_per_tok=3)  # 1 group of 2 reachable


def test_build_model_is_deterministic_and_keeps_global_rng():
    config = tiny_config("tiny_qwen2", VOCAB)
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    a, b, c = build_model(config, 0), build_model(config, 0), build_model(config, 1)
    assert torch.equal(torch.rand(3), expected_next)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["model.embed_tokens.weight"], sc["model.embed_tokens.weight"])
    assert next(a.parameters()).dtype == torch.float32


def test_model_facts_param_count_is_exact_for_tiny_models(tiny_models):
    for model in tiny_models.values():
        assert ModelFacts.from_config(model.config).param_count == describe_model(model)["params"]


# ---------------------------------------------------------------------------------------- save / load
@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_save_load_round_trip_gives_identical_logits(tiny_models, arch, tmp_path):
    model = tiny_models[arch]
    out = save_model(model, make_tokenizer(), tmp_path / "model")
    assert (out / "model.safetensors").is_file() and (out / "config.json").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["model"]  # no temporary sibling left behind

    loaded = load_causal_lm(out)
    assert type(loaded) is type(model) and next(loaded.parameters()).dtype == torch.float32
    ids = torch.randint(3, VOCAB, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        assert torch.equal(model(ids).logits, loaded(ids).logits)
    # transformers 5 would swap in the family's tokenizer class for qwen2/phi3 folders; the saved one must win.
    assert load_tokenizer(out)("w5 w7")["input_ids"] == [5, 7]


def test_save_replaces_existing_folder_and_tokenizer_round_trips(tiny_models, tmp_path):
    out = tmp_path / "student"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    save_model(tiny_models["tiny_qwen2"], make_tokenizer(), out)
    assert not (out / "stale.txt").exists()
    tok = load_tokenizer(out)
    assert tok("w5 w7")["input_ids"] == [5, 7]
    assert (tok.pad_token_id, tok.eos_token_id) == (0, 2)


def test_load_dtype_and_attn_implementation(tiny_models, tmp_path):
    out = save_model(tiny_models["tiny_deepseek_v3"], None, tmp_path / "teacher")
    model = load_causal_lm(out, dtype="bfloat16", attn_implementation="eager")
    assert next(model.parameters()).dtype == torch.bfloat16
    assert model.config._attn_implementation == "eager"
    with pytest.raises(ConfigError, match="float64"):
        load_causal_lm(out, dtype="float64")


def test_missing_paths_give_clear_errors(tmp_path):
    hint = "run `distill prepare-demo` or set teacher.path=<HF folder>"
    missing = tmp_path / "nope"
    with pytest.raises(
        CheckpointError, match=re.escape(f"model path {missing} does not exist; run `distill prepare-demo`")
    ):
        load_causal_lm(missing, hint=hint)

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CheckpointError, match=r"has no config.json \(found: nothing\)"):
        load_causal_lm(empty, hint=hint)

    (empty / "config.json").write_text(json.dumps({"model_type": "qwen2"}))
    with pytest.raises(CheckpointError, match=r"has no weights .*found: config.json\)"):
        load_causal_lm(empty)
    with pytest.raises(CheckpointError, match="no tokenizer files"):
        load_tokenizer(empty)


# --------------------------------------------------------------------------------- production configs
def test_production_arch_configs_parse_into_facts():
    r1 = ModelFacts.from_arch("deepseek_r1")
    assert isinstance(load_config(arch_config_path("deepseek_r1")), DeepseekV3Config)
    assert (r1.vocab_size, r1.hidden_size, r1.num_layers, r1.num_attention_heads) == (129280, 7168, 61, 128)
    assert r1.is_mla and r1.is_moe
    assert (r1.num_experts, r1.num_experts_per_tok, r1.num_shared_experts) == (256, 8, 1)
    assert (r1.num_dense_layers, r1.num_moe_layers) == (3, 58)
    assert (r1.intermediate_size, r1.moe_intermediate_size) == (18432, 2048)
    # The published figures: 671B parameters in total, 37B active per token.
    assert round(r1.param_count / 1e9) == 671 and 37e9 < r1.active_param_count < 38e9

    qwen = ModelFacts.from_arch("qwen2_5_3b")
    assert (qwen.vocab_size, qwen.hidden_size, qwen.num_layers) == (151936, 2048, 36)
    assert (qwen.num_attention_heads, qwen.num_key_value_heads, qwen.intermediate_size) == (16, 2, 11008)
    assert qwen.tie_word_embeddings and not qwen.is_moe and not qwen.is_mla
    assert round(qwen.param_count / 1e8) == 31  # 3.09B

    phi = ModelFacts.from_arch("phi3_mini")
    assert (phi.vocab_size, phi.hidden_size, phi.num_layers) == (32064, 3072, 32)
    assert (phi.num_attention_heads, phi.num_key_value_heads, phi.intermediate_size) == (32, 32, 8192)
    assert round(phi.param_count / 1e8) == 38  # 3.82B


def test_arch_config_names_and_model_folders(tmp_path):
    assert set(ARCH_CONFIGS) == {"deepseek_r1", "qwen2_5_3b", "phi3_mini"}
    with pytest.raises(ConfigError, match="deepseek_r1, qwen2_5_3b, phi3_mini"):
        arch_config_path("llama3")
    # from_path reads only config.json: a folder without weights is enough.
    (tmp_path / "config.json").write_text(arch_config_path("phi3_mini").read_text())
    assert ModelFacts.from_path(tmp_path).hidden_size == 3072
    with pytest.raises(CheckpointError, match="no config file"):
        ModelFacts.from_path(tmp_path / "missing")
