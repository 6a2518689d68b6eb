"""On-policy distillation throughput: this project's Ray path at on_policy.max_staleness 0, 1 and 2 against TRL's
`GKDTrainer` with lmbda=1 (every batch written by the student), side by side in one invocation.

Same teacher and student (the demo pair: tiny DeepSeek-V3 teacher, tiny Qwen2 student, same initial weights), same
encoded rows (each row's prompt: the conversation up to the assistant's reply), same global batch in one
micro-batch, the same sampling (temperature 1, top_p 1, top_k off, --max-new-tokens, stop at the same end token),
the same two CPU cores:
    TRL      : one process, torch on both cores; GKDTrainer(lmbda=1, beta=0): each step the student samples the
               completions, the teacher scores them (full logits), forward KL on the completion tokens.
    distill  : `cluster=local_ray`, one stage, every batch on-policy (lmbda 1, loss=kd: forward KL to the teacher's
               top-k; its CE term is off on the student's samples): a rollout actor (a copy of the student, loading
               the weights rank 0 publishes) writes each step's batch, the teacher actor scores it into the buffer,
               the DeepSpeed ZeRO-2 rank trains on it. One torch thread each; the rollout actor reserves no Ray CPU
               (cluster.cpus_per_rollout_actor=0): Ray's 2 CPUs are the teacher's and the rank's, and the rollout
               actor shares those cores. At staleness 0 rollout -> scoring -> training run in turn (GKD's
               synchronous recipe); at staleness k > 0 step s's rollout and scoring run while the steps before
               it train, up to k steps written at once. Logged at the default train.log_every (TRL: no logging).
Figure: trained tokens/s (tokens: the completion tokens trained, the written batches' counts on our side, checked
against metrics.jsonl on the logged steps; the labels GKDTrainer trains on its side), warm-up steps and start-up
excluded; every side run --repeats times, alternating, medians compared. Target: the best staleness >= 1.5x TRL.

    python bench/onpolicy_throughput.py      # 20 timed steps after 2, 3 alternating repeats (~8 min on 2 cores)
    python bench/onpolicy_throughput.py --batch 32 --max-new-tokens 64 --steps 10 --repeats 2   # more work per step
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from bench_env import gkd_config, offline_cpu_environment, step_clock

TARGET = 1.5


def onpolicy_curriculum(max_new_tokens: int, staleness: int) -> str:
    """One stage, every batch the student's own. (A `+curriculum.stages.0.on_policy={...}` override cannot merge
    into the stage's None, so the stage list is given whole.)"""
    on_policy = (
        f"{{lmbda: 1.0, max_new_tokens: {max_new_tokens}, temperature: 1.0, top_p: 1.0, "
        f"max_staleness: {staleness}}}"
    )
    return f"curriculum.stages=[{{name: onpolicy, fraction: 1.0, on_policy: {on_policy}}}]"


def trl_rate(
    cfg, rows: list[dict], steps: int, warmup: int, batch: int, threads: int, max_new_tokens: int
) -> tuple[float, float]:
    """(trained tokens/s, mean completion length) of GKDTrainer(lmbda=1) over `steps` steps after `warmup`."""
    import torch
    from datasets import Dataset
    from trl.experimental.gkd import GKDTrainer

    from distill.batch import left_pad
    from distill.data.batching import pad_batch
    from distill.eval.runs import generation_stop_id
    from distill.models.loading import load_causal_lm, load_tokenizer
    from distill.models.resolve import build_student, require_teacher
    from distill.training.onpolicy import prompt_lengths

    torch.set_num_threads(threads)
    teacher_path = require_teacher(cfg)
    tokenizer = load_tokenizer(teacher_path)
    torch.manual_seed(cfg.train.seed)
    student = build_student(cfg, tokenizer)
    teacher = load_causal_lm(teacher_path, dtype="float32")
    trained: list[int] = []
    completions: list[float] = []

    def collate(examples: list[dict]) -> dict:
        """Our rows as GKD's inputs: the prompts left-padded (what it samples from), and the full rows
        (labels[t + 1] trained where loss_mask[t] is), which lmbda=1 replaces by the student's samples."""
        padded = pad_batch(examples, tokenizer.pad_token_id)
        ids, mask = padded["input_ids"], padded["loss_mask"]
        labels = torch.full_like(ids, -100)
        labels[:, 1:] = torch.where(mask[:, :-1], ids[:, 1:], -100)
        lengths = prompt_lengths(mask, padded["attention_mask"])
        prompts, attend = left_pad(
            [row[:n].tolist() for row, n in zip(ids, lengths, strict=True)], tokenizer.pad_token_id
        )
        return {
            "input_ids": ids,
            "attention_mask": padded["attention_mask"].long(),
            "labels": labels,
            "prompts": prompts,
            "prompt_attention_mask": attend,
        }

    class CountingGKD(GKDTrainer):
        """GKDTrainer, counting the completion tokens each on-policy step trains (its loss's labels != -100)."""

        @staticmethod
        def generate_on_policy_outputs(model, inputs, generation_config):
            ids, attend, labels = GKDTrainer.generate_on_policy_outputs(model, inputs, generation_config)
            count = int((labels[:, 1:] != -100).sum())
            trained.append(count)
            completions.append(count / labels.shape[0])
            return ids, attend, labels

    clock = step_clock()
    with tempfile.TemporaryDirectory() as out:
        args = gkd_config(
            out, cfg, batch=batch, max_steps=warmup + steps, lmbda=1.0, max_new_tokens=max_new_tokens
        )
        trainer = CountingGKD(
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
        # Our rollouts stop at the reply's end token (<|im_end|>); GKDTrainer copies the model's eos, which the
        # Trainer has just aligned to the tokenizer's EOS: without this it would never stop early.
        trainer.generation_config.eos_token_id = generation_stop_id(tokenizer)
        trainer.train()
    assert len(trained) == len(clock.marks) == warmup + steps, (len(trained), len(clock.marks))
    seconds = clock.marks[-1] - clock.marks[warmup - 1]
    timed = slice(warmup, warmup + steps)
    return sum(trained[timed]) / seconds, statistics.mean(completions[timed])


def distill_rate(cfg, run_dir: str, steps: int, warmup: int, staleness: int) -> tuple[float, float]:
    """(trained tokens/s, mean completion length) of the Ray on-policy run, timed between step commits. The run
    logs at its default train.log_every (TRL's side logs nothing); each step's trained tokens are the counts of
    its written batches (the feed's, what the driver divides the loss by), and the logged steps are checked to be
    written at the asked staleness."""
    from distill.cluster.driver import Hooks
    from distill.run import run
    from distill.tracking.metrics_log import read_metrics

    marks: dict[int, float] = {}
    tokens: dict[int, int] = {}

    class StepClock(Hooks):
        def after_step(self, driver, step: int) -> None:
            marks[step] = time.perf_counter()
            written = driver.onpolicy.tokens
            tokens[step] = sum(written[tuple(b)] for b in driver.assignment.step_batches(step))

    run(cfg, hooks=StepClock())
    timed = range(warmup, warmup + steps)
    logged = [
        r for r in read_metrics(Path(run_dir) / "metrics.jsonl") if r["step"] in timed and "tokens" in r
    ]
    # Each logged row covers the steps since the previous log, all after the warm-up's `staleness` steps.
    for r in logged:
        if r.get("onpolicy/share") != 1.0 or r.get("onpolicy/staleness") != staleness:
            raise RuntimeError(f"step {r['step']} is not on-policy at staleness {staleness}: {r}")
        if r["tokens"] != tokens[r["step"]]:
            raise RuntimeError(f"step {r['step']}: {tokens[r['step']]} written tokens, the run logged {r}")
    if not logged:
        raise RuntimeError(f"no logged step in {timed.start}-{timed.stop - 1}: raise --steps")
    length = statistics.mean(r["onpolicy/completion_tokens"] for r in logged)
    return sum(tokens[s] for s in timed) / (marks[warmup + steps - 1] - marks[warmup - 1]), length


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=20, help="timed optimizer steps (after --warmup)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps (>= the largest staleness)")
    p.add_argument("--batch", type=int, default=16, help="global batch in sequences")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--staleness", default="0,1,2", help="on_policy.max_staleness values of the distill side")
    p.add_argument("--cores", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3, help="alternating runs of each side (medians compared)")
    p.add_argument("overrides", nargs="*", help="extra `distill` overrides, e.g. prepare.cache_dir=...")
    args = p.parse_args()
    stalenesses = [int(k) for k in args.staleness.split(",")]
    if args.warmup < max(stalenesses) or args.warmup < 1:
        p.error(f"--warmup {args.warmup} must be >= 1 and >= the largest staleness {max(stalenesses)}")
    offline_cpu_environment()

    from distill.config import compose
    from distill.data.build import build_data
    from distill.models.loading import load_tokenizer
    from distill.models.resolve import require_teacher
    from distill.xtok.build import row_encoder
    from launch.prepare_demo import prepare_demo

    total = args.warmup + args.steps
    common = [
        "cluster=local_ray",
        f"cluster.cpus_per_node={args.cores}",
        "cluster.cpus_per_rollout_actor=0",  # shares the teacher's and the rank's cores (see the docstring)
        # TRL's shape: the whole global batch in one micro-batch, so both sides run the same passes.
        f"cluster.micro_batch_size={args.batch}",
        "cluster.grad_accum_steps=1",
        f"cluster.global_batch_size={args.batch}",
        f"train.steps={total}",
        "eval.max_batches=1",
        "eval.generate_examples=0",
        "loss=kd",
        "loss.temperature=1.0",
        *args.overrides,
    ]
    ours: dict[int, list[float]] = {k: [] for k in stalenesses}
    lengths: dict[object, list[float]] = {k: [] for k in [*stalenesses, "trl"]}
    theirs: list[float] = []
    # Alternated, several times: on a shared 2-core machine one run can be off by 30% either way.
    for repeat in range(args.repeats):
        for k in stalenesses:
            with tempfile.TemporaryDirectory() as run_dir:
                cfg = compose([*common, onpolicy_curriculum(args.max_new_tokens, k)], run_dir=run_dir)
                if repeat == 0 and k == stalenesses[0]:
                    prepare_demo(cfg)
                    tokenizer = load_tokenizer(require_teacher(cfg))
                    rows = build_data(cfg, row_encoder(cfg, tokenizer)).train_rows
                    print(
                        f"teacher {cfg.teacher.name}, student {cfg.student.name}, {len(rows)} rows, global batch "
                        f"{args.batch}, max_new_tokens {args.max_new_tokens}, {args.steps} timed steps after "
                        f"{args.warmup}, {args.cores} cores, {args.repeats} alternating repeats",
                        flush=True,
                    )
                rate, length = distill_rate(cfg, run_dir, args.steps, args.warmup, k)
            ours[k].append(rate)
            lengths[k].append(length)
            print(f"repeat {repeat} distill staleness {k}: {rate:.0f} tokens/s", flush=True)
        rate, length = trl_rate(
            cfg, rows, args.steps, args.warmup, args.batch, args.cores, args.max_new_tokens
        )
        theirs.append(rate)
        lengths["trl"].append(length)
        print(f"repeat {repeat} TRL GKDTrainer lmbda=1: {rate:.0f} tokens/s", flush=True)

    trl = statistics.median(theirs)
    medians = {k: statistics.median(v) for k, v in ours.items()}

    def row(name: str, median: float, runs: list[float], length: list[float]) -> str:
        return (
            f"{name:34s} {median:9.0f} {median / trl:7.2f}x {statistics.mean(length):11.1f}   "
            f"{[round(x) for x in runs]}"
        )

    print(f"\n{'side':34s} {'tokens/s':>9s} {'vs TRL':>8s} {'completion':>11s}   runs (tokens/s)")
    print(row("TRL GKDTrainer (lmbda=1, beta=0)", trl, theirs, lengths["trl"]))
    for k in stalenesses:
        print(row(f"distill Ray on-policy, staleness {k}", medians[k], ours[k], lengths[k]))
    if 0 in medians and 1 in medians:
        faster = medians[1] > medians[0]
        print(
            f"staleness 1 / staleness 0 = {medians[1] / medians[0]:.2f}x: rollout overlaps training "
            f"{'(faster)' if faster else '(NOT faster)'}; per repeat "
            f"{[round(a / b, 2) for a, b in zip(ours[1], ours[0], strict=True)]}"
        )
    best = max(medians, key=medians.get)
    ratio = medians[best] / trl
    print(
        f"onpolicy_throughput: staleness {best} {ratio:.2f}x TRL (target >= {TARGET}x): "
        f"{'met' if ratio >= TARGET else 'missed'}"
    )


if __name__ == "__main__":
    main()
