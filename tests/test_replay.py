"""The continual replay buffer, through its public API: reservoir statistics (Algorithm R, per-increment quota),
row trimming and replay-batch padding, frozen snapshots, bf16 payloads, and atomic safetensors checkpoints."""

from __future__ import annotations

import copy
import os
from pathlib import Path

import numpy as np
import pytest
import torch

import distill.data.replay as replay
from distill.batch import TeacherBatch
from distill.data.replay import ReplayBuffer
from distill.errors import CheckpointError, ConfigError

K, L, H = 3, 2, 4
GARBAGE = 77  # what the source batches carry on padding, so a stored pad position would show


def make_batch(
    first: int,
    lengths: tuple[int, ...],
    *,
    bf16: bool = False,
    features: bool = False,
) -> TeacherBatch:
    """Right-padded rows whose tokens are all `first + row` (so a replayed row names its source sample)."""
    b, t = len(lengths), max(lengths)
    g = torch.Generator().manual_seed(first)
    mask = torch.arange(t)[None, :] < torch.tensor(lengths)[:, None]
    ids = torch.where(mask, (first + torch.arange(b, dtype=torch.int32))[:, None], GARBAGE).int()
    logits = torch.randn(b, t, K, generator=g)
    return TeacherBatch.from_torch(
        (0, first),
        input_ids=ids,
        attention_mask=mask,
        loss_mask=mask & (torch.arange(t) > 0),  # differs from attention_mask so a swap would show
        topk_ids=torch.randint(0, 50, (b, t, K), generator=g, dtype=torch.int32),
        topk_logits=logits.to(torch.bfloat16) if bf16 else logits,
        log_normalizer=torch.randn(b, t, generator=g),
        hidden=torch.randn(b, t, L, H, generator=g) if features else None,
        attention=torch.rand(b, L, t, t, generator=g) if features else None,
    )


def every_sample(buf: ReplayBuffer | replay.ReplaySnapshot) -> TeacherBatch:
    """All held samples as one batch (a batch as large as the snapshot draws without replacement)."""
    snap = buf if isinstance(buf, replay.ReplaySnapshot) else buf.snapshot()
    return snap.batch((9, 9), 0, len(snap), pad_id=-1)


def held(buf: ReplayBuffer) -> list[int]:
    """The source ids of the held samples, sorted."""
    return sorted(every_sample(buf).input_ids[:, 0].tolist()) if len(buf) else []


def assert_batches_equal(a: TeacherBatch, b: TeacherBatch) -> None:
    assert a.batch_id == b.batch_id and a.float_dtypes == b.float_dtypes
    assert a.arrays().keys() == b.arrays().keys()
    for name, x in a.arrays().items():
        assert x.dtype == b.arrays()[name].dtype, name
        np.testing.assert_array_equal(x, b.arrays()[name], err_msg=name)


# ---- reservoir statistics ------------------------------------------------------------------------------------
def test_algorithm_r_keeps_each_sample_with_probability_capacity_over_n():
    capacity, n, seeds = 8, 80, 300
    stream = make_batch(0, tuple(1 + i % 3 for i in range(n)))
    inclusion = np.zeros(n)
    for seed in range(seeds):
        buf = ReplayBuffer(capacity, seed=seed)
        assert buf.offer(stream, 0) >= capacity
        assert len(buf) == capacity and buf.counts() == {0: capacity} and buf.offered() == {0: n}
        inclusion[held(buf)] += 1
    freq = inclusion / seeds
    assert freq.sum() == pytest.approx(capacity)
    assert np.abs(freq - capacity / n).max() < 0.08  # ~4.5 sigma per sample at 300 seeds
    # The first `capacity` samples enter for sure, so early and late halves are where a bias would show.
    assert freq[: n // 2].mean() == pytest.approx(0.1, abs=0.015)
    assert freq[n // 2 :].mean() == pytest.approx(0.1, abs=0.015)


def test_the_buffer_never_exceeds_capacity_and_is_a_function_of_seed_and_offers():
    runs = {}
    for name, seed in (("a", 1), ("b", 1), ("c", 2)):
        buf = ReplayBuffer(5, seed=seed)
        for j in range(30):
            buf.offer(make_batch(10 * j, (2, 1, 3)), j // 10)
            assert len(buf) <= 5
        runs[name] = held(buf)
    assert runs["a"] == runs["b"] != runs["c"]


def test_without_quota_an_increments_share_follows_its_share_of_offers():
    offers, capacity, seeds = (100, 200, 300), 60, 40
    mean = np.zeros(3)
    for seed in range(seeds):
        buf = ReplayBuffer(capacity, seed=seed)
        for inc, n in enumerate(offers):
            buf.offer(make_batch(1000 * inc, (1,) * n), inc)
        counts = buf.counts()
        mean += [counts.get(i, 0) / seeds for i in range(3)]
    np.testing.assert_allclose(mean, [10, 20, 30], atol=2.5)  # capacity * n_i / sum(n)


def test_a_quota_gives_every_increment_an_equal_share():
    capacity = 30
    buf = ReplayBuffer(capacity, seed=0, quota=capacity // 3)
    for inc in range(3):
        for j in range(10):
            buf.offer(make_batch(1000 * inc + 20 * j, (2,) * 20), inc)
    assert buf.counts() == {0: 10, 1: 10, 2: 10} and buf.offered() == {0: 200, 1: 200, 2: 200}
    # A fourth increment (more than capacity // quota) takes room from the fullest increments, ties from the
    # oldest, until it holds the most itself: then it samples within its share instead of growing past the others.
    buf.offer(make_batch(9000, (1,) * 50), 3)
    assert buf.counts() == {0: 7, 1: 7, 2: 7, 3: 9} and buf.offered()[3] == 50


def test_with_a_quota_each_increment_keeps_a_uniform_sample_of_its_own_offers():
    # quota = capacity: the new increment grows by evicting the old one until it holds the most, then keeps
    # a uniform sample of its offers (its early samples are as likely to stay as its late ones).
    n, seeds = 40, 300
    inclusion = np.zeros(n)
    for seed in range(seeds):
        buf = ReplayBuffer(6, seed=seed, quota=6)
        buf.offer(make_batch(1000, (1,) * 20), 0)
        buf.offer(make_batch(0, (1,) * n), 1)
        assert buf.counts() == {0: 2, 1: 4}
        inclusion[[i for i in held(buf) if i < 1000]] += 1
    freq = inclusion / seeds
    assert freq[: n // 2].mean() == pytest.approx(4 / n, abs=0.02)
    assert freq[n // 2 :].mean() == pytest.approx(4 / n, abs=0.02)


# ---- rows, snapshots and replay batches -----------------------------------------------------------------------
def test_rows_keep_exactly_their_real_tokens_and_replay_rebuilds_them():
    source = make_batch(10, (3, 1, 5, 4), bf16=True, features=True)
    buf = ReplayBuffer(8, seed=0)
    assert buf.offer(source, 0) == 4
    out = every_sample(buf)  # the 4 samples in some order, padded to 5
    lengths = source.attention_mask.sum(1)
    assert sorted(out.attention_mask.sum(1).tolist()) == sorted(lengths.tolist())
    assert out.input_ids.shape == (4, 5) and out.attention.shape == (4, L, 5, 5)
    for i, row in enumerate(out.input_ids[:, 0] - 10):
        t = int(lengths[row])
        for name, a in source.arrays().items():
            mine = out.arrays()[name][i]
            if name == "attention":
                np.testing.assert_array_equal(mine[:, :t, :t], a[row, :, :t, :t], err_msg=name)
                assert not mine[:, t:, :].any() and not mine[:, :, t:].any()
            else:
                np.testing.assert_array_equal(mine[:t], a[row, :t], err_msg=name)
                expected_pad = -1 if name == "input_ids" else 0  # masks: False
                assert (mine[t:] == expected_pad).all(), name
    assert out.float_dtypes == source.float_dtypes
    assert {name: a.dtype for name, a in out.arrays().items()} == {
        name: a.dtype for name, a in source.arrays().items()
    }


def test_bf16_logits_come_back_as_the_same_bf16_values():
    logits = torch.randn(2, 4, K).to(torch.bfloat16)
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]], dtype=torch.bool)
    source = TeacherBatch.from_torch(
        (0, 0),
        input_ids=torch.tensor([[5, 5, 5, 5], [6, 6, 0, 0]], dtype=torch.int32),
        attention_mask=mask,
        loss_mask=mask,
        topk_ids=torch.zeros(2, 4, K, dtype=torch.int32),
        topk_logits=logits,
        log_normalizer=torch.zeros(2, 4),
    )
    buf = ReplayBuffer(2, seed=0)
    buf.offer(source, 0)
    out = every_sample(buf)
    got = out.to_torch()["topk_logits"]
    assert got.dtype == torch.bfloat16
    for i, row in enumerate(out.input_ids[:, 0] - 5):
        t = int(mask[row].sum())
        assert torch.equal(got[i, :t], logits[row, :t])


def test_a_snapshot_is_frozen_and_its_batches_depend_only_on_the_position():
    buf = ReplayBuffer(6, seed=4)
    for j in range(4):
        buf.offer(make_batch(10 * j, (2, 4, 3)), 0)
    snap, frozen = buf.snapshot(), copy.deepcopy(buf)
    before = snap.batch((1, 2), 17, 5, pad_id=0)
    counts = snap.counts()
    for j in range(20):  # replaces most slots of the live buffer
        buf.offer(make_batch(1000 + 10 * j, (5, 1)), 1)
    assert snap.counts() == counts == frozen.counts() and len(snap) == 6 and buf.counts().get(1, 0) > 3
    assert_batches_equal(snap.batch((1, 2), 17, 5, pad_id=0), before)
    assert_batches_equal(frozen.snapshot().batch((1, 2), 17, 5, pad_id=0), before)

    # A rebuilt buffer (another process, the same offers) gives the same batch for the same position.
    twin = ReplayBuffer(6, seed=4)
    for j in range(4):
        twin.offer(make_batch(10 * j, (2, 4, 3)), 0)
    assert_batches_equal(twin.snapshot().batch((1, 2), 17, 5, pad_id=0), before)
    assert before.batch_id == (1, 2) and before.input_ids.shape[0] == 5
    others = [snap.batch((1, 2), g, 5, pad_id=0).input_ids for g in range(18, 24)]
    assert any(not np.array_equal(o, before.input_ids) for o in others)
    # Fewer samples than the batch: drawn with replacement.
    assert snap.batch((0, 0), 3, 20, pad_id=0).input_ids.shape[0] == 20


def test_an_empty_or_disabled_buffer_has_nothing_to_replay():
    off = ReplayBuffer(0, seed=0)
    assert off.offer(make_batch(0, (2, 3)), 0) == 0
    assert len(off) == 0 and off.counts() == {} and off.offered() == {0: 2}
    with pytest.raises(ValueError, match="at least one earlier increment"):
        off.snapshot().batch((0, 0), 0, 2, pad_id=0)


# ---- checkpoints -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("quota", [0, 4])
def test_save_load_round_trips_and_continues_like_the_uninterrupted_buffer(tmp_path, quota):
    def offer_increment(buf: ReplayBuffer, inc: int) -> None:
        for j in range(6):
            buf.offer(make_batch(1000 * inc + 10 * j, (3, 1, 4), bf16=True, features=True), inc)

    whole, half = ReplayBuffer(8, seed=5, quota=quota), ReplayBuffer(8, seed=5, quota=quota)
    for buf in (whole, half):
        offer_increment(buf, 0)
        offer_increment(buf, 1)
    path = half.save(tmp_path / "replay.safetensors")
    resumed = ReplayBuffer.load(path, capacity=8, seed=5, quota=quota)
    assert resumed.counts() == half.counts() and resumed.offered() == half.offered()
    assert_batches_equal(every_sample(resumed), every_sample(half))
    for buf in (whole, resumed):
        offer_increment(buf, 2)
    assert resumed.counts() == whole.counts() and resumed.offered() == whole.offered()
    assert_batches_equal(every_sample(resumed), every_sample(whole))
    assert whole.counts().get(2, 0) > 0


def test_an_empty_buffer_round_trips(tmp_path):
    path = ReplayBuffer(3, seed=1).save(tmp_path / "empty.safetensors")
    buf = ReplayBuffer.load(path, capacity=3, seed=1)
    assert len(buf) == 0 and buf.offered() == {}
    assert buf.offer(make_batch(0, (2,)), 0) == 1


@pytest.mark.parametrize(
    ("field", "kwargs"), [("capacity", {"capacity": 9}), ("seed", {"seed": 6}), ("quota", {"quota": 2})]
)
def test_loading_with_other_settings_names_the_field(tmp_path, field, kwargs):
    buf = ReplayBuffer(8, seed=5, quota=3)
    buf.offer(make_batch(0, (2, 2)), 0)
    path = buf.save(tmp_path / "r.safetensors")
    settings = {"capacity": 8, "seed": 5, "quota": 3, **kwargs}
    with pytest.raises(CheckpointError, match=rf"{field}=.*r\.safetensors|r\.safetensors.*{field}="):
        ReplayBuffer.load(path, **settings)


def test_missing_truncated_or_foreign_files_are_checkpoint_errors(tmp_path):
    buf = ReplayBuffer(4, seed=0)
    buf.offer(make_batch(0, (3, 2)), 0)
    data = buf.save(tmp_path / "good.safetensors").read_bytes()
    with pytest.raises(CheckpointError, match="missing"):
        ReplayBuffer.load(tmp_path / "absent.safetensors", capacity=4, seed=0)
    for cut in (5, 40, len(data) - 3):
        (tmp_path / "cut.safetensors").write_bytes(data[:cut])
        with pytest.raises(CheckpointError, match=r"cut\.safetensors is damaged"):
            ReplayBuffer.load(tmp_path / "cut.safetensors", capacity=4, seed=0)
    from safetensors.numpy import save_file

    save_file({"x": np.zeros(2)}, str(tmp_path / "foreign.safetensors"))
    with pytest.raises(CheckpointError, match="damaged"):
        ReplayBuffer.load(tmp_path / "foreign.safetensors", capacity=4, seed=0)


@pytest.mark.parametrize("failure", ["write", "rename"])
def test_a_failed_save_leaves_the_previous_file_and_no_temp(tmp_path, monkeypatch, failure):
    buf = ReplayBuffer(4, seed=0)
    buf.offer(make_batch(0, (3, 2)), 0)
    path = buf.save(tmp_path / "r.safetensors")
    before = path.read_bytes()
    buf.offer(make_batch(10, (4, 4, 1)), 0)

    def broken_write(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"partial")
        raise OSError("disk full")

    def broken_rename(src, dst):
        raise OSError("disk full")

    if failure == "write":
        monkeypatch.setattr(replay, "save_file", broken_write)
    else:
        monkeypatch.setattr(os, "replace", broken_rename)
    with pytest.raises(OSError, match="disk full"):
        buf.save(path)
    monkeypatch.undo()
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["r.safetensors"]
    assert ReplayBuffer.load(path, capacity=4, seed=0).offered() == {0: 2}


# ---- errors ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("kwargs", "key"), [({"capacity": -1}, "capacity"), ({"capacity": 4, "quota": -2}, "quota")]
)
def test_negative_sizes_are_config_errors_naming_the_key(kwargs, key):
    capacity = kwargs.pop("capacity")
    with pytest.raises(ConfigError, match=rf"continual\.replay\.{key}=-\d+ is negative; use 0"):
        ReplayBuffer(capacity, seed=0, **kwargs)


def test_increments_must_not_go_back():
    buf = ReplayBuffer(4, seed=0)
    buf.offer(make_batch(0, (2,)), 1)
    buf.offer(make_batch(1, (2,)), 1)
    with pytest.raises(ValueError, match="increment 0 offered after increment 1"):
        buf.offer(make_batch(2, (2,)), 0)


def test_batches_with_other_outputs_or_left_padding_are_refused_untouched():
    buf = ReplayBuffer(4, seed=0)
    buf.offer(make_batch(0, (2, 3), bf16=True), 0)
    state = (buf.counts(), buf.offered(), held(buf))
    with pytest.raises(ConfigError, match="same fields, dtypes"):
        buf.offer(make_batch(10, (2, 3)), 0)  # fp32 logits after bf16 ones would pad into garbage
    with pytest.raises(ConfigError, match="same fields, dtypes"):
        buf.offer(make_batch(10, (2, 3), bf16=True, features=True), 0)
    left = make_batch(20, (2, 3), bf16=True)
    left.attention_mask = left.attention_mask[:, ::-1].copy()
    with pytest.raises(ValueError, match="not right-padded"):
        buf.offer(left, 0)
    assert (buf.counts(), buf.offered(), held(buf)) == state
