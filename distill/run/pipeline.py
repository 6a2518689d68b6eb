"""The one run path: validate once, build the parts once, train on the backend `cluster.mode` names, then
export, evaluate and report the same way whichever backend trained.

Run folder: config.yaml (resolved), stages.json, metrics.jsonl, student/ (Hugging Face folder), eval.json,
report.md + plots; the Ray backend adds checkpoints/ and online_stats.json.
"""

from __future__ import annotations

import importlib
import json
import logging
from pathlib import Path
from typing import Any, Protocol

from distill.config import resolved_yaml
from distill.data.build import build_data
from distill.data.routing import Router, routed_encoder
from distill.errors import ConfigError
from distill.eval.runs import (
    evaluate,
    evaluate_increments,
    generation_stop_id,
    run_memory_peaks,
    write_run_report,
    write_stages,
)
from distill.export import ExportFormat, get_format
from distill.export.pipeline import export_student, scored_once
from distill.io import atomic_write_json, atomic_write_text
from distill.models.loading import load_tokenizer
from distill.models.resolve import model_facts, pair_facts, require_teacher, student_tokenizer
from distill.run.cache import open_run_cache
from distill.run.teachers import SetMember, pair_member, prepare_teacher_set
from distill.run.validate import validate_run
from distill.teacher.teacher_set import use_primary_teacher, validate_teacher_set
from distill.tracking.metrics_log import MetricsLog
from distill.tracking.wandb_log import open_wandb
from distill.training.build import continual_run, run_stream
from distill.training.modes import ChainedHooks, PeriodicEval, StepHooks
from distill.training.parts import RunParts, Trained
from distill.xtok.build import row_encoder

log = logging.getLogger("distill")

# cluster.mode -> "module:class" of its backend, imported on use (Ray and DeepSpeed load only for `ray`).
BACKENDS = {"local": "distill.run.local:LocalBackend", "ray": "distill.cluster.backend:RayBackend"}


class Backend(Protocol):
    def snapshot(self, name: str) -> Any:
        """The current student as a model in this process (the Ray ranks export it to run_dir/<name> first)."""

    def train(self, mode: StepHooks, metrics: MetricsLog) -> Trained:
        """Train cfg.train.steps optimizer steps (from a checkpoint on resume), export the student."""


def prepare(cfg) -> RunParts:
    """Everything the backends share, validated and built once; writes config.yaml and stages.json."""
    use_primary_teacher(cfg)  # several teachers: `teacher` is the first of them
    validate_teacher_set(cfg)
    teacher_path = require_teacher(cfg)
    teacher_tokenizer = load_tokenizer(teacher_path)
    topology = validate_run(cfg, pair_facts(cfg, teacher_tokenizer))
    # With a token map the student trains on its own tokenizer; the teacher keeps its own (distill.xtok).
    tokenizer = student_tokenizer(cfg, teacher_tokenizer)
    members = prepare_teacher_set(cfg, tokenizer)
    data = build_data(cfg, _row_encoder(cfg, tokenizer, teacher_tokenizer, members))
    curriculum, stream = run_stream(cfg, data, tokenizer, topology.batches_per_step)
    # A foreign or short teacher cache fails here, before any process starts.
    cache = open_run_cache(cfg, teacher_path, tokenizer, stream, teacher_tokenizer)
    # Only now, with the data read and every check passed, is the run folder written: a bad input leaves an
    # existing run folder as it was.
    run_dir = _run_dir(cfg)
    atomic_write_text(run_dir / "config.yaml", resolved_yaml(cfg))
    write_stages(run_dir, curriculum)
    return RunParts(
        cfg=cfg,
        topology=topology,
        teacher_path=teacher_path,
        teacher_tokenizer=teacher_tokenizer,
        tokenizer=tokenizer,
        teacher_hidden_size=model_facts(cfg.teacher, len(teacher_tokenizer)).hidden_size,
        data=data,
        curriculum=curriculum,
        stream=stream,
        cache_identity=cache,
        teachers=members,
    )


def _row_encoder(cfg, tokenizer, teacher_tokenizer, members: list[SetMember] | None):
    """Examples -> rows; with several teachers each row also names its teacher (routing), and carries the
    alignment to the tokenizer of the teachers with a token map, if any."""
    if members is None:
        return row_encoder(cfg, tokenizer, teacher_tokenizer)
    mapped = pair_member(members)
    encode = row_encoder(mapped.view, tokenizer, mapped.tokenizer) if mapped else row_encoder(cfg, tokenizer)
    return routed_encoder(encode, Router([m.name for m in members], cfg.routing, cfg.data.subsets))


def _run_dir(cfg) -> Path:
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


def run(cfg, *, hooks=None) -> dict:
    """Validate, train on the configured backend, export, evaluate, report. Returns the eval summary.

    hooks: the Ray driver's failure-injection and stop points (`distill.cluster.driver.Hooks`; tests, drills).
    """
    parts = prepare(cfg)
    exports = [get_format(name) for name in cfg.export.formats]  # a misspelt format fails before training
    backend = make_backend(parts, hooks)
    wandb = open_wandb(cfg, parts.run_dir)  # a background thread; a no-op unless tracking.wandb
    with MetricsLog(parts.run_dir / "metrics.jsonl", mirror=wandb.log) as metrics:
        mode = mode_hooks(parts, backend, metrics)
        trained = backend.train(mode, metrics)
    summary = evaluate(cfg, trained.student, parts.tokenizer, parts.data, trained.teacher)
    summary.update(run_memory_peaks(parts.run_dir))  # mem/<role>/..._mib: each process's peak while training
    summary.update(parts.data.counts)  # data/...: rows the data rules skipped, dropped or cut (build_data)
    atomic_write_json(parts.run_dir / "eval.json", summary)
    report = write_run_report(cfg, summary, mode.matrices())
    if exports:
        export_at_end(cfg, parts, trained, exports, report)
    wandb.finish({f"eval/{k}": v for k, v in summary.items() if isinstance(v, int | float)})
    log.info("eval %s", json.dumps(summary, sort_keys=True))
    return summary


def export_at_end(cfg, parts: RunParts, trained: Trained, formats: list[ExportFormat], report: Path) -> None:
    """`export.formats`: the trained student's deployment exports in <run_dir>/exports (or export.out_dir), each
    evaluated like the student itself (the same held-out batches and teacher outputs); the run's report gains
    their table."""
    out = Path(cfg.export.out_dir or parts.run_dir / "exports")
    teacher = scored_once(trained.teacher)
    evaluate_export = None
    if cfg.export.evaluate:

        def evaluate_export(model):
            return evaluate(cfg, model, parts.tokenizer, parts.data, teacher)

    table, _ = export_student(
        parts.run_dir / "student", formats, out, evaluate_export, generation_stop_id(parts.tokenizer)
    )
    atomic_write_text(report, report.read_text() + f"\n## Deployment exports ({out})\n\n{table}\n")


def make_backend(parts: RunParts, hooks=None) -> Backend:
    mode = parts.cfg.cluster.mode
    if mode not in BACKENDS:
        raise ConfigError(f"cluster.mode={mode!r} is not one of {sorted(BACKENDS)}.")
    module, name = BACKENDS[mode].split(":")
    return getattr(importlib.import_module(module), name)(parts, hooks=hooks)


def mode_hooks(parts: RunParts, backend: Backend, metrics: MetricsLog) -> StepHooks:
    """The run mode's step hooks (continual: replay and increment evaluations) and periodic evaluation."""
    cfg = parts.cfg
    hooks: list[StepHooks] = []
    if cfg.mode == "continual":
        continual = None

        def evaluate_increment(i: int) -> dict:
            model = backend.snapshot(f"increments/{i:02d}-{continual.increments[i]}")
            return evaluate_increments(cfg, model, parts.tokenizer, parts.data, continual.increments)

        # Its own stream object: the Ray backend's producer thread reads the run's.
        continual = continual_run(
            cfg,
            parts.curriculum,
            parts.stream.copy(),
            parts.tokenizer,
            parts.topology.batches_per_step,
            evaluate=evaluate_increment,
        )
        hooks.append(continual)
    if cfg.train.eval_every:
        hooks.append(
            PeriodicEval(
                cfg.train.eval_every,
                # Held-out CE, perplexity and token accuracy; no generation and no teacher in this process.
                evaluate=lambda: evaluate(
                    cfg, backend.snapshot("eval_student"), parts.tokenizer, parts.data, generate_examples=0
                ),
                write=metrics.write,
            )
        )
    return ChainedHooks(*hooks) if len(hooks) != 1 else hooks[0]
