"""Several named teachers behind one scorer: each example's rows go to its teacher (or to every teacher of the
ensemble), and the per-teacher outputs of one batch are combined into the one TeacherBatch the student trains on.

`teachers: {math: ..., code: ...}` in the run config; `teacher` alone is a set of one and never comes here. Every
teacher is a full teacher config, so each is built by the single-teacher code (`teacher_views`): its own engine
or Ray group, its own top-k, its own token map. A batch carries `teacher` [B] (distill/data/routing.py): the index
of the row's teacher in `names`, or ENSEMBLE.

`combine` is the one place per-teacher outputs meet, used by the local backend (`TeacherSet`) and by the Ray
path (distill/cluster/teacher_set_group.py) alike: every teacher's rows are put back in their places in the
student's vocabulary, and each token becomes the weighted mixture of the teachers that scored it
(distill/teacher/ensemble.py; a routed row's one teacher is a mixture of one, the same distribution).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch
from omegaconf import DictConfig, read_write
from torch import Tensor

from distill.batch import ENSEMBLE, ENSEMBLE_NAME, ROUTE, BatchId, TeacherBatch
from distill.errors import ConfigError
from distill.teacher.ensemble import check_weighting, confidence, mix_topk


# ---- config ------------------------------------------------------------------------------------------------
def has_teacher_set(cfg) -> bool:
    return bool(cfg.get("teachers"))


def teacher_names(cfg) -> list[str]:
    return list(cfg.teachers) if has_teacher_set(cfg) else [str(cfg.teacher.name)]


def teacher_views(cfg) -> dict[str, DictConfig]:
    """name -> the run config as that teacher's single-teacher run sees it (`teacher` = that teacher, no set), so
    every single-teacher builder (engine, Ray group, token map, paths) serves each teacher unchanged."""
    if not has_teacher_set(cfg):
        return {str(cfg.teacher.name): cfg}
    views = {}
    for name in cfg.teachers:
        view = cfg.copy()
        t = cfg.teachers[name]
        with read_write(view):
            view.teacher = t
            view.teachers = {}
            # Its share of the cluster: its own group's layout (checked against its model as a single run's).
            if t.get("replicas") is not None:
                view.cluster.teacher_replicas = t.replicas
            if t.get("tp") is not None:
                view.cluster.teacher_tp = t.tp
        views[str(name)] = view
    return views


def require_one_teacher(cfg, command: str) -> None:
    """`distill teacher-cache`, `generate` and `eval` serve one teacher: with `teachers` the user picks it."""
    if has_teacher_set(cfg):
        raise ConfigError(
            f"distill {command} serves one teacher, but `teachers` names {teacher_names(cfg)}; run it once per "
            "teacher, with that teacher as `teacher` (e.g. teacher.path=<its folder>) and no `teachers`."
        )


def use_primary_teacher(cfg) -> None:
    """With a teacher set, `teacher` becomes its first member (the student's tokenizer and the held-out side come
    from it), in place, so config.yaml shows what ran."""
    if has_teacher_set(cfg):
        with read_write(cfg):
            cfg.teacher = cfg.teachers[next(iter(cfg.teachers))]


def static_weights(cfg) -> list[float]:
    """The ensemble's weight per teacher, in `teacher_names` order (equal when none is given)."""
    names = teacher_names(cfg)
    given = dict(cfg.ensemble.weights)
    if not given:
        return [1.0] * len(names)
    return [float(given.get(n, 0.0)) for n in names]


def validate_teacher_set(cfg) -> None:
    """The set's own rules, from the config alone (before any model is read): names that routing, the ensemble and
    the curriculum use exist, and the features a set does not carry yet are off, each refusal naming the way out."""
    if not has_teacher_set(cfg):
        staged = [s.name for s in cfg.curriculum.stages if s.get("teachers")]
        if staged:
            raise ConfigError(
                f"curriculum stages {staged} weigh teachers, but the run has one teacher; name several in `teachers`."
            )
        return
    names = teacher_names(cfg)
    _validate_routing(cfg, names)
    _validate_weights(cfg, names)
    refusals = {
        "an offline teacher cache (teacher.cache)": any(t.cache for t in cfg.teachers.values()),
        "mode=continual": cfg.mode == "continual",
        "packed rows (data.packing)": cfg.data.packing,
        "on-policy stages": any(s.get("on_policy") for s in cfg.curriculum.stages),
        "hidden-state or attention terms": any(
            t.weight and (t.name.startswith("hidden") or t.name == "attention_transfer")
            for t in cfg.loss.terms.values()
        ),
    }
    for what, used in refusals.items():
        if used:
            raise ConfigError(
                f"several teachers (teachers: {names}) do not support {what} yet; run it with one teacher "
                "(unset `teachers`), or drop it from this run."
            )


def _validate_routing(cfg, names: list[str]) -> None:
    r = cfg.routing

    def known(value, where: str) -> None:
        if value not in [*names, ENSEMBLE_NAME]:
            raise ConfigError(
                f"{where}={value!r} names no teacher; the teachers are {names} (or {ENSEMBLE_NAME!r})."
            )

    for subset, target in r.subsets.items():
        known(target, f"routing.subsets.{subset}")
        if subset not in cfg.data.subsets:
            raise ConfigError(
                f"routing.subsets names data subset {subset!r}, which data.subsets does not define "
                f"(it has {sorted(cfg.data.subsets)}); add data.subsets.{subset} with its domains / levels."
            )
        if cfg.data.subsets[subset].path:
            raise ConfigError(
                f"routing.subsets.{subset}: subset {subset!r} is a separate dataset (path), whose rows cannot be "
                "told apart from the run's by their fields; give that dataset a column naming each row's teacher "
                "and set routing.key to it."
            )
    if r.default is not None:
        known(r.default, "routing.default")
    if r.key is None and not r.subsets and r.default is None:
        raise ConfigError("routing has no rule (routing.key, routing.subsets or routing.default); set one.")


def _validate_weights(cfg, names: list[str]) -> None:
    """ensemble.weights / weighting, and each curriculum stage's teacher multipliers."""
    for name, weight in cfg.ensemble.weights.items():
        if name not in names:
            raise ConfigError(f"ensemble.weights names {name!r}; the teachers are {names}.")
        if weight < 0:
            raise ConfigError(f"ensemble.weights.{name}={weight} is negative; weights must be >= 0.")
    weights = static_weights(cfg)
    if not any(w > 0 for w in weights):
        raise ConfigError("ensemble.weights gives every teacher 0; give at least one a weight > 0.")
    check_weighting(cfg.ensemble.weighting)
    for stage in cfg.curriculum.stages:
        multipliers = dict(stage.get("teachers") or {})
        for name in multipliers:
            if name not in names:
                raise ConfigError(
                    f"curriculum stage {stage.name!r} weighs teacher {name!r}; the teachers are {names}."
                )
        if multipliers and not any(
            w * multipliers.get(n, 0.0) > 0 for n, w in zip(names, weights, strict=True)
        ):
            raise ConfigError(
                f"curriculum stage {stage.name!r} turns every teacher off (teachers: {multipliers}); keep one > 0."
            )


# ---- one batch, several teachers ---------------------------------------------------------------------------
def stage_routing(
    route: Tensor, weights: Sequence[float], names: Sequence[str], multipliers: Mapping[str, float] | None
) -> tuple[Tensor, list[float]]:
    """A curriculum stage's teachers (`curriculum.stages[i].teachers`): the ensemble weights times the stage's
    multipliers, and the rows routed to a teacher the stage turns off sent to the ensemble of the others."""
    if not multipliers:
        return route, list(weights)
    scale = [float(multipliers.get(name, 0.0)) for name in names]
    route = route.clone()
    for index, m in enumerate(scale):
        if m == 0:
            route[route == index] = ENSEMBLE
    return route, [w * m for w, m in zip(weights, scale, strict=True)]


def teacher_rows(route: Tensor, index: int, weights: Sequence[float]) -> Tensor:
    """[r] long: the rows teacher `index` scores (its own, and the ensemble's when its weight is > 0)."""
    mine = route == index
    if weights[index] > 0:
        mine |= route == ENSEMBLE
    return mine.nonzero().flatten()


def select_rows(batch: Mapping[str, Tensor | None], rows: Tensor) -> dict[str, Tensor | None]:
    """The micro-batch restricted to `rows` (every per-row tensor; None stays None)."""
    return {k: (None if v is None else v[rows]) for k, v in batch.items()}


def combine(
    batch_id: BatchId,
    batch: Mapping[str, Tensor | None],
    parts: Mapping[int, TeacherBatch],
    weights: Sequence[float],
    weighting: str = "static",
) -> TeacherBatch:
    """The batch's TeacherBatch from its teachers' parts.

    batch: the student's micro-batch ([B, T] tensors and `teacher` [B]); parts: teacher index -> its TeacherBatch
    of exactly `teacher_rows(route, index, weights)` (in the student's positions and vocabulary: a token map was
    applied already); weights: the ensemble's static weight per teacher.
    """
    route = batch[ROUTE].long()
    b, t = batch["input_ids"].shape
    n_teachers = len(weights)
    ids, logits, norms, token_w = [], [], [], torch.zeros(b * t, n_teachers, dtype=torch.float64)
    for index in range(n_teachers):
        rows = teacher_rows(route, index, weights)
        part = parts.get(index)
        if part is None:
            if len(rows):
                raise ValueError(
                    f"teacher {index} scores rows {rows.tolist()} of batch {batch_id} but sent nothing"
                )
            continue
        if part.topk_ids.shape[0] != len(rows):
            raise ValueError(
                f"teacher {index} sent {part.topk_ids.shape[0]} rows for batch {batch_id}; it scores {len(rows)}"
            )
        k = part.k
        full_ids = torch.full((b, t, k), -1, dtype=torch.long)
        full_logits = torch.full((b, t, k), -torch.inf, dtype=torch.float32)
        full_norm = torch.zeros((b, t), dtype=torch.float32)
        width = part.topk_ids.shape[1]  # a part is never wider than the batch (same rows, same padding)
        full_ids[rows, :width] = part.tensor("topk_ids").long()
        full_logits[rows, :width] = part.tensor("topk_logits").float()
        full_norm[rows, :width] = part.tensor("log_normalizer").float()
        ids.append(full_ids.reshape(b * t, k))
        logits.append(full_logits.reshape(b * t, k))
        norms.append(full_norm.reshape(b * t))
        row_w = torch.where(route == index, 1.0, torch.where(route == ENSEMBLE, weights[index], 0.0))
        w = row_w.double()[:, None].expand(b, t).reshape(b * t)
        if weighting == "confidence":  # a position where this teacher has nothing mapped weighs 0 for it
            w = w * confidence(ids[-1], logits[-1], norms[-1])
        token_w[:, len(ids) - 1] = w
    token_w = token_w[:, : len(ids)]
    # Padding positions and rows' tokens no teacher scored weigh nothing: give them the first teacher (all -inf).
    token_w[token_w.sum(-1) <= 0, 0] = 1.0
    mixed_ids, mixed_logits, mixed_norm = mix_topk(ids, logits, norms, token_w)
    width = mixed_ids.shape[-1]
    return TeacherBatch.from_torch(
        batch_id,
        input_ids=batch["input_ids"].to(torch.int32),
        attention_mask=batch["attention_mask"].bool(),
        loss_mask=batch["loss_mask"].bool(),
        topk_ids=mixed_ids.reshape(b, t, width),
        topk_logits=mixed_logits.reshape(b, t, width),
        log_normalizer=mixed_norm.reshape(b, t),
    )


Scorer = Callable[[BatchId, Mapping[str, Tensor]], TeacherBatch]


StageTeachers = Callable[[BatchId], Mapping[str, float] | None]
"""batch id -> the teacher multipliers of the curriculum stage that trains it (None: as configured)."""


class TeacherSet:
    """The local backend's several teachers: each scorer (a single-teacher `batch_scorer`) scores its rows, then
    `combine`. (Each teacher's throughput: wrap its scorer, e.g. distill/run/local.py's `_timed`.)"""

    def __init__(
        self,
        names: Sequence[str],
        scorers: Sequence[Scorer],
        weights: Sequence[float],
        weighting: str,
        stage_teachers: StageTeachers | None = None,
    ):
        self.names, self.scorers = list(names), list(scorers)
        self.weights, self.weighting = list(weights), weighting
        self.stage_teachers = stage_teachers

    def score(self, batch_id: BatchId, batch: Mapping[str, Tensor]) -> TeacherBatch:
        multipliers = self.stage_teachers(batch_id) if self.stage_teachers is not None else None
        route, weights = stage_routing(batch[ROUTE], self.weights, self.names, multipliers)
        batch = {**batch, ROUTE: route}
        parts = {}
        for index, scorer in enumerate(self.scorers):
            rows = teacher_rows(route, index, weights)
            if len(rows):
                parts[index] = scorer(batch_id, select_rows(batch, rows))
        return combine(batch_id, batch, parts, weights, self.weighting)
