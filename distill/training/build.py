"""The run's training parts, built beside `loss.*`, `curriculum.*`, `optim.*` and `continual.*`: the curriculum
and its numbered batch stream, the objective, the LR schedule, the reference trainer and the continual run."""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch

from distill.curriculum.build import continual_curriculum, curriculum_from_config
from distill.curriculum.stages import Curriculum
from distill.data.build import RunData, batch_stream
from distill.data.mixing import MixedStream, Segment
from distill.data.replay import ReplayBuffer
from distill.errors import ConfigError
from distill.models.head import check_fusable
from distill.teacher.teacher_set import has_teacher_set
from distill.training.continual import ContinualRun
from distill.training.objective import Objective, TermSpec, term_group, term_specs_from_config
from distill.training.onpolicy import check_on_policy_run
from distill.training.reference import ReferenceTrainer, build_optimizer
from distill.training.schedule import curriculum_lr, optim_lr


# ---- curriculum and stream ------------------------------------------------------------------------------
def run_curriculum(cfg, steps_for_tokens=None) -> Curriculum:
    """The run's stages: `curriculum.stages` (mode=standard) or one stage per increment (mode=continual).

    Without `steps_for_tokens`, stages measured in tokens count as one step (a check before the data is
    loaded); the run resolves them with its data.
    """
    weights = {label: float(t.weight) for label, t in cfg.loss.terms.items() if t.weight}
    groups = {label: term_group(cfg.loss.terms[label].name) for label in weights}
    common = {
        "train_steps": cfg.train.steps,
        "base_temperature": cfg.loss.temperature,
        "term_weights": weights,
        "term_groups": groups,
    }
    if cfg.mode == "continual":
        curriculum = continual_curriculum(cfg.curriculum, cfg.continual, **common)
    elif cfg.mode != "standard":
        raise ConfigError(f"mode={cfg.mode!r} is not one of ['standard', 'continual'].")
    elif steps_for_tokens is None and any(s.tokens for s in cfg.curriculum.stages):
        stages = [s.tokens for s in cfg.curriculum.stages]
        if all(stages):  # every stage in tokens: nothing to check against train.steps yet
            common["train_steps"] = len(stages)
        curriculum = curriculum_from_config(
            cfg.curriculum, **common, steps_for_tokens=lambda *_: 1, check_total=False
        )
    else:
        curriculum = curriculum_from_config(cfg.curriculum, **common, steps_for_tokens=steps_for_tokens)
    check_on_policy_run(cfg, curriculum)
    return curriculum


def run_stream(cfg, data: RunData, tokenizer, per_step: int) -> tuple[Curriculum, MixedStream]:
    """The run's curriculum and its numbered batch stream: each stage's (or increment's) data mix laid over the
    stage's stream positions (optimizer steps x `per_step` micro-batches)."""
    streams = {
        # `train` keeps the data seed, so a single-stage run sees exactly the batches of a plain BatchStream;
        # every other slice gets its own permutation seed.
        name: batch_stream(cfg, part.train_rows, tokenizer, seed=_slice_seed(cfg.data.seed, name))
        for name, part in data.slices.items()
    }
    segments: list[Segment] = []

    def steps_for_tokens(index: int, start_step: int, shares, tokens: int) -> int:
        # A provisional open-ended segment for this stage: count its steps until they hold `tokens`.
        probe = MixedStream(streams, [*segments, Segment(start_step * per_step, 2**62, shares)])
        steps, total = 0, 0
        while total < tokens:
            first = (start_step + steps) * per_step
            total += sum(probe.batch_tokens(g) for g in range(first, first + per_step))
            steps += 1
        segments.append(Segment(start_step * per_step, (start_step + steps) * per_step, shares))
        return steps

    curriculum = run_curriculum(cfg, steps_for_tokens)
    segments = [Segment(a * per_step, b * per_step, stage.data) for a, b, stage in curriculum.spans()]
    return curriculum, MixedStream(streams, segments)


def _slice_seed(seed: int, name: str) -> int:
    if name == "train":
        return seed
    return int.from_bytes(hashlib.sha256(f"{seed}/{name}".encode()).digest()[:4], "little")


# ---- objective and optimisation ---------------------------------------------------------------------------
def run_term_specs(cfg) -> list[TermSpec]:
    """The loss terms some step of the run's curriculum trains: what the objective computes and what the
    teacher ships (hidden states or attention maps no stage reads are never produced)."""
    live = set(run_curriculum(cfg).active_labels())
    return [spec for spec in term_specs_from_config(cfg.loss.terms) if spec.label in live]


def build_objective(cfg, student, teacher_hidden_size: int) -> Objective:
    return Objective(
        run_term_specs(cfg),
        temperature=cfg.loss.temperature,
        chunk_size=cfg.loss.chunk_size,
        student_hidden_size=student.config.hidden_size,
        teacher_hidden_size=teacher_hidden_size,
        # Several teachers' mixture is a student-vocabulary top-k with empty slots, as a mapped teacher's.
        cross_tokenizer=cfg.teacher.token_map.enabled or has_teacher_set(cfg),
        fused_head=fused_head(cfg, student),
    )


def fused_head(cfg, student) -> bool:
    """loss.fused_head, after checking that the fused head computes this student's logits exactly."""
    if cfg.loss.fused_head:
        check_fusable(student)
    return bool(cfg.loss.fused_head)


def lr_schedule(cfg, curriculum: Curriculum):
    """step -> LR multiplier: the optimizer's warm-up and decay, restarted at stages with `restart_lr`."""
    o = cfg.optim
    return curriculum_lr(
        curriculum, schedule=o.schedule, warmup_steps=o.warmup_steps, min_ratio=o.min_lr_ratio
    )


def build_reference_trainer(
    model,
    objective: Objective,
    optim,
    steps: int,
    lr: float | None = None,
    schedule=None,
    share_every: int = 0,
) -> ReferenceTrainer:
    """AdamW over the student and the objective's projections, with the configured warm-up + decay (or the
    given `schedule`, step -> multiplier); gradient shares measured every `share_every` steps (0: never)."""
    params = [*model.parameters(), *objective.parameters()]
    optimizer = build_optimizer(
        params, lr=lr or optim.lr, weight_decay=optim.weight_decay, betas=optim.betas, eps=optim.eps
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule or optim_lr(optim, steps))
    return ReferenceTrainer(
        model, objective, optimizer, scheduler, grad_clip=optim.grad_clip, share_every=share_every
    )


def share_interval(cfg) -> int:
    """Steps between gradient-share measurements: the logged steps with `tracking.grad_shares`, else 0."""
    return int(cfg.train.log_every) if cfg.tracking.grad_shares else 0


# ---- continual mode ---------------------------------------------------------------------------------------
def continual_run(
    cfg, curriculum: Curriculum, stream: MixedStream, tokenizer, per_step: int, *, evaluate
) -> ContinualRun:
    """mode=continual: the replay buffer and after-increment evaluations (results in run_dir/continual.json)."""
    r = cfg.continual.replay
    return ContinualRun(
        curriculum,
        stream,
        ReplayBuffer(r.capacity, seed=cfg.train.seed, quota=r.quota),
        per_step=per_step,
        batch_size=cfg.cluster.micro_batch_size,
        pad_id=tokenizer.pad_token_id,
        evaluate=evaluate,
        results_path=Path(cfg.run_dir) / "continual.json",
    )
