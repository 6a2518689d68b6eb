"""Peak memory per role (`distill.tracking.memory`): the measurement itself, the metric keys and their
aggregation over a role's processes, the Ray driver's assembly from the replies it already has, and a local run
whose metrics.jsonl, eval.json and report carry the trainer's figures. The Ray roles in a real run are checked
by test_online_distributed's ZeRO-2 baseline."""

from __future__ import annotations

import asyncio
import json
import time

import pytest
import torch
from matplotlib.image import imread

from distill.config import compose
from distill.tracking.memory import (
    MIB,
    MemoryPeaks,
    final_peaks,
    measure,
    memory_key,
    role_metrics,
    split_key,
)
from distill.tracking.metrics_log import read_metrics

ALLOCATED = 200 * MIB


# ---- the measurement ---------------------------------------------------------------------------------------
def test_measurement_sees_a_200_mib_tensor():
    before = measure()
    assert before.peak_rss > 50 * MIB and before.rss is not None and before.rss > 50 * MIB  # python + torch
    block = torch.ones(ALLOCATED // 4, dtype=torch.float32)  # written, so every page is resident
    after = measure()
    grown = after.rss - before.rss
    assert 0.9 * ALLOCATED < grown < 1.5 * ALLOCATED, grown / MIB
    assert after.peak_rss >= after.rss and after.peak_rss >= before.peak_rss
    del block
    # A peak does not come down (beyond the kernel's page-counting slack, see `measure`).
    assert measure().peak_rss >= after.peak_rss - MIB


def test_measurement_never_initialises_cuda():
    peaks = measure()
    if not torch.cuda.is_initialized():  # this process never used CUDA: nothing to report, nothing started
        assert peaks.cuda_max_allocated is None and peaks.cuda_max_reserved is None
        assert not torch.cuda.is_initialized()
    else:
        assert peaks.cuda_max_reserved >= peaks.cuda_max_allocated >= 0


# ---- keys and roles (pure) ---------------------------------------------------------------------------------
def test_metric_keys_in_mib_only_for_figures_the_process_has():
    cpu = MemoryPeaks(peak_rss=300 * MIB, rss=int(250.25 * MIB))
    assert cpu.metrics("trainer") == {"mem/trainer/peak_rss_mib": 300.0, "mem/trainer/rss_mib": 250.2}
    gpu = MemoryPeaks(peak_rss=MIB, rss=MIB, cuda_max_allocated=5 * MIB, cuda_max_reserved=8 * MIB)
    assert gpu.metrics("teacher/0.1")["mem/teacher/0.1/cuda_max_reserved_mib"] == 8.0
    assert split_key("mem/teacher/0.1/cuda_max_reserved_mib") == ("teacher/0.1", "cuda_max_reserved")
    assert split_key(memory_key("driver", "peak_rss")) == ("driver", "peak_rss")


def test_role_metrics_are_the_max_over_processes_and_each_process_when_several():
    rank0 = MemoryPeaks(
        peak_rss=400 * MIB, rss=100 * MIB, cuda_max_allocated=7 * MIB, cuda_max_reserved=9 * MIB
    )
    rank1 = MemoryPeaks(peak_rss=300 * MIB, rss=200 * MIB)  # never touched CUDA
    got = role_metrics("student", {"0": rank0, "1": rank1})
    assert got["mem/student/peak_rss_mib"] == 400.0 and got["mem/student/rss_mib"] == 200.0
    assert got["mem/student/cuda_max_allocated_mib"] == 7.0  # the max over the processes that have it
    assert got["mem/student/1/peak_rss_mib"] == 300.0 and "mem/student/1/cuda_max_allocated_mib" not in got
    # One process: its figures under the role only, no duplicate per-process keys.
    assert role_metrics("buffer", {"0": rank1}) == rank1.metrics("buffer")
    assert role_metrics("teacher", {}) == {}


def test_final_peaks_take_each_peak_over_the_rows():
    rows = [
        {"step": 0, "mem/student/peak_rss_mib": 500.0, "mem/student/rss_mib": 480.0, "loss": 2.0},
        {"step": 1, "mem/student/peak_rss_mib": 350.0, "mem/student/rss_mib": 340.0},  # restarted world
        {"step": 1, "eval/ce": 1.0},
        {"event": "stage_transition", "step": 1},
    ]
    assert final_peaks(rows) == {"mem/student/peak_rss_mib": 500.0}  # current RSS is no peak


# ---- the Ray side's assembly, without Ray --------------------------------------------------------------------
def test_buffer_figures_sum_counters_and_keep_each_shards_memory():
    from distill.cluster.buffer import Buffer, BufferShard

    shards = [asyncio.run(BufferShard(i, capacity=4).stats()) for i in range(2)]
    assert all(isinstance(s["memory"], MemoryPeaks) and s["memory"].peak_rss > 0 for s in shards)
    total = Buffer.total_stats(shards)
    assert "memory" not in total and total["depth"] == 0
    assert Buffer.shard_memory(shards) == {"0": shards[0]["memory"], "1": shards[1]["memory"]}


def test_driver_reports_every_role_from_the_replies_it_has():
    from distill.cluster.driver import Assignment, Driver

    class Teachers:
        def memory_peaks(self) -> dict[str, MemoryPeaks]:
            return {"0.0": MemoryPeaks(peak_rss=600 * MIB), "0.1": MemoryPeaks(peak_rss=650 * MIB)}

    nothing = dict(students=None, buffer=None, sink=None, inputs=None, tokens=None)
    driver = Driver(teachers=Teachers(), assignment=Assignment(1, 2, 8), total_steps=1, **nothing)
    outs = [{"memory": MemoryPeaks(peak_rss=(r + 1) * 100 * MIB)} for r in range(2)]
    got = driver._memory_metrics(outs, {"0": MemoryPeaks(peak_rss=90 * MIB)})
    assert got["mem/driver/peak_rss_mib"] == pytest.approx(measure().peak_rss / MIB, rel=0.05)
    assert got["mem/student/peak_rss_mib"] == 200.0 and got["mem/student/0/peak_rss_mib"] == 100.0
    assert got["mem/teacher/peak_rss_mib"] == 650.0 and got["mem/teacher/0.0/peak_rss_mib"] == 600.0
    assert got["mem/buffer/peak_rss_mib"] == 90.0 and "mem/buffer/0/peak_rss_mib" not in got


# ---- a local run ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def local_run(tiny_teacher, base_overrides, tmp_path_factory):
    from distill.run import run

    out = tmp_path_factory.mktemp("memory-run")
    tiny = [
        "curriculum=single_stage",
        "train.steps=4",
        "train.log_every=2",
        "eval.generate_examples=0",
        "eval.max_batches=1",
    ]
    summary = run(compose([*base_overrides, *tiny], run_dir=str(out)))
    return out, summary


def test_local_run_logs_the_trainers_peak_memory(local_run):
    out, summary = local_run
    rows = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 3]
    for row in rows:
        assert row["mem/trainer/peak_rss_mib"] > 50 and row["mem/trainer/rss_mib"] > 50
        assert row["mem/trainer/peak_rss_mib"] >= row["mem/trainer/rss_mib"]
    assert rows[1]["mem/trainer/peak_rss_mib"] >= rows[0]["mem/trainer/peak_rss_mib"] - 1  # see `measure`
    assert not [k for k in rows[-1] if k.startswith("mem/") and not k.startswith("mem/trainer/")]

    saved = json.loads((out / "eval.json").read_text())
    assert saved["mem/trainer/peak_rss_mib"] == max(r["mem/trainer/peak_rss_mib"] for r in rows)
    assert "mem/trainer/rss_mib" not in saved and "ce" in saved
    assert summary["mem/trainer/peak_rss_mib"] == saved["mem/trainer/peak_rss_mib"]


def test_local_run_report_plots_and_tabulates_the_peaks(local_run):
    out, summary = local_run
    text = (out / "report.md").read_text()
    assert "## Peak memory per role" in text and "](memory.png)" in text
    assert f"| trainer | {summary['mem/trainer/peak_rss_mib']:.0f} |" in text
    heldout = text[text.index("## Held-out evaluation") :]
    assert "mem/" not in heldout  # the peaks have their own table, not the eval metrics'
    image = imread(out / "memory.png")
    assert image.shape[0] > 200 and image.std() > 0.01


def test_rss_growth_sees_what_a_block_allocates_and_only_that():
    import numpy as np

    from distill.tracking.memory import RssGrowth

    with RssGrowth() as quiet:
        sum(range(1000))
    with RssGrowth() as growth:
        block = np.ones(64 << 20, dtype=np.uint8)  # 64 MiB, touched
        time.sleep(0.05)
        del block
    assert growth.peak >= 60 << 20
    assert quiet.peak < 16 << 20
