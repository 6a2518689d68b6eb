"""`distill cluster=<a ray cluster config>`: the online distributed run (called by `launch.distill.run`).

Everything that can be checked without processes is checked first (topology, ZeRO config, buffer capacity, a
resume's identity), then the live Ray cluster's resources (both groups planned before any actor starts), then
the groups are started: buffer shards, student ranks (loading in the background) and the teacher replicas.
The driver loop (`distill.cluster.driver.Driver`) trains; the student is exported to run_dir/student and
evaluated in this process like the reference run.

Run folder additions: checkpoints/step-N (see `CheckpointStore`), online_stats.json (consumption counts per
batch, restarts, buffer figures).
"""

from __future__ import annotations

import functools
import json
import logging
import os
import signal
import threading
import time
from collections import defaultdict
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from distill.cluster.buffer import Buffer, check_capacity
from distill.cluster.driver import Assignment, CheckpointStore, Driver, Hooks
from distill.cluster.placement import alive_nodes, plan_replica_nodes
from distill.cluster.runtime import connect, teacher_group_from_config
from distill.cluster.student_group import FORWARDED_ENV, StudentGroup, StudentSpec, plan_student_nodes
from distill.config import resolved_yaml
from distill.config.topology import Topology
from distill.config.validate import validate_run
from distill.errors import ConfigError
from distill.io import atomic_write_json, atomic_write_text
from distill.models.fingerprint import model_fingerprint
from distill.models.loading import load_causal_lm, load_tokenizer, load_tokenizer_folder
from distill.models.tokenizer import tokenizer_hash
from distill.student import build_ds_config
from distill.tracking.metrics_log import MetricsLog, read_metrics
from distill.tracking.wandb_log import open_wandb
from distill.training.objective import teacher_layers
from distill.training.reference import StepMetrics
from launch import builders

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


def run_distributed(cfg: DictConfig, *, hooks: Hooks | None = None) -> dict:
    """Train with the Ray teacher group, buffer and DeepSpeed student group; export; evaluate. Returns the
    eval summary. `hooks` inject failures or stops (tests, chaos drills); SIGUSR1 stops after a checkpoint."""
    with StopOnSignal(hooks) as stop:
        return _run_distributed(cfg, stop)


def _run_distributed(cfg: DictConfig, hooks: Hooks) -> dict:
    c = cfg.cluster
    run_dir = Path(cfg.run_dir)
    teacher_path = builders.require_teacher(cfg)
    teacher_tokenizer = load_tokenizer(teacher_path)
    topology = validate_run(cfg, builders.pair_facts(cfg, teacher_tokenizer))  # cheap; run() has done it too
    # With a token map the student trains on its own tokenizer; the teacher keeps its own (distill.xtok).
    tokenizer = builders.student_tokenizer(cfg, teacher_tokenizer)
    if cfg.teacher.cache:
        raise ConfigError(
            "teacher.cache is for the single-process path; the online distributed run scores with the teacher "
            "actors. Unset teacher.cache or use cluster=local_single."
        )
    batches_per_step = c.grad_accum_steps * c.student_world_size
    per_shard = check_capacity(c.buffer_capacity, c.buffer_shards, batches_per_step)
    ds_config = build_ds_config(
        zero_stage=cfg.student.zero_stage,
        micro_batch_size=c.micro_batch_size,
        grad_accum_steps=c.grad_accum_steps,
        world_size=c.student_world_size,
        grad_clip=cfg.optim.grad_clip,
        precision=cfg.student.precision,
        offload_optimizer=cfg.student.offload_optimizer,
        global_batch_size=c.global_batch_size,
    )
    checkpoints = CheckpointStore(
        run_dir / "checkpoints",
        keep=cfg.checkpoint.keep,
        identity=run_identity(cfg, teacher_path, tokenizer),
        topology=asdict(topology),
    )
    start = checkpoints.resume_point() if cfg.resume else None  # a foreign checkpoint fails here
    if cfg.resume and start is None:
        log.warning("resume=true but %s holds no checkpoint; starting from step 0", checkpoints.root)

    data = builders.build_data(cfg, tokenizer, teacher_tokenizer)
    curriculum, stream = builders.run_stream(cfg, data, tokenizer)
    builders.write_stages(run_dir, curriculum)
    assignment = Assignment(c.grad_accum_steps, c.student_world_size, stream.num_batches)
    terms = builders.run_term_specs(cfg)
    hidden_layers, attention_layers = teacher_layers(terms, "hidden"), teacher_layers(terms, "attention")
    teacher_hidden = builders.model_facts(cfg.teacher, len(tokenizer)).hidden_size

    wandb = open_wandb(cfg, run_dir)  # a background thread; a no-op unless tracking.wandb
    clock = time.perf_counter()
    connect(c)
    teacher_nodes, student_nodes = plan_nodes(topology)  # the live cluster; raises before any actor starts
    log.info("teachers on %s, students on %s", teacher_nodes, student_nodes)
    buffer = students = teachers = continual = None
    try:
        buffer = Buffer.create(
            shards=c.buffer_shards, capacity_per_shard=per_shard, batches_per_epoch=stream.num_batches
        )
        students = StudentGroup(
            student_spec(cfg, teacher_path, teacher_hidden, ds_config, builders.lr_schedule(cfg, curriculum)),
            buffer,
            nodes=student_nodes,
            cpus_per_actor=c.cpus_per_student_actor,
            gpus_per_actor=c.gpus_per_student_actor,
        )
        teachers = teacher_group_from_config(
            cfg,
            teacher_path,
            hidden_layers,
            attention_layers,
            builders.token_table(cfg, teacher_tokenizer, tokenizer),
        )
        students.wait_ready()
        log.info("teacher and student actors ready in %.1f s", time.perf_counter() - clock)
        clock = time.perf_counter()
        # Tokens per batch for the loss normalisation; its own stream object (the producer thread has one).
        token_stream = stream.copy()
        if cfg.mode == "continual":

            def evaluate_increment(i: int) -> dict:
                # The ranks export the current weights; this process evaluates them like the reference does.
                folder = students.export(run_dir / "increments" / f"{i:02d}-{continual.increments[i]}")
                model = load_causal_lm(folder, dtype="float32")
                return builders.evaluate_increments(cfg, model, tokenizer, data, continual)

            continual = builders.continual_run(
                cfg, curriculum, token_stream, tokenizer, evaluate=evaluate_increment
            )
        sink = _MetricsSink(
            run_dir / "metrics.jsonl",
            buffer=buffer,
            batches_per_step=batches_per_step,
            mirror=wandb.log,
        )
        with sink:
            driver = Driver(
                teachers=teachers,
                students=students,
                buffer=buffer,
                assignment=assignment,
                inputs=functools.partial(_numbered_inputs, stream, assignment),
                tokens=functools.partial(_batch_tokens, token_stream, continual),
                total_steps=cfg.train.steps,
                sink=sink,
                log_every=cfg.train.log_every,
                checkpoints=checkpoints,
                checkpoint_every=cfg.checkpoint.every_steps,
                hooks=hooks,
                progress=cfg.tracking.progress,
                plans=curriculum.plan,
                continual=continual,
            )
            driver.run(start)
        log.info(
            "trained steps %d-%d in %.1f s", driver.first_step, cfg.train.steps, time.perf_counter() - clock
        )
        students.export(run_dir / "student")
        placement = {"teacher_nodes": teachers.actor_nodes(), "student_nodes": students.actor_nodes()}
        atomic_write_json(run_dir / "online_stats.json", {**driver.summary(), **placement})
    finally:
        for group in (teachers, students, buffer):
            if group is not None:
                group.shutdown()

    summary = evaluate(cfg, teacher_path, tokenizer, data, run_dir / "student")
    atomic_write_json(run_dir / "eval.json", summary)
    builders.write_run_report(cfg, summary, continual)
    wandb.finish({f"eval/{k}": v for k, v in summary.items() if isinstance(v, int | float)})
    log.info("eval %s", json.dumps(summary, sort_keys=True))
    return summary


# ---- before any actor starts ----------------------------------------------------------------------------
def run_identity(cfg: DictConfig, teacher_path: Path, tokenizer) -> dict:
    """What a resumed run must share with its checkpoint to continue it exactly, as flat `section.field` keys.

    Teacher replicas / TP, buffer and per-actor resources may change between a stop and a resume (the math
    does not depend on them); the student's data-parallel layout, the models, data and schedule may not.
    """
    c, s = cfg.cluster, cfg.student
    plain = functools.partial(OmegaConf.to_container, resolve=True)
    return {
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


def plan_nodes(topology: Topology) -> tuple[list[str], list[str]]:
    """Teacher replica nodes (the teacher group's own plan) and student rank nodes on the live Ray cluster."""
    t = topology
    nodes = alive_nodes()
    teacher_nodes = plan_replica_nodes(
        nodes,
        replicas=t.teacher_replicas,
        tp=t.teacher_tp,
        cpus_per_actor=t.cpus_per_teacher_actor,
        gpus_per_actor=t.gpus_per_teacher_actor,
        spread=t.nodes > 1,  # as teacher_group_from_config
    )
    used: dict[str, tuple[float, float]] = defaultdict(lambda: (0.0, 0.0))
    for node in teacher_nodes:
        cpu, gpu = used[node]
        used[node] = (
            cpu + t.teacher_tp * t.cpus_per_teacher_actor,
            gpu + t.teacher_tp * t.gpus_per_teacher_actor,
        )
    student_nodes = plan_student_nodes(
        nodes,
        world_size=t.student_world_size,
        cpus_per_actor=t.cpus_per_student_actor,
        gpus_per_actor=t.gpus_per_student_actor,
        used=dict(used),
    )
    return teacher_nodes, student_nodes


def student_spec(
    cfg: DictConfig, teacher_path: Path, teacher_hidden: int, ds_config: dict, lr_schedule=None
) -> StudentSpec:
    env = {k: os.environ[k] for k in FORWARDED_ENV if k in os.environ}
    env.setdefault("DS_ACCELERATOR", "cuda" if cfg.cluster.device == "cuda" else "cpu")
    tokenizer_path = builders.student_tokenizer_folder(cfg) or str(teacher_path)
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
        env=env,
    )


def build_student_and_objective(cfg_yaml: str, tokenizer_path: str, teacher_hidden: int, lr_schedule):
    """Runs inside each student actor: the reference run's student and objective, seeded the same way, and the
    driver's LR schedule (its stage lengths were resolved with the data; Ray ships the closure)."""
    cfg = OmegaConf.create(cfg_yaml)
    tokenizer = load_tokenizer_folder(tokenizer_path)
    torch.manual_seed(cfg.train.seed)
    student = builders.build_student(cfg, tokenizer)
    objective = builders.build_objective(cfg, student, teacher_hidden)
    return student, objective, lr_schedule


# ---- during and after the run -------------------------------------------------------------------------------
def _batch_tokens(stream, continual, batch_id) -> int:
    """Trained tokens of a batch: counted from its rows, or from the replay batch the driver builds."""
    position = stream.position_of(batch_id)
    if continual is not None and continual.is_replay(position):
        return continual.tokens(position)
    return stream.batch_tokens(position)


def _numbered_inputs(stream, assignment: Assignment, position: int):
    """(batch_id, numpy arrays) from stream position `position` on: what the teacher actors receive."""
    for batch_id, batch in stream.forever(assignment.batch_id(position)):
        yield batch_id, {k: v.numpy() for k, v in batch.items()}


class _MetricsSink:
    """metrics.jsonl with the reference run's records (+ buffer figures); `rewind` drops steps to be redone.

    teacher/tokens_per_s: trained tokens the teacher group has put into the buffer per wall second since the
    sink opened (a step's tokens / its batches x batches put): a running average, since the buffer lets the
    teacher work in bursts; below the students' rate, the students wait for it.
    """

    def __init__(
        self,
        path: Path,
        *,
        buffer: Buffer | None = None,
        batches_per_step: int = 1,
        mirror=None,
    ) -> None:
        self.path, self.mirror = path, mirror
        self.buffer, self.batches_per_step = buffer, batches_per_step
        self._opened = time.perf_counter()
        self._log = MetricsLog(path, mirror=mirror)

    def write(self, metrics: StepMetrics, extras: dict[str, float]) -> None:
        record = metrics.as_record()
        record["student/tokens_per_s"] = record["tokens_per_s"]
        if self.buffer is not None:
            puts, seconds = self.buffer.stats()["puts"], time.perf_counter() - self._opened
            record["teacher/tokens_per_s"] = (
                puts * metrics.tokens / self.batches_per_step / max(seconds, 1e-9)
            )
        self._log.write({**record, **extras})

    def rewind(self, step: int) -> None:
        self._log.close()
        kept = [r for r in read_metrics(self.path) if r["step"] < step]
        atomic_write_text(self.path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in kept))
        self._log = MetricsLog(self.path, mirror=self.mirror)

    def __enter__(self) -> _MetricsSink:
        return self

    def __exit__(self, *exc) -> None:
        self._log.close()


def evaluate(cfg: DictConfig, teacher_path: Path, tokenizer, data, student_dir: Path) -> dict:
    """The reference run's evaluation, on the exported student loaded in this process."""
    student = load_causal_lm(student_dir, dtype="float32")
    if cfg.teacher.token_map.enabled:  # the teacher's logits are over another vocabulary: no KL to it
        return builders.evaluate(cfg, student, tokenizer, data)
    engine = builders.build_teacher_engine(cfg, teacher_path, None)
    return builders.evaluate(
        cfg, student, tokenizer, data, lambda b: engine.logits(b["input_ids"], b["attention_mask"])
    )
