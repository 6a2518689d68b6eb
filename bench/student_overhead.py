"""Student overhead: one DeepSpeed student step with the KD objective (CE + top-k forward KL, chunked) against
plain DeepSpeed SFT of the same model (the model's own `labels=` loss, `engine.backward`, `engine.step`).

Both run in this process as a one-rank gloo world with the same ZeRO config, model, batches and optimizer; the KD
step also moves the TeacherBatch tensors (top-k ids, logits, log-normaliser) into the loss, as the online run does.
Teacher outputs are made up front (a random top-k over the vocabulary): the teacher's cost is not the student's.
Target: KD tokens/s >= 0.9x SFT tokens/s.

    python bench/student_overhead.py                          # vocab 32064 (Phi-3's), 4 x 256 tokens, k 64
    python bench/student_overhead.py --vocab 151936 --k 64    # Qwen2.5's vocabulary: the loss is all LM head
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import time

import numpy as np
import torch


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_batches(n: int, b: int, t: int, k: int, vocab: int) -> list:
    """n TeacherBatches of random tokens with a random (sorted, normalised) teacher top-k."""
    from distill.batch import TeacherBatch

    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        logits = np.sort(rng.standard_normal((b, t, k), dtype=np.float32) * 3, axis=-1)[..., ::-1]
        loss_mask = np.ones((b, t), dtype=bool)
        loss_mask[:, : t // 4] = False  # the prompt
        out.append(
            TeacherBatch(
                batch_id=(0, i),
                input_ids=rng.integers(0, vocab, (b, t), dtype=np.int32),
                attention_mask=np.ones((b, t), dtype=bool),
                loss_mask=loss_mask,
                topk_ids=rng.integers(0, vocab, (b, t, k), dtype=np.int32),
                topk_logits=np.ascontiguousarray(logits),
                # log-sum-exp over the full vocabulary >= over the top-k: make it a plausible value.
                log_normalizer=(np.log(np.exp(logits).sum(-1)) + 0.5).astype(np.float32),
            )
        )
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--vocab", type=int, default=32064, help="student vocabulary size (Phi-3's)")
    p.add_argument("--hidden", type=int, default=256, help="student hidden size")
    p.add_argument("--layers", type=int, default=4, help="student layers")
    p.add_argument("--batch", type=int, default=4, help="sequences per step")
    p.add_argument("--seq", type=int, default=256, help="tokens per sequence")
    p.add_argument("--k", type=int, default=64, help="teacher top-k per token")
    p.add_argument("--zero", type=int, default=2, help="DeepSpeed ZeRO stage")
    p.add_argument("--steps", type=int, default=12, help="timed steps, each side")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps before them")
    p.add_argument("--threads", type=int, default=1, help="torch threads (the student actor's CPU share)")
    args = p.parse_args()
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.expanduser("~/.cache/distill/torch_extensions"))
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1")
    os.environ["MASTER_PORT"] = str(free_port())
    torch.set_num_threads(args.threads)

    import deepspeed  # the SFT baseline is plain DeepSpeed, as a user would write it

    from distill.config.schema import OptimizerConfig
    from distill.models import build_model, tiny_config
    from distill.student import StudentEngine, build_ds_config, init_distributed_from_env
    from distill.training.objective import Objective, TermSpec
    from distill.training.reference import build_optimizer

    init_distributed_from_env("gloo")
    arch = tiny_config(
        "tiny_qwen2",
        args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.hidden * 3,
        num_hidden_layers=args.layers,
        num_attention_heads=max(args.hidden // 64, 1),
        num_key_value_heads=max(args.hidden // 128, 1),
    )
    ds = build_ds_config(
        zero_stage=args.zero, micro_batch_size=args.batch, grad_accum_steps=1, world_size=1, grad_clip=1.0
    )
    optim = OptimizerConfig(lr=1e-4, warmup_steps=0, schedule="constant")
    total = args.warmup + args.steps
    batches = make_batches(total, args.batch, args.seq, args.k, args.vocab)
    tokens = [int(b.loss_mask.sum()) for b in batches]
    print(
        f"student: qwen2-style, hidden {args.hidden}, {args.layers} layers, vocab {args.vocab}; "
        f"{args.batch} x {args.seq} tokens per step, top-{args.k}, ZeRO-{args.zero}, {args.threads} thread(s)"
    )

    # ---- plain DeepSpeed SFT
    model = build_model(arch, seed=0)
    engine, *_ = deepspeed.initialize(
        model=model,
        optimizer=build_optimizer(model.parameters(), lr=1e-4, weight_decay=0.0, betas=(0.9, 0.95), eps=1e-8),
        config=ds,
    )
    sft_times = []
    for i, b in enumerate(batches):
        mb = b.to_torch(engine.device)
        labels = mb["input_ids"].long().masked_fill(~mb["loss_mask"], -100)
        start = time.perf_counter()
        out = engine(
            input_ids=mb["input_ids"].long(), attention_mask=mb["attention_mask"].long(), labels=labels
        )
        engine.backward(out.loss)
        engine.step()
        out.loss.detach().item()  # sync, as the KD step does (it returns floats)
        if i >= args.warmup:
            sft_times.append(time.perf_counter() - start)
    del engine, model

    # ---- this project's student step: CE + forward KL on the teacher's top-k
    terms = [TermSpec("ce", "ce", 0.5), TermSpec("kd", "forward_kl", 0.5)]
    objective = Objective(terms, temperature=2.0, chunk_size=0)
    kd = StudentEngine(build_model(arch, seed=0), objective, optim=optim, total_steps=total, ds_config=ds)
    kd_times = []
    for i, b in enumerate(batches):
        start = time.perf_counter()
        kd.train_step(i, [b.to_torch(kd.device)], tokens[i])
        if i >= args.warmup:
            kd_times.append(time.perf_counter() - start)

    timed_tokens = sum(tokens[args.warmup :])
    sft_rate = timed_tokens / sum(sft_times)
    kd_rate = timed_tokens / sum(kd_times)
    print(
        f"plain DeepSpeed SFT : {sft_rate:8.0f} trained tokens/s (median step {statistics.median(sft_times):.3f} s)"
    )
    print(
        f"KD student step     : {kd_rate:8.0f} trained tokens/s (median step {statistics.median(kd_times):.3f} s)"
    )
    print(f"KD / SFT = {kd_rate / sft_rate:.2f}x (target >= 0.9x)")


if __name__ == "__main__":
    main()
