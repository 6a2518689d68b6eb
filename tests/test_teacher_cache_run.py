"""`distill teacher-cache` end to end: resume after a kill, checksums, identity checks, training from the cache."""

from __future__ import annotations

import json

import numpy as np
import pytest

import launch.teacher_cache as tc
from distill.cache import CacheReader
from distill.config import compose
from distill.errors import CheckpointError
from distill.tracking.metrics_log import read_metrics
from launch.distill import run
from tests.test_teacher_group import TP_ATOL

pytestmark = pytest.mark.slow


def overrides(base, tmp_path, *extra):
    return [
        *base,
        f"teacher_cache.dir={tmp_path / 'cache'}",
        "teacher_cache.shard_batches=2",
        "teacher_cache.logits_encoding=fp32",
        "train.steps=4",
        "curriculum=single_stage",  # every logged step carries every term
        "train.log_every=1",
        "eval.generate_examples=0",
        "eval.max_batches=1",
        *extra,
    ]


def test_killed_cache_run_resumes_without_recomputing(tiny_teacher, base_overrides, tmp_path, monkeypatch):
    cfg = compose(overrides(base_overrides, tmp_path))
    real_score = tc._score
    scored = []

    def dying_score(*args):
        for i, batch in enumerate(real_score(*args)):
            if i == 5:
                raise KeyboardInterrupt  # the job is killed while batch 5 is in flight
            scored.append(batch.batch_id)
            yield batch

    monkeypatch.setattr(tc, "_score", dying_score)
    with pytest.raises(KeyboardInterrupt):
        tc.build_cache(cfg)
    with pytest.warns(UserWarning, match="incomplete"):
        done = CacheReader(cfg.teacher_cache.dir).batch_ids()
    assert done == scored  # every batch scored before the kill is on disk (the writer flushes on the way out)

    scored.clear()
    monkeypatch.setattr(tc, "_score", lambda *a: (scored.append(b.batch_id) or b for b in real_score(*a)))
    tc.build_cache(cfg)
    reader = CacheReader(cfg.teacher_cache.dir)
    assert reader.complete
    assert reader.batch_ids()[0] == (-1, 0)  # the held-out batch first (eval.max_batches=1), then training's
    assert scored[0] == reader.batch_ids()[5] == (0, 4)
    assert len(scored) == len(reader) - 5  # nothing finished was computed again

    # The resumed cache equals an uninterrupted one.
    fresh = compose(overrides(base_overrides, tmp_path / "fresh"))
    monkeypatch.setattr(tc, "_score", real_score)
    tc.build_cache(fresh)
    other = CacheReader(fresh.teacher_cache.dir)
    for bid in reader.batch_ids():
        np.testing.assert_array_equal(reader.read(bid).topk_ids, other.read(bid).topk_ids)
        np.testing.assert_array_equal(reader.read(bid).topk_logits, other.read(bid).topk_logits)


def test_the_cache_holds_what_the_same_configs_run_reads_by_default(tiny_teacher, base_overrides, tmp_path):
    """teacher_cache.epochs unset: as many epochs as train.steps reads (here more than one), so `distill
    teacher-cache` and `distill` with the same config just work; an explicit count still rules."""

    def training_batches(cache) -> int:
        return sum(1 for epoch, _ in CacheReader(cache).batch_ids() if epoch >= 0)

    small = ["data.num_train=16", "train.steps=5"]
    cfg = compose(overrides(base_overrides, tmp_path, *small))
    needed = cfg.train.steps * cfg.cluster.grad_accum_steps * cfg.cluster.student_world_size
    tc.build_cache(cfg)
    one = compose(overrides(base_overrides, tmp_path / "one", *small, "teacher_cache.epochs=1"))
    tc.build_cache(one)
    per_epoch = training_batches(tmp_path / "one" / "cache")
    assert per_epoch < needed  # one epoch is not enough for this run ...
    assert training_batches(tmp_path / "cache") == -(-needed // per_epoch) * per_epoch  # ... the default is


def test_training_from_cache_equals_online_teacher(tiny_teacher, base_overrides, tmp_path):
    cfg = compose(overrides(base_overrides, tmp_path))
    tc.build_cache(cfg)
    run(compose(overrides(base_overrides, tmp_path), run_dir=str(tmp_path / "online")))
    run(
        compose(
            overrides(base_overrides, tmp_path, f"teacher.cache={tmp_path / 'cache'}"),
            run_dir=str(tmp_path / "c"),
        )
    )
    online = read_metrics(tmp_path / "online" / "metrics.jsonl")
    cached = read_metrics(tmp_path / "c" / "metrics.jsonl")
    assert len(online) == len(cached) == 4
    for a, b in zip(online, cached, strict=True):
        assert a["loss/forward_kl"] == pytest.approx(b["loss/forward_kl"], rel=1e-5, abs=1e-7)
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5, abs=1e-7)
    # The evaluation's teacher side (agreement, KL) comes from the cache's held-out batches.
    online_eval, cached_eval = (json.loads((tmp_path / r / "eval.json").read_text()) for r in ("online", "c"))
    for key in ("agreement", "kl_to_teacher", "ce"):
        assert cached_eval[key] == pytest.approx(online_eval[key], rel=1e-5), key

    # A cache built for other settings is refused before training, naming what differs.
    with pytest.raises(CheckpointError, match="k"):
        run(
            compose(
                overrides(base_overrides, tmp_path, f"teacher.cache={tmp_path / 'cache'}", "teacher.topk=8"),
                run_dir=str(tmp_path / "bad"),
            )
        )
    with pytest.raises(CheckpointError, match="data_hash"):
        run(
            compose(
                overrides(base_overrides, tmp_path, f"teacher.cache={tmp_path / 'cache'}", "data.seed=5"),
                run_dir=str(tmp_path / "bad2"),
            )
        )

    # A corrupted shard names the file and the checksum.
    shard = sorted((tmp_path / "cache").glob("shard-*.safetensors"))[0]
    raw = bytearray(shard.read_bytes())
    raw[-1] ^= 0xFF
    shard.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match=shard.name):
        run(
            compose(
                overrides(base_overrides, tmp_path, f"teacher.cache={tmp_path / 'cache'}"),
                run_dir=str(tmp_path / "corrupt"),
            )
        )


@pytest.mark.distributed
def test_ray_tp2_cache_equals_local_cache(tiny_teacher, base_overrides, tmp_path, ray_cluster):
    local = compose(overrides(base_overrides, tmp_path / "local", "data.num_train=64"))
    tc.build_cache(local)
    on_ray = compose(
        overrides(
            base_overrides,
            tmp_path / "ray",
            "data.num_train=64",
            "cluster.mode=ray",
            "cluster.nodes=2",
            "cluster.teacher_tp=2",
        )
    )
    tc.build_cache(on_ray)
    a, b = CacheReader(local.teacher_cache.dir), CacheReader(on_ray.teacher_cache.dir)
    assert a.batch_ids() == b.batch_ids()
    for bid in a.batch_ids():
        assert_same_topk(a.read(bid), b.read(bid), atol=TP_ATOL)


def assert_same_topk(a, b, atol: float) -> None:
    """Equal top-k logits; equal ids except where logits tie within `atol` (TP-sharded and single-device
    reductions may order exact ties differently, e.g. with eager attention for attention transfer)."""
    np.testing.assert_allclose(a.topk_logits, b.topk_logits, atol=atol)
    k = a.topk_ids.shape[-1]
    for idx in zip(*np.nonzero(a.topk_ids != b.topk_ids), strict=True):
        pos, j = idx[:-1], idx[-1]
        logits = a.topk_logits[pos]
        found = np.nonzero(b.topk_ids[pos] == a.topk_ids[idx])[0]
        tied_with = found[0] if found.size else k - 1  # gone from b's top-k: tied at the boundary
        assert abs(logits[j] - logits[tied_with]) < atol, (idx, logits[j], logits[tied_with])
