"""The continual replay buffer: reservoir sampling (with and without a per-increment quota), trimming and
padding of rows with their teacher outputs, frozen snapshots, and safetensors checkpoints."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from distill.data.replay import ReplayBuffer
from distill.errors import CheckpointError, ConfigError
from distill.teacher.batch import TeacherBatch


def make_batch(
    first: int, lengths=(3, 5), k: int = 2, bf16: bool = False, hidden: bool = False
) -> TeacherBatch:
    """Rows whose tokens are first + row index (so a stored sample names its source), right-padded with -1."""
    b, t = len(lengths), max(lengths)
    ids = torch.full((b, t), -1, dtype=torch.int32)
    mask = torch.zeros((b, t), dtype=torch.bool)
    for i, n in enumerate(lengths):
        ids[i, :n] = first + i
        mask[i, :n] = True
    logits = torch.randn(b, t, k, generator=torch.Generator().manual_seed(first))
    return TeacherBatch.from_torch(
        (0, first),
        input_ids=ids,
        attention_mask=mask,
        loss_mask=mask,
        topk_ids=torch.arange(b * t * k, dtype=torch.int32).reshape(b, t, k),
        topk_logits=logits.to(torch.bfloat16) if bf16 else logits,
        log_normalizer=torch.ones(b, t),
        hidden=torch.randn(b, t, 1, 4) if hidden else None,
    )


def fill(buf: ReplayBuffer, increment: int, n: int, start: int = 0) -> None:
    for j in range(n):
        buf.offer(make_batch(start + 2 * j, lengths=(2,)), increment)


def held_ids(buf: ReplayBuffer) -> list[int]:
    return sorted(int(s.arrays["input_ids"][0]) for s in buf._samples)


def test_algorithm_r_keeps_a_uniform_bounded_sample():
    inclusion = Counter()
    for seed in range(200):
        buf = ReplayBuffer(10, seed=seed)
        fill(buf, 0, 100)
        assert len(buf) == 10 and buf.offered() == {0: 100}
        inclusion.update(held_ids(buf))
    early = sum(inclusion[2 * j] for j in range(50)) / (200 * 50)
    late = sum(inclusion[2 * j] for j in range(50, 100)) / (200 * 50)
    assert early == pytest.approx(0.1, abs=0.02) and late == pytest.approx(0.1, abs=0.02)
    a, b, c = (ReplayBuffer(10, seed=s) for s in (1, 1, 2))
    for buf in (a, b, c):
        fill(buf, 0, 100)
    assert held_ids(a) == held_ids(b) != held_ids(c)


def test_shares_follow_offers_without_quota_and_are_equal_with_one():
    plain, quota = ReplayBuffer(30, seed=0), ReplayBuffer(30, seed=0, quota=10)
    for inc, n in enumerate((300, 300, 300)):
        fill(plain, inc, n, start=1000 * inc)
        fill(quota, inc, n, start=1000 * inc)
    assert quota.counts() == {0: 10, 1: 10, 2: 10}
    shares = plain.counts()
    assert sum(shares.values()) == 30 and all(4 <= shares[i] <= 16 for i in range(3))  # ~1/3 each, no quota


def test_quota_evicts_from_the_largest_increment_when_full():
    buf = ReplayBuffer(6, seed=0, quota=3)
    fill(buf, 0, 3)
    fill(buf, 1, 2, start=100)
    fill(buf, 2, 5, start=200)  # capacity 6: increment 2 takes room from the fullest (0, then 1 ...)
    counts = buf.counts()
    assert sum(counts.values()) == 6 and counts[2] == 3 and max(counts.values()) == 3


def test_rows_are_trimmed_and_replay_batches_padded_deterministically():
    buf = ReplayBuffer(8, seed=3)
    source = make_batch(10, lengths=(3, 5), bf16=True, hidden=True)
    assert buf.offer(source, 0) == 2
    stored = sorted(buf._samples, key=lambda s: len(s.arrays["input_ids"]))
    assert [len(s.arrays["input_ids"]) for s in stored] == [3, 5]
    np.testing.assert_array_equal(stored[1].arrays["topk_logits"], source.topk_logits[1, :5])
    snap = buf.snapshot()
    fill(buf, 1, 4, start=50)  # later offers leave the snapshot alone
    assert snap.counts() == {0: 2}
    a, b = snap.batch((0, 7), 7, 4, pad_id=99), snap.batch((0, 7), 7, 4, pad_id=99)
    np.testing.assert_array_equal(a.input_ids, b.input_ids)
    assert a.batch_id == (0, 7) and a.input_ids.shape == (4, 5) and a.hidden.shape == (4, 5, 1, 4)
    assert a.float_dtypes["topk_logits"] == "bfloat16" and a.tensor("topk_logits").dtype == torch.bfloat16
    short = [i for i in range(4) if a.attention_mask[i].sum() == 3]
    assert short and all((a.input_ids[i, 3:] == 99).all() and not a.loss_mask[i, 3:].any() for i in short)
    assert any(
        not np.array_equal(snap.batch((0, g), g, 4, pad_id=0).input_ids, a.input_ids) for g in range(8, 20)
    )
    with pytest.raises(ValueError, match="at least one earlier increment"):
        ReplayBuffer(4, seed=0).snapshot().batch((0, 0), 0, 2, pad_id=0)


def test_save_load_round_trip_continues_exactly(tmp_path):
    whole, half = ReplayBuffer(12, seed=5, quota=6), ReplayBuffer(12, seed=5, quota=6)
    fill(whole, 0, 20)
    fill(half, 0, 20)
    path = half.save(tmp_path / "replay.safetensors")
    resumed = ReplayBuffer.load(path, capacity=12, seed=5, quota=6)
    assert held_ids(resumed) == held_ids(half) and resumed.offered() == half.offered()
    fill(whole, 1, 20, start=500)
    fill(resumed, 1, 20, start=500)
    assert held_ids(resumed) == held_ids(whole)
    with pytest.raises(CheckpointError, match="seed=5"):
        ReplayBuffer.load(path, capacity=12, seed=6, quota=6)
    with pytest.raises(CheckpointError, match="capacity=12"):
        ReplayBuffer.load(path, capacity=13, seed=5, quota=6)
    (tmp_path / "bad.safetensors").write_bytes(path.read_bytes()[:40])
    with pytest.raises(CheckpointError, match="damaged"):
        ReplayBuffer.load(tmp_path / "bad.safetensors", capacity=12, seed=5, quota=6)


def test_a_failed_save_leaves_the_previous_file(tmp_path, monkeypatch):
    import distill.data.replay as replay

    buf = ReplayBuffer(4, seed=0)
    fill(buf, 0, 2)
    path = buf.save(tmp_path / "r.safetensors")
    before = path.read_bytes()
    fill(buf, 0, 4, start=40)

    def broken(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(replay, "save_file", broken)
    with pytest.raises(OSError, match="disk full"):
        buf.save(path)
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["r.safetensors"]


@pytest.mark.parametrize(
    ("kwargs", "key"), [({"capacity": -1}, "capacity"), ({"capacity": 4, "quota": -1}, "quota")]
)
def test_negative_sizes_are_config_errors(kwargs, key):
    with pytest.raises(ConfigError, match=f"continual.replay.{key}"):
        ReplayBuffer(kwargs.pop("capacity"), seed=0, **kwargs)


def test_increments_come_in_order():
    buf = ReplayBuffer(4, seed=0)
    fill(buf, 1, 1)
    with pytest.raises(ValueError, match="in order"):
        fill(buf, 0, 1)
