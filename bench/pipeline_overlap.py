"""Online pipeline overlap: trained tokens/s of teacher actor -> buffer -> student actor (one CPU each, a local
Ray instance) against the teacher alone and the student alone on the same batches.

    teacher alone : TeacherGroup.score_stream over the run's batches (outputs left in the object store)
    student alone : the same student steps on batches already in the buffer (only the train_step calls timed)
    pipeline      : the driver loop (producer thread + buffer + student steps) over the same steps
Target: pipeline >= 0.9x the slower of the two (the teacher runs ahead while the student steps).

Uses the test suite's tiny teacher recipe (trained by prepare-demo on first use, ~1 min; reuse a cache with
--cache-dir, e.g. the folder DISTILL_TEST_CACHE points at):

    python bench/pipeline_overlap.py --cache-dir /tmp/distill-cache --steps 30 --micro 32
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np
from bench_env import offline_cpu_environment

# The tests' teacher (tests/conftest.py TEST_OVERRIDES): same prepare keys, so the same cached folder.
TINY = [
    "experiment=ci_tiny",
    "prepare.teacher_steps=150",
    "prepare.teacher_train_size=2000",
    "prepare.teacher_levels=[1]",
    "prepare.vocab_size=384",
    "prepare.eval_examples=16",
    "tracking.progress=false",
]


class NullSink:
    def write(self, metrics, extras) -> None:
        pass

    def rewind(self, step: int) -> None:
        pass


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cache-dir", default=os.environ.get("DISTILL_TEST_CACHE", "/tmp/distill-bench-cache"))
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--micro", type=int, default=32, help="sequences per batch (= per step: W 1, accum 1)")
    p.add_argument("--capacity", type=int, default=4, help="buffer capacity in batches")
    p.add_argument("--warmup", type=int, default=3)
    args = p.parse_args()
    offline_cpu_environment()

    import ray

    from distill.cluster.backend import _numbered_inputs, student_spec
    from distill.cluster.buffer import Buffer
    from distill.cluster.driver import Assignment, Driver
    from distill.cluster.runtime import connect, teacher_group_from_config
    from distill.cluster.student_group import StudentGroup
    from distill.config import compose
    from distill.data.build import batch_stream, build_data
    from distill.models.loading import load_tokenizer
    from distill.models.resolve import model_facts, require_teacher
    from distill.student import build_ds_config
    from distill.xtok.build import row_encoder
    from launch.prepare_demo import prepare_demo

    steps, m = args.steps + args.warmup, args.micro
    cfg = compose(
        [
            *TINY,
            f"prepare.cache_dir={args.cache_dir}",
            "cluster=local_ray",
            "loss=kd",  # the figures in its notes were measured with one stage of logit KD
            "curriculum=single_stage",
            f"cluster.micro_batch_size={m}",
            "cluster.grad_accum_steps=1",
            f"cluster.global_batch_size={m}",
            f"cluster.buffer_capacity={args.capacity}",
            f"train.steps={steps}",
            f"data.num_train={steps * m}",
        ]
    )
    prepare_demo(cfg)
    teacher_path = require_teacher(cfg)
    tokenizer = load_tokenizer(teacher_path)
    data = build_data(cfg, row_encoder(cfg, tokenizer))
    stream = batch_stream(cfg, data.train_rows, tokenizer)
    a = Assignment(1, 1, stream.num_batches)
    tokens = {a.batch_id(g): int(stream.batch(*a.batch_id(g))["loss_mask"].sum()) for g in range(steps)}
    timed = [a.batch_id(g) for g in range(args.warmup, steps)]
    timed_tokens = sum(tokens[b] for b in timed)
    seq_len = float(np.mean([stream.batch(*b)["input_ids"].shape[1] for b in timed]))
    print(
        f"{args.steps} timed steps of {m} sequences (mean padded length {seq_len:.0f}), {timed_tokens} trained tokens"
    )

    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="ERROR")
    connect(cfg.cluster)
    teacher_hidden = model_facts(cfg.teacher, len(tokenizer)).hidden_size
    ds = build_ds_config(zero_stage=2, micro_batch_size=m, grad_accum_steps=1, world_size=1, grad_clip=1.0)
    node = ray.get_runtime_context().get_node_id()
    buffer = Buffer.create(shards=1, capacity_per_shard=args.capacity, batches_per_epoch=stream.num_batches)
    students = StudentGroup(student_spec(cfg, teacher_path, teacher_hidden, ds), buffer, nodes=[node])
    teachers = teacher_group_from_config(cfg, teacher_path, [], [])
    students.wait_ready()
    try:
        # ---- teacher alone
        outputs, start = {}, None
        for meta, ref in teachers.score_stream(_numbered_inputs(stream, a, 0)):
            outputs[tuple(meta.batch_id)] = (meta, ref)
            if len(outputs) == args.warmup:
                start = time.perf_counter()
            if len(outputs) == steps:
                break
        teacher_s = time.perf_counter() - start

        # ---- student alone: the step's batch is already in the buffer
        student_s = 0.0
        for step in range(steps):
            (b,) = a.step_batches(step)
            meta, ref = outputs[b]
            buffer.put(b, ref, meta.nbytes)
            t = time.perf_counter()
            students.train_step(step, [[b]], tokens[b])
            if step >= args.warmup:
                student_s += time.perf_counter() - t
            buffer.ack([b])
        del outputs

        # ---- pipeline: producer thread + student steps, overlapped
        driver = Driver(
            teachers=teachers,
            students=students,
            buffer=buffer,
            assignment=a,
            inputs=lambda g: _numbered_inputs(stream, a, g),
            tokens=tokens.__getitem__,
            total_steps=steps,
            sink=NullSink(),
        )
        clock = {}

        class Timer:
            def after_step(self, driver, step: int) -> None:
                if step == args.warmup - 1:
                    clock["start"] = time.perf_counter()

        driver.hooks = Timer()
        driver.run()
        pipeline_s = time.perf_counter() - clock["start"]
        stats = buffer.stats()
    finally:
        teachers.shutdown()
        students.shutdown()
        buffer.shutdown()
        ray.shutdown()

    rates = {
        "teacher alone": timed_tokens / teacher_s,
        "student alone": timed_tokens / student_s,
        "pipeline": timed_tokens / pipeline_s,
    }
    for name, rate in rates.items():
        print(f"{name:14s}: {rate:9.0f} trained tokens/s")
    slower = min(rates["teacher alone"], rates["student alone"])
    print(
        f"pipeline / slower stage = {rates['pipeline'] / slower:.2f}x (target >= 0.9x); buffer: producer waited "
        f"{stats['producer_wait_s']:.1f} s, consumer waited {stats['consumer_wait_s']:.1f} s in all"
    )


if __name__ == "__main__":
    main()
