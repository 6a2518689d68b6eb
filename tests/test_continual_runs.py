"""Continual distillation end to end: increments with replay on the reference path and on the distributed path
(teacher actor -> buffer -> DeepSpeed students, replay batches put by the driver), compared step for step;
a distributed run stopped in the middle of an increment resumes with its replay buffer and evaluations."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from distill.cluster.driver import Hooks
from distill.config import compose
from distill.eval.continual import ContinualMatrix
from distill.tracking.metrics_log import read_metrics
from tests.test_online_distributed import TP1_TEACHER, StopAfter, StopRun

pytestmark = pytest.mark.slow
INCREMENTS = ["shopping", "travel", "baking"]
STEPS = 12  # 4 per increment
COMMON = [
    "mode=continual",
    "curriculum=single_stage",
    "loss=kd",
    f"continual.increments=[{','.join(INCREMENTS)}]",
    "continual.replay.capacity=48",
    "continual.replay.ratio=0.5",
    f"train.steps={STEPS}",
    "train.log_every=1",
    "data.num_train=240",
    "eval.generate_examples=0",
    "eval.max_batches=1",
]
SAME_BATCH = ["cluster.micro_batch_size=8", "cluster.grad_accum_steps=2"]  # = sim_2node's W 2 x accum 1


def _run(overrides: list[str], run_dir: Path, hooks: Hooks | None = None) -> list[dict]:
    from distill.run import run

    cfg = compose(overrides, run_dir=str(run_dir))
    run(cfg, hooks=hooks)
    return read_metrics(run_dir / "metrics.jsonl")


def _results(run_dir: Path) -> dict:
    return json.loads((run_dir / "continual.json").read_text())


@pytest.fixture(scope="module")
def reference(tiny_teacher, base_overrides, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("continual-ref")
    _run([*base_overrides, *COMMON, "cluster=local_single", *SAME_BATCH], out)
    return out


def test_reference_continual_run_reports_the_accuracy_matrix(reference):
    rows = read_metrics(reference / "metrics.jsonl")
    assert [r["stage"] for r in rows] == [name for name in INCREMENTS for _ in range(4)]
    results = _results(reference)
    assert results["increments"] == INCREMENTS and results["completed"] == len(INCREMENTS)
    accuracy = ContinualMatrix.from_dict(next(m for m in results["matrices"] if m["metric"] == "accuracy"))
    assert len(accuracy.values) == len(INCREMENTS) and all(len(r) == len(INCREMENTS) for r in accuracy.values)
    assert all(0.0 <= v <= 1.0 for row in accuracy.values for v in row)
    # The student improves on what it has trained on: after increment i, increment i beats the untrained start
    # of the run on it (row 0 is after the first increment, so compare the diagonal's growth on the CE matrix).
    ce = ContinualMatrix.from_dict(next(m for m in results["matrices"] if m["metric"] == "ce"))
    assert ce.values[-1][-1] < ce.values[0][-1]
    assert results["average_forgetting"]["accuracy"] == pytest.approx(accuracy.average_forgetting())
    # The buffer holds samples of every increment but the last... and of the last, offered after its steps.
    held = {int(k): v for k, v in results["replay"].items()}
    assert sum(held.values()) == 48 and set(held) == {0, 1, 2}
    report = (reference / "report.md").read_text()
    assert "Continual: accuracy" in report and (reference / "continual_accuracy.png").stat().st_size > 1000


@pytest.mark.distributed
def test_distributed_continual_run_matches_the_reference(ray_cluster, base_overrides, reference, tmp_path):
    got = _run(
        [*base_overrides, *COMMON, "cluster=sim_2node", TP1_TEACHER, "checkpoint.every_steps=2"], tmp_path
    )
    want = read_metrics(reference / "metrics.jsonl")
    assert [r["tokens"] for r in got] == [r["tokens"] for r in want]  # replay batches included
    for g, w in zip(got, want, strict=True):
        assert g["stage"] == w["stage"]
        for key in ("loss", "loss/forward_kl", "loss/ce", "lr"):
            assert g[key] == pytest.approx(w[key], rel=1e-4), (g["step"], key)
    a, b = _results(tmp_path), _results(reference)
    assert a["replay"] == b["replay"]
    for ma, mb in zip(a["matrices"], b["matrices"], strict=True):
        flat = [v for row in mb["values"] for v in row]
        assert [v for row in ma["values"] for v in row] == pytest.approx(flat, rel=1e-4), ma["metric"]
    assert sorted(p.name for p in (tmp_path / "increments").iterdir()) == [
        f"{i:02d}-{name}" for i, name in enumerate(INCREMENTS)
    ]
    # The checkpoint carries the replay buffer (live and the increment's frozen snapshot) as safetensors.
    latest = tmp_path / "checkpoints" / (tmp_path / "checkpoints" / "latest").read_text().strip()
    assert (latest / "replay.safetensors").is_file() and (latest / "replay_frozen.safetensors").is_file()


@pytest.mark.distributed
def test_continual_resume_mid_increment_continues_the_uninterrupted_run(
    ray_cluster, base_overrides, reference, tmp_path
):
    """Stopped after step 5 (increment `travel`, steps 4-7; the checkpoint holds steps 0-5): the resumed run
    replays from the snapshot frozen at the start of `travel`, not from the buffer as it was at step 6."""
    overrides = [*base_overrides, *COMMON, "cluster=sim_2node", TP1_TEACHER, "checkpoint.every_steps=2"]
    with pytest.raises(StopRun):
        _run(overrides, tmp_path, hooks=StopAfter(5))
    assert _results(tmp_path)["completed"] == 1
    got = _run([*overrides, "resume=true"], tmp_path)
    want = read_metrics(reference / "metrics.jsonl")
    assert [r["step"] for r in got] == list(range(STEPS))
    for g, w in zip(got, want, strict=True):
        assert g["loss"] == pytest.approx(w["loss"], rel=1e-4), g["step"]
    assert _results(tmp_path)["replay"] == _results(reference)["replay"]
    assert _results(tmp_path)["completed"] == len(INCREMENTS)
