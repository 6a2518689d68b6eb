"""`distill plan`: the layout arithmetic on the shipped production configs (no weights, no processes)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from distill.config.topology import Topology
from distill.errors import TopologyError
from distill.models.facts import ModelFacts
from distill.run.plan import (
    Hardware,
    Workload,
    measured_per_device,
    overrides,
    plan_layout,
    student_memory_gb,
    teacher_memory_gb,
    valid_tp,
)
from launch.plan import main as plan_main

R1 = ModelFacts.from_arch("deepseek_r1")
H200 = {"gpus_per_node": 8, "gpu_memory_gb": 141}
FP8 = Workload(teacher_dtype="float8")


def test_memory_arithmetic():
    # 671B parameters x 1 byte x 1.2 headroom; a 3B student under ZeRO-2 keeps its bf16 weights whole.
    assert teacher_memory_gb(R1, "float8") == pytest.approx(R1.param_count * 1.2 / 1e9)
    assert R1.param_count == pytest.approx(671e9, rel=0.01)
    qwen = ModelFacts.from_arch("qwen2_5_3b")
    p = qwen.param_count
    assert student_memory_gb(qwen, "bfloat16", 2, 4) == pytest.approx((2 * p + 2 * p / 4 + 12 * p / 4) / 1e9)
    assert student_memory_gb(qwen, "bfloat16", 3, 4) == pytest.approx(16 * p / 4 / 1e9)
    assert student_memory_gb(qwen, "bfloat16", 0, 4) == pytest.approx(16 * p / 1e9)


def test_tp_sizes_divide_heads_and_experts():
    assert valid_tp(R1, 8) == [1, 2, 4, 8]  # 128 heads, 256 experts
    assert valid_tp(ModelFacts.from_arch("phi3_mini"), 8) == [1, 2, 4, 8]  # 32 heads


@pytest.mark.parametrize("student", ["qwen2_5_3b", "phi3_mini"])
@pytest.mark.parametrize("nodes", [2, 3, 4])
def test_r1_plans_are_valid_balanced_topologies(student, nodes):
    s = ModelFacts.from_arch(student)
    hw = Hardware(nodes=nodes, **H200)
    plan = plan_layout(R1, s, hw, FP8)
    # 671 GB x 1.2 over 8 x 141 x 0.9 usable: TP 8 is the smallest TP that holds R1 (TP 4: 201 GB/device).
    assert plan.teacher_tp == 8
    assert plan.teacher_replicas * 8 + plan.student_world_size + plan.idle_devices == nodes * 8
    assert plan.teacher_replicas <= nodes  # one TP-8 replica per node at most
    assert plan.student_world_size * plan.grad_accum_steps * 4 == 256
    # Balanced: the next smaller world that splits the 64 micro-batches (half of it) would be slower than the
    # teacher group, so no student rank is wasted.
    per_rank = plan.student_tokens_per_s / plan.student_world_size
    w = plan.student_world_size
    assert w == 1 or (w // 2) * per_rank < plan.teacher_tokens_per_s
    # ... and the printed overrides build a Topology that passes the run's own checks.
    values = dict(o.removeprefix("cluster.").split("=") for o in overrides(plan))
    fields = Topology.__dataclass_fields__
    topology = Topology(
        **{k: type(getattr(Topology(**_defaults()), k))(v) for k, v in values.items() if k in fields}
    )
    topology.check_fits()
    assert topology.buffer_capacity >= topology.grad_accum_steps * topology.student_world_size


def _defaults() -> dict:
    return dict(
        nodes=1,
        cpus_per_node=1,
        gpus_per_node=0,
        device="cpu",
        backend="gloo",
        teacher_replicas=1,
        teacher_tp=1,
        student_world_size=1,
        micro_batch_size=1,
        grad_accum_steps=1,
        global_batch_size=1,
    )


def test_given_throughputs_pick_the_balance():
    """Teacher 1000 tok/s/device x TP 8 = 8000 per replica; students 2000 per rank: 4 nodes -> 3 replicas
    (24 devices, 24000 tok/s) need 12 ranks, but only 8 devices are left and 64 sequences split into 8."""
    q = ModelFacts.from_arch("qwen2_5_3b")
    work = Workload(teacher_dtype="float8", teacher_tokens_per_s=1000, student_tokens_per_s=2000)
    plan = plan_layout(R1, q, Hardware(nodes=4, **H200), work)
    assert min(plan.teacher_tokens_per_s, plan.student_tokens_per_s) == 16000
    assert (plan.teacher_replicas, plan.student_world_size) == (2, 8)  # same rate, fewer devices
    assert plan.idle_devices == 8
    # Students 8x faster per device: one rank keeps up with a replica.
    fast = Workload(teacher_dtype="float8", teacher_tokens_per_s=1000, student_tokens_per_s=8000)
    plan = plan_layout(R1, q, Hardware(nodes=2, **H200), fast)
    assert (plan.teacher_replicas, plan.student_world_size, plan.balance) == (1, 1, 1.0)


def test_fewer_devices_than_the_teacher_needs_is_a_clear_error():
    q = ModelFacts.from_arch("qwen2_5_3b")
    with pytest.raises(
        TopologyError, match=r"needs 805 GB .* at least 12 devices of 80 GB .* one node of 8 devices"
    ) as err:
        plan_layout(R1, q, Hardware(nodes=4, gpus_per_node=8, gpu_memory_gb=80), FP8)
    # The user already passed float8: the hint names the next smaller dtype, not the one given.
    assert "--teacher-dtype float8" not in str(err.value) and "--teacher-dtype int4" in str(err.value)
    with pytest.raises(TopologyError, match=r"--teacher-dtype float8\)"):
        plan_layout(
            R1, q, Hardware(nodes=4, gpus_per_node=8, gpu_memory_gb=80), Workload(teacher_dtype="bfloat16")
        )
    with pytest.raises(TopologyError, match=r"one node of 4 devices"):
        plan_layout(R1, q, Hardware(nodes=4, gpus_per_node=4, gpu_memory_gb=141), FP8)
    # The teacher fits but nothing is left for a student rank.
    with pytest.raises(TopologyError, match=r"8 devices \(1 nodes x 8\); one teacher replica needs 8"):
        plan_layout(R1, q, Hardware(nodes=1, **H200), FP8)


def test_cli_prints_overrides_and_fails_clearly():
    cmd = [
        sys.executable,
        "-m",
        "launch.cli",
        "plan",
        "teacher=deepseek_r1",
        "student=phi3_mini",
        "--nodes",
        "2",
    ]
    ok = subprocess.run(
        [*cmd, "--gpu-memory-gb", "141", "--teacher-dtype", "float8"], capture_output=True, text=True
    )
    assert ok.returncode == 0, ok.stderr
    assert "1 replicas x TP 8" in ok.stdout and "cluster.teacher_tp=8" in ok.stdout
    bad = subprocess.run(cmd, capture_output=True, text=True)  # bf16 R1 on 80 GB devices
    assert bad.returncode == 1 and "distill plan: the teacher needs 1610 GB" in bad.stderr


def test_measured_throughputs_come_from_a_run_folder(tmp_path, capsys):
    """A run with 1 replica x TP 2 and 4 student ranks: per-device figures divide by 2 and by 4."""
    (tmp_path / "config.yaml").write_text(
        "cluster:\n  teacher_replicas: 1\n  teacher_tp: 2\n  student_world_size: 4\n"
    )
    rows = [
        {"step": s, "teacher/tokens_per_s": 3000.0 + 200 * s, "student/tokens_per_s": 8000.0}
        for s in range(3)
    ]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert measured_per_device(tmp_path) == (pytest.approx(1600.0), pytest.approx(2000.0))
    args = ["teacher=deepseek_r1", "student=phi3_mini", "--nodes", "2", "--gpu-memory-gb", "141"]
    plan_main([*args, "--teacher-dtype", "float8", "--from-run", str(tmp_path)])
    out = capsys.readouterr().out
    # TP 8 x 1600 = 12 800 tokens/s per replica; 2000 per student rank: 8 ranks (16 000) cover one replica.
    assert "12,800 tokens/s" in out and "8 ranks" in out
