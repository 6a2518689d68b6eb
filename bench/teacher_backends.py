"""Teacher scoring throughput of the hf engine (TP 1) against the vLLM engine on the same tiny model and cores,
and the bytes per token each puts on the wire.

    python bench/teacher_backends.py [--batches 6 --batch-size 8 --seq 128 --k 64 --threads 2]

The model is a tiny Qwen2 at DeepSeek-R1's vocabulary (129,280 rows, hidden 128, head_dim 64: vLLM's CPU attention
needs 64), fp32. Batches are right-padded rows of random lengths in [seq/2, seq], as the training stream's are. Both
engines get the same torch/OpenMP threads (--threads); vLLM runs in its own environment
(`python -m distill.teacher.vllm_engine`, scripts/setup_vllm.sh), the hf engine in this process. Each engine scores
one warm-up batch first; its start-up (vLLM: engine build) is printed apart.

Wire: the TeacherBatch each returns (numpy arrays into Ray's object store) per real token. Both ship the same
format (top-k ids int32, top-k values fp32, log-normaliser fp32, the inputs), so the figures should be equal;
the endpoint's HTTP reply (JSON) is estimated apart from the size of the
completions API's prompt_logprobs (id key, logprob, rank, decoded token per entry).

Target: vLLM scores at least as many tokens/s as the hf engine (TP 1) on the same cores. On GPUs vLLM's fused
kernels and paged attention are the reason to use it; on 2 shared CPU cores this is what it costs or gains here.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.numpy import load_file, save_file

R1_VOCAB = 129_280


def make_teacher(folder: Path) -> Path:
    from distill.models import build_model, save_model, tiny_config

    config = tiny_config(
        "tiny_qwen2",
        R1_VOCAB,
        hidden_size=128,
        num_attention_heads=2,
        num_key_value_heads=1,
        num_hidden_layers=2,
        intermediate_size=256,
        initializer_range=0.3,
        eos_token_id=1,
    )
    return save_model(build_model(config, seed=0), None, folder)


def make_batches(n: int, b: int, t: int) -> list[dict[str, np.ndarray]]:
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        ids = torch.randint(2, R1_VOCAB, (b, t), generator=g)
        lengths = torch.randint(t // 2, t + 1, (b,), generator=g)
        mask = torch.arange(t) < lengths[:, None]
        ids[~mask] = 0
        out.append({"input_ids": ids.numpy(), "attention_mask": mask.numpy(), "loss_mask": mask.numpy()})
    return out


def bench_hf(model: Path, batches: list, k: int, threads: int) -> dict:
    from distill.teacher import TeacherEngine

    torch.set_num_threads(threads)
    start = time.perf_counter()
    engine = TeacherEngine.from_pretrained(model, k, dtype="float32", length_groups=1)
    started = time.perf_counter() - start
    tensors = [{n: torch.from_numpy(a) for n, a in b.items()} for b in batches]
    engine.score_batch((0, 0), tensors[0])  # warm-up
    start = time.perf_counter()
    outs = [engine.score_batch((0, i), b) for i, b in enumerate(tensors[1:], 1)]
    seconds = time.perf_counter() - start
    tokens = sum(int(b["attention_mask"].sum()) for b in batches[1:])
    nbytes = sum(o.nbytes() for o in outs)
    return {"start_s": started, "tokens_per_s": tokens / seconds, "bytes_per_token": nbytes / tokens}


def bench_vllm(model: Path, batches: list, k: int, threads: int, folder: Path) -> dict:
    from distill.teacher.vllm_engine import CPU_ENV
    from distill.teacher.vllm_env import require_vllm_python

    names = []
    for i, b in enumerate(batches):
        save_file(b, str(folder / f"b{i}.safetensors"))
        names.append(str(folder / f"b{i}.safetensors"))
    env = {**os.environ, **CPU_ENV, "OMP_NUM_THREADS": str(threads)}
    cmd = [
        str(require_vllm_python()),
        "-m",
        "distill.teacher.vllm_engine",
        "--model",
        str(model),
        "--topk",
        str(k),
    ]
    proc = subprocess.run(
        [*cmd, "--out", str(folder / "out"), *names], env=env, capture_output=True, text=True
    )
    if proc.returncode:
        sys.exit(f"vLLM engine failed:\n{proc.stderr[-3000:]}")
    timing = json.loads((folder / "out" / "timing.json").read_text())
    tokens, seconds = sum(timing["tokens"][1:]), sum(timing["score_s"][1:])  # the first batch warms up
    nbytes = sum(
        sum(a.nbytes for a in load_file(str(folder / "out" / f"b{i}.scored.safetensors")).values())
        for i in range(1, len(batches))
    )
    return {
        "start_s": timing["start_s"],
        "tokens_per_s": tokens / seconds,
        "bytes_per_token": nbytes / tokens,
    }


def endpoint_json_bytes_per_token(k: int) -> float:
    """One position's prompt_logprobs entry as the completions API serialises it: k (+1) entries of
    "<id>": {"logprob": <float>, "rank": <int>, "decoded_token": <str>} (decoded tokens average ~4 characters)."""
    entry = json.dumps({"123456": {"logprob": -12.345678901234567, "rank": 12, "decoded_token": "abcd"}})
    return (k + 1) * (len(entry) - 1)  # minus the braces, plus a comma separator


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batches", type=int, default=6)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--k", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        model = make_teacher(folder / "teacher")
        batches = make_batches(args.batches, args.batch_size, args.seq)
        print(
            f"tiny Qwen2 at vocabulary {R1_VOCAB}, fp32, k={args.k}, {args.batches - 1} timed batches of "
            f"{args.batch_size} x {args.seq} (ragged), {args.threads} threads each"
        )
        hf = bench_hf(model, batches, args.k, args.threads)
        vllm = bench_vllm(model, batches, args.k, args.threads, folder)
    for name, r in (("hf (TP 1)", hf), ("vllm", vllm)):
        print(
            f"{name:10s} start {r['start_s']:6.1f} s   {r['tokens_per_s']:8.0f} tokens/s   "
            f"{r['bytes_per_token']:6.0f} bytes/token on the wire (TeacherBatch)"
        )
    print(
        f"endpoint   ~{endpoint_json_bytes_per_token(args.k):.0f} bytes/token of JSON over HTTP (prompt_logprobs)"
    )
    ratio = vllm["tokens_per_s"] / hf["tokens_per_s"]
    verdict = "met" if ratio >= 1.0 else "missed"
    print(
        f"teacher_backends: vllm {vllm['tokens_per_s']:.0f} tokens/s = {ratio:.2f}x hf {hf['tokens_per_s']:.0f} "
        f"(target >= 1.00x): {verdict}"
    )


if __name__ == "__main__":
    main()
