"""Chaos: one online run on the session's simulated two-node Ray cluster under a seeded schedule of faults
(`distill.cluster.chaos`): a teacher actor, a student actor, a buffer shard and the whole worker node killed at
seeded steps; and, separately, the driver process itself killed (SIGKILL) and restarted with resume=true.

Each run must complete, consume every batch exactly once per epoch (the driver's consumption counts) and end with
the uninterrupted run's weights. The layout puts actors of every kind on the worker node: two TP-1 teacher
replicas (one per node), two student ranks (one per node), two buffer shards (one per node). The node is removed
with `ray.cluster_utils.Cluster.remove_node` and a node like it added back (as an autoscaler or an operator
replaces a lost machine), so the session's cluster is whole again for the tests after these.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from distill.cluster.chaos import KINDS, ChaosHooks, schedule
from distill.cluster.driver import Assignment, CheckpointStore
from distill.errors import CheckpointError
from distill.tracking.metrics_log import read_metrics
from tests.test_online_distributed import _run, _stats, _weights

REPO = Path(__file__).parent.parent
STEPS = 12
BATCHES_PER_EPOCH = 6  # 48 rows / micro-batch 8; 12 steps x 2 batches = 4 epochs
RUN = [
    "cluster=sim_2node",
    "cluster.teacher_replicas=2",
    "cluster.teacher_tp=1",
    "cluster.buffer_capacity=4",  # the teacher runs two steps ahead: it still scores when its actor dies
    f"train.steps={STEPS}",
    "train.log_every=1",
    "data.num_train=48",
    "eval.generate_examples=0",
    "eval.max_batches=1",
    "checkpoint.every_steps=2",
    "checkpoint.keep=2",
]


def assert_exactly_once_per_epoch(run_dir: Path) -> None:
    a = Assignment(accum=1, world=2, batches_per_epoch=BATCHES_PER_EPOCH)
    want = {f"{e}:{i}": 1 for s in range(STEPS) for e, i in a.step_batches(s)}
    assert len({k.split(":")[0] for k in want}) == STEPS * 2 // BATCHES_PER_EPOCH  # 4 whole epochs
    assert _stats(run_dir)["consumption"] == want


def assert_same_run(run_dir: Path, baseline: Path) -> None:
    got, want = read_metrics(run_dir / "metrics.jsonl"), read_metrics(baseline / "metrics.jsonl")
    assert [r["step"] for r in got] == list(range(STEPS))
    for g, w in zip(got, want, strict=True):
        assert g["tokens"] == w["tokens"]
        assert g["loss"] == pytest.approx(w["loss"], rel=1e-6), g["step"]
    reference = _weights(baseline)
    for name, tensor in _weights(run_dir).items():
        torch.testing.assert_close(tensor, reference[name], rtol=1e-6, atol=1e-6, msg=name)


@pytest.fixture(scope="module")
def chaos_overrides(base_overrides) -> list[str]:
    return [*base_overrides, *RUN]


@pytest.fixture(scope="module")
def uninterrupted(ray_cluster, tiny_teacher, chaos_overrides, tmp_path_factory) -> Path:
    """The same run without faults: shared by every seed and the driver kill."""
    out = tmp_path_factory.mktemp("chaos-baseline")
    _run(chaos_overrides, out)
    stats = _stats(out)
    assert stats["restores"] == [] and stats["teacher_restarts"] == 0
    return out


def lose_worker_node(cluster) -> None:
    """Remove the worker node (the head holds the driver) and add one like it back."""
    (node,) = cluster.worker_nodes
    params = node._ray_params  # the node's own arguments: the replacement offers what it offered
    cluster.remove_node(node)
    cluster.add_node(
        num_cpus=params.num_cpus, resources=params.resources, object_store_memory=params.object_store_memory
    )


def test_the_schedule_is_seeded_and_holds_one_fault_of_each_kind():
    first = schedule(7, steps=STEPS, replicas=2, ranks=2, shards=2)
    assert [(f.kind, f.step, f.target) for f in first] == [
        (f.kind, f.step, f.target) for f in schedule(7, steps=STEPS, replicas=2, ranks=2, shards=2)
    ]
    assert sorted(f.kind for f in first) == sorted(KINDS)
    steps = [f.step for f in first]
    assert steps == sorted(set(steps)) and steps[0] >= 1 and steps[-1] < 2 * STEPS // 3
    others = {
        tuple((f.kind, f.step) for f in schedule(s, steps=STEPS, replicas=2, ranks=2, shards=2))
        for s in range(5)
    }
    assert len(others) > 1  # the seed matters


def test_a_cleared_shard_drops_its_batches_and_wakes_its_waiters():
    """After a node's loss the driver drops every held batch (their payloads may be gone); a put waiting for room
    gets in, and a lease of a dropped batch waits for it to be produced again."""
    import asyncio

    from distill.cluster.buffer import PUT_OK, BufferShard

    async def scenario():
        shard = BufferShard(0, capacity=1)
        assert await shard.put((0, 0), ["r0"], 5) == PUT_OK
        await shard.lease([(0, 0)], "g0-r0", timeout=1)
        waiting = asyncio.ensure_future(shard.put((0, 1), ["r1"], 5, timeout=5))
        await asyncio.sleep(0.02)
        assert await shard.clear() == 1
        assert await waiting == PUT_OK  # room again
        assert await shard.held() == [(0, 1)]
        with pytest.raises(TimeoutError, match=r"\(0, 0\)"):  # dropped: produced again before any lease
            await shard.lease([(0, 0)], "g1-r0", timeout=0.05)
        assert (await shard.stats())["bytes_held"] == 5

    asyncio.run(scenario())


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_a_run_under_a_seeded_fault_schedule_completes_exactly_once_with_the_uninterrupted_weights(
    ray_cluster, chaos_overrides, uninterrupted, tmp_path, seed
):
    faults = schedule(seed, steps=STEPS, replicas=2, ranks=2, shards=2)
    hooks = ChaosHooks(faults, lose_node=lambda: lose_worker_node(ray_cluster))
    _run(chaos_overrides, tmp_path, hooks=hooks)
    records = hooks.settle()
    print(f"seed {seed}: " + "; ".join(f"{f.describe()} ({f.regained_s:.1f} s to regain)" for f in faults))
    assert all(r["injected_s"] is not None and r["regained_s"] is not None for r in records), records
    stats = _stats(tmp_path)
    # A killed teacher actor is re-dispatched by its group; the lost node's replica is re-placed on another node
    # (one restart when the killed actor was that replica's and nothing was scored between the two faults).
    assert any(r["moved"] for r in stats["teacher_restart_log"]), stats["teacher_restart_log"]
    # The student, shard and node faults each restore the pipeline from the last checkpoint.
    restores = stats["restores"]
    assert len(restores) >= 3, restores
    # The killed shard is always replaced; the lost node held a shard only if none moved off it before (a
    # replaced shard may land on the head node), so ">= 2" failed in 1 of 3 seeds on some runs.
    assert stats["buffer_shards_replaced"] >= 1
    assert [n for r in restores for n in r["nodes_lost"]], restores
    assert all(r["restored_step"] % 2 == 0 and r["restored_step"] <= r["failed_at_step"] for r in restores)
    assert_exactly_once_per_epoch(tmp_path)
    assert_same_run(tmp_path, uninterrupted)
    assert len(ray_cluster.worker_nodes) == 1  # whole again for the next test


@pytest.mark.distributed
@pytest.mark.slow
def test_a_killed_driver_resumes_from_its_last_checkpoint_and_loses_nothing_written(
    ray_cluster, chaos_overrides, uninterrupted, tmp_path
):
    """The `distill` command in a subprocess joined to the session's cluster, SIGKILLed once its step-6
    checkpoint exists (no handler runs; Ray reclaims its actors), then run again with resume=true."""
    cmd = [sys.executable, "-m", "launch.cli", *chaos_overrides, f"run_dir={tmp_path}"]
    cmd.append(f"cluster.address={ray_cluster.address}")
    log = (tmp_path / "driver.log").open("w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
    store = CheckpointStore(tmp_path / "checkpoints", keep=2, identity={}, topology={})
    deadline = time.monotonic() + 240
    while (latest := _latest(store)) < 6:
        assert proc.poll() is None, (tmp_path / "driver.log").read_text()[-3000:]
        assert time.monotonic() < deadline, "no step-6 checkpoint within 240 s"
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    before = read_metrics(tmp_path / "metrics.jsonl")
    kept = [r for r in before if r["step"] < latest]
    assert len(kept) == latest  # every step up to the checkpoint is in metrics.jsonl

    subprocess.run([*cmd, "resume=true"], stdout=log, stderr=subprocess.STDOUT, check=True, cwd=REPO)
    after = read_metrics(tmp_path / "metrics.jsonl")
    assert (
        after[:latest] == kept
    )  # nothing already written is lost (the steps after the checkpoint are redone)
    assert_exactly_once_per_epoch(tmp_path)  # counts saved with the checkpoint + the resumed steps'
    assert_same_run(tmp_path, uninterrupted)


def _latest(store: CheckpointStore) -> int:
    try:
        path = store.latest()
    except (OSError, CheckpointError):  # a pointer being switched: read it again
        return -1
    return -1 if path is None else int(path.name.removeprefix("step-"))
