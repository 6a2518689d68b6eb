"""A student initialised from its teacher's layers (student.init_from_teacher)."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, Gemma3TextConfig

from distill.errors import ConfigError
from distill.models.from_teacher import copy_of_teacher, evenly_spaced_layers
from distill.models.tiny import tiny_config


def _teacher(config):
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).eval()


def test_a_copy_of_every_layer_is_the_teacher():
    teacher = _teacher(tiny_config("tiny_qwen2", 128))
    x = torch.randint(0, 128, (2, 12))
    student = copy_of_teacher(teacher, list(range(teacher.config.num_hidden_layers))).eval()
    with torch.no_grad():
        assert torch.equal(student(input_ids=x).logits, teacher(input_ids=x).logits)


def test_picked_layers_carry_the_teachers_weights_and_per_layer_types():
    config = Gemma3TextConfig(
        vocab_size=96,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=6,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        sliding_window=8,
        layer_types=["sliding_attention"] * 5 + ["full_attention"],
    )
    teacher = _teacher(config)
    student = copy_of_teacher(teacher, [0, 3, 5])
    assert student.config.num_hidden_layers == 3
    assert student.config.layer_types == ["sliding_attention", "sliding_attention", "full_attention"]
    t, s = teacher.state_dict(), student.state_dict()
    for new, old in enumerate([0, 3, 5]):
        key = "model.layers.{}.self_attn.q_proj.weight"
        assert torch.equal(s[key.format(new)], t[key.format(old)])
    assert torch.equal(s["model.embed_tokens.weight"], t["model.embed_tokens.weight"])
    assert torch.equal(s["model.norm.weight"], t["model.norm.weight"])
    x = torch.randint(0, 96, (1, 10))
    with torch.no_grad():  # a real forward of the shallower model (sliding and full attention layers)
        assert torch.isfinite(student.eval()(input_ids=x).logits).all()


def test_layer_choice_and_bad_indices():
    assert evenly_spaced_layers(18, 4) == [0, 6, 11, 17]
    assert evenly_spaced_layers(4, 2) == [0, 3]
    with pytest.raises(ConfigError, match="between 1 and"):
        evenly_spaced_layers(4, 5)
    teacher = _teacher(tiny_config("tiny_qwen2", 64))
    with pytest.raises(ConfigError, match="teacher layer index"):
        copy_of_teacher(teacher, [0, 9])


def test_run_with_a_student_from_the_teacher(tiny_teacher, base_overrides, tmp_path):
    from distill.config import compose
    from distill.run import run

    cfg = compose(
        [
            *base_overrides,
            "student=from_teacher",
            "student.num_layers=2",
            "loss=kd",
            "curriculum=single_stage",
            "eval.generate_examples=0",
            "train.steps=4",
        ],
        run_dir=str(tmp_path / "run"),
    )
    summary = run(cfg)
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "student")
    assert exported.config.num_hidden_layers == 2
    assert exported.config.model_type == "deepseek_v3"
    assert summary["ce"] < 3.0  # a copy of the task-trained teacher, not a random model (log 384 = 5.95)

    bad = compose(
        [*base_overrides, "student=from_teacher", "student.arch=tiny_qwen2"], run_dir=str(tmp_path / "b")
    )
    with pytest.raises(ConfigError, match="unset student"):
        run(bad)
