"""Several teachers on the Ray path: one teacher group per teacher (one of them on another tokenizer, through its
token map), each scoring the rows routed to it, combined per batch before the buffer. The run equals the
single-process reference with the same teachers across a stop and resume from a checkpoint, and consumes every
batch exactly once."""

from __future__ import annotations

import json

import pytest

from distill.config import compose
from tests.test_online_distributed import (
    RUN,
    StopAfter,
    StopRun,
    _run,
    _stats,
    assert_same_curve,
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


def test_two_teachers_on_ray_stopped_and_resumed_match_the_reference_once_each(pair, ray_cluster, tmp_path):
    """One Ray run, stopped after step 5 (checkpoint at step 6) and resumed, against the single-process
    reference: resuming a teacher set continues its routing and combine where the checkpoint left them (an
    exact resume of one teacher is test_online_distributed's)."""
    want = _run(
        [*pair, "cluster=local_single", "cluster.micro_batch_size=8", "cluster.grad_accum_steps=2"],
        tmp_path / "ref",
    )
    online = tmp_path / "online"
    overrides = [*pair, *RAY, "checkpoint.every_steps=2"]
    with pytest.raises(StopRun):
        _run(overrides, online, hooks=StopAfter(5))
    got = _run([*overrides, "resume=true"], online)
    assert_same_curve(got, want)
    _once_each(online)
    logged = [r for r in got if "teacher/a/tokens" in r]
    assert (
        logged
        and sum(r["teacher/a/tokens"] for r in logged) > 0
        and sum(r["teacher/b/tokens"] for r in logged) > 0
    )
    nodes = _stats(online)["teacher_nodes"]
    assert len(nodes) == 2  # one replica per teacher
    got_eval, ref = (json.loads((tmp_path / d / "eval.json").read_text()) for d in ("online", "ref"))
    assert got_eval["agreement"] == pytest.approx(ref["agreement"], abs=0.02)


def _once_each(run_dir) -> None:
    """Every batch of the STEPS committed steps (2 ranks x 1 micro-batch) consumed exactly once, none other."""
    consumption = _stats(run_dir)["consumption"]
    assert len(consumption) == STEPS * 2 and set(consumption.values()) == {1}
