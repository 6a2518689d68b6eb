"""cluster.mode=local: the single-process reference backend. The teacher scores each micro-batch just before
its step (or an offline cache supplies it), a plain torch optimizer steps the student; every distributed result
is tested against this path."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator

import torch
from tqdm.auto import tqdm

from distill.batch import BatchId
from distill.data.batching import pad_batch
from distill.errors import ConfigError
from distill.eval.runs import generation_stop_id, run_heldout_batches
from distill.models.loading import save_model
from distill.models.resolve import build_student
from distill.run.cache import CachedTeacher
from distill.teacher.build import build_teacher_engine
from distill.teacher.teacher_set import TeacherSet, static_weights
from distill.tracking.memory import measure
from distill.tracking.metrics_log import MetricsLog
from distill.tracking.rates import RateMeter
from distill.training.build import build_objective, build_reference_trainer, lr_schedule, share_interval
from distill.training.modes import StepHooks
from distill.training.onpolicy import Rollouts
from distill.training.parts import RunParts, Trained
from distill.training.reference import run_steps
from distill.xtok.build import batch_scorer
from distill.xtok.rollout import written_pairs

log = logging.getLogger("distill")


class LocalBackend:
    def __init__(self, parts: RunParts, *, hooks=None) -> None:
        if hooks is not None:
            raise ConfigError(
                "driver hooks (failure injection, stops) need the Ray backend (cluster.mode=ray)."
            )
        cfg = self.cfg = parts.cfg
        if cfg.resume or cfg.checkpoint.every_steps:
            raise ConfigError(
                "resume / checkpoint.every_steps need the distributed path (cluster.mode=ray, e.g. cluster=local_ray); "
                "the single-process reference trainer runs start to finish. Unset them or pick a Ray cluster config."
            )
        self.parts = parts
        torch.manual_seed(cfg.train.seed)
        self.student = build_student(cfg, parts.tokenizer)
        self.objective = build_objective(cfg, self.student, parts.teacher_hidden_size)
        self.engine = build_teacher_engine(
            cfg,
            parts.teacher_path,
            hidden_layers=self.objective.teacher_hidden_layers,
            attention_layers=self.objective.teacher_attention_layers,
        )
        self.teacher_rates: dict[str, RateMeter] = {}  # several teachers: each one's own throughput
        self.teacher_set = self._teacher_set()

    def snapshot(self, name: str):
        return self.student  # the weights being trained, in this process

    def train(self, mode: StepHooks, metrics: MetricsLog) -> Trained:
        cfg, parts = self.cfg, self.parts
        trainer = build_reference_trainer(
            self.student,
            self.objective,
            cfg.optim,
            cfg.train.steps,
            schedule=lr_schedule(cfg, parts.curriculum),
            share_every=share_interval(cfg),
        )
        scored: dict[BatchId, object] = {}  # this step's TeacherBatches, for the ones the mode keeps
        teacher_rate = RateMeter()
        teacher_fn = self._teacher_fn(mode, scored, teacher_rate)
        rollouts = self._rollouts()
        bar = tqdm(
            total=cfg.train.steps, desc="distill", disable=not cfg.tracking.progress, dynamic_ncols=True
        )

        def on_step(m):
            bar.update(1)
            bar.set_postfix(loss=f"{m.loss:.4f}", stage=m.plan.stage, refresh=False)
            if (record := m.plan.transition()) is not None:
                log.info("curriculum transition %s", json.dumps(record, sort_keys=True))
            mode.after_commit(m.step, [scored[b] for b in mode.kept_batches(m.step)])
            scored.clear()
            if (m.step + 1) % cfg.train.log_every == 0 or m.step + 1 == cfg.train.steps:
                record = m.as_record()
                record["student/tokens_per_s"] = record["tokens_per_s"]
                record["teacher/tokens_per_s"] = teacher_rate.take()
                record["buffer/depth"] = 0  # no buffer: the teacher scores each batch just before its step
                record.update(measure().metrics("trainer"))  # one process: student, teacher and data
                if rollouts is not None:
                    record.update(rollouts.stats.take())
                for name, rate in self.teacher_rates.items():
                    record[f"teacher/{name}/tokens"] = float(rate.tokens)  # read before take() resets it
                    record[f"teacher/{name}/tokens_per_s"] = rate.take()
                metrics.write(record)

        run_steps(
            trainer,
            stepped_batches(parts.stream, mode, parts.topology.batches_per_step),
            teacher_fn,
            start_step=0,
            steps=cfg.train.steps,
            accum=cfg.cluster.grad_accum_steps,
            on_step=on_step,
            plans=parts.curriculum.plan,
            teacher_every_step=mode.needs_teacher,
            rollout=rollouts,
        )
        bar.close()
        student = self.student
        if cfg.student.lora.enabled:  # adapters folded in, so student/ is a plain HF folder
            from distill.models.lora import merge_for_export  # peft is an optional extra: LoRA runs only

            student = merge_for_export(student)
        save_model(student, parts.tokenizer, parts.run_dir / "student")
        return Trained(student, self._heldout_teacher())

    def _rollouts(self) -> Rollouts | None:
        """The student's own batches on on-policy stages; None when no stage is on-policy."""
        if not any(stage.on_policy is not None for stage in self.parts.curriculum.stages):
            return None
        parts, tok = self.parts, self.parts.tokenizer
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        # A reply ends where evaluation's greedy decoding stops (<|im_end|> for chat rows), not at the eos.
        stop = generation_stop_id(tok)
        reencode = None
        if self.cfg.teacher.token_map.enabled:  # the student's text, encoded again for both tokenizers
            stream = parts.stream.copy()

            def reencode(batch_id, completions):
                examples = [row["example"] for _, row in stream.rows(stream.position_of(batch_id))]
                rows = written_pairs(
                    tok,
                    parts.teacher_tokenizer,
                    examples,
                    completions,
                    stop_id=stop,
                    max_length=self.cfg.data.max_length,
                )
                return pad_batch(rows, pad)

        return Rollouts(self.student, seed=self.cfg.train.seed, eos_id=stop, pad_id=pad, reencode=reencode)

    def _teacher_set(self) -> TeacherSet | None:
        """Several teachers: one engine each (the primary's is `self.engine`), each scoring its rows in the
        student's vocabulary, combined per batch; None with one teacher."""
        members = self.parts.teachers
        if members is None:
            return None
        scorers = []
        self.teacher_rates = {m.name: RateMeter() for m in members}
        for i, m in enumerate(members):
            engine = self.engine if i == 0 else build_teacher_engine(m.view, m.path)
            score = batch_scorer(m.view, engine, m.tokenizer, self.parts.tokenizer)
            scorers.append(_timed(score, self.teacher_rates[m.name]))
        names = [m.name for m in members]
        weights, weighting = static_weights(self.cfg), self.cfg.ensemble.weighting
        return TeacherSet(names, scorers, weights, weighting, stage_teachers=self.parts.stage_teachers)

    def _heldout_teacher(self):
        """The teacher's side of the evaluation: the offline cache's held-out batches, or this process's engine
        (the reference path has the teacher here anyway); None across tokenizers."""
        cfg, parts = self.cfg, self.parts
        if self.teacher_set is not None:  # the routed / mixed teacher, in the student's vocabulary
            return lambda batch_id, batch: self.teacher_set.score(batch_id, batch).to_torch()
        if cfg.teacher.token_map.enabled:
            return None
        if cfg.teacher.cache:
            cached = CachedTeacher(cfg.teacher.cache, parts.cache_identity)
            heldout = run_heldout_batches(cfg, parts.tokenizer, parts.data)
            if not all(cached.reader.has(batch_id) for batch_id, _ in heldout):
                log.warning(
                    "teacher cache %s holds no held-out batches (written before distill teacher-cache scored them, "
                    "or with other eval.* settings): eval.json has no agreement or KL",
                    cfg.teacher.cache,
                )
                return None
            return cached
        return lambda batch_id, batch: self.engine.score_batch(batch_id, batch).to_torch()

    def _teacher_fn(self, mode: StepHooks, scored: dict, rate: RateMeter):
        """(batch_id, batch) -> teacher tensors: the offline cache, or the engine (kept in `scored` for the
        mode); None when no step needs the teacher."""
        cfg, parts = self.cfg, self.parts
        if self.objective.needs_teacher and cfg.teacher.cache:
            fn = CachedTeacher(cfg.teacher.cache, parts.cache_identity)
        elif self.objective.needs_teacher or mode.needs_teacher:
            if self.teacher_set is not None:
                score = self.teacher_set.score
            else:
                score = batch_scorer(cfg, self.engine, parts.teacher_tokenizer, parts.tokenizer)

            def fn(batch_id, batch):
                scored[tuple(batch_id)] = teacher_batch = score(batch_id, batch)
                return teacher_batch.to_torch()

        else:
            return None
        return _timed(fn, rate)


def stepped_batches(stream, mode: StepHooks, per_step: int) -> Iterator[tuple[BatchId, dict]]:
    """Every position of the stream in order: the stream's batches, and the mode's stored batches (teacher
    outputs included, e.g. continual replay) in their places."""
    for position in range(stream.end):
        batch_id = stream.batch_id(position)
        stored = dict(mode.stored_batches(position // per_step))
        yield batch_id, (stored[batch_id].to_torch() if batch_id in stored else stream.batch(*batch_id))


def _timed(teacher_fn, rate: RateMeter):
    """teacher_fn that adds its scored tokens (loss-mask positions) and seconds to `rate`."""

    def timed(batch_id, batch):
        start = time.perf_counter()
        out = teacher_fn(batch_id, batch)
        rate.add(int(batch["loss_mask"].sum()), time.perf_counter() - start)
        return out

    return timed
