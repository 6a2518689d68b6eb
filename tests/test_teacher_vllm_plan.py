"""`distill plan` with teacher.backend=vllm: a replica may span nodes (TP within a node x pipeline stages across
nodes), so R1 fits a cluster of 80 GB devices that the hf backend (one TP group per node) refuses. Pure arithmetic."""

from __future__ import annotations

import pytest

from distill.errors import TopologyError
from distill.models.facts import ModelFacts
from distill.run.plan import Hardware, Workload, overrides, plan_layout, report

R1 = ModelFacts.from_arch("deepseek_r1")
QWEN = ModelFacts.from_arch("qwen2_5_3b")
H100_4 = Hardware(nodes=4, gpus_per_node=8, gpu_memory_gb=80)


def test_vllm_lays_r1_across_nodes_of_80gb_devices():
    """805 GB (671B x 1 B x 1.2) over 72 usable GB a device needs 12 devices: no node of 8 holds a replica. The
    estimated rates make the teacher the bottleneck, so the plan gives it every device the students can spare:
    2 replicas of TP 4 x 3 stages (each stage one TP-4 group on its own node; 67 GB a device)."""
    work = Workload(teacher_dtype="float8", teacher_backend="vllm")
    plan = plan_layout(R1, QWEN, H100_4, work)
    assert plan.teacher_pp >= 2 and plan.teacher_tp * plan.teacher_pp >= 12
    assert (plan.teacher_tp, plan.teacher_pp, plan.teacher_replicas) == (4, 3, 2)
    assert plan.teacher_memory_gb == pytest.approx(R1.param_count * 1.2 / 1e9 / 12)
    assert plan.teacher_memory_gb <= 80 * 0.9
    assert plan.teacher_replicas * 12 + plan.student_world_size + plan.idle_devices == 32
    assert f"teacher.pipeline_parallel={plan.teacher_pp}" in overrides(plan)
    text = report(R1, QWEN, plan, H100_4, work)
    assert "2 replicas x TP 4 x PP 3 (each replica across 3 nodes) = 24 devices" in text
    print(text)


def test_a_fast_teacher_gets_one_replica_of_the_fewest_devices():
    """When the teacher is not the bottleneck: one replica, the fewest devices that hold it (TP 4 x 3 stages = 12
    beats TP 8 x 2 stages = 16), the rest to the students."""
    work = Workload(teacher_dtype="float8", teacher_backend="vllm", teacher_tokens_per_s=1e6)
    plan = plan_layout(R1, QWEN, Hardware(nodes=3, gpus_per_node=8, gpu_memory_gb=80), work)
    assert (plan.teacher_replicas, plan.teacher_tp, plan.teacher_pp) == (1, 4, 3)
    assert plan.student_world_size + plan.idle_devices == 12


def test_hf_still_refuses_and_names_the_vllm_way_out():
    with pytest.raises(TopologyError, match=r"needs 805 GB .* one node of 8 devices .* teacher.backend=vllm"):
        plan_layout(R1, QWEN, H100_4, Workload(teacher_dtype="float8"))


def test_vllm_refuses_a_teacher_larger_than_the_cluster():
    with pytest.raises(TopologyError, match=r"more than the whole cluster holds \(1 nodes x 8\)"):
        plan_layout(
            R1,
            QWEN,
            Hardware(nodes=1, gpus_per_node=8, gpu_memory_gb=80),
            Workload(teacher_dtype="float8", teacher_backend="vllm"),
        )


def test_single_node_teachers_keep_one_stage():
    """Where a TP group on one node holds the teacher, vLLM plans exactly what hf plans (fewer stages first)."""
    hw = Hardware(nodes=2, gpus_per_node=8, gpu_memory_gb=141)
    hf = plan_layout(R1, QWEN, hw, Workload(teacher_dtype="float8"))
    served = plan_layout(R1, QWEN, hw, Workload(teacher_dtype="float8", teacher_backend="vllm"))
    assert served.teacher_pp == 1 and served.topology == hf.topology
