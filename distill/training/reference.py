"""The single-process reference trainer: TeacherBatch -> weighted loss terms -> plain torch optimizer step.

Every distributed path is tested against this one, so it stays small and obviously correct.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from distill.batch import model_inputs
from distill.curriculum.stages import StepPlan
from distill.models.head import headless_forward
from distill.training.grad_shares import measure_shares, measures_shares
from distill.training.objective import ON_POLICY, Objective

MicroBatch = dict[str, torch.Tensor | None]


@dataclass
class StepMetrics:
    step: int
    loss: float
    terms: dict[str, float]
    tokens: int
    lr: float
    grad_norm: float
    seconds: float
    batch_ids: list[tuple[int, int]] = field(default_factory=list)
    plan: StepPlan | None = None
    grad_shares: dict[str, float] = field(default_factory=dict)
    """Each active term's share of the gradient norm (measured steps only; distill.training.grad_shares)."""

    def as_record(self) -> dict:
        """The metrics.jsonl row; with a curriculum plan, also its stage, temperature and alpha."""
        stage = {}
        if self.plan is not None:
            p = self.plan
            stage = {
                "stage": p.stage,
                "stage_index": p.stage_index,
                "temperature": p.temperature,
                "alpha": p.alpha,
            }
        return {
            **stage,
            "step": self.step,
            "loss": self.loss,
            **{f"loss/{k}": v for k, v in self.terms.items()},
            **{f"grad_share/{k}": v for k, v in self.grad_shares.items()},
            "tokens": self.tokens,
            "lr": self.lr,
            "grad_norm": self.grad_norm,
            "tokens_per_s": self.tokens / max(self.seconds, 1e-9),
        }


def student_forward(model: nn.Module, objective: Objective, batch: MicroBatch, plan: StepPlan | None = None):
    """The student forward with exactly the extra outputs the step's terms need; with the objective's fused head,
    the decoder only (the head is applied inside the loss, chunk by chunk)."""
    forward = headless_forward if objective.fused_head else model_output
    return forward(
        model,
        input_ids=batch["input_ids"],
        **model_inputs(batch),
        output_hidden_states=objective.wants("hidden", plan),
        output_attentions=objective.wants("attention", plan),
    )


def model_output(model: nn.Module, **inputs):
    """The causal LM's own forward: CausalLMOutput with logits [B, T, V]."""
    return model(**inputs, use_cache=False)


class ReferenceTrainer:
    """One process, one student, a plain torch optimizer; gradient accumulation over micro-batches."""

    def __init__(
        self,
        student: nn.Module,
        objective: Objective,
        optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LRScheduler,
        *,
        grad_clip: float,
        device: torch.device | str = "cpu",
        share_every: int = 0,
    ) -> None:
        """share_every: measure the terms' gradient shares on steps with (step + 1) % share_every == 0 (the
        logged steps); 0: never."""
        self.student, self.objective = student, objective
        self.optimizer, self.scheduler, self.grad_clip = optimizer, scheduler, grad_clip
        self.device, self.share_every = torch.device(device), share_every

    def parameters(self) -> list[nn.Parameter]:
        return [*self.student.parameters(), *self.objective.parameters()]

    def train_step(
        self, step: int, micro_batches: Sequence[MicroBatch], plan: StepPlan | None = None
    ) -> StepMetrics:
        """One optimizer step over all micro-batches of the global batch, with the curriculum's `plan`."""
        start = time.perf_counter()
        self.student.train()
        # The global token count is known before any forward, so each micro-batch's loss is already divided
        # by it: the accumulated gradient equals that of one big batch.
        num_tokens = int(sum(int(mb["loss_mask"].sum()) for mb in micro_batches))
        denom = max(num_tokens, 1)
        self.optimizer.zero_grad(set_to_none=True)
        term_sums: dict[str, torch.Tensor] = {}
        shares: dict[str, float] = {}
        for i, mb in enumerate(micro_batches):
            mb = {k: (v.to(self.device) if v is not None else None) for k, v in mb.items()}
            out = student_forward(self.student, self.objective, mb, plan)
            sums = self.objective(out, mb, plan)
            if i == 0 and measures_shares(step, self.share_every):
                shares = measure_shares(self.objective.weighted_terms(sums, plan), self.parameters())
            (self.objective.weighted_total(sums, plan) / denom).backward()
            for label, s in sums.items():
                term_sums[label] = term_sums.get(label, 0.0) + s.detach()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.parameters(), self.grad_clip or float("inf"))
        lr = self.optimizer.param_groups[0]["lr"]
        self.optimizer.step()
        self.scheduler.step()
        terms = {label: float(s) / denom for label, s in term_sums.items()}  # one sync point per step
        total = sum(self.objective.weight(label, plan) * v for label, v in terms.items())
        seconds = time.perf_counter() - start
        return StepMetrics(
            step, total, terms, num_tokens, lr, float(grad_norm), seconds, plan=plan, grad_shares=shares
        )


def build_optimizer(params, *, lr: float, weight_decay: float, betas: Sequence[float], eps: float):
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, betas=tuple(betas), eps=eps)


def run_steps(
    trainer: ReferenceTrainer,
    batches: Iterator[tuple[tuple[int, int], MicroBatch]],
    teacher: Callable[[tuple[int, int], MicroBatch], MicroBatch] | None,
    *,
    start_step: int,
    steps: int,
    accum: int,
    on_step: Callable[[StepMetrics], None],
    plans: Callable[[int], StepPlan] | None = None,
    teacher_every_step: bool = False,
    rollout: Callable[[tuple[int, int], MicroBatch, StepPlan | None], MicroBatch] | None = None,
) -> None:
    """Pull `accum` numbered batches per step, add the teacher's outputs when the step's terms need them (or
    always, with `teacher_every_step`) unless a batch carries them already (replay), step.

    plans: the curriculum (step -> StepPlan); None trains every step with the objective as configured.
    rollout: on-policy stages (distill.training.onpolicy.Rollouts): the batch the student writes in place of the
    dataset's, before the teacher scores it.
    """
    for step in range(start_step, steps):
        plan = plans(step) if plans is not None else None
        needs_teacher = teacher is not None and (
            teacher_every_step or trainer.objective.needs_teacher_for(plan)
        )
        micro, ids = [], []
        for _ in range(accum):
            batch_id, batch = next(batches)
            scored, source = batch.get("topk_ids") is not None, batch
            if rollout is not None and not scored:
                batch = rollout(batch_id, batch, plan)
            written = batch is not source
            if needs_teacher and not scored:
                batch = teacher(batch_id, batch)
            if written:  # the student's own tokens: no hard labels (Objective)
                batch = {**batch, ON_POLICY: torch.ones((), dtype=torch.bool)}
            micro.append(batch)
            ids.append(batch_id)
        metrics = trainer.train_step(step, micro, plan)
        metrics.batch_ids = ids
        on_step(metrics)
