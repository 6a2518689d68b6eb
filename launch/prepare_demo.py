"""`distill prepare-demo`: train the local tokenizer and the tiny DeepSeek-V3 teacher on the embedded task.

A teacher at a production vocabulary (teacher=tiny_r1_vocab) trains on its real tokenizer instead of a local one.

Cached by everything that shapes the teacher (see `distill.models.resolve.demo_teacher_dir`): a second call is instant.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from datasets import DatasetDict
from omegaconf import DictConfig
from tqdm.auto import tqdm

from distill.data import DOMAINS, build_task_dataset, encode_example
from distill.data.build import RunData, batch_stream
from distill.errors import ConfigError
from distill.eval.runs import evaluate
from distill.io import atomic_dir, atomic_write_json, build_lock, cached_dir
from distill.models.loading import load_causal_lm, load_tokenizer, load_tokenizer_folder, save_model
from distill.models.resolve import demo_student_tokenizer_dir, demo_teacher_dir, demo_teacher_tokenizer_dir
from distill.models.tiny import TINY_ARCHS, build_model, tiny_config
from distill.models.tokenizer import task_corpus, train_tokenizer
from distill.training.build import build_reference_trainer
from distill.training.objective import Objective, TermSpec
from distill.training.reference import run_steps
from launch.app import hydra_app

log = logging.getLogger("distill.prepare")
EVAL_FILE = "task_eval.json"


def prepare_demo(cfg: DictConfig) -> dict:
    """Return the teacher's held-out metrics, training and caching the teacher first if needed."""
    if cfg.teacher.arch not in TINY_ARCHS or cfg.teacher.path:
        raise ConfigError(
            f"prepare-demo trains a tiny teacher; teacher={cfg.teacher.name} is not one of {TINY_ARCHS}."
        )
    teacher_domains(cfg.prepare)  # an unknown domain fails before anything is trained
    out = demo_teacher_dir(cfg)
    with build_lock(out):
        return _prepare_locked(cfg, out)


def _prepare_locked(cfg: DictConfig, out: Path) -> dict:
    if cfg.prepare.student_vocab_size:
        prepare_student_tokenizer(cfg)
    if (out / EVAL_FILE).is_file() and not cfg.prepare.force:
        summary = json.loads((out / EVAL_FILE).read_text())
        print(f"cached teacher: {out}\n{_describe(summary)}")
        return summary
    teacher, tokenizer, summary = _train_teacher(cfg)

    def fill(tmp: Path) -> None:
        save_model(teacher, tokenizer, tmp)
        atomic_write_json(tmp / EVAL_FILE, summary)

    atomic_dir(out, fill)
    # Reload once: the cache is only trusted if transformers can load what was written.
    load_causal_lm(out)
    load_tokenizer(out)
    print(f"teacher saved: {out}\n{_describe(summary)}")
    return summary


def _train_teacher(cfg: DictConfig):
    """A local tokenizer (or the teacher arch's real one) and the tiny teacher trained with CE on the embedded
    task; its held-out metrics."""
    p = cfg.prepare
    real = demo_teacher_tokenizer_dir(cfg)
    tokenizer = load_tokenizer_folder(real) if real else train_tokenizer(task_corpus(p.seed), p.vocab_size)
    data = teacher_task_dataset(p)
    rows = [encode_example(tokenizer, ex, cfg.data.max_length) for ex in data["train"]]
    heldout = [encode_example(tokenizer, ex, cfg.data.max_length) for ex in data["eval"]]

    torch.manual_seed(p.seed)
    config = tiny_config(
        cfg.teacher.arch,
        len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        **dict(p.teacher_arch_overrides),
    )
    teacher = build_model(config, seed=p.seed)
    objective = Objective([TermSpec("ce", "ce", 1.0)], temperature=1.0, chunk_size=cfg.loss.chunk_size)
    trainer = build_reference_trainer(teacher, objective, cfg.optim, p.teacher_steps, lr=p.teacher_lr)
    stream = batch_stream(cfg, rows, tokenizer, batch_size=p.teacher_batch_size)
    n_params = sum(x.numel() for x in teacher.parameters())
    print(
        f"training the {cfg.teacher.arch} teacher ({n_params / 1e6:.2f}M params) for {p.teacher_steps} steps"
    )
    bar = tqdm(total=p.teacher_steps, desc="teacher", disable=not cfg.tracking.progress, dynamic_ncols=True)

    def on_step(m):
        bar.update(1)
        bar.set_postfix(ce=f"{m.loss:.3f}", refresh=False)

    run_steps(trainer, stream.forever(), None, start_step=0, steps=p.teacher_steps, accum=1, on_step=on_step)
    bar.close()
    held = RunData(rows, heldout, list(data["eval"]))
    return teacher, tokenizer, evaluate(cfg, teacher, tokenizer, held, generate_examples=p.eval_examples)


def teacher_domains(p: DictConfig) -> list[str]:
    """The embedded-task domains the teacher trains and is evaluated on (`prepare.teacher_domains`; None: all), in
    DOMAINS order, so the same set in any order trains the same teacher (and shares its cache key)."""
    if p.teacher_domains is None:
        return list(DOMAINS)
    wanted = list(p.teacher_domains)
    unknown = [d for d in wanted if d not in DOMAINS]
    if unknown or not wanted:
        raise ConfigError(
            f"prepare.teacher_domains={wanted}: {'unknown ' + str(unknown) if unknown else 'empty'}; "
            f"name some of the embedded task's domains {list(DOMAINS)}, or null for all of them."
        )
    return [d for d in DOMAINS if d in wanted]


def teacher_task_dataset(p: DictConfig) -> DatasetDict:
    """The teacher's train and held-out splits: `teacher_domains(p)` x `p.teacher_levels`. The tokenizer is not
    drawn from these (it trains on every domain, `task_corpus(p.seed)`), so experts on different domains share it."""
    return build_task_dataset(
        teacher_domains(p), list(p.teacher_levels), p.teacher_train_size, p.eval_examples, p.seed
    )


def prepare_student_tokenizer(cfg: DictConfig) -> Path:
    """The cross-tokenizer demo's second tokenizer: another corpus sample (seed + 1) and vocabulary size,
    so its merges differ from the teacher's. Cached; pass its folder as student.tokenizer."""
    p = cfg.prepare
    out = demo_student_tokenizer_dir(cfg)
    cached_dir(
        out,
        "tokenizer.json",
        lambda tmp: train_tokenizer(task_corpus(p.seed + 1), p.student_vocab_size).save_pretrained(str(tmp)),
        rebuild=p.force,
    )
    print(f"student tokenizer ({p.student_vocab_size} tokens): {out}")
    return out


def _describe(summary: dict) -> str:
    em = summary.get("exact_match")
    em_text = f", held-out exact-match {em:.1%}" if em is not None else ""
    return f"teacher held-out CE {summary['ce']:.4f} nats/token{em_text}"


@hydra_app
def main(cfg: DictConfig) -> None:
    prepare_demo(cfg)
