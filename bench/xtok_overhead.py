"""Throughput of cross-tokenizer KD against same-tokenizer KD on the same data.

    python bench/xtok_overhead.py                      # tiny DeepSeek-V3 teacher, tiny Qwen2 student
    python bench/xtok_overhead.py --steps 20 --batch 16 --teacher-vocab 2048 --student-vocab 1536

Every path does the same work per step: teacher forward -> top-k -> student forward/backward -> AdamW step, on the
same conversations, with the same architectures (random weights: speed does not depend on training).

  cross       the student on its own tokenizer, the teacher on its own; rows carry the alignment (`encode_pair`),
              the teacher's top-k is projected into the student's positions and vocabulary
              (`CrossTokenizerTeacher`), `loss=kd_xtok` (adds the uld term).
  same (S)    teacher and student both on the STUDENT's tokenizer, `loss=kd`: the student does exactly the
              cross path's work; only the teacher's tokenization and the map / alignment differ.
  same (T)    both on the TEACHER's tokenizer, `loss=kd`: the student also trains on other (here fewer) tokens.

Throughput is in characters per second (the tokenizers cut the same text into different token counts, so
characters are the fair unit), encoding included (paid once per example per run, charged to every step here).
The map-and-alignment share is measured directly: extra encoding per example (alignment) + top-k projection +
the uld term, as a share of the cross path's step. Aim: <= 20%. Medians over interleaved rounds; run on an idle
machine (2 shared cores are noisy).
"""

from __future__ import annotations

import argparse
import statistics
import time
from types import SimpleNamespace

import torch

from distill.data import build_task_dataset, encode_example, pad_batch
from distill.models.tiny import build_model, tiny_config
from distill.models.tokenizer import task_corpus, train_tokenizer
from distill.teacher.engine import TeacherEngine
from distill.training.objective import Objective, TermSpec
from distill.xtok import CrossTokenizerTeacher, build_token_map, encode_pair
from distill.xtok.teacher import project_topk

KD = [TermSpec("forward_kl", "forward_kl", 1.0), TermSpec("ce", "ce", 0.5)]


def _model(tok, arch: str, seed: int):
    cfg = tiny_config(arch, len(tok), pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    return build_model(cfg, seed=seed)


class TrainPath:
    """One way of training: its micro-batches, teacher scorer, student, objective and optimizer."""

    def __init__(self, batches, score, student, objective) -> None:
        self.batches, self.score, self.student, self.objective = batches, score, student, objective
        self.opt = torch.optim.AdamW([*student.parameters(), *objective.parameters()], lr=1e-3)
        self.times: list[float] = []
        self.i = 0

    def run(self, steps: int, record: bool = True) -> None:
        for _ in range(steps):
            batch = self.batches[self.i % len(self.batches)]
            self.i += 1
            start = time.perf_counter()
            tb = self.score(batch).to_torch()
            out = self.student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"].long())
            sums = self.objective(out, tb)
            loss = self.objective.weighted_total(sums) / max(int(batch["loss_mask"].sum()), 1)
            loss.backward()
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)
            if record:
                self.times.append(time.perf_counter() - start)

    @property
    def step(self) -> float:
        return statistics.median(self.times)


def _median_ms(fn, n: int = 20) -> float:
    times = []
    for _ in range(n):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def _encode(fn, examples) -> tuple[list[dict], float]:
    start = time.perf_counter()
    rows = [fn(ex) for ex in examples]
    return rows, (time.perf_counter() - start) / len(examples)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=8, help="timed steps per path per round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--examples", type=int, default=128)
    ap.add_argument("--teacher-vocab", type=int, default=512)
    ap.add_argument("--student-vocab", type=int, default=400)
    ap.add_argument("--topk", type=int, default=16)
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (the student actor's CPU share)")
    args = ap.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)

    t_tok = train_tokenizer(task_corpus(0), args.teacher_vocab)
    s_tok = train_tokenizer(task_corpus(1), args.student_vocab)
    examples = list(
        build_task_dataset(["shopping", "travel", "baking", "garden"], [1, 2], args.examples, 0, 0)["train"]
    )
    start = time.perf_counter()
    token_map = build_token_map(t_tok, s_tok)
    map_seconds = time.perf_counter() - start
    same_t_rows, enc_t = _encode(lambda ex: encode_example(t_tok, ex, args.max_length), examples)
    same_s_rows, enc_s = _encode(lambda ex: encode_example(s_tok, ex, args.max_length), examples)
    encode_pair(s_tok, t_tok, examples[0], args.max_length)  # the per-tokenizer vocabulary tables, once
    cross_rows, enc_x = _encode(lambda ex: encode_pair(s_tok, t_tok, ex, args.max_length), examples)

    def batches(rows, pad_id):
        n = len(rows) - args.batch + 1
        return [pad_batch(rows[i : i + args.batch], pad_id) for i in range(0, n, args.batch)]

    cross_batches = batches(cross_rows, s_tok.pad_token_id)
    chars = sum(int(b["target_chars"][b["loss_mask"]].sum()) for b in cross_batches) / len(cross_batches)

    def scorer(engine):
        return lambda b: engine.score((0, 0), b["input_ids"], b["attention_mask"], b["loss_mask"])

    teacher_t = TeacherEngine(_model(t_tok, "tiny_deepseek_v3", 1), topk=args.topk)
    teacher_s = TeacherEngine(_model(s_tok, "tiny_deepseek_v3", 1), topk=args.topk)
    xteacher = CrossTokenizerTeacher(teacher_t, token_map.ids)
    uld_obj = Objective(
        [*KD, TermSpec("uld", "uld", 1.0)], temperature=1.0, chunk_size=0, cross_tokenizer=True
    )
    paths = {
        "cross": TrainPath(
            cross_batches, lambda b: xteacher.score((0, 0), b), _model(s_tok, "tiny_qwen2", 2), uld_obj
        ),
        "same (S)": TrainPath(
            batches(same_s_rows, s_tok.pad_token_id),
            scorer(teacher_s),
            _model(s_tok, "tiny_qwen2", 2),
            Objective(KD, temperature=1.0, chunk_size=0),
        ),
        "same (T)": TrainPath(
            batches(same_t_rows, t_tok.pad_token_id),
            scorer(teacher_t),
            _model(t_tok, "tiny_qwen2", 2),
            Objective(KD, temperature=1.0, chunk_size=0),
        ),
    }
    for p in paths.values():
        p.run(1, record=False)  # warm-up
    for _ in range(args.rounds):
        for p in paths.values():
            p.run(args.steps)

    # The machinery alone, on the cross path's first batch: projection and the uld term.
    b = cross_batches[0]
    scored = teacher_t.score(
        (0, 0), b["teacher_input_ids"], b["teacher_attention_mask"], b["teacher_attention_mask"]
    )
    project_ms = _median_ms(
        lambda: project_topk(
            scored.tensor("topk_ids"),
            scored.tensor("topk_logits"),
            scored.tensor("log_normalizer"),
            b["align"],
            xteacher.table,
        )
    )
    student = paths["cross"].student
    tb = xteacher.score((0, 0), b).to_torch()
    logits = student(input_ids=b["input_ids"], attention_mask=b["attention_mask"].long()).logits.detach()
    logits.requires_grad_(True)
    only_uld = Objective([TermSpec("uld", "uld", 1.0)], temperature=1.0, chunk_size=0, cross_tokenizer=True)

    out = SimpleNamespace(logits=logits)  # the objective reads `.logits` only for logit terms

    def uld_step() -> None:
        only_uld.weighted_total(only_uld(out, tb)).backward()

    uld_ms = _median_ms(uld_step)

    encode = {"cross": enc_x, "same (S)": enc_s, "same (T)": enc_t}
    total = {k: p.step + encode[k] * args.batch for k, p in paths.items()}
    rate = {k: chars / t for k, t in total.items()}
    machinery = (enc_x - enc_s) * args.batch * 1e3 + project_ms + uld_ms
    tokens = {
        "teacher": sum(len(r["input_ids"]) for r in same_t_rows) / len(examples),
        "student": sum(len(r["input_ids"]) for r in same_s_rows) / len(examples),
    }
    print(
        f"token map ({len(t_tok)} -> {len(s_tok)} tokens): {map_seconds * 1e3:.1f} ms once, {token_map.counts()}"
    )
    print(
        f"tokens per example: teacher tokenizer {tokens['teacher']:.1f}, student tokenizer {tokens['student']:.1f}"
    )
    print(
        "encode per example: "
        + ", ".join(f"{k} {v * 1e3:.2f} ms" for k, v in encode.items())
        + f" (alignment +{(enc_x - enc_s) * 1e3:.2f} ms)"
    )
    print(f"step (batch {args.batch}, median of {args.rounds}x{args.steps}, {args.threads} thread(s)):")
    for k, p in paths.items():
        print(f"  {k:9s} {p.step * 1e3:7.1f} ms   {rate[k]:9,.0f} chars/s incl. encoding")
    print(f"throughput ratio cross / same (S) = {rate['cross'] / rate['same (S)']:.3f}  (same student work)")
    print(
        f"throughput ratio cross / same (T) = {rate['cross'] / rate['same (T)']:.3f}  (student on other tokens)"
    )
    print(
        f"map + alignment per step: {machinery:.1f} ms = alignment {(enc_x - enc_s) * args.batch * 1e3:.1f} "
        f"+ projection {project_ms:.1f} + uld {uld_ms:.1f}; {100 * machinery / (total['cross'] * 1e3):.1f}% of "
        "the cross step (aim <= 20%)"
    )


if __name__ == "__main__":
    main()
