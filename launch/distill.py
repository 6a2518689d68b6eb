"""`distill`: one distillation run. Validates everything first, then trains, exports and evaluates.

Run folder: config.yaml (resolved), metrics.jsonl, student/ (Hugging Face folder), eval.json.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import torch
from omegaconf import DictConfig
from tqdm.auto import tqdm

from distill.config import resolved_yaml
from distill.config.validate import validate_run
from distill.errors import ConfigError
from distill.io import atomic_write_json, atomic_write_text
from distill.models.loading import load_tokenizer, save_model
from distill.models.lora import merge_for_export
from distill.tracking.metrics_log import MetricsLog
from distill.tracking.rates import RateMeter
from distill.tracking.wandb_log import open_wandb
from distill.training.reference import run_steps
from launch import builders
from launch.app import hydra_app
from launch.teacher_cache import CachedTeacher

log = logging.getLogger("distill")


def run(cfg: DictConfig) -> dict:
    """Validate, train with the reference trainer, export the student, evaluate. Returns the eval summary."""
    run_dir = Path(cfg.run_dir)
    teacher_path = builders.require_teacher(cfg)
    tokenizer = load_tokenizer(teacher_path)
    validate_run(cfg, builders.pair_facts(cfg, tokenizer))
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(run_dir / "config.yaml", resolved_yaml(cfg))
    if cfg.cluster.mode == "ray":
        from launch.distributed import run_distributed  # Ray and DeepSpeed load only for distributed runs

        return run_distributed(cfg)

    if cfg.resume or cfg.checkpoint.every_steps:
        raise ConfigError(
            "resume / checkpoint.every_steps need the distributed path (cluster.mode=ray, e.g. cluster=local_ray); "
            "the single-process reference trainer runs start to finish. Unset them or pick a Ray cluster config."
        )
    # With a token map the student trains on its own tokenizer; the teacher keeps its own (distill.xtok).
    teacher_tokenizer, tokenizer = tokenizer, builders.student_tokenizer(cfg, tokenizer)
    torch.manual_seed(cfg.train.seed)
    student = builders.build_student(cfg, tokenizer)
    teacher_hidden = builders.model_facts(cfg.teacher, len(tokenizer)).hidden_size
    objective = builders.build_objective(cfg, student, teacher_hidden)
    engine = builders.build_teacher_engine(cfg, teacher_path, objective)
    data = builders.build_data(cfg, tokenizer, teacher_tokenizer)
    curriculum, stream = builders.run_stream(cfg, data, tokenizer)
    builders.write_stages(run_dir, curriculum)

    trainer = builders.build_reference_trainer(
        student, objective, cfg.optim, cfg.train.steps, schedule=builders.lr_schedule(cfg, curriculum)
    )
    continual = scored = None
    batches = stream.forever()
    if cfg.mode == "continual":
        continual = builders.continual_run(
            cfg,
            curriculum,
            stream,
            tokenizer,
            evaluate=lambda i: builders.evaluate_increments(cfg, student, tokenizer, data, continual),
        )
        batches = reference_continual_batches(stream, continual)
        scored = {}  # batch id -> TeacherBatch of the current step, offered to the replay buffer after it
    teacher_fn = None
    if objective.needs_teacher and cfg.teacher.cache:
        needed = cfg.train.steps * cfg.cluster.grad_accum_steps
        teacher_fn = CachedTeacher(cfg, teacher_path, tokenizer, needed, stream)
    elif objective.needs_teacher or continual is not None:
        score = builders.batch_scorer(cfg, engine, teacher_tokenizer, tokenizer)

        def teacher_fn(batch_id, batch):
            teacher_batch = score(batch_id, batch)
            if scored is not None:
                scored[tuple(batch_id)] = teacher_batch
            return teacher_batch.to_torch()

    teacher_rate = RateMeter()
    if teacher_fn is not None:
        teacher_fn = _timed(teacher_fn, teacher_rate)
    wandb = open_wandb(cfg, run_dir)  # a background thread; a no-op unless tracking.wandb
    bar = tqdm(total=cfg.train.steps, desc="distill", disable=not cfg.tracking.progress, dynamic_ncols=True)
    with MetricsLog(run_dir / "metrics.jsonl", mirror=wandb.log) as metrics:

        def on_step(m):
            bar.update(1)
            bar.set_postfix(loss=f"{m.loss:.4f}", stage=m.plan.stage, refresh=False)
            if (record := m.plan.transition()) is not None:
                log.info("curriculum transition %s", json.dumps(record, sort_keys=True))
            if continual is not None:
                continual.after_step(m.step, [scored.pop(b) for b in continual.new_data(m.step)])
            if (m.step + 1) % cfg.train.log_every == 0 or m.step + 1 == cfg.train.steps:
                record = m.as_record()
                record["student/tokens_per_s"] = record["tokens_per_s"]
                record["teacher/tokens_per_s"] = teacher_rate.take()
                record["buffer/depth"] = 0  # no buffer: the teacher scores each batch just before its step
                metrics.write(record)

        run_steps(
            trainer,
            batches,
            teacher_fn,
            start_step=0,
            steps=cfg.train.steps,
            accum=cfg.cluster.grad_accum_steps,
            on_step=on_step,
            plans=curriculum.plan,
            teacher_every_step=continual is not None,
        )
    bar.close()

    student = merge_for_export(student)  # LoRA: adapters folded in, so student/ is a plain HF folder
    save_model(student, tokenizer, run_dir / "student")
    # A cross-tokenizer teacher's logits are over another vocabulary: no KL/agreement to it at eval.
    teacher_logits = (
        None
        if cfg.teacher.token_map.enabled
        else lambda b: engine.logits(b["input_ids"], b["attention_mask"])
    )
    summary = builders.evaluate(cfg, student, tokenizer, data, teacher_logits)
    atomic_write_json(run_dir / "eval.json", summary)
    builders.write_run_report(cfg, summary, continual)
    wandb.finish({f"eval/{k}": v for k, v in summary.items() if isinstance(v, int | float)})
    log.info("eval %s", json.dumps(summary, sort_keys=True))
    return summary


def reference_continual_batches(stream, continual):
    """Every position of the stream in order: the teacher's batches, and replay batches (teacher outputs
    included, from the replay snapshot) in their places."""
    position = 0
    while position < stream.end:
        step = position // continual.per_step
        replay = dict(continual.replay_batches(step))
        for g in continual.positions(step):
            batch_id = stream.batch_id(g)
            yield batch_id, (replay[batch_id].to_torch() if batch_id in replay else stream.batch(*batch_id))
        position = (step + 1) * continual.per_step


def _timed(teacher_fn, rate: RateMeter):
    """teacher_fn that adds its scored tokens (loss-mask positions) and seconds to `rate`."""

    def timed(batch_id, batch):
        start = time.perf_counter()
        out = teacher_fn(batch_id, batch)
        rate.add(int(batch["loss_mask"].sum()), time.perf_counter() - start)
        return out

    return timed


@hydra_app
def main(cfg: DictConfig) -> float:
    summary = run(cfg)
    return summary["ce"]  # the sweep objective for Hydra multirun / optimizers
