"""End-to-end runs of the single-process reference path on tiny real models (the `slow` tier)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from distill.config import compose
from distill.models.resolve import demo_teacher_dir
from distill.tracking.metrics_log import read_metrics
from launch.distill import run

pytestmark = pytest.mark.slow


def test_cli_run_writes_a_complete_run_folder(tiny_teacher, base_overrides, tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "launch.cli", *base_overrides, f"hydra.run.dir={out}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (out / "config.yaml").is_file()
    assert "forward_kl" in (out / "config.yaml").read_text()
    records = read_metrics(out / "metrics.jsonl")
    assert records[-1]["step"] == 8 - 1
    for key in ("stage", "loss", "loss/forward_kl", "loss/ce", "lr", "tokens_per_s"):
        assert key in records[-1]
    summary = json.loads((out / "eval.json").read_text())
    assert {"ce", "ppl", "kl_to_teacher", "agreement", "exact_match"} <= summary.keys()
    student = AutoModelForCausalLM.from_pretrained(out / "student", local_files_only=True)
    assert list((out / "student").glob("*.safetensors"))
    ids = torch.tensor([[1, 2, 3]])
    assert student(ids).logits.shape[-1] == student.config.vocab_size


def test_kd_student_beats_ce_only_on_heldout_ce(tiny_teacher, base_overrides, tmp_path):
    common = [*base_overrides, "train.steps=40", "data.num_train=640", "eval.generate_examples=0"]
    # One stage each at this short budget; the three-stage recipe is measured at full length by bench/quality.py.
    common = [*common, "curriculum=single_stage"]
    kd = run(compose([*common, "loss=kd"], run_dir=str(tmp_path / "kd")))
    ce = run(compose([*common, "loss=ce_only"], run_dir=str(tmp_path / "ce")))
    assert kd["ce"] < ce["ce"], (kd, ce)
    assert kd["agreement"] > ce["agreement"] - 0.02


def test_gradient_accumulation_equals_one_big_batch(tiny_teacher, base_overrides, tmp_path):
    """Normalising by the global token count once makes micro-batching invisible to the loss curve."""
    common = [
        *base_overrides,
        "train.steps=4",
        "train.log_every=1",
        "eval.generate_examples=0",
        "eval.max_batches=1",
    ]
    one = compose(
        [*common, "cluster.micro_batch_size=16", "cluster.grad_accum_steps=1"], run_dir=str(tmp_path / "a")
    )
    acc = compose(
        [*common, "cluster.micro_batch_size=8", "cluster.grad_accum_steps=2"], run_dir=str(tmp_path / "b")
    )
    # The same sequences per step: the stream is shuffled by (seed, epoch) and batched at the micro size,
    # so two consecutive micro-batches of 8 are exactly one batch of 16.
    run(one)
    run(acc)
    a = read_metrics(tmp_path / "a" / "metrics.jsonl")
    b = read_metrics(tmp_path / "b" / "metrics.jsonl")
    assert [r["tokens"] for r in a] == [r["tokens"] for r in b]
    for ra, rb in zip(a, b, strict=True):
        assert ra["loss"] == pytest.approx(rb["loss"], rel=1e-5)


def test_feature_transfer_terms_train(tiny_teacher, base_overrides, tmp_path):
    cfg = compose(
        [
            *base_overrides,
            "loss=kd_features",
            "curriculum=single_stage",  # every term on in every step
            "student=tiny_phi3",
            "train.steps=3",
            "train.log_every=1",
            "eval.generate_examples=0",
            "eval.max_batches=1",
        ],
        run_dir=str(tmp_path),
    )
    run(cfg)
    records = read_metrics(tmp_path / "metrics.jsonl")
    for r in records:
        for term in ("forward_kl", "ce", "hidden", "attention"):
            assert torch.isfinite(torch.tensor(r[f"loss/{term}"]))
    assert records[-1]["loss/hidden"] > 0


def test_resolved_config_is_written(tiny_teacher, base_overrides, tmp_path):
    cfg = compose(
        [
            *base_overrides,
            "train.steps=1",
            "curriculum=single_stage",
            "eval.generate_examples=0",
            "eval.max_batches=1",
        ],
        run_dir=str(tmp_path),
    )
    run(cfg)
    text = (tmp_path / "config.yaml").read_text()
    assert "${" not in text  # interpolations resolved
    assert str(demo_teacher_dir(cfg).parent.parent) in text


def test_any_hf_folders_as_teacher_and_student_on_a_user_dataset(tiny_teacher, base_overrides, tmp_path):
    """teacher=hf / student=hf take any causal-LM folder; data.path takes a user jsonl with chat messages."""
    from distill.models.loading import load_tokenizer, save_model
    from distill.models.tiny import build_model, tiny_config

    tokenizer = load_tokenizer(tiny_teacher)
    ids = dict(pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    save_model(
        build_model(tiny_config("tiny_qwen2", len(tokenizer), **ids), seed=1), tokenizer, tmp_path / "t"
    )
    save_model(
        build_model(tiny_config("tiny_phi3", len(tokenizer), **ids), seed=2), tokenizer, tmp_path / "s"
    )
    rows = [
        {
            "messages": [
                {"role": "user", "content": f"What is {i} + 1?"},
                {"role": "assistant", "content": f"{i + 1}"},
            ]
        }
        for i in range(64)
    ]
    (tmp_path / "data.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    cfg = compose(
        [
            *base_overrides,
            "teacher=hf",
            f"teacher.path={tmp_path / 't'}",
            "student=hf",
            f"student.path={tmp_path / 's'}",
            f"data.path={tmp_path / 'data.jsonl'}",
            "data.eval_fraction=0.25",
            "train.steps=2",
            "curriculum=single_stage",
            "train.log_every=1",
        ],
        run_dir=str(tmp_path / "run"),
    )
    summary = run(cfg)
    assert "exact_match" not in summary  # a user dataset has no known answers
    assert summary["tokens"] > 0
    assert len(read_metrics(tmp_path / "run" / "metrics.jsonl")) == 2


def test_eval_command_scores_an_exported_student(tiny_teacher, base_overrides, tmp_path):
    from launch.evaluate import evaluate

    tiny = [
        "train.steps=1",
        "curriculum=single_stage",
        "eval.max_batches=1",
        "eval.generate_examples=4",
        "eval.max_new_tokens=8",
    ]
    run(compose([*base_overrides, *tiny], run_dir=str(tmp_path / "run")))
    result = evaluate(
        compose(
            [*base_overrides, *tiny, f"eval.model={tmp_path / 'run' / 'student'}"],
            run_dir=str(tmp_path / "ev"),
        )
    )
    saved = json.loads((tmp_path / "ev" / "eval.json").read_text())
    assert saved["model"] == str(tmp_path / "run" / "student")
    for key in ("ce", "ppl", "kl_to_teacher", "agreement", "exact_match", "tokens_per_s"):
        assert key in saved and saved[key] == pytest.approx(result[key])
    assert saved["kl_to_teacher"] > 0 and 0 <= saved["agreement"] <= 1
    # The same student, data and teacher as the run's own end-of-run evaluation: the same figures.
    at_run_end = json.loads((tmp_path / "run" / "eval.json").read_text())
    for key in ("ce", "kl_to_teacher", "agreement", "exact_match"):
        assert saved[key] == pytest.approx(at_run_end[key], rel=1e-5), key


def test_demo_prints_teacher_kd_and_ce_rows(tiny_teacher, base_overrides, tmp_path, capsys):
    from launch.demo import compare

    tiny = [
        "train.steps=2",
        "curriculum=single_stage",
        "eval.max_batches=1",
        "eval.generate_examples=4",
        "eval.max_new_tokens=8",
    ]
    rows = compare(compose([*base_overrides, *tiny], run_dir=str(tmp_path)))
    assert list(rows) == ["teacher", "KD student", "CE-only student"]
    assert rows["teacher"]["agreement"] == 1.0
    table = (tmp_path / "demo.md").read_text()
    assert "KD student" in table and "exact-match" in table
    assert "CE-only student" in capsys.readouterr().out
    assert (tmp_path / "kd" / "student").is_dir() and (tmp_path / "ce_only" / "student").is_dir()
