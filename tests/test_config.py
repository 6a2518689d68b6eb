"""Config composition and up-front validation: bad input fails before any model is loaded."""

import pytest
from hydra.errors import ConfigCompositionException

from distill.config import compose, resolved_yaml
from distill.errors import CheckpointError, ConfigError
from distill.models import resolve
from distill.run.validate import validate_run


def facts(cfg):
    return resolve.pair_facts(cfg)


def test_default_config_composes_and_validates():
    cfg = compose()
    topology = validate_run(cfg, facts(cfg))
    assert topology.global_batch_size == cfg.cluster.global_batch_size
    assert "forward_kl" in resolved_yaml(cfg)


def test_demo_runs_the_online_path_by_default_and_the_reference_on_request():
    """`distill demo` (root config `demo`) is the `distill` config on a local Ray cluster."""
    demo, plain = compose(config_name="demo"), compose()
    assert demo.cluster.mode == "ray" and demo.cluster.address is None  # a fresh local Ray instance
    assert plain.cluster.mode == "local"
    validate_run(demo, facts(demo))
    assert {k: v for k, v in demo.items() if k != "cluster"} == {
        k: v for k, v in plain.items() if k != "cluster"
    }
    assert compose(["cluster=local_single"], config_name="demo").cluster == plain.cluster


@pytest.mark.parametrize("override", ["loss.temprature=2", "optim.learning_rate=1", "cluster.gpus=2"])
def test_misspelt_key_fails_at_start(override):
    with pytest.raises(ConfigCompositionException):
        compose([override])


def test_misspelt_key_inside_a_term_fails(tmp_path):
    with pytest.raises(ConfigCompositionException):
        compose(["loss.terms.ce.wieght=2"])


@pytest.mark.parametrize(
    "group", ["loss=kd", "loss=ce_only", "loss=jsd", "loss=kd_features", "student=tiny_phi3"]
)
def test_every_shipped_group_validates(group):
    cfg = compose([group])
    validate_run(cfg, facts(cfg))


def test_unknown_loss_name_lists_valid_ones():
    cfg = compose(["loss.terms.forward_kl.name=forward_kk"])
    with pytest.raises(ConfigError) as e:
        validate_run(cfg, facts(cfg))
    assert "forward_kk" in str(e.value) and "reverse_kl" in str(e.value)


def test_temperature_must_be_positive():
    cfg = compose(["loss.temperature=0"])
    with pytest.raises(ConfigError, match="temperature"):
        validate_run(cfg, facts(cfg))


def test_k_larger_than_vocab():
    cfg = compose(["teacher.topk=100000"])
    with pytest.raises(ConfigError, match="100000"):
        validate_run(cfg, facts(cfg))


def test_layer_map_out_of_range():
    cfg = compose(["loss=kd_features", "loss.terms.hidden.layer_map=[[2,40]]"])
    with pytest.raises(ConfigError, match="40"):
        validate_run(cfg, facts(cfg))
    cfg = compose(["loss=kd_features", "loss.terms.attention.layer_map=[[9,1]]"])
    with pytest.raises(ConfigError, match=r"\[9, 1\]"):
        validate_run(cfg, facts(cfg))


def test_all_weights_zero():
    cfg = compose(["loss=ce_only", "loss.terms.ce.weight=0"])
    with pytest.raises(ConfigError, match="every weight is 0"):
        validate_run(cfg, facts(cfg))


def test_batch_arithmetic_checked_from_config():
    cfg = compose(["cluster.grad_accum_steps=3"])
    with pytest.raises(ConfigError, match="global_batch_size"):
        validate_run(cfg, facts(cfg))


@pytest.mark.parametrize("student", ["qwen2_5_3b", "phi3_mini"])
def test_production_configs_validate_but_vocab_mismatch_is_named(student):
    """R1 (129280 tokens) and Qwen2.5/Phi-3 do not share a tokenizer: clear error naming the way out."""
    cfg = compose(["teacher=deepseek_r1", f"student={student}", "cluster.teacher_tp=8"])
    f = facts(cfg)
    assert f.teacher_vocab == 129280 and f.teacher_layers == 61
    assert f.teacher_shape.num_experts == 256
    with pytest.raises(ConfigError, match="vocabulary"):
        validate_run(cfg, f)


def test_production_teacher_with_tiny_student_validates():
    cfg = compose(["teacher=deepseek_r1", "teacher.topk=64", "cluster.teacher_tp=8"])
    validate_run(cfg, facts(cfg))


def test_tp_that_does_not_divide_deepseek_heads():
    cfg = compose(["teacher=deepseek_r1", "cluster.teacher_tp=3"])
    with pytest.raises(ConfigError, match="128 attention heads"):
        validate_run(cfg, facts(cfg))


def test_missing_checkpoint_paths(tmp_path):
    cfg = compose(["teacher=hf", f"teacher.path={tmp_path / 'nope'}"])
    with pytest.raises(CheckpointError, match="nope"):
        resolve.require_teacher(cfg)
    cfg = compose([f"prepare.cache_dir={tmp_path}"])
    with pytest.raises(CheckpointError, match="prepare-demo"):
        resolve.require_teacher(cfg)
    cfg = compose(["teacher=deepseek_r1"])
    with pytest.raises(ConfigError, match=r"teacher\.path"):
        resolve.require_teacher(cfg)


def test_reference_path_refuses_resume_instead_of_ignoring_it(tiny_teacher, base_overrides, tmp_path):
    from launch.distill import run

    with pytest.raises(ConfigError, match=r"cluster\.mode=ray"):
        run(compose([*base_overrides, "resume=true"], run_dir=str(tmp_path)))


def test_a_user_error_is_a_message_and_exit_code_2_not_a_traceback(tmp_path):
    """No teacher under prepare.cache_dir: the CLI says so in a line, names the fix and exits 2; with
    HYDRA_FULL_ERROR=1 the traceback is kept for debugging."""
    import os
    import subprocess
    import sys

    cmd = [
        sys.executable,
        "-m",
        "launch.cli",
        f"prepare.cache_dir={tmp_path}",
        f"hydra.run.dir={tmp_path / 'run'}",
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    env.pop("HYDRA_FULL_ERROR", None)
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    (line,) = [ln for ln in proc.stderr.splitlines() if ln.startswith("distill: ")]
    assert "CheckpointError: teacher checkpoint" in line and "run `distill prepare-demo` first" in line
    full = subprocess.run(cmd, capture_output=True, text=True, env={**env, "HYDRA_FULL_ERROR": "1"})
    assert full.returncode != 0 and "Traceback" in full.stderr


def test_a_student_whose_head_the_fused_loss_cannot_reproduce_fails_at_start(tmp_path):
    """Granite divides its logits by config.logits_scaling: the fused head would train other logits than the
    model computes, so a Granite student is refused before any model loads, unless the head is unfused."""
    from transformers import GraniteConfig

    vocab = facts(compose()).teacher_vocab
    GraniteConfig(
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    ).save_pretrained(tmp_path)
    cfg = compose(["student=hf", f"student.path={tmp_path}"])
    with pytest.raises(ConfigError, match=r"'granite' architecture .* loss.fused_head=false"):
        validate_run(cfg, facts(cfg))
    unfused = compose(["student=hf", f"student.path={tmp_path}", "loss.fused_head=false"])
    validate_run(unfused, facts(unfused))
