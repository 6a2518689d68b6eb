"""Teacher service throughput (TP 1 vs TP 2 in real Ray actors) and the cost of each payload encoding.

    python bench/teacher_throughput.py [--batches 8 --batch-size 4 --seq 128 --k 64 --vocab 129280]

Prints teacher tokens/s through `TeacherGroup.score_stream` for TP 1 and TP 2 (one replica, gloo on CPU), then,
on the real teacher outputs, the bytes per token of every ids x logits encoding and the KL error it adds
(nats/token, KL(original top-k + tail || decoded)). Target: <= 200 bytes/token at k = 64 with KL < 1e-3.

The teacher is the tiny DeepSeek-V3 (MLA + MoE) at a bench vocabulary; on 2 CPU cores TP mostly shows its
communication overhead, on GPUs it is what makes a 671B teacher fit at all.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

os.environ.setdefault("RAY_AUTH_MODE", "disabled")


def make_teacher(folder: Path, vocab: int) -> None:
    from distill.models.loading import save_model
    from distill.models.tiny import build_model, tiny_config

    save_model(
        build_model(tiny_config("tiny_deepseek_v3", vocab, pad_token_id=0, eos_token_id=0), 0), None, folder
    )


def make_batches(n: int, b: int, t: int, vocab: int) -> list:
    g = torch.Generator().manual_seed(0)
    out = []
    for i in range(n):
        ids = torch.randint(1, vocab, (b, t), generator=g).numpy()
        ones = np.ones((b, t), dtype=bool)
        out.append(((0, i), {"input_ids": ids, "attention_mask": ones, "loss_mask": ones}))
    return out


def tokens_per_s(folder: Path, batches: list, *, tp: int, k: int) -> tuple[float, list]:
    import ray

    from distill.cluster.teacher_group import TeacherGroup, TeacherSpec

    group = TeacherGroup(TeacherSpec(path=str(folder), topk=k), replicas=1, tp=tp, cpus_per_actor=1)
    try:
        list(group.score_stream(batches[:1]))  # warm-up: first forward allocates and builds kernels
        start = time.perf_counter()
        outs = [ray.get(ref) for _, ref in group.score_stream(batches)]
        seconds = time.perf_counter() - start
    finally:
        group.shutdown()
    tokens = sum(a["input_ids"].size for _, a in batches)
    return tokens / seconds, outs


def encoding_table(outs: list, k: int, vocab: int) -> list[tuple[str, str, int, float]]:
    from distill.cache.encoding import LOGITS_ENCODINGS, bytes_per_token, encoding_kl, packed_ids_name

    rows = []
    for ids in ("int32", packed_ids_name(vocab)):
        for logits in LOGITS_ENCODINGS:
            kl = float(np.mean([encoding_kl(o, ids, logits) for o in outs]))
            rows.append((ids, logits, bytes_per_token(k, ids, logits), kl))
    return rows


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--batches", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--k", type=int, default=64)
    p.add_argument("--vocab", type=int, default=129280)  # DeepSeek-R1's vocabulary
    args = p.parse_args()

    import ray

    os.makedirs(os.path.join(tempfile.gettempdir(), "ray"), exist_ok=True)
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="ERROR")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "teacher"
        make_teacher(folder, args.vocab)
        batches = make_batches(args.batches, args.batch_size, args.seq, args.vocab)
        print(
            f"teacher: tiny DeepSeek-V3, vocab {args.vocab}, {args.batches} batches of {args.batch_size}x{args.seq}"
        )
        print("| TP | teacher tokens/s |\n|---|---|")
        outs = None
        for tp in (1, 2):
            rate, got = tokens_per_s(folder, batches, tp=tp, k=args.k)
            outs = outs or got
            print(f"| {tp} | {rate:,.0f} |")
    ray.shutdown()
    print(
        f"\npayload per token at k={args.k} (ids + logits + fp32 log-normaliser), KL error on these outputs:"
    )
    print("| ids | logits | bytes/token | KL error (nats/token) | target met |\n|---|---|---|---|---|")
    for ids, logits, nbytes, kl in encoding_table(outs, args.k, args.vocab):
        ok = "yes" if nbytes <= 200 and kl < 1e-3 else "no"
        print(f"| {ids} | {logits} | {nbytes} | {kl:.2e} | {ok} |")


if __name__ == "__main__":
    main()
