"""`distill plan`: a cluster layout that balances teacher and student throughput, and the overrides to use it.

    distill plan teacher=deepseek_r1 student=qwen2_5_3b --nodes 2 --gpus-per-node 8 --gpu-memory-gb 141 \
        --teacher-dtype float8

The teacher and student come from the usual config groups (or `teacher.path=` / `student.path=`); only their
config.json numbers are read. Per-device throughputs are given (`--teacher-tokens-per-s`, measured e.g. from a
run's metrics) or estimated from FLOPs: a teacher forward costs 2 x active parameters per token, a student
training step 6 x parameters, at `--mfu` of `--peak-tflops`. `--from-run RUN_DIR` takes both from a run's
metrics.jsonl (e.g. a short job on the target hardware). Throughput is taken as linear in devices.

The arithmetic lives in `distill.run.plan` (pure, tested without processes); the chosen layout is checked with
the same `Topology` a run uses, so the printed overrides validate.
"""

from __future__ import annotations

import argparse
import sys

from distill.errors import TopologyError
from distill.run.plan import Hardware, Workload, measured_per_device, plan_layout, report


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="distill plan", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "overrides", nargs="*", help="config overrides, e.g. teacher=deepseek_r1 student=phi3_mini"
    )
    parser.add_argument("--nodes", type=int, required=True)
    parser.add_argument("--gpus-per-node", type=int, default=8)
    parser.add_argument("--gpu-memory-gb", type=float, default=80.0)
    parser.add_argument("--cpus-per-node", type=int, default=96)
    parser.add_argument("--peak-tflops", type=float, default=989.0)
    parser.add_argument("--mfu", type=float, default=0.4)
    parser.add_argument("--teacher-dtype", help="weights dtype (default: the teacher config's dtype)")
    parser.add_argument("--teacher-tokens-per-s", type=float, help="measured, per device")
    parser.add_argument("--student-tokens-per-s", type=float, help="measured, per device")
    parser.add_argument(
        "--from-run", help="a finished run folder: per-device tokens/s from its metrics.jsonl"
    )
    parser.add_argument("--seq-len", type=int, default=4096)
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--global-batch", type=int, default=256)
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)

    from distill.config import compose
    from distill.models.resolve import model_facts, student_facts

    teacher_rate, student_rate = args.teacher_tokens_per_s, args.student_tokens_per_s
    if args.from_run:
        measured = measured_per_device(args.from_run)
        teacher_rate, student_rate = teacher_rate or measured[0], student_rate or measured[1]
    cfg = compose(args.overrides)
    teacher = model_facts(cfg.teacher, cfg.prepare.vocab_size)
    student = student_facts(cfg, cfg.prepare.vocab_size)
    hw = Hardware(
        args.nodes, args.gpus_per_node, args.gpu_memory_gb, args.cpus_per_node, args.peak_tflops, args.mfu
    )
    work = Workload(
        teacher_dtype=args.teacher_dtype or cfg.teacher.dtype,
        student_dtype=cfg.student.dtype,
        zero_stage=cfg.student.zero_stage,
        seq_len=args.seq_len,
        micro_batch=args.micro_batch,
        global_batch=args.global_batch,
        topk=cfg.teacher.topk,
        teacher_backend=cfg.teacher.backend,
        teacher_tokens_per_s=teacher_rate,
        student_tokens_per_s=student_rate,
    )
    try:
        plan = plan_layout(teacher, student, hw, work)
    except TopologyError as err:
        sys.exit(f"distill plan: {err}")
    print(report(teacher, student, plan, hw, work))
