"""Several teachers on the Ray path: one teacher group per teacher (one of them on another tokenizer, through its
token map), each scoring the rows routed to it, combined per batch before the buffer. The run equals the
single-process reference with the same teachers, consumes every batch exactly once, and resumes exactly from a
checkpoint."""

from __future__ import annotations

import json

import pytest
import torch

from distill.config import compose
from tests.test_online_distributed import (
    RUN,
    StopAfter,
    StopRun,
    _run,
    _stats,
    _weights,
    assert_same_curve,
    read_metrics,
)

pytestmark = [pytest.mark.distributed, pytest.mark.slow]


@pytest.fixture(scope="module")
def pair(tiny_teacher, base_overrides, tmp_path_factory) -> list[str]:
    """The student trains on the cross-tokenizer demo's second tokenizer. `a` (the test teacher, on its own
    tokenizer, through its token map) scores shopping and travel; `b` (a teacher on the student's tokenizer, seeded
    random weights) scores baking; garden rows go to their ensemble (weights 0.7 / 0.3)."""
    from distill.models.loading import load_tokenizer_folder, save_model
    from distill.models.tiny import build_model, tiny_config
    from launch.prepare_demo import prepare_student_tokenizer

    student_tokenizer = prepare_student_tokenizer(compose([*base_overrides, *XTOK]))
    tok = load_tokenizer_folder(student_tokenizer)
    config = tiny_config(
        "tiny_deepseek_v3", len(tok), pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id
    )
    b = tmp_path_factory.mktemp("teachers") / "on_student_tokenizer"
    save_model(build_model(config, seed=11), tok, b)
    return [
        *base_overrides,
        *RUN,
        *XTOK,
        f"train.steps={STEPS}",
        "loss=kd",
        "+teacher@teachers.a=tiny_deepseek_v3",
        f"teachers.a.path={tiny_teacher}",
        "teachers.a.token_map.enabled=true",
        "+teacher@teachers.b=tiny_deepseek_v3",
        f"teachers.b.path={b}",
        "+routing.subsets={shopping: a, travel: a, baking: b}",
        "routing.default=ensemble",
        "+ensemble.weights={a: 0.7, b: 0.3}",
    ]


# The demo's second tokenizer as the student's (experiment=xtok_demo without its loss and curriculum).
XTOK = ["prepare.student_vocab_size=320", "student.tokenizer=${prepare.cache_dir}/tokenizers/student-v320-s0"]
STEPS = 10

# Both teacher groups (TP 1, one CPU each) on the first simulated node, the two ZeRO-2 ranks on the second.
RAY = ["cluster=sim_2node", "cluster.teacher_tp=1", "student.zero_stage=2"]


def test_two_teachers_on_ray_match_the_reference_once_each_and_resume_exactly(pair, ray_cluster, tmp_path):
    want = _run(
        [*pair, "cluster=local_single", "cluster.micro_batch_size=8", "cluster.grad_accum_steps=2"],
        tmp_path / "ref",
    )
    got = _run([*pair, *RAY], tmp_path / "online")
    assert_same_curve(got, want)
    _once_each(tmp_path / "online")
    logged = [r for r in got if "teacher/a/tokens" in r]
    assert (
        logged
        and sum(r["teacher/a/tokens"] for r in logged) > 0
        and sum(r["teacher/b/tokens"] for r in logged) > 0
    )
    nodes = _stats(tmp_path / "online")["teacher_nodes"]
    assert len(nodes) == 2  # one replica per teacher
    online, ref = (json.loads((tmp_path / d / "eval.json").read_text()) for d in ("online", "ref"))
    assert online["agreement"] == pytest.approx(ref["agreement"], abs=0.02)

    # Stopped after step 5 (checkpoint at step 6), resumed: the uninterrupted run's curve and weights.
    resumed = tmp_path / "resumed"
    overrides = [*pair, *RAY, "checkpoint.every_steps=2"]
    with pytest.raises(StopRun):
        _run(overrides, resumed, hooks=StopAfter(5))
    again = _run([*overrides, "resume=true"], resumed)
    assert_same_curve(again, got, rel=1e-6)
    _once_each(resumed)
    want_weights = _weights(tmp_path / "online")
    for name, tensor in _weights(resumed).items():
        torch.testing.assert_close(tensor, want_weights[name], rtol=1e-6, atol=1e-6)
    assert len(read_metrics(resumed / "metrics.jsonl")) == len(got)


def _once_each(run_dir) -> None:
    """Every batch of the STEPS committed steps (2 ranks x 1 micro-batch) consumed exactly once, none other."""
    consumption = _stats(run_dir)["consumption"]
    assert len(consumption) == STEPS * 2 and set(consumption.values()) == {1}
