"""On-policy batches: the student writes the completions it is then distilled on (GKD; on-policy distillation).

A batch of an on-policy stage keeps its rows' prompts, every row up to its first trained token (a chat row's
conversation up to the assistant's reply; a plain-text row's first token), and the student samples the rest. The
teacher then scores prompt + completion like any other batch, and the stage's terms train on the completion's
tokens only. Which batches are on-policy (GKD's lambda) and every sample are drawn from `train.seed` and the
batch id, so a run is reproducible and the distributed path can be tested against this one.
"""

from __future__ import annotations

import functools
import hashlib
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from distill.batch import BatchId, cut_after_stop, left_pad
from distill.curriculum.stages import HARD, OnPolicy, StepPlan
from distill.data.batching import pad_batch
from distill.errors import ConfigError

# Loss terms whose labels must be the student's samples (distill.losses.terms.sampled_reverse_kl).
SAMPLED_TOKEN_TERMS = ("reverse_kl_k1", "reverse_kl_k3")


@dataclass
class RolloutStats:
    """What the rollouts of the steps since the last `take` wrote: the metrics that show a length collapse
    (reverse-KL students of a thinking teacher learn to stop early) or a student that never stops."""

    batches: int = 0
    on_policy: int = 0
    seconds: float = 0.0
    rows: int = 0
    tokens: int = 0
    ended: int = 0

    def add(self, lengths: list[int], ended: list[bool]) -> None:
        self.on_policy += 1
        self.rows += len(lengths)
        self.tokens += sum(lengths)
        self.ended += sum(ended)

    def take(self) -> dict[str, float]:
        """`onpolicy/*` metrics since the last call (empty when no batch was on an on-policy stage)."""
        if not self.batches:
            return {}
        record = {"onpolicy/share": self.on_policy / self.batches, "onpolicy/rollout_s": self.seconds}
        if self.rows:
            record |= {
                "onpolicy/completion_tokens": self.tokens / self.rows,
                "onpolicy/eos_rate": self.ended / self.rows,
            }
        self.__init__()
        return record


def _draw(seed: int, batch_id: BatchId, what: str) -> int:
    """A 63-bit number from (seed, batch id, purpose): the same on every process and every run."""
    digest = hashlib.sha256(f"{seed}/{batch_id[0]}/{batch_id[1]}/{what}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def sample_seed(seed: int, batch_id: BatchId) -> int:
    """The torch seed of batch `batch_id`'s rollout (the same on every process)."""
    return _draw(seed, batch_id, "sample")


def is_on_policy(spec: OnPolicy, seed: int, batch_id: BatchId) -> bool:
    """Whether batch `batch_id` of an on-policy stage is the student's (probability `spec.lmbda`)."""
    return spec.lmbda >= 1.0 or _draw(seed, batch_id, "lambda") / 2**63 < spec.lmbda


def prompt_lengths(loss_mask: torch.Tensor, attention_mask: torch.Tensor) -> list[int]:
    """Each row's prompt length: up to its first trained token. loss_mask[t] trains the prediction of token t + 1,
    so the first trained token is one after the first True; a row with nothing trained is all prompt."""
    lengths = []
    for mask, attend in zip(loss_mask.bool(), attention_mask.bool(), strict=True):
        trained = torch.nonzero(mask).flatten()
        lengths.append(int(trained[0]) + 1 if len(trained) else int(attend.sum()))
    return lengths


Reencode = Callable[[list[list[int]]], dict[str, torch.Tensor]]
"""Cross-tokenizer rollouts: the completions (student ids, cut after the stop token) -> the written batch, each row
re-encoded for both tokenizers with its alignment (distill/xtok/rollout.py)."""


@torch.no_grad()
def rollout(
    model: nn.Module,
    batch: dict[str, torch.Tensor],
    spec: OnPolicy,
    *,
    seed: int,
    eos_id: int,
    pad_id: int,
    reencode: Reencode | None = None,
) -> tuple[dict[str, torch.Tensor], list[int], list[bool]]:
    """The batch with its rows' completions written by `model`: (batch, completion lengths, ended with eos).

    The new rows are prompt + completion (cut after the first eos), right-padded, with loss_mask on the
    predictions of the completion's tokens. Sampling is seeded by `seed` (derive it from the batch id).
    reencode: with a token map, what turns the completions into the written batch (both tokenizations aligned).
    """
    if batch.get("position_ids") is not None:
        raise ConfigError("on-policy stages complete unpacked rows: set data.packing=false.")
    if batch.get("align") is not None and reencode is None:
        raise ConfigError(
            "a cross-tokenizer batch (teacher.token_map) needs `reencode`: the student's reply must be encoded again "
            "for the teacher's tokenizer (distill/xtok/rollout.py)."
        )
    lengths = prompt_lengths(batch["loss_mask"], batch["attention_mask"])
    rows = [batch["input_ids"][i, :n].tolist() for i, n in enumerate(lengths)]
    device = next(model.parameters()).device
    prompts, attend = left_pad(rows, pad_id)
    width = prompts.shape[1]
    was_training = model.training
    model.eval()
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            out = model.generate(
                input_ids=prompts.to(device),
                attention_mask=attend.to(device),
                do_sample=True,
                temperature=spec.temperature,
                top_p=spec.top_p,
                top_k=0,
                max_new_tokens=spec.max_new_tokens,
                eos_token_id=eos_id,
                pad_token_id=pad_id,
            )
    finally:
        model.train(was_training)
    completions = [cut_after_stop(new, eos_id) for new in out[:, width:].cpu().tolist()]
    ended = [c[-1:] == [eos_id] for c in completions]
    if reencode is not None:
        return reencode(completions), [len(c) for c in completions], ended
    encoded = []
    for ids, completion in zip(rows, completions, strict=True):
        # loss_mask[t] trains the prediction of token t + 1: the completion's tokens sit at len(ids)..end.
        mask = [False] * (len(ids) - 1) + [True] * len(completion) + [False]
        encoded.append({"input_ids": ids + completion, "loss_mask": mask})
    return pad_batch(encoded, pad_id), [len(c) for c in completions], ended


def check_on_policy_run(cfg, curriculum) -> None:
    """Refuse, before anything loads, an on-policy stage in a run that cannot give the student's samples to the
    teacher: each message names the setting to change."""
    for stage in curriculum.stages:
        live = [label for label, w in curriculum.stage_weights(stage, None).items() if w]
        sampled = [label for label in live if cfg.loss.terms[label].name in SAMPLED_TOKEN_TERMS]
        if sampled and stage.on_policy is None:
            raise ConfigError(
                f"loss terms {sampled} estimate the reverse KL from the student's own samples, but curriculum stage "
                f"{stage.name!r} trains on the dataset's text: give them weight only in on-policy stages (name the "
                "stages' terms, e.g. terms: {hard: 1.0, forward_kl: 1.0} off-policy and {k1: 1.0} on-policy)."
            )
        soft = [label for label in live if curriculum.term_groups[label] != HARD]
        if stage.on_policy is not None and stage.on_policy.lmbda >= 1.0 and not soft:
            raise ConfigError(
                f"curriculum stage {stage.name!r} is on-policy with only hard-label terms {live}, which are off on "
                "the student's own samples: it would train nothing. Give it a teacher term (terms: {soft: 1.0})."
            )
    stages = [s.name for s in curriculum.stages if s.on_policy is not None]
    if not stages:
        return
    where = f"curriculum stages {stages} are on-policy"
    problems = [
        (
            bool(cfg.teacher.cache),
            "the student's samples need a live teacher, and teacher.cache holds scores of the "
            "dataset's text only: unset teacher.cache",
        ),
        (bool(cfg.data.packing), "rollouts complete unpacked rows: set data.packing=false"),
        (
            cfg.cluster.mode == "local"
            and any(s.on_policy.max_staleness for s in curriculum.stages if s.on_policy),
            "on_policy.max_staleness > 0 overlaps rollouts with training on the Ray path only; the single-process "
            "path writes every step with the weights it trains (staleness 0): set it to 0 or use a Ray cluster",
        ),
        (cfg.mode != "standard", "on-policy stages are for mode=standard"),
    ]
    for failed, message in problems:
        if failed:
            raise ConfigError(f"{where}, but {message}.")


class Rollouts:
    """The local backend's on-policy batches: `(batch_id, batch, plan) -> batch`, the student's own where the
    plan's stage is on-policy and the lambda draw says so, the dataset's otherwise."""

    def __init__(
        self,
        model: nn.Module,
        *,
        seed: int,
        eos_id: int,
        pad_id: int,
        reencode: Callable[[BatchId, list[list[int]]], dict] | None = None,
    ) -> None:
        """reencode: with a token map, (batch id, completions) -> the written batch (distill/xtok/rollout.py)."""
        self.model, self.seed, self.eos_id, self.pad_id = model, seed, eos_id, pad_id
        self.reencode = reencode
        self.stats = RolloutStats()

    def __call__(self, batch_id: BatchId, batch: dict, plan: StepPlan | None) -> dict:
        spec = plan.on_policy if plan is not None else None
        if spec is None:
            return batch
        self.stats.batches += 1
        if not is_on_policy(spec, self.seed, batch_id):
            return batch
        start = time.perf_counter()
        written, lengths, ended = rollout(
            self.model,
            batch,
            spec,
            seed=sample_seed(self.seed, batch_id),
            eos_id=self.eos_id,
            pad_id=self.pad_id,
            reencode=None if self.reencode is None else functools.partial(self.reencode, batch_id),
        )
        self.stats.seconds += time.perf_counter() - start
        self.stats.add(lengths, ended)
        return written
