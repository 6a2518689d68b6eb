"""On-policy distillation on the Ray path: a rollout actor holding a copy of the student writes each on-policy
batch with the weights the ranks publish, the TP-2 teacher grades it, two ZeRO-3 ranks on the other simulated node
train on it. At staleness 0 the run equals the single-process on-policy reference; a stopped run resumes exactly;
at staleness 1 the rollouts overlap training, one step behind."""

from __future__ import annotations

import pytest

from tests.test_online_distributed import StopAfter, StopRun, _run, _stats

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

STEPS = 10
ONPOLICY = [
    f"train.steps={STEPS}",
    "train.log_every=1",
    "data.num_train=80",
    "eval.generate_examples=0",
    "eval.max_batches=1",
    "curriculum=three_stage_onpolicy",  # steps 0 (KD warm-up), 1-5 (KD), 6-9 (on-policy)
    "curriculum.stages.2.on_policy.lmbda=0.75",  # 5 of the 8 batches: both kinds in steps 6-8, two own in 9
    "curriculum.stages.2.on_policy.max_new_tokens=16",
    "loss=kd",
]
RAY = [
    "cluster=sim_2node",
    "student.zero_stage=3",
    "cluster.cpus_per_rollout_actor=0",  # the simulated nodes' CPUs are the teacher's and the ranks'
]


def _same(got: list[dict], want: list[dict], rel: float) -> None:
    assert [r["step"] for r in got] == [r["step"] for r in want]
    assert [r["tokens"] for r in got] == [r["tokens"] for r in want]  # the same samples, so the same lengths
    for g, w in zip(got, want, strict=True):
        for key in ("loss", "lr", "grad_norm", *[k for k in w if k.startswith("loss/")]):
            assert g[key] == pytest.approx(w[key], rel=rel), (g["step"], key, g[key], w[key])


@pytest.fixture(scope="module")
def common(base_overrides) -> list[str]:
    return [*base_overrides, *ONPOLICY]


def test_onpolicy_on_ray_equals_the_reference_and_resumes_exactly(
    common, ray_cluster, tiny_teacher, tmp_path
):
    want = _run(
        [*common, "cluster=local_single", "cluster.micro_batch_size=8", "cluster.grad_accum_steps=2"],
        tmp_path / "ref",
    )
    got = _run([*common, *RAY], tmp_path / "ray")
    _same(got, want, rel=1e-4)
    on = [r for r in got if r.get("stage") == "onpolicy"]
    assert [r["onpolicy/share"] for r in on] == [0.5, 0.5, 0.5, 1.0]  # the lambda draws of steps 6-9
    assert all(r["onpolicy/staleness"] == 0 and r["onpolicy/dropped"] == 0 for r in on)
    consumption = _stats(tmp_path / "ray")["consumption"]
    assert len(consumption) == STEPS * 2 and set(consumption.values()) == {1}

    # Stopped inside the on-policy stage (checkpoint at step 8), resumed: the uninterrupted run's curve.
    resumed = tmp_path / "resumed"
    with pytest.raises(StopRun):
        _run([*common, *RAY, "checkpoint.every_steps=2"], resumed, hooks=StopAfter(7))
    again = _run([*common, *RAY, "checkpoint.every_steps=2", "resume=true"], resumed)
    _same(again, got, rel=1e-6)


def test_onpolicy_staleness_two_overlaps_rollouts_with_training(common, ray_cluster, tiny_teacher, tmp_path):
    """Two steps written at once by two rollout actors (the feed's two threads), while the steps before train."""
    overrides = ["curriculum.stages.2.on_policy.max_staleness=2", "cluster.rollout_actors=2"]
    got = _run([*common, *RAY, *overrides], tmp_path)
    on = [r for r in got if r.get("stage") == "onpolicy"]
    assert on and [r["onpolicy/staleness"] for r in on if "onpolicy/staleness" in r] == [2] * len(on)
    consumption = _stats(tmp_path)["consumption"]
    assert len(consumption) == STEPS * 2 and set(consumption.values()) == {1}


def test_cross_tokenizer_onpolicy_on_ray_equals_the_reference(
    base_overrides, ray_cluster, tiny_teacher, tmp_path
):
    """The demo's cross-tokenizer pair: the rollout actor re-encodes the student's replies for the teacher's
    tokenizer, the (TP-1, as in tests/test_xtok_online.py) teacher actor grades its own tokens, projected back."""
    from distill.config import compose
    from launch.prepare_demo import prepare_student_tokenizer

    common = [
        *base_overrides,
        *ONPOLICY,
        "experiment=xtok_demo",
        "prepare.student_vocab_size=320",
        "loss=kd_xtok",
    ]
    prepare_student_tokenizer(compose(common))
    local = ["cluster=local_single", "cluster.micro_batch_size=8", "cluster.grad_accum_steps=2"]
    want = _run([*common, *local], tmp_path / "ref")
    got = _run([*common, *RAY, "cluster.teacher_tp=1", "student.zero_stage=2"], tmp_path / "ray")
    _same(got, want, rel=1e-4)
    assert [r["onpolicy/share"] for r in got if r.get("stage") == "onpolicy"] == [0.5, 0.5, 0.5, 1.0]
