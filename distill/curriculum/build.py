"""Curriculum and continual-increment stages from the typed config (`curriculum.*`, `continual.*`).

Pure: the caller passes the loss terms' configured weights and groups, and, for stages measured in tokens, a
function that counts how many steps of that stage's data hold the given number of trained tokens.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from distill.curriculum.schedules import Ramp
from distill.curriculum.stages import Curriculum, OnPolicy, Stage
from distill.errors import ConfigError

REPLAY = "replay"
"""The data-mix source name of replayed samples (continual mode)."""

# (stage index, first step, data shares, tokens) -> the stage's length in steps
StepsForTokens = Callable[[int, int, Mapping[str, float], int], int]


def curriculum_from_config(
    cur,
    *,
    train_steps: int,
    base_temperature: float,
    term_weights: Mapping[str, float],
    term_groups: Mapping[str, str],
    steps_for_tokens: StepsForTokens | None = None,
    check_total: bool = True,
) -> Curriculum:
    """`curriculum.stages` laid over the run. Fractions are shares of train.steps (the last fractional stage
    takes the rounding remainder); the stages must add up to train.steps."""
    stages: list[Stage] = []
    start = 0
    shares = _apportion(cur, train_steps) if _fractions_sum_to_one(cur) else None
    for i, sc in enumerate(cur.stages):
        where = f"curriculum stage {sc.name!r}"
        given = [k for k in ("steps", "tokens", "fraction") if sc[k]]
        if len(given) > 1:
            raise ConfigError(f"{where} sets {given}; give exactly one of steps, tokens or fraction.")
        if any(sc[k] < 0 for k in ("steps", "tokens", "fraction")):
            raise ConfigError(f"{where} has a negative length; lengths must be > 0.")
        data = dict(sc.data)
        if sc.tokens:
            if steps_for_tokens is None:
                raise ConfigError(f"{where} is measured in tokens, which needs the run's data to resolve.")
            steps = steps_for_tokens(i, start, data, int(sc.tokens))
        elif sc.fraction:
            steps = shares[i] if shares else max(1, round(sc.fraction * train_steps))
        else:
            steps = int(sc.steps)
        stages.append(
            Stage(
                name=sc.name,
                steps=steps,
                temperature=_ramp(sc.temperature, default=base_temperature),
                terms=dict(sc.terms),
                alpha=_ramp(sc.alpha) if sc.alpha.start is not None else None,
                data=data,
                restart_lr=sc.restart_lr,
                select_threshold=sc.select_threshold,
                on_policy=_on_policy(getattr(sc, "on_policy", None)),
                teachers=dict(sc.get("teachers") or {}),
            )
        )
        start += steps
    curriculum = Curriculum(stages, term_weights=term_weights, term_groups=term_groups)
    if check_total and curriculum.total_steps != train_steps:
        lengths = " + ".join(f"{s.name} {s.steps}" for s in stages)
        raise ConfigError(
            f"curriculum stages add up to {curriculum.total_steps} steps ({lengths}) but train.steps={train_steps}; "
            f"set train.steps={curriculum.total_steps} or change the stage lengths (fractions follow train.steps)."
        )
    return curriculum


def continual_curriculum(
    cur,
    cont,
    *,
    train_steps: int,
    base_temperature: float,
    term_weights: Mapping[str, float],
    term_groups: Mapping[str, str],
) -> Curriculum:
    """One stage per increment, each with the single curriculum stage's losses and schedules, its increment's
    data mixed with replay at `continual.replay.ratio` (from the second increment on)."""
    if len(cur.stages) != 1:
        raise ConfigError(
            f"mode=continual runs each increment with one stage's settings, but curriculum={cur.name} has "
            f"{len(cur.stages)} stages; use curriculum=single_stage (or a one-stage curriculum)."
        )
    increments = list(cont.increments)
    _check_increments(increments)
    replay = cont.replay
    _check_replay(replay)
    per = cont.steps_per_increment or train_steps // len(increments)
    if per <= 0:
        raise ConfigError(
            f"train.steps={train_steps} over {len(increments)} increments leaves no steps per increment; raise "
            "train.steps or set continual.steps_per_increment."
        )
    base = cur.stages[0]
    stages = []
    for i, name in enumerate(increments):
        data = {name: 1.0}
        if i > 0 and replay.ratio > 0:
            data = {name: 1.0 - replay.ratio, REPLAY: replay.ratio}
        stages.append(
            Stage(
                name=name,
                steps=per,
                temperature=_ramp(base.temperature, default=base_temperature),
                terms=dict(base.terms),
                alpha=_ramp(base.alpha) if base.alpha.start is not None else None,
                data=data,
                restart_lr=cont.restart_lr and i > 0,
                select_threshold=base.select_threshold,
            )
        )
    curriculum = Curriculum(stages, term_weights=term_weights, term_groups=term_groups)
    if curriculum.total_steps != train_steps:
        raise ConfigError(
            f"{len(increments)} increments x {per} steps = {curriculum.total_steps} steps, but train.steps="
            f"{train_steps}; set train.steps={curriculum.total_steps} (a multiple of the increments) or "
            "continual.steps_per_increment to match."
        )
    return curriculum


def _check_increments(increments: list[str]) -> None:
    if not increments:
        raise ConfigError("continual.increments is empty; list the data.subsets to train on, in order.")
    if REPLAY in increments:
        raise ConfigError(
            f"continual.increments names {REPLAY!r}, the reserved name of the replayed share; rename that subset."
        )
    if len(set(increments)) != len(increments):
        raise ConfigError(
            f"continual.increments {increments} names a subset twice; each increment is trained once."
        )


def _check_replay(replay) -> None:
    if replay.capacity < 0:
        raise ConfigError(
            f"continual.replay.capacity={replay.capacity} is negative; use 0 (no replay) or more."
        )
    if not 0.0 <= replay.ratio < 1.0:
        raise ConfigError(
            f"continual.replay.ratio={replay.ratio} is outside [0, 1): it is the share of each step's batches drawn "
            "from the replay buffer (1 would leave no new data)."
        )
    if replay.quota < 0:
        raise ConfigError(f"continual.replay.quota={replay.quota} is negative; use 0 (no quota) or more.")
    if replay.ratio > 0 and replay.capacity == 0:
        raise ConfigError(
            f"continual.replay.ratio={replay.ratio} needs a replay buffer, but continual.replay.capacity=0; set a "
            "capacity or ratio=0 (no replay)."
        )


def _ramp(sc, default: float | None = None) -> Ramp:
    start = sc.start if sc.start is not None else default
    return Ramp(float(start), None if sc.end is None else float(sc.end), sc.schedule)


def _apportion(cur, train_steps: int) -> list[int]:
    """Steps of all-fractional stages summing to one: exactly train.steps in all, every stage at least one step,
    the rest by largest remainder (so 0.1 / 0.7 / 0.2 of 8 steps is 1 / 5 / 2, of 300 is 30 / 210 / 60)."""
    n = len(cur.stages)
    if train_steps < n:
        raise ConfigError(
            f"train.steps={train_steps} is too short for curriculum={cur.name}'s {n} stages (each needs a step); "
            "raise train.steps or use curriculum=single_stage."
        )
    exact = [s.fraction * train_steps for s in cur.stages]
    steps = [max(1, int(x)) for x in exact]
    while sum(steps) > train_steps:  # the minimum of one step overfilled: take from the largest
        steps[steps.index(max(steps))] -= 1
    for i in sorted(range(n), key=lambda i: exact[i] - int(exact[i]), reverse=True)[
        : train_steps - sum(steps)
    ]:
        steps[i] += 1
    return steps


def _fractions_sum_to_one(cur) -> bool:
    """Fractions meant to cover the run exactly (all stages fractional and summing to 1)."""
    return all(s.fraction for s in cur.stages) and abs(sum(s.fraction for s in cur.stages) - 1.0) < 1e-6


def _on_policy(oc) -> OnPolicy | None:
    """A stage's `on_policy` block (None: an off-policy stage)."""
    if oc is None:
        return None
    return OnPolicy(
        lmbda=float(oc.lmbda),
        max_new_tokens=int(oc.max_new_tokens),
        temperature=float(oc.temperature),
        top_p=float(oc.top_p),
        max_staleness=int(oc.get("max_staleness", 0)),
    )
