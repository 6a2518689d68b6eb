"""This project's online run against the peer users would pick instead: TRL's `GKDTrainer` (teacher in the same
process, forward KL, no on-policy sampling), side by side in one invocation.

Same teacher and student (the demo pair `distill demo` trains: tiny DeepSeek-V3 teacher, tiny Qwen2 student,
same initial weights), same encoded rows and trained tokens, same global batch, same two CPU cores:
    TRL      : one process, torch on both cores; GKDTrainer(lmbda=0, beta=0, seq_kd=False) = off-policy
               forward KL on the teacher's full logits; the teacher forward and the student step alternate.
    distill  : `distill cluster=local_ray` (teacher actor on one core -> buffer -> DeepSpeed ZeRO-2 student rank
               on the other), the online path the README demo runs.
Figure: trained tokens/s of student training, warm-up steps excluded, start-up (model load, actor start)
excluded on both sides; each side run --repeats times, alternating, and the medians compared. Target: distill
>= 1.5x TRL.

    python bench/vs_trl.py                        # the demo's teacher (trained on first use, ~3 min)
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

from bench_env import gkd_config, offline_cpu_environment, step_clock


def trl_rate(cfg, rows: list[dict], steps: int, warmup: int, batch: int, threads: int) -> float:
    """Trained tokens/s of TRL's GKDTrainer on `rows` (already encoded), `steps` timed steps after `warmup`."""
    import torch
    from datasets import Dataset
    from trl.experimental.gkd import GKDTrainer

    from distill.data.batching import pad_batch
    from distill.models.loading import load_causal_lm, load_tokenizer
    from distill.models.resolve import build_student, require_teacher

    torch.set_num_threads(threads)
    teacher_path = require_teacher(cfg)
    tokenizer = load_tokenizer(teacher_path)
    torch.manual_seed(cfg.train.seed)
    student = build_student(cfg, tokenizer)
    teacher = load_causal_lm(teacher_path, dtype="float32")
    trained: list[int] = []

    def collate(examples: list[dict]) -> dict:
        """Our encoded rows as TRL's inputs: labels[t + 1] is trained where our loss_mask[t] is."""
        padded = pad_batch(examples, tokenizer.pad_token_id)
        ids, mask = padded["input_ids"], padded["loss_mask"]
        labels = torch.full_like(ids, -100)
        labels[:, 1:] = torch.where(mask[:, :-1], ids[:, 1:], -100)
        trained.append(int(mask.sum()))
        return {"input_ids": ids, "attention_mask": padded["attention_mask"].long(), "labels": labels}

    clock = step_clock()
    with tempfile.TemporaryDirectory() as out:
        args = gkd_config(out, cfg, batch=batch, max_steps=warmup + steps, lmbda=0.0)
        trainer = GKDTrainer(
            model=student,
            teacher_model=teacher,
            args=args,
            data_collator=collate,
            train_dataset=Dataset.from_list(
                [{"input_ids": r["input_ids"], "loss_mask": r["loss_mask"]} for r in rows]
            ),
            processing_class=tokenizer,
            callbacks=[clock],
        )
        trainer.train()
    # Collate calls run one step ahead of on_step_end marks only through the loader's prefetch (0 workers: none).
    seconds = clock.marks[-1] - clock.marks[warmup - 1]
    return sum(trained[warmup : warmup + steps]) / seconds


def distill_rate(cfg, steps: int, warmup: int) -> float:
    """Trained tokens/s of the online run (`distill.run.run` on the Ray backend), timed between step commits."""
    from distill.cluster.driver import Hooks
    from distill.run import run

    marks: dict[int, float] = {}
    tokens: dict[int, int] = {}

    class StepClock(Hooks):
        def after_step(self, driver, step: int) -> None:
            marks[step] = time.perf_counter()
            # The driver's own count (the loss-mask sums it divides by), so the run logs at its default pace.
            tokens[step] = sum(driver.tokens(b) for b in driver.assignment.step_batches(step))

    run(cfg, hooks=StepClock())
    trained = sum(tokens[s] for s in range(warmup, warmup + steps))
    return trained / (marks[warmup + steps - 1] - marks[warmup - 1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=60, help="timed optimizer steps (after --warmup)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--batch", type=int, default=16, help="global batch in sequences")
    p.add_argument("--cores", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3, help="alternating runs of each side (medians compared)")
    p.add_argument("overrides", nargs="*", help="extra `distill` overrides, e.g. prepare.cache_dir=...")
    args = p.parse_args()
    offline_cpu_environment()

    from distill.config import compose
    from distill.data.build import build_data
    from distill.models.loading import load_tokenizer
    from distill.models.resolve import require_teacher
    from distill.xtok.build import row_encoder
    from launch.prepare_demo import prepare_demo

    total = args.warmup + args.steps
    overrides = [
        "cluster=local_ray",
        f"cluster.cpus_per_node={args.cores}",
        # TRL's shape: the whole global batch in one micro-batch (per_device_train_batch_size, no
        # accumulation), so both sides run the same forward and backward passes.
        f"cluster.micro_batch_size={args.batch}",
        "cluster.grad_accum_steps=1",
        f"cluster.global_batch_size={args.batch}",
        f"train.steps={total}",
        "eval.max_batches=1",
        "eval.generate_examples=0",
        "loss=kd",
        "curriculum=single_stage",  # TRL's GKD is one stage of forward KL at T=1
        "loss.temperature=1.0",
        *args.overrides,
    ]
    ours, theirs = [], []
    # Alternated, several times: on a shared 2-core machine one pair of runs can be off by 30% either way.
    for repeat in range(args.repeats):
        with tempfile.TemporaryDirectory() as run_dir:
            cfg = compose(overrides, run_dir=run_dir)
            if repeat == 0:
                prepare_demo(cfg)
                tokenizer = load_tokenizer(require_teacher(cfg))
                rows = build_data(cfg, row_encoder(cfg, tokenizer)).train_rows
                print(
                    f"teacher {cfg.teacher.name}, student {cfg.student.name}, {len(rows)} rows, global batch "
                    f"{args.batch}, {args.steps} timed steps after {args.warmup}, {args.cores} cores, "
                    f"{args.repeats} alternating repeats"
                )
            ours.append(distill_rate(cfg, args.steps, args.warmup))
        theirs.append(trl_rate(cfg, rows, args.steps, args.warmup, args.batch, args.cores))
    mine, trl = statistics.median(ours), statistics.median(theirs)
    print(
        f"TRL GKDTrainer (forward KL, off-policy) : {trl:8.0f} trained tokens/s  runs {[round(x) for x in theirs]}"
    )
    print(
        f"distill online (teacher actor + ZeRO-2) : {mine:8.0f} trained tokens/s  runs {[round(x) for x in ours]}"
    )
    print(
        f"distill / TRL = {mine / trl:.2f}x medians (target >= 1.5x); per pair "
        f"{[round(a / b, 2) for a, b in zip(ours, theirs, strict=True)]}"
    )


if __name__ == "__main__":
    main()
