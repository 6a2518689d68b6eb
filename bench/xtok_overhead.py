"""Throughput of cross-tokenizer KD against same-tokenizer KD on the same data.

    python bench/xtok_overhead.py                      # tiny DeepSeek-V3 teacher, tiny Qwen2 student
    python bench/xtok_overhead.py --steps 20 --batch 16 --teacher-vocab 2048 --student-vocab 1536

Both runs use the same conversations, the same teacher architecture and the same student architecture, and do
the same work per step: teacher forward on its tokens -> top-k -> student forward/backward -> AdamW step.
Same-tokenizer KD: the student uses the teacher's tokenizer, `loss=kd`. Cross-tokenizer KD: the student has
its own tokenizer, the rows carry the alignment (`encode_pair`), the teacher's top-k is projected into the
student's positions and vocabulary (`CrossTokenizerTeacher`), `loss=kd_xtok` (adds the uld term).

Printed: data encoding time per example (once per run, amortised over epochs), the step time of each path,
and tokens/s in *characters* per second (the two tokenizers cut the same text into different token counts,
so characters are the fair unit), and the ratio. Models are randomly initialised: speed does not depend on
training. Run on an idle machine; numbers on shared cores are noisy, so each path takes the median step.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from distill.data import build_task_dataset, encode_example, pad_batch
from distill.models.tiny import build_model, tiny_config
from distill.models.tokenizer import task_corpus, train_tokenizer
from distill.teacher.engine import TeacherEngine
from distill.training.objective import Objective, TermSpec
from distill.xtok import CrossTokenizerTeacher, build_token_map, encode_pair


def _model(tok, arch: str, seed: int):
    cfg = tiny_config(arch, len(tok), pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    return build_model(cfg, seed=seed)


def _run(batches, engine, score, student, objective, steps: int) -> float:
    """Median seconds per step over `steps` steps (after one warm-up step)."""
    opt = torch.optim.AdamW([*student.parameters(), *objective.parameters()], lr=1e-3)
    times = []
    for i in range(steps + 1):
        batch = batches[i % len(batches)]
        start = time.perf_counter()
        tb = score(batch).to_torch()
        out = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"].long())
        loss = objective.weighted_total(objective(out, tb)) / max(int(batch["loss_mask"].sum()), 1)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--examples", type=int, default=128)
    ap.add_argument("--teacher-vocab", type=int, default=512)
    ap.add_argument("--student-vocab", type=int, default=400)
    ap.add_argument("--topk", type=int, default=16)
    ap.add_argument("--max-length", type=int, default=128)
    args = ap.parse_args()
    torch.manual_seed(0)

    t_tok = train_tokenizer(task_corpus(0), args.teacher_vocab)
    s_tok = train_tokenizer(task_corpus(1), args.student_vocab)
    examples = list(
        build_task_dataset(["shopping", "travel", "baking", "garden"], [1, 2], args.examples, 0, 0)["train"]
    )

    start = time.perf_counter()
    same_rows = [encode_example(t_tok, ex, args.max_length) for ex in examples]
    same_encode = (time.perf_counter() - start) / len(examples)
    start = time.perf_counter()
    token_map = build_token_map(t_tok, s_tok)
    map_seconds = time.perf_counter() - start
    start = time.perf_counter()
    cross_rows = [encode_pair(s_tok, t_tok, ex, args.max_length) for ex in examples]
    cross_encode = (time.perf_counter() - start) / len(examples)

    def batches(rows, pad_id):
        return [
            pad_batch(rows[i : i + args.batch], pad_id)
            for i in range(0, len(rows) - args.batch + 1, args.batch)
        ]

    same_batches, cross_batches = (
        batches(same_rows, t_tok.pad_token_id),
        batches(cross_rows, s_tok.pad_token_id),
    )
    chars = sum(int(b["target_chars"][b["loss_mask"]].sum()) for b in cross_batches) / len(cross_batches)

    engine = TeacherEngine(_model(t_tok, "tiny_deepseek_v3", 1), topk=args.topk)
    kd = [TermSpec("forward_kl", "forward_kl", 1.0), TermSpec("ce", "ce", 0.5)]
    same_obj = Objective(kd, temperature=1.0, chunk_size=0)
    cross_obj = Objective(
        [*kd, TermSpec("uld", "uld", 1.0)], temperature=1.0, chunk_size=0, cross_tokenizer=True
    )
    xteacher = CrossTokenizerTeacher(engine, token_map.padded(engine.vocab_size))

    def same_score(b):
        return engine.score((0, 0), b["input_ids"], b["attention_mask"], b["loss_mask"])

    same_step = _run(same_batches, engine, same_score, _model(t_tok, "tiny_qwen2", 2), same_obj, args.steps)
    cross_step = _run(
        cross_batches,
        engine,
        lambda b: xteacher.score((0, 0), b),
        _model(s_tok, "tiny_qwen2", 2),
        cross_obj,
        args.steps,
    )
    # Per-step cost including the encoding of the step's examples (paid once per example per run).
    same_total = same_step + same_encode * args.batch
    cross_total = cross_step + cross_encode * args.batch
    ratio = (chars / cross_total) / (chars / same_total)
    print(
        f"token map ({len(t_tok)} -> {len(s_tok)} tokens): {map_seconds * 1e3:.1f} ms once, {token_map.counts()}"
    )
    print(f"encode per example: same {same_encode * 1e3:.2f} ms, cross {cross_encode * 1e3:.2f} ms")
    print(
        f"step (batch {args.batch}, median of {args.steps}): same {same_step * 1e3:.1f} ms, cross {cross_step * 1e3:.1f} ms"
    )
    print(f"chars/s incl. encoding: same {chars / same_total:,.0f}, cross {chars / cross_total:,.0f}")
    print(f"throughput ratio cross/same = {ratio:.3f}  (overhead {100 * (1 / ratio - 1):.1f}%)")


if __name__ == "__main__":
    main()
