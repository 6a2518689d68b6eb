"""Peak memory and time of one student training step at a long trace and a 152k vocabulary: fused head vs not.

    python bench/student_memory.py                                   # CPU: V 151,936, T 8,192, batch 1, bf16
    python bench/student_memory.py --device cuda --hidden 2048       # GPU, Qwen2.5-3B's width (bench/gpu_smoke.sh)

Three cases, each in its own subprocess (one's peak cannot hide in another's), on the same tiny Qwen2 student
(`--hidden`, `--layers`) and the same synthetic top-64 teacher:
  (a) unfused KD: the student materialises logits [T, V]; CE + top-k forward KL at T 2 on them (loss.fused_head=false)
  (b) fused KD:   the same terms through the fused head (distill.losses.fused), no [T, V] tensor
  (c) fused SFT:  hard-label CE only through the fused head, no teacher: the floor a KD step is measured against
A step is the product's: `student_forward` + `Objective` + the weighted total over the token count, backward.
Peak = the process's peak minus its footprint right before the first step (model, gradients' storage and inputs
are in the footprint): CPU ru_maxrss, CUDA max_memory_allocated. Time = best of `--repeats` steps after it.

Targets (the memory issue): (b) at most 1.25x (c) in peak memory, and at most 1.1x (a) in time.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import torch

from distill.batch import TeacherBatch
from distill.models.tiny import build_model, tiny_config
from distill.training.objective import Objective, TermSpec
from distill.training.reference import student_forward

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
CASES = {
    "unfused_kd": ("(a) unfused KD (CE + top-k KL)", False, True),
    "fused_kd": ("(b) fused KD (CE + top-k KL)", True, True),
    "fused_sft": ("(c) fused SFT (CE only)", True, False),
}
MEMORY_TARGET, TIME_TARGET = 1.25, 1.1


def footprint_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device)
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def synthetic_batch(seq_len: int, vocab: int, k: int, device: torch.device) -> dict:
    """One row of random tokens (loss on all but the first 16 and the last) and a top-k teacher whose tail
    holds 1-50% of the mass, built without any [T, V] tensor."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (1, seq_len), generator=g)
    loss_mask = torch.ones(1, seq_len, dtype=torch.bool)
    loss_mask[:, :16] = False
    loss_mask[:, -1] = False
    topk_ids = (torch.randint(vocab, (1, seq_len, 1), generator=g) + torch.arange(k) * (vocab // k)) % vocab
    topk_logits = (torch.randn(1, seq_len, k, generator=g) * 2 + 5).sort(dim=-1, descending=True).values
    tail = torch.rand(1, seq_len, generator=g) * 0.49 + 0.01
    batch = TeacherBatch.from_torch(
        (0, 0),
        input_ids=ids.int(),
        attention_mask=torch.ones(1, seq_len, dtype=torch.bool),
        loss_mask=loss_mask,
        topk_ids=topk_ids.int(),
        topk_logits=topk_logits,
        log_normalizer=torch.logsumexp(topk_logits, -1) - torch.log1p(-tail),
    )
    return batch.to_torch(device)


def worker(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    _, fused, kd = CASES[args.worker]
    config = tiny_config(
        "tiny_qwen2",
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        num_hidden_layers=args.layers,
        intermediate_size=4 * args.hidden,
        max_position_embeddings=args.seq_len,
    )
    model = build_model(config, seed=0).to(device=device, dtype=DTYPES[args.dtype]).train()
    terms = [TermSpec("ce", "ce", 0.5)] + ([TermSpec("kd", "forward_kl", 1.0)] if kd else [])
    objective = Objective(terms, temperature=2.0, chunk_size=0, fused_head=fused)
    batch = synthetic_batch(args.seq_len, args.vocab, args.k, device)
    if not kd:
        batch = {k: batch[k] for k in ("input_ids", "attention_mask", "loss_mask")}
    tokens = int(batch["loss_mask"].sum())
    for p in model.parameters():  # the gradients' storage exists before the step in every case
        p.grad = torch.zeros_like(p)

    def step() -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        sums = objective(student_forward(model, objective, batch), batch)
        loss = objective.weighted_total(sums) / tokens
        loss.backward()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - start
        step.loss = float(loss.detach())  # type: ignore[attr-defined]
        return seconds

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    base = footprint_bytes(device)
    times = [step()]
    peak = peak_bytes(device) - base
    times += [step() for _ in range(args.repeats)]
    print(json.dumps({"peak_bytes": peak, "seconds": min(times[1:] or times), "loss": step.loss}))  # type: ignore[attr-defined]


def run_case(args: argparse.Namespace, case: str) -> dict | None:
    cmd = [sys.executable, __file__, "--worker", case]
    for flag in ("device", "vocab", "seq_len", "hidden", "layers", "k", "dtype", "repeats", "threads"):
        cmd += [f"--{flag.replace('_', '-')}", str(getattr(args, flag))]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        print(f"{case} failed with code {proc.returncode}:\n{proc.stderr[-3000:]}")
        return None
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--vocab", type=int, default=151936)
    p.add_argument("--seq-len", type=int, default=8192)
    p.add_argument("--hidden", type=int, default=64, help="student width (2048 is Qwen2.5-3B's)")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--k", type=int, default=64)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    p.add_argument(
        "--repeats", type=int, default=2, help="timed steps after the measured one (best reported)"
    )
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--cases", default=",".join(CASES))
    p.add_argument("--worker", choices=sorted(CASES), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(args)
        return

    elem = DTYPES[args.dtype].itemsize
    logits_bytes = args.seq_len * args.vocab * elem
    print(
        f"one student step, batch 1 x {args.seq_len} tokens, V {args.vocab}, hidden {args.hidden}, "
        f"{args.layers} layers, {args.dtype}, top-{args.k} teacher at T 2, {args.device}"
    )
    print(f"the logits [T, V] that (a) materialises: {logits_bytes / 2**30:.2f} GiB ({logits_bytes:,} bytes)")
    results = {case: run_case(args, case) for case in args.cases.split(",")}
    print(f"{'case':<34}{'peak MiB':>10}{'step s':>9}{'loss':>10}")
    for case, r in results.items():
        if r is not None:
            print(
                f"{CASES[case][0]:<34}{r['peak_bytes'] / 2**20:>10.0f}{r['seconds']:>9.2f}{r['loss']:>10.4f}"
            )
    a, b, c = (results.get(k) for k in CASES)
    if a is None or b is None or c is None:
        print("student_memory: a case failed (target (b) <= 1.25x (c) memory, <= 1.1x (a) time): missed")
        return
    memory, speed = b["peak_bytes"] / c["peak_bytes"], b["seconds"] / a["seconds"]
    print(
        f"(b)/(c) peak memory {memory:.2f}x (target <= {MEMORY_TARGET}x); (a)/(b) peak {a['peak_bytes'] / b['peak_bytes']:.1f}x"
    )
    print(f"(b)/(a) step time {speed:.2f}x (target <= {TIME_TARGET}x)")
    met = memory <= MEMORY_TARGET and speed <= TIME_TARGET
    print(
        f"student_memory: fused KD {memory:.2f}x SFT memory, {speed:.2f}x unfused time "
        f"(target <= {MEMORY_TARGET}x, <= {TIME_TARGET}x): {'met' if met else 'missed'}"
    )


if __name__ == "__main__":
    main()
