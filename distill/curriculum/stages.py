"""The curriculum: an ordered list of stages, and what each optimizer step trains with.

Every quantity is a pure function of the global step (`Curriculum.plan(step)`): the stage, its temperature and
alpha, the effective weight of every loss term, the selective-distillation threshold, the LR schedule segment
and the data mix. So a run resumed in the middle of a stage continues exactly the schedule of the run that was
never stopped, and the single-process and distributed paths agree by construction.

Term weights: `loss.terms` defines the terms (name, parameters, layer maps) and their configured weights; a
stage scales them. `Stage.terms` maps a term label, or a group (`hard`: the hard-label CE; `soft`: logit terms
against the teacher; `features`: hidden-state and attention transfer), to a multiplier of the configured
weight; terms it does not name are off in that stage (a label beats its group). An empty mapping keeps every
term at its configured weight. Alpha, when a stage schedules it, is the teacher's share of the logit loss
(the `alpha` every metrics row reports): hard terms are scaled by 1 - alpha and soft terms by alpha, on top of
the multipliers; feature terms are not touched by alpha.
"""

from __future__ import annotations

import bisect
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from distill.curriculum.schedules import Ramp
from distill.errors import ConfigError

HARD, SOFT, FEATURES = "hard", "soft", "features"
TERM_GROUPS = (HARD, SOFT, FEATURES)


def _span_index(starts: Sequence[int], step: int) -> int:
    """The span holding `step`, of consecutive spans given by their sorted first steps (`starts[0] <= step`)."""
    return bisect.bisect_right(starts, step) - 1


@dataclass(frozen=True)
class OnPolicy:
    """An on-policy stage's rollouts (config: `curriculum.stages[i].on_policy`, distill.training.onpolicy)."""

    lmbda: float = 1.0
    """Share of the stage's batches the student writes (GKD's lambda); the rest are the dataset's."""
    max_new_tokens: int = 64
    temperature: float = 1.0
    top_p: float = 1.0
    max_staleness: int = 0
    """Ray path: step s's rollouts use the weights of step s - max_staleness (clamped to the run's first step)."""

    def check(self, where: str) -> None:
        if not 0.0 < self.lmbda <= 1.0:
            raise ConfigError(f"{where}: on_policy.lmbda={self.lmbda}; it is a share of batches in (0, 1].")
        if self.max_new_tokens < 1:
            raise ConfigError(f"{where}: on_policy.max_new_tokens={self.max_new_tokens}; use at least 1.")
        if self.temperature <= 0.0:
            raise ConfigError(
                f"{where}: on_policy.temperature={self.temperature}; sampling needs a temperature > 0."
            )
        if not 0.0 < self.top_p <= 1.0:
            raise ConfigError(f"{where}: on_policy.top_p={self.top_p}; use a value in (0, 1].")
        if self.max_staleness < 0:
            raise ConfigError(f"{where}: on_policy.max_staleness={self.max_staleness}; use 0 or more steps.")


@dataclass(frozen=True)
class Stage:
    """One resolved stage (its length already in optimizer steps)."""

    name: str
    steps: int
    temperature: Ramp
    terms: Mapping[str, float] = field(default_factory=dict)
    """Label or group -> multiplier of the configured weight; empty: every term as configured."""
    alpha: Ramp | None = None
    """Teacher share of the logit loss over the stage; None: the weights as they are."""
    data: Mapping[str, float] = field(default_factory=lambda: {"train": 1.0})
    """Data source name -> share of the stage's batches."""
    restart_lr: bool = False
    """Start a new LR schedule (warm-up and decay over this stage's steps) at this stage's first step."""
    select_threshold: float | None = None
    """Overrides `select_threshold` of every term that selects tokens (`select_by`); None keeps theirs."""
    on_policy: OnPolicy | None = None
    """The student writes (a share of) this stage's batches; None: the dataset's text."""
    teachers: Mapping[str, float] = field(default_factory=dict)
    """Several teachers: name -> multiplier of its ensemble weight (unnamed: off); empty: every teacher as configured."""


@dataclass(frozen=True)
class StepPlan:
    """What optimizer step `step` trains with. Small and picklable: it travels to the student actors."""

    step: int
    stage: str
    stage_index: int
    stage_step: int
    temperature: float
    alpha: float
    weights: dict[str, float]
    """Effective weight of every term label (0: the term is not computed this step)."""
    select_threshold: float | None = None
    on_policy: OnPolicy | None = None
    """The stage's rollouts when it is on-policy."""
    teachers: dict[str, float] = field(default_factory=dict)
    """The stage's teacher multipliers (see Stage.teachers)."""

    @property
    def active(self) -> list[str]:
        return [label for label, w in self.weights.items() if w != 0.0]

    def transition(self) -> dict | None:
        """A log record when this step opens a stage after the first, else None."""
        if self.stage_step != 0 or self.step == 0:
            return None
        return {"step": self.step, "stage": self.stage, "stage_index": self.stage_index}


@dataclass(frozen=True)
class Transition:
    step: int
    """The first step of stage `to`."""
    previous: str
    to: str


class Curriculum:
    """Stages laid end to end over `total_steps` optimizer steps.

    term_weights: label -> configured weight (`loss.terms`); term_groups: label -> `hard` / `soft` / `features`.
    """

    def __init__(
        self,
        stages: Sequence[Stage],
        *,
        term_weights: Mapping[str, float],
        term_groups: Mapping[str, str],
    ) -> None:
        if not stages:
            raise ConfigError(
                "curriculum.stages is empty; give at least one stage (curriculum=single_stage)."
            )
        self.stages = list(stages)
        self.term_weights = dict(term_weights)
        self.term_groups = dict(term_groups)
        self.starts: list[int] = []
        total = 0
        for stage in self.stages:
            self.starts.append(total)
            total += stage.steps
        self.total_steps = total
        self._validate()

    # ---- per step ------------------------------------------------------------------------------------------
    def stage_index(self, step: int) -> int:
        if not 0 <= step < self.total_steps:
            raise IndexError(f"step {step} is outside the curriculum's {self.total_steps} steps")
        return _span_index(self.starts, step)

    def plan(self, step: int) -> StepPlan:
        i = self.stage_index(step)
        stage, local = self.stages[i], step - self.starts[i]
        alpha = stage.alpha.at(local, stage.steps) if stage.alpha is not None else None
        weights = self.stage_weights(stage, alpha)
        return StepPlan(
            step=step,
            stage=stage.name,
            stage_index=i,
            stage_step=local,
            temperature=stage.temperature.at(local, stage.steps),
            alpha=alpha if alpha is not None else self._teacher_share(weights),
            weights=weights,
            select_threshold=stage.select_threshold,
            on_policy=stage.on_policy,
            teachers=dict(stage.teachers),
        )

    def stage_weights(self, stage: Stage, alpha: float | None) -> dict[str, float]:
        weights = {}
        for label, configured in self.term_weights.items():
            group = self.term_groups[label]
            multiplier = stage.terms.get(label, stage.terms.get(group, 0.0)) if stage.terms else 1.0
            if alpha is not None and group == HARD:
                multiplier *= 1.0 - alpha
            elif alpha is not None and group == SOFT:
                multiplier *= alpha
            weights[label] = configured * multiplier
        return weights

    def lr_segment(self, step: int) -> tuple[int, int]:
        """(step within its LR segment, the segment's length): the LR schedule restarts at every stage that sets
        `restart_lr`, so each segment runs its own warm-up and decay."""
        restarts = [0] + [
            s for s, st in zip(self.starts, self.stages, strict=True) if st.restart_lr and s > 0
        ]
        i = _span_index(restarts, step)
        end = restarts[i + 1] if i + 1 < len(restarts) else self.total_steps
        return step - restarts[i], end - restarts[i]

    # ---- the whole run -------------------------------------------------------------------------------------
    def transitions(self) -> list[Transition]:
        return [
            Transition(self.starts[i], self.stages[i - 1].name, self.stages[i].name)
            for i in range(1, len(self.stages))
        ]

    def spans(self) -> list[tuple[int, int, Stage]]:
        """(first step, end step exclusive, stage) of every stage."""
        return [(s, s + st.steps, st) for s, st in zip(self.starts, self.stages, strict=True)]

    def active_labels(self) -> list[str]:
        """Terms with a nonzero weight in some step: the objective must be able to compute these (and the
        teacher must ship what they read)."""
        return [label for label in self.term_weights if any(label in self._live(st) for st in self.stages)]

    def _live(self, stage: Stage) -> set[str]:
        """Labels whose weight is nonzero somewhere in `stage` (a ramp moves monotonically between its ends)."""
        live = {label for label, w in self.stage_weights(stage, None).items() if w != 0.0}
        if stage.alpha is not None:
            ends = {stage.alpha.start, stage.alpha.start if stage.alpha.end is None else stage.alpha.end}
            if ends == {1.0}:
                live -= {label for label in live if self.term_groups[label] == HARD}
            if ends == {0.0}:
                live -= {label for label in live if self.term_groups[label] == SOFT}
        return live

    def _teacher_share(self, weights: Mapping[str, float]) -> float:
        """The classic KD alpha of a set of weights: soft / (hard + soft)."""
        hard = sum(w for label, w in weights.items() if self.term_groups[label] == HARD)
        soft = sum(w for label, w in weights.items() if self.term_groups[label] == SOFT)
        return soft / (hard + soft) if hard + soft else 0.0

    # ---- checks --------------------------------------------------------------------------------------------
    def _validate(self) -> None:
        names = [s.name for s in self.stages]
        for name in names:
            if names.count(name) > 1:
                raise ConfigError(
                    f"curriculum stage name {name!r} is used twice; stage names must be unique."
                )
        for label, group in self.term_groups.items():
            if group not in TERM_GROUPS:
                raise ConfigError(f"term {label!r} has group {group!r}, not one of {list(TERM_GROUPS)}")
        known = sorted(self.term_weights) + list(TERM_GROUPS)
        for stage in self.stages:
            where = f"curriculum stage {stage.name!r}"
            if stage.steps <= 0:
                raise ConfigError(
                    f"{where} has zero length ({stage.steps} steps); give it steps, tokens or a fraction > 0, "
                    "or remove it."
                )
            for key, multiplier in stage.terms.items():
                if key not in known:
                    raise ConfigError(
                        f"{where}: terms.{key} names no loss term or group; valid: {known} (terms are defined in "
                        "loss.terms, e.g. loss=kd_features)."
                    )
                if multiplier < 0:
                    raise ConfigError(f"{where}: terms.{key}={multiplier} is negative; use a weight >= 0.")
            for which, ramp in (("temperature", stage.temperature), ("alpha", stage.alpha)):
                if ramp is None:
                    continue
                for value in (ramp.start, ramp.start if ramp.end is None else ramp.end):
                    if which == "temperature" and not value > 0:
                        raise ConfigError(f"{where}: temperature {value} must be > 0.")
                    if which == "alpha" and not 0.0 <= value <= 1.0:
                        raise ConfigError(f"{where}: alpha {value} must be within [0, 1].")
            if not stage.data or any(r < 0 for r in stage.data.values()) or sum(stage.data.values()) <= 0:
                raise ConfigError(
                    f"{where}: data mix {dict(stage.data)} needs at least one source with a share > 0 and no "
                    "negative shares (e.g. data: {train: 0.5, target: 0.5})."
                )
            if stage.on_policy is not None:
                stage.on_policy.check(where)
            if not self._live(stage):
                raise ConfigError(
                    f"{where}: every loss term weight is 0 (terms {dict(stage.terms) or 'as configured'}, "
                    f"loss.terms {self.term_weights}); the stage would train nothing. Give a term a weight."
                )
