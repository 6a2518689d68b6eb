"""cluster.mode=ray: the online distributed backend of `distill.run`.

Everything that can be checked without processes is checked first (ZeRO config, buffer capacity, a resume's
identity), then the live Ray cluster's resources (both groups planned before any actor starts), then the groups
are started: buffer shards, student ranks (loading in the background) and the teacher replicas. The driver loop
(`distill.cluster.driver.Driver`) trains; the ranks export the student to run_dir/student.

Run folder additions: checkpoints/step-N (see `CheckpointStore`), online_stats.json (consumption counts per
batch, restarts, buffer figures).
"""

from __future__ import annotations

import functools
import logging
import os
import signal
import threading
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from ray.exceptions import RayTaskError

from distill.cluster.buffer import Buffer
from distill.cluster.driver import Assignment, CheckpointStore, Driver, Hooks
from distill.cluster.placement import plan_nodes
from distill.cluster.rollout_group import OnPolicyFeed, RolloutGroup, RolloutSpec
from distill.cluster.runtime import (
    cache_group_from_config,
    connect,
    fetched_outputs,
    teacher_group_from_config,
)
from distill.cluster.student_group import FORWARDED_ENV, StudentGroup, StudentSpec
from distill.cluster.teacher_set_group import TeacherSetGroup
from distill.config import resolved_yaml
from distill.config.topology import check_capacity
from distill.eval.runs import generation_stop_id, run_heldout_batches, scored_outputs
from distill.io import atomic_write_json
from distill.models.fingerprint import model_fingerprint
from distill.models.loading import load_causal_lm, load_tokenizer_folder
from distill.models.resolve import build_student, student_tokenizer_folder
from distill.models.tokenizer import tokenizer_hash
from distill.student import build_ds_config
from distill.teacher.teacher_set import static_weights
from distill.tracking.metrics_log import MetricsLog
from distill.training.build import build_objective, lr_schedule, run_term_specs, share_interval
from distill.training.modes import StepHooks
from distill.training.objective import teacher_layers
from distill.training.parts import RunParts, Trained
from distill.training.reference import StepMetrics
from distill.xtok.build import token_table

log = logging.getLogger("distill")


class Preempted(SystemExit):
    """Raised after a stop signal's checkpoint: exits the process with code 75 (EX_TEMPFAIL), which
    slurm/distill.sbatch answers with a requeue; the requeued job resumes from `checkpoint`."""

    EXIT_CODE = 75

    def __init__(self, step: int, checkpoint: Path) -> None:
        super().__init__(self.EXIT_CODE)
        self.step, self.checkpoint = step, checkpoint


class StopOnSignal(Hooks):
    """SIGUSR1 (Slurm's `--signal` before a time limit or preemption): finish the current step, checkpoint and
    raise `Preempted`. The handler only sets a flag; the stop happens between steps, on the main thread."""

    def __init__(self, inner: Hooks | None = None, signals: tuple[int, ...] = (signal.SIGUSR1,)) -> None:
        self.inner, self.signals = inner or Hooks(), signals
        self.received: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopOnSignal:
        if threading.current_thread() is threading.main_thread():  # signal handlers live on the main thread
            for sig in self.signals:
                self._previous[sig] = signal.signal(sig, self._on_signal)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _on_signal(self, signum: int, frame) -> None:
        self.received = signum
        log.warning("signal %d: will checkpoint after the current step and stop", signum)

    def after_step(self, driver: Driver, step: int) -> None:
        self.inner.after_step(driver, step)
        if self.received is not None and step + 1 < driver.total_steps:
            committed, path = driver.stop_after()  # commits the step already sent, if any
            if committed >= driver.total_steps:
                return  # that was the last step: finish the run (export, eval) instead of requeueing
            log.warning("stopped after step %d; checkpoint %s (resume with resume=true)", committed - 1, path)
            raise Preempted(committed, path)


class RayBackend:
    """Teacher actor groups -> parameter-server buffer -> DeepSpeed student ranks, steered by the Driver.

    hooks: failure injection and stop points (`Hooks`; tests, chaos drills); SIGUSR1 stops after a checkpoint.
    """

    def __init__(self, parts: RunParts, *, hooks: Hooks | None = None) -> None:
        cfg, t = parts.cfg, parts.topology
        self.parts, self.cfg, self.hooks = parts, cfg, hooks
        self.per_shard = check_capacity(
            cfg.cluster.buffer_capacity, cfg.cluster.buffer_shards, t.batches_per_step
        )
        self.ds_config = build_ds_config(
            zero_stage=cfg.student.zero_stage,
            micro_batch_size=t.micro_batch_size,
            grad_accum_steps=t.grad_accum_steps,
            world_size=t.student_world_size,
            grad_clip=cfg.optim.grad_clip,
            precision=cfg.student.precision,
            offload_optimizer=cfg.student.offload_optimizer,
            global_batch_size=t.global_batch_size,
        )
        self.checkpoints = CheckpointStore(
            parts.run_dir / "checkpoints",
            keep=cfg.checkpoint.keep,
            identity=run_identity(cfg, parts.teacher_path, parts.tokenizer, parts.teachers),
            topology=asdict(t),
            fallback_to_previous=cfg.checkpoint.fallback_to_previous,
        )
        self.start = (
            self.checkpoints.resume_point() if cfg.resume else None
        )  # a foreign checkpoint fails here
        if cfg.resume and self.start is None:
            log.warning("resume=true but %s holds no checkpoint; starting from step 0", self.checkpoints.root)
        self.students: StudentGroup | None = None
        self.heldout_teacher = None  # the teacher's outputs for the held-out batches, scored before it stops

    def snapshot(self, name: str):
        """The ranks export the current weights to run_dir/<name>; this process loads them."""
        folder = self.students.export(self.parts.run_dir / name)
        return load_causal_lm(folder, dtype="float32")

    def train(self, mode: StepHooks, metrics: MetricsLog) -> Trained:
        with StopOnSignal(self.hooks) as hooks:
            self._train(mode, metrics, hooks)
        return Trained(load_causal_lm(self.parts.run_dir / "student", dtype="float32"), self.heldout_teacher)

    def _train(self, mode: StepHooks, metrics: MetricsLog, hooks: Hooks) -> None:
        parts, cfg, c = self.parts, self.cfg, self.cfg.cluster
        clock = time.perf_counter()
        connect(c)
        # The live cluster; raises before any actor. Several teachers: one group each, of the same layout.
        layouts = [m.view.cluster for m in parts.teachers] if parts.teachers else None
        teacher_nodes, student_nodes = plan_nodes(parts.topology, layouts)
        log.info("teachers on %s, students on %s", teacher_nodes, student_nodes)
        buffer = teachers = rollouts = None
        try:
            buffer = Buffer.create(
                shards=c.buffer_shards,
                capacity_per_shard=self.per_shard,
                batches_per_epoch=parts.stream.num_batches,
                max_bytes_per_shard=(c.buffer_capacity_bytes // c.buffer_shards) or None,
            )
            self.students = self._student_group(buffer, student_nodes)
            teachers = self._teacher_group()
            self.students.wait_ready()
            log.info("teacher and student actors ready in %.1f s", time.perf_counter() - clock)
            clock = time.perf_counter()
            rollouts = self._rollout_group()
            driver = self._driver(buffer, teachers, mode, metrics, hooks, rollouts)
            driver.run(self.start)
            log.info(
                "trained steps %d-%d in %.1f s",
                driver.first_step,
                cfg.train.steps,
                time.perf_counter() - clock,
            )
            self.students.export(parts.run_dir / "student")
            self.heldout_teacher = self._score_heldout(teachers)
            placement = {
                "teacher_nodes": teachers.actor_nodes(),
                "student_nodes": self.students.actor_nodes(),
            }
            atomic_write_json(parts.run_dir / "online_stats.json", {**driver.summary(), **placement})
        finally:
            for group in (teachers, self.students, buffer, rollouts):
                if group is not None:
                    group.shutdown()

    def _score_heldout(self, teachers):
        """The teacher's side of the evaluation, scored by its actors (or the cache's readers) before they stop,
        so the driver never loads the teacher: the held-out batches' TeacherBatches (top-k only, small)."""
        p, cfg = self.parts, self.cfg
        if cfg.teacher.token_map.enabled and p.teachers is None:
            return None  # another vocabulary: no agreement or KL against the student's
        heldout = run_heldout_batches(cfg, p.tokenizer, p.data)
        arrays = ((batch_id, {k: v.numpy() for k, v in b.items()}) for batch_id, b in heldout)
        try:
            return scored_outputs(fetched_outputs(teachers, arrays))
        except RayTaskError as err:  # a cache written before it scored held-out batches, or for other eval.*
            log.warning(
                "no teacher outputs for the held-out batches (%s): eval.json has no agreement or KL", err
            )
            return None

    def _student_group(self, buffer: Buffer, nodes: list[str]) -> StudentGroup:
        p, c = self.parts, self.cfg.cluster
        spec = student_spec(
            self.cfg,
            p.teacher_path,
            p.teacher_hidden_size,
            self.ds_config,
            lr_schedule(self.cfg, p.curriculum),
        )
        return StudentGroup(
            spec,
            buffer,
            nodes=nodes,
            cpus_per_actor=c.cpus_per_student_actor,
            gpus_per_actor=c.gpus_per_student_actor,
        )

    def _teacher_group(self):
        """The teacher replicas, or with `teacher.cache` the cache's readers (score once, train many)."""
        p = self.parts
        if p.cache_identity is not None:
            return cache_group_from_config(self.cfg, p.cache_identity)
        terms = run_term_specs(self.cfg)
        if p.teachers is not None:
            return self._teacher_set_group()
        return teacher_group_from_config(
            self.cfg,
            p.teacher_path,
            teacher_layers(terms, "hidden"),
            teacher_layers(terms, "attention"),
            token_table(self.cfg, p.teacher_tokenizer, p.tokenizer),
        )

    def _teacher_set_group(self) -> TeacherSetGroup:
        """Several teachers: one TeacherGroup each (its `replicas` / `tp` share, else cluster.teacher_*), placed
        in turn on what the groups before it left free (the plan `plan_nodes` checked), streamed as one."""
        p = self.parts
        groups, used = [], {}
        try:
            for m in p.teachers:
                table = token_table(m.view, m.tokenizer, p.tokenizer)
                group = teacher_group_from_config(
                    m.view, m.path, (), (), table, reserve_cpus=dict(used), name=f"teacher-{m.name}"
                )
                groups.append(group)
                for node, cpus in groups[-1].reserved_cpus().items():
                    used[node] = used.get(node, 0.0) + cpus
        except BaseException:
            for g in groups:
                g.shutdown()
            raise
        names = [m.name for m in p.teachers]
        weights, weighting = static_weights(self.cfg), self.cfg.ensemble.weighting
        return TeacherSetGroup(names, groups, weights, weighting, stage_teachers=p.stage_teachers)

    def _rollout_group(self) -> RolloutGroup | None:
        """On-policy stages: the rollout actors (copies of the student); None when every stage is off-policy."""
        p, c = self.parts, self.cfg.cluster
        if not any(stage.on_policy is not None for stage in p.curriculum.stages):
            return None
        tok = p.tokenizer
        mapped = self.cfg.teacher.token_map.enabled  # the teacher's folder holds its tokenizer
        spec = RolloutSpec(
            student=self.students.spec,
            seed=self.cfg.train.seed,
            eos_id=generation_stop_id(tok),
            pad_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id,
            teacher_tokenizer_path=str(p.teacher_path) if mapped else None,
            max_length=self.cfg.data.max_length,
        )
        return RolloutGroup(
            spec,
            actors=c.rollout_actors,
            cpus_per_actor=c.cpus_per_rollout_actor,
            gpus_per_actor=c.gpus_per_rollout_actor,
        )

    def _driver(
        self, buffer, teachers, mode: StepHooks, metrics: MetricsLog, hooks: Hooks, rollouts=None
    ) -> Driver:
        p, cfg = self.parts, self.cfg
        assignment = Assignment(
            p.topology.grad_accum_steps, p.topology.student_world_size, p.stream.num_batches
        )
        onpolicy = None
        if rollouts is not None:
            prompts = p.stream.copy()  # its own stream object: the feed's thread reads it
            onpolicy = OnPolicyFeed(
                rollouts=rollouts,
                teachers=teachers,
                buffer=buffer,
                assignment=assignment,
                plans=p.curriculum.plan,
                seed=cfg.train.seed,
                batch_arrays=lambda b: {k: v.numpy() for k, v in prompts.batch(*b).items()},
                total_steps=cfg.train.steps,
                max_staleness=max(s.on_policy.max_staleness for s in p.curriculum.stages if s.on_policy),
                batch_examples=(
                    (lambda b: [row["example"] for _, row in prompts.rows(prompts.position_of(b))])
                    if cfg.teacher.token_map.enabled
                    else None
                ),
            )
        # Tokens per batch for the loss normalisation; its own stream object (the producer thread reads one).
        token_stream = p.stream.copy()
        return Driver(
            teachers=teachers,
            students=self.students,
            buffer=buffer,
            assignment=assignment,
            inputs=functools.partial(_numbered_inputs, p.stream, assignment),
            tokens=functools.partial(_batch_tokens, token_stream, mode),
            total_steps=cfg.train.steps,
            sink=_MetricsSink(metrics, buffer=buffer, batches_per_step=p.topology.batches_per_step),
            log_every=cfg.train.log_every,
            checkpoints=self.checkpoints,
            checkpoint_every=cfg.checkpoint.every_steps,
            hooks=hooks,
            progress=cfg.tracking.progress,
            plans=p.curriculum.plan,
            mode=mode,
            onpolicy=onpolicy,
        )


# ---- before any actor starts ----------------------------------------------------------------------------
def run_identity(cfg: DictConfig, teacher_path: Path, tokenizer, teachers=None) -> dict:
    """What a resumed run must share with its checkpoint to continue it exactly, as flat `section.field` keys.

    Teacher replicas / TP, buffer and per-actor resources may change between a stop and a resume (the math
    does not depend on them); the student's data-parallel layout, the models, data and schedule may not.
    teachers: several teachers' SetMembers: each one's model, k and token map, the routing and the ensemble too.
    """
    c, s = cfg.cluster, cfg.student
    plain = functools.partial(OmegaConf.to_container, resolve=True)
    several = {}
    if teachers is not None:
        several = {
            f"teachers.{m.name}": {
                "model": model_fingerprint(m.path),
                "topk": m.view.teacher.topk,
                "token_map": m.mapped,
                "logits_dtype": m.view.teacher.logits_dtype,
            }
            for m in teachers
        }
        several |= {"routing": plain(cfg.routing), "ensemble": plain(cfg.ensemble)}
    return {
        **several,
        "cluster.student_world_size": c.student_world_size,
        "cluster.micro_batch_size": c.micro_batch_size,
        "cluster.grad_accum_steps": c.grad_accum_steps,
        "cluster.global_batch_size": c.global_batch_size,
        "student.zero_stage": s.zero_stage,
        "student.precision": s.precision,
        "student.arch": s.arch,
        "student.path": model_fingerprint(s.path) if s.path else None,
        "student.overrides": plain(s.overrides),
        "student.init_seed": s.init_seed,
        "student.dtype": s.dtype,
        "student.tokenizer": tokenizer_hash(tokenizer),
        "teacher.token_map": cfg.teacher.token_map.enabled,
        "teacher.model": model_fingerprint(teacher_path),
        "teacher.topk": cfg.teacher.topk,
        "teacher.logits_dtype": cfg.teacher.logits_dtype,
        "data": plain(cfg.data),
        "loss": plain(cfg.loss),
        "curriculum": plain(cfg.curriculum),
        "mode": cfg.mode,
        "continual": plain(cfg.continual) if cfg.mode == "continual" else None,
        "optim": plain(cfg.optim),
        "train.steps": cfg.train.steps,
        "train.seed": cfg.train.seed,
    }


def student_spec(
    cfg: DictConfig, teacher_path: Path, teacher_hidden: int, ds_config: dict, lr_schedule=None
) -> StudentSpec:
    env = {k: os.environ[k] for k in FORWARDED_ENV if k in os.environ}
    env.setdefault("DS_ACCELERATOR", "cuda" if cfg.cluster.device == "cuda" else "cpu")
    tokenizer_path = student_tokenizer_folder(cfg) or str(teacher_path)
    return StudentSpec(
        build=functools.partial(
            build_student_and_objective,
            resolved_yaml(cfg),
            tokenizer_path,
            teacher_hidden,
            lr_schedule,
        ),
        optim=OmegaConf.to_object(cfg.optim),
        total_steps=cfg.train.steps,
        ds_config=ds_config,
        tokenizer_path=tokenizer_path,
        device=cfg.cluster.device,
        backend=cfg.cluster.backend,
        threads=max(1, int(cfg.cluster.cpus_per_student_actor)),
        gradient_checkpointing=cfg.student.gradient_checkpointing,
        share_every=share_interval(cfg),
        env=env,
        seed=cfg.train.seed,
    )


def build_student_and_objective(cfg_yaml: str, tokenizer_path: str, teacher_hidden: int, lr_schedule):
    """Runs inside each student actor: the reference run's student and objective, seeded the same way, and the
    driver's LR schedule (its stage lengths were resolved with the data; Ray ships the closure)."""
    cfg = OmegaConf.create(cfg_yaml)
    tokenizer = load_tokenizer_folder(tokenizer_path)
    torch.manual_seed(cfg.train.seed)
    student = build_student(cfg, tokenizer)
    objective = build_objective(cfg, student, teacher_hidden)
    return student, objective, lr_schedule


# ---- during and after the run -------------------------------------------------------------------------------
def _batch_tokens(stream, mode: StepHooks, batch_id) -> int:
    """Trained tokens of a batch: counted from its rows, or from the stored batch the mode builds."""
    position = stream.position_of(batch_id)
    stored = mode.batch_tokens(position)
    return stream.batch_tokens(position) if stored is None else stored


def _numbered_inputs(stream, assignment: Assignment, position: int):
    """(batch_id, numpy arrays) from stream position `position` on: what the teacher actors receive."""
    for batch_id, batch in stream.forever(assignment.batch_id(position)):
        yield batch_id, {k: v.numpy() for k, v in batch.items()}


class _MetricsSink:
    """The run's metrics log with the reference run's records (+ buffer figures); `rewind` drops steps to be redone.

    teacher/tokens_per_s: trained tokens the teacher group has put into the buffer per wall second since the
    sink opened (a step's tokens / its batches x batches put): a running average, since the buffer lets the
    teacher work in bursts; below the students' rate, the students wait for it.
    """

    def __init__(self, log: MetricsLog, *, buffer: Buffer | None = None, batches_per_step: int = 1) -> None:
        self.log, self.buffer, self.batches_per_step = log, buffer, batches_per_step
        self._opened = time.perf_counter()

    def write(self, metrics: StepMetrics, extras: dict[str, float]) -> None:
        record = metrics.as_record()
        record["student/tokens_per_s"] = record["tokens_per_s"]
        if self.buffer is not None:
            puts, seconds = self.buffer.stats()["puts"], time.perf_counter() - self._opened
            record["teacher/tokens_per_s"] = (
                puts * metrics.tokens / self.batches_per_step / max(seconds, 1e-9)
            )
        self.log.write({**record, **extras})

    def rewind(self, step: int) -> None:
        self.log.rewind(step)
