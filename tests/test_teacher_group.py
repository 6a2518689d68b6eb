"""TeacherGroup in real Ray actors on a simulated two-node cluster: placement, TP, recovery, exactly-once."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from distill.batch import TeacherBatch
from distill.cluster.teacher_group import BatchMeta, TeacherGroup, TeacherSpec
from distill.cluster.worker import TorchrunWorker
from distill.models.loading import save_model
from distill.models.tiny import build_model, tiny_config
from distill.teacher.engine import TeacherEngine

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

V = 96


def _save(tmp_path_factory, arch: str):
    path = tmp_path_factory.mktemp("tp-teacher") / arch
    save_model(build_model(tiny_config(arch, V, pad_token_id=0, eos_token_id=0), seed=3), None, path)
    return path


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    return _save(tmp_path_factory, "tiny_deepseek_v3")


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory):
    return _save(tmp_path_factory, "tiny_qwen2")


def batches(n: int, b: int = 2, t: int = 10):
    g = torch.Generator().manual_seed(0)
    out = []
    for i in range(n):
        ids = torch.randint(1, V, (b, t), generator=g)
        attn = torch.ones(b, t, dtype=torch.bool)
        attn[-1, -2:] = False
        loss = attn.clone()
        loss[:, :3] = False
        out.append(
            ((0, i), {"input_ids": ids.numpy(), "attention_mask": attn.numpy(), "loss_mask": loss.numpy()})
        )
    return out


def reference(teacher_dir, items, k):
    engine = TeacherEngine.from_pretrained(teacher_dir, k, hidden_layers=(2,))
    return {
        bid: engine.score(
            bid, *(torch.from_numpy(a[n]) for n in ("input_ids", "attention_mask", "loss_mask"))
        )
        for bid, a in items
    }


# TP 2 sums each row-parallel product over two ranks in another order than TP 1: fp32 rounding only. Measured on
# the trained test teacher (logits up to ~15, fp32 spacing 1e-6 there): at most 1.1e-5 on the top-k logits and
# 5.7e-6 on the log-normaliser over every batch of a run (tests/test_teacher_cache_run.py's TP-2 cache). The
# bound TP_ATOL is ~9x that; hidden states travel as bf16 (spacing 1/128 at 1-2), hence 1e-2.
TP_ATOL = 1e-4


def assert_same(got, want):
    np.testing.assert_array_equal(got.topk_ids, want.topk_ids)
    np.testing.assert_allclose(got.topk_logits, want.topk_logits, atol=TP_ATOL, rtol=0)
    np.testing.assert_allclose(got.log_normalizer, want.log_normalizer, atol=TP_ATOL, rtol=0)
    np.testing.assert_allclose(
        got.tensor("hidden").float().numpy(), want.tensor("hidden").float().numpy(), atol=1e-2, rtol=0
    )


def test_two_replicas_of_tp2_on_two_nodes_equal_single_process(ray_cluster, teacher_dir):
    import ray

    items = batches(6)
    want = reference(teacher_dir, items, k=8)
    spec = TeacherSpec(path=str(teacher_dir), topk=8, hidden_layers=(2,))
    group = TeacherGroup(spec, replicas=2, tp=2, cpus_per_actor=1, spread=True)
    try:
        nodes = group.actor_nodes()
        assert all(len(set(replica)) == 1 for replica in nodes)  # a replica's TP ranks share a node
        assert nodes[0][0] != nodes[1][0]  # replicas spread over the two nodes
        seen = []
        for meta, ref in group.score_stream(items):
            got = ray.get(ref)
            assert got.batch_id == meta.batch_id
            assert_same(got, want[meta.batch_id])
            seen.append(meta.batch_id)
        assert seen == [bid for bid, _ in items]
    finally:
        group.shutdown()


def test_qwen2_teacher_tp2_in_ray_equals_single_process(ray_cluster, qwen_dir):
    import ray

    items = batches(3)
    want = reference(qwen_dir, items, k=8)
    group = TeacherGroup(TeacherSpec(path=str(qwen_dir), topk=8, hidden_layers=(2,)), replicas=1, tp=2)
    try:
        for meta, ref in group.score_stream(items):
            assert_same(ray.get(ref), want[meta.batch_id])
    finally:
        group.shutdown()


def test_killed_actor_recovers_and_every_batch_arrives_exactly_once(ray_cluster, teacher_dir):
    """Kill one TP rank of one replica mid-stream: the replica is rebuilt, its batches re-dispatched."""
    import ray

    items = batches(8)
    want = reference(teacher_dir, items, k=8)
    spec = TeacherSpec(path=str(teacher_dir), topk=8, hidden_layers=(2,))
    group = TeacherGroup(spec, replicas=2, tp=2, cpus_per_actor=1)
    try:
        seen = []
        for i, (meta, ref) in enumerate(group.score_stream(items)):
            if i == 1:
                group.kill_actor(replica=1, rank=1)  # batches queued on replica 1 are lost with it
            assert_same(ray.get(ref), want[meta.batch_id])
            seen.append(meta.batch_id)
        assert seen == [bid for bid, _ in items]
        assert group.replicas[1].restarts == 1
        assert group.replicas[0].restarts == 0
    finally:
        group.shutdown()


class SlowEchoWorker(TorchrunWorker):
    """A teacher worker with the TeacherWorker protocol and no model (a stand-in for a slow forward): each batch
    takes `spec` seconds and comes back as its own tokens, so a test can hold batches in flight on an actor."""

    def __init__(self, spec: float, replica: int, rank: int, tp: int) -> None:
        self.seconds, self.replica = spec, replica

    def setup(self, address) -> int:
        return self.pid()

    def score(self, batch_id, inputs):
        time.sleep(self.seconds)
        ids = inputs["input_ids"]
        mask = np.ones(ids.shape, dtype=bool)
        zeros = np.zeros(ids.shape, dtype=np.float32)
        out = TeacherBatch(tuple(batch_id), ids, mask, mask, ids[..., None], zeros[..., None], zeros)
        return BatchMeta(tuple(batch_id), out.num_tokens, out.nbytes(), self.replica, self.pid()), out


def test_two_streams_that_lose_one_replica_restart_it_once_and_get_every_batch(ray_cluster):
    """The driver's producer thread and the on-policy feed's threads stream through one group at once. When the
    replica they share dies, both streams hold batches on it: it is restarted once, not once per stream (a second
    restart would kill the actors the first one started), and each stream gets each of its batches once, in order."""
    import threading

    import ray

    group = TeacherGroup(0.6, worker=SlowEchoWorker, replicas=1, tp=1, cpus_per_actor=0.5)
    streams = {
        s: [((s, i), {"input_ids": np.full((1, 4), 10 * s + i, dtype=np.int32)}) for i in range(2)]
        for s in range(2)
    }
    got: dict[int, list] = {}

    def consume(s: int) -> None:
        got[s] = [
            (meta.batch_id, int(ray.get(ref).input_ids[0, 0])) for meta, ref in group.score_stream(streams[s])
        ]

    threads = [threading.Thread(target=consume, args=(s,)) for s in streams]
    try:
        for t in threads:
            t.start()
        time.sleep(0.3)  # both streams have sent both their batches; the actor is still on the first
        group.kill_actor(replica=0, rank=0)
        for t in threads:
            t.join(timeout=120)
        assert got == {s: [((s, i), 10 * s + i) for i in range(2)] for s in streams}
        assert group.replicas[0].restarts == 1 and len(group.restart_log) == 1
    finally:
        group.shutdown()
