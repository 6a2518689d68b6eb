"""Peak memory and time of the chunked top-k forward_kl term against a naive full-vocab implementation.

    python bench/loss_memory.py                          # V=151936, 4096 tokens, k=64, bf16 logits
    python bench/loss_memory.py --tokens 512 --vocab 32000 --chunk-sizes 64,256

Each method runs forward+backward in its own subprocess, so one's peak cannot hide inside the other's.
Peak extra memory = ru_maxrss (peak RSS of the process) minus the RSS measured right after the inputs are
allocated, i.e. what the loss itself adds: activations, fp32 copies, and the [N, V] gradient of the logits
(which both methods must produce). Time = wall time of one forward+backward after one warm-up run.

The naive method upcasts the logits to fp32, takes a full log_softmax, scatters the teacher's top-k
probabilities plus its tail (spread uniformly over the V-k other ids) into a dense [N, V] distribution and
takes an elementwise KL. Its value differs slightly from the bucketed top-k+tail KL by construction (the
tail is spread rather than kept as one bucket); it is a memory/time baseline, not a reference.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import subprocess
import sys
import time

import torch

import distill.losses as L
from distill.losses.chunked import row_chunks

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def rss_bytes() -> int:
    """Current resident set size of this process."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def make_inputs(tokens: int, vocab: int, k: int, dtype: torch.dtype) -> tuple[torch.Tensor, L.TopKTeacher]:
    """Student logits [tokens, vocab] (leaf, requires grad) and a top-k teacher with tail mass in [1%, 50%]."""
    g = torch.Generator().manual_seed(0)
    logits = torch.empty(tokens, vocab, dtype=dtype)
    for rows in row_chunks(tokens, 64):  # fill in slices: no full-size fp32 temporary before the baseline
        logits[rows] = torch.randn(rows.stop - rows.start, vocab, generator=g)
    # Distinct ids per row without a [tokens, vocab] argsort: a random offset plus evenly spaced strides.
    ids = (torch.randint(vocab, (tokens, 1), generator=g) + torch.arange(k) * (vocab // k)) % vocab
    t_logits = (torch.randn(tokens, k, generator=g) * 2 + 5).sort(dim=-1, descending=True).values
    tail_mass = torch.rand(tokens, generator=g) * 0.49 + 0.01
    log_normalizer = torch.logsumexp(t_logits, -1) - torch.log1p(-tail_mass)
    return logits.requires_grad_(), L.TopKTeacher(ids.int(), t_logits, log_normalizer)


def chunked_kl(
    logits: torch.Tensor, teacher: L.TopKTeacher, temperature: float, chunk_size: int
) -> torch.Tensor:
    mask = torch.ones(logits.shape[0], dtype=torch.bool)
    loss, _ = L.get("forward_kl")(logits, teacher, mask, temperature=temperature, chunk_size=chunk_size)
    return loss


def naive_kl(logits: torch.Tensor, teacher: L.TopKTeacher, temperature: float) -> torch.Tensor:
    """The straightforward full-vocab version: every intermediate is a dense [N, V] fp32 tensor."""
    n, vocab = logits.shape
    x = logits.float()
    log_q = torch.log_softmax(x if temperature == 1.0 else x / temperature, dim=-1)
    buckets = teacher.log_probs(temperature).exp()  # [N, k+1], tail last
    k = buckets.shape[1] - 1
    p = (buckets[:, -1:] / max(vocab - k, 1)).expand(n, vocab).clone()  # tail spread over the other ids
    p.scatter_(1, teacher.ids.long(), buckets[:, :k])
    return temperature**2 * (p * (p.clamp(min=1e-30).log() - log_q)).sum()


def worker(args: argparse.Namespace) -> None:
    """One method in this process; prints one JSON line."""
    logits, teacher = make_inputs(args.tokens, args.vocab, args.k, DTYPES[args.dtype])
    gc.collect()
    base = rss_bytes()
    if args.worker == "naive":
        step = lambda: naive_kl(logits, teacher, args.temperature)  # noqa: E731
    else:
        step = lambda: chunked_kl(logits, teacher, args.temperature, args.chunk_size)  # noqa: E731
    runs = []  # (wall seconds, cpu seconds) per run
    for _ in range(1 + args.repeats):  # the first run is the warm-up
        logits.grad = None
        start, cpu_start = time.perf_counter(), time.process_time()
        loss = step()
        loss.backward()
        runs.append((time.perf_counter() - start, time.process_time() - cpu_start))
    assert logits.grad is not None and logits.grad.dtype == logits.dtype
    best = min(runs[1:] or runs)
    print(
        json.dumps(
            {
                "peak_extra_mib": (peak_rss_bytes() - base) / 2**20,
                "seconds": best[0],
                "cpu_seconds": best[1],
                "baseline_mib": base / 2**20,
                "loss": float(loss.detach()),
            }
        )
    )


def run_method(args: argparse.Namespace, method: str, chunk_size: int = 0) -> dict | None:
    cmd = [sys.executable, __file__, "--worker", method, "--chunk-size", str(chunk_size)]
    for flag in ("tokens", "vocab", "k", "dtype", "temperature", "repeats"):
        cmd += [f"--{flag}", str(getattr(args, flag))]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        print(f"{method} (chunk {chunk_size}) failed with code {proc.returncode}:\n{proc.stderr[-2000:]}")
        return None
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--vocab", type=int, default=151936)
    p.add_argument("--k", type=int, default=64)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16", help="student logits dtype")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument(
        "--chunk-sizes", default="32,64,128,256,1024", help="comma-separated rows per chunk to try"
    )
    p.add_argument("--repeats", type=int, default=3, help="timed runs after the warm-up (best is reported)")
    p.add_argument("--worker", choices=["naive", "chunked"], help=argparse.SUPPRESS)
    p.add_argument("--chunk-size", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(args)
        return

    print(
        f"forward_kl forward+backward: tokens={args.tokens} vocab={args.vocab} k={args.k} "
        f"student logits {args.dtype} T={args.temperature}; torch threads={torch.get_num_threads()}"
    )
    print("peak extra = ru_maxrss peak minus RSS right after the inputs were allocated (per subprocess);")
    print(
        f"wall s = best of {args.repeats} forward+backward after one warm-up; cpu s = that run's process CPU"
    )
    print("time (user+sys, all threads), less disturbed by other jobs sharing the cores.\n")
    naive = run_method(args, "naive")
    rows = [("naive", naive)]
    rows += [(f"chunked c={c}", run_method(args, "chunked", int(c))) for c in args.chunk_sizes.split(",")]

    print_table(rows, naive)
    print("\ntarget: chunked peak <= 1/8 of naive at <= 1.2x its time.")
    print("The loss values differ by construction: the naive version spreads the tail over the other ids.")


def print_table(rows: list[tuple[str, dict | None]], naive: dict | None) -> None:
    """method, peak extra MiB, wall and CPU seconds, and ratios against the naive run."""
    print(
        f"{'method':<16}{'peak MiB':>10}{'wall s':>8}{'cpu s':>8}{'mem vs naive':>14}{'wall x':>8}{'cpu x':>7}{'loss':>11}"
    )
    for name, r in rows:
        if r is None:
            print(f"{name:<16}{'failed':>10}")
            continue
        mem = f"1/{naive['peak_extra_mib'] / r['peak_extra_mib']:.1f}" if naive else "-"
        wall = f"{r['seconds'] / naive['seconds']:.2f}" if naive else "-"
        cpu = f"{r['cpu_seconds'] / naive['cpu_seconds']:.2f}" if naive else "-"
        figures = f"{r['peak_extra_mib']:>10.0f}{r['seconds']:>8.2f}{r['cpu_seconds']:>8.1f}"
        print(f"{name:<16}{figures}{mem:>14}{wall:>8}{cpu:>7}{r['loss']:>11.6g}")


if __name__ == "__main__":
    main()
