"""Curriculum schedules, stage plans, LR restarts and data mixes: pure functions of the step, no models."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from distill.config import compose
from distill.curriculum import Curriculum, Ramp, Stage
from distill.data.batching import BatchStream
from distill.data.mixing import MixedStream, Segment, block_pattern
from distill.data.sources import data_sources
from distill.data.sources import validate_sources as _validate_sources
from distill.errors import ConfigError
from distill.training.build import run_curriculum
from distill.training.schedule import curriculum_lr, lr_multiplier

WEIGHTS = {"kl": 1.0, "ce": 0.5, "hidden": 0.1}
GROUPS = {"kl": "soft", "ce": "hard", "hidden": "features"}


def three(**changes) -> Curriculum:
    stages = [
        Stage("warm", 2, Ramp(2.0), terms={"hard": 1.0}),
        Stage(
            "kd",
            5,
            Ramp(4.0, 1.0, "linear"),
            terms={"hard": 1.0, "soft": 1.0, "features": 2.0},
            alpha=Ramp(0.5, 0.9, "linear"),
        ),
        Stage("ft", 3, Ramp(1.0), terms={"ce": 1.0, "soft": 0.5}, restart_lr=True, select_threshold=0.3),
    ]
    for i, stage in changes.items():
        stages[int(i[1:])] = stage
    return Curriculum(stages, term_weights=WEIGHTS, term_groups=GROUPS)


@pytest.mark.parametrize("kind", ["linear", "cosine"])
@pytest.mark.parametrize(("start", "end"), [(4.0, 1.0), (0.2, 0.8)])
def test_ramps_reach_both_ends_monotonically_in_either_direction(kind, start, end):
    ramp = Ramp(start, end, kind)
    values = [ramp.at(s, 11) for s in range(11)]
    assert values[0] == pytest.approx(start) and values[-1] == pytest.approx(end)
    assert values == sorted(values, reverse=start > end)
    assert ramp.at(5, 11) == pytest.approx((start + end) / 2)  # both pass the midpoint at mid-stage
    assert Ramp(start, end, kind).at(0, 1) == start and Ramp(3.0).at(7, 10) == 3.0
    if kind == "cosine":  # slower than linear at the start
        assert abs(values[1] - start) < abs(start + (end - start) * 0.1 - start)


def test_unknown_ramp_kind_fails():
    with pytest.raises(ConfigError, match="not one of"):
        Ramp(1.0, 2.0, "exp")


def test_plan_weights_temperature_alpha_per_stage():
    c = three()
    assert [c.stage_index(s) for s in range(10)] == [0, 0, 1, 1, 1, 1, 1, 2, 2, 2]
    warm = c.plan(1)
    assert (
        warm.weights == {"kl": 0.0, "ce": 0.5, "hidden": 0.0}
        and warm.alpha == 0.0
        and warm.temperature == 2.0
    )
    mid = c.plan(4)  # kd stage, local step 2 of 5: alpha 0.7, T 2.5
    assert mid.stage == "kd" and mid.stage_step == 2
    assert mid.temperature == pytest.approx(2.5) and mid.alpha == pytest.approx(0.7)
    assert mid.weights == pytest.approx({"kl": 1.0 * 0.7, "ce": 0.5 * 0.3, "hidden": 0.1 * 2.0})
    ft = c.plan(8)  # a label (ce) beats its group; no alpha ramp: alpha is the teacher's share of the weights
    assert ft.weights == pytest.approx({"kl": 0.5, "ce": 0.5, "hidden": 0.0})
    assert ft.alpha == pytest.approx(0.5 / 1.0) and ft.select_threshold == 0.3
    assert ft.transition() is None and c.plan(7).transition() == {"step": 7, "stage": "ft", "stage_index": 2}


def test_empty_terms_keep_the_configured_weights():
    c = Curriculum([Stage("main", 3, Ramp(2.0))], term_weights=WEIGHTS, term_groups=GROUPS)
    assert c.plan(2).weights == WEIGHTS and c.plan(2).alpha == pytest.approx(1.0 / 1.5)


def test_plans_and_lr_are_pure_functions_of_the_step():
    """What a resumed run recomputes mid-stage-2 equals what the uninterrupted run used there."""
    first, second = three(), three()
    walked = [first.plan(s) for s in range(10)]
    assert [second.plan(s) for s in (5, 3, 6)] == [walked[5], walked[3], walked[6]]
    kw = {"schedule": "cosine", "warmup_steps": 2, "min_ratio": 0.1}
    a, b = curriculum_lr(first, **kw), curriculum_lr(second, **kw)
    assert [a(s) for s in range(10)] == [b(s) for s in reversed(range(10))][::-1]


def test_lr_restarts_at_a_restart_stage():
    c = three()
    kw = {"schedule": "cosine", "warmup_steps": 2, "min_ratio": 0.1}
    lr = curriculum_lr(c, **kw)
    assert c.lr_segment(6) == (6, 7) and c.lr_segment(7) == (0, 3) and c.lr_segment(9) == (2, 3)
    assert lr(7) == pytest.approx(lr_multiplier(0, 3, **{**kw, "min_ratio": 0.1}))  # warm-up again
    plain = Curriculum(
        [Stage("a", 4, Ramp(1.0)), Stage("b", 6, Ramp(1.0))], term_weights=WEIGHTS, term_groups=GROUPS
    )
    flat = curriculum_lr(plain, **kw)
    assert [flat(s) for s in range(10)] == [lr_multiplier(s, 10, **kw) for s in range(10)]


def test_transitions_spans_and_active_terms():
    c = three()
    assert [(t.step, t.previous, t.to) for t in c.transitions()] == [(2, "warm", "kd"), (7, "kd", "ft")]
    assert [(a, b, st.name) for a, b, st in c.spans()] == [(0, 2, "warm"), (2, 7, "kd"), (7, 10, "ft")]
    assert c.active_labels() == ["kl", "ce", "hidden"]
    only_soft = Curriculum(
        [Stage("s", 2, Ramp(1.0), terms={"hard": 1.0, "soft": 1.0}, alpha=Ramp(1.0))],
        term_weights=WEIGHTS,
        term_groups=GROUPS,
    )
    assert only_soft.active_labels() == ["kl"]  # alpha 1 throughout zeroes the hard term


@pytest.mark.parametrize(
    ("stage", "match"),
    [
        (Stage("x", 0, Ramp(1.0)), "zero length"),
        (Stage("x", 2, Ramp(1.0), terms={"nope": 1.0}), "names no loss term"),
        (Stage("x", 2, Ramp(1.0), terms={"ce": -1.0}), "negative"),
        (Stage("x", 2, Ramp(1.0), terms={"hidden": 0.0, "ce": 0.0}), "every loss term weight is 0"),
        (Stage("x", 2, Ramp(0.0)), "temperature"),
        (Stage("x", 2, Ramp(1.0), alpha=Ramp(0.5, 1.5, "linear")), "alpha"),
        (Stage("x", 2, Ramp(1.0), data={"train": 0.0}), "data mix"),
        (Stage("warm", 2, Ramp(1.0)), "used twice"),
    ],
)
def test_bad_stages_fail_with_the_problem_named(stage, match):
    with pytest.raises(ConfigError, match=match):
        three(s1=stage)


def _cfg(*overrides):
    return compose(list(overrides))


def test_fractions_cover_train_steps_exactly():
    for steps in (3, 8, 300, 301):
        c = run_curriculum(_cfg("curriculum=three_stage", f"train.steps={steps}"))
        assert c.total_steps == steps and all(s.steps >= 1 for s in c.stages)
    with pytest.raises(ConfigError, match="too short"):
        run_curriculum(_cfg("curriculum=three_stage", "train.steps=2"))


def test_stage_lengths_in_steps_and_tokens():
    cfg = _cfg(
        "curriculum=single_stage",
        "train.steps=30",
        "curriculum.stages.0.fraction=0",
        "curriculum.stages.0.tokens=900",
    )
    seen = []

    def steps_for_tokens(index, first, shares, tokens):
        seen.append((index, first, dict(shares), tokens))
        return 30

    assert run_curriculum(cfg, steps_for_tokens).total_steps == 30
    assert seen == [(0, 0, {"train": 1.0}, 900)]
    with pytest.raises(ConfigError, match=r"train\.steps=40"):
        run_curriculum(
            _cfg(
                "curriculum=single_stage",
                "train.steps=40",
                "curriculum.stages.0.fraction=0",
                "curriculum.stages.0.tokens=900",
            ),
            steps_for_tokens,
        )
    with pytest.raises(ConfigError, match="exactly one of steps, tokens or fraction"):
        run_curriculum(_cfg("curriculum=single_stage", "curriculum.stages.0.steps=5"))


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        (["continual.replay.capacity=-1"], "capacity=-1"),
        (["continual.replay.ratio=1.0"], r"outside \[0, 1\)"),
        (["continual.replay.ratio=-0.1"], r"outside \[0, 1\)"),
        (["continual.replay.capacity=0"], "needs a replay buffer"),
        (["continual.replay.quota=-2"], "quota=-2"),
        (["curriculum=three_stage"], "one stage"),
        (["train.steps=10"], "multiple of the increments"),
    ],
)
def test_bad_continual_settings_fail_up_front(overrides, match):
    with pytest.raises(ConfigError, match=match):
        run_curriculum(_cfg("mode=continual", "curriculum=single_stage", "train.steps=300", *overrides))


def test_unknown_datasets_fail_up_front():
    with pytest.raises(ConfigError, match="'nope'"):
        _validate_sources(_cfg("curriculum=three_stage", "+curriculum.stages.2.data.nope=0.5"))
    with pytest.raises(ConfigError, match=r"continual\.increments names dataset 'moon'"):
        _validate_sources(
            _cfg("mode=continual", "curriculum=single_stage", "continual.increments=[shopping,moon]")
        )
    assert data_sources(_cfg("curriculum=three_stage")) == ["train", "target"]
    assert data_sources(_cfg()) == ["train"]
    assert data_sources(_cfg("mode=continual")) == ["shopping", "travel", "baking", "garden"]


# ---- data mixes --------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("shares", "counts"),
    [
        ({"a": 0.5, "b": 0.5}, {"a": 1, "b": 1}),
        ({"a": 0.75, "b": 0.25}, {"a": 3, "b": 1}),
        ({"x": 0.3, "y": 0.7}, {"x": 3, "y": 7}),
        ({"a": 1, "b": 1, "c": 2}, {"a": 1, "b": 1, "c": 2}),
        ({"a": 1.0, "z": 0.0}, {"a": 1}),
    ],
)
def test_block_pattern_has_exact_shares_without_runs(shares, counts):
    pattern = block_pattern(shares)
    assert {n: pattern.count(n) for n in set(pattern)} == counts
    minority = min(counts, key=counts.get)
    doubled = pattern + pattern
    if counts[minority] * 2 <= len(pattern):  # a minority source never comes twice in a row
        assert all(not (a == b == minority) for a, b in itertools.pairwise(doubled))
    with pytest.raises(ConfigError):
        block_pattern({"a": 0.0})


def _stream(token: int, n: int, batch: int = 2, seed: int = 0) -> BatchStream:
    rows = [
        {"input_ids": [token, i + 1, i + 2], "loss_mask": [True] * (1 + i % 2) + [False] * (2 - i % 2)}
        for i in range(n)
    ]
    return BatchStream(rows, batch, seed=seed, pad_id=0)


def test_single_segment_is_the_plain_batch_stream():
    plain = _stream(7, 10)
    mixed = MixedStream({"train": _stream(7, 10)}, [Segment(0, 12, {"train": 1.0})])
    got = list(mixed.forever())
    want = [x for _, x in zip(range(12), plain.forever(), strict=False)]
    assert [b for b, _ in got] == [b for b, _ in want]
    for (_, g), (_, w) in zip(got, want, strict=True):
        assert torch.equal(g["input_ids"], w["input_ids"])


def test_segments_mix_rows_and_continue_each_source():
    sources = {"train": _stream(7, 10), "target": _stream(9, 6)}
    segments = [
        Segment(0, 4, {"train": 1.0}),
        Segment(4, 8, {"train": 0.5, "target": 0.5}),
        Segment(8, 12, {"train": 1.0}),
    ]
    mixed = MixedStream(sources, segments)
    rows = [mixed.rows(g) for g in range(12)]
    assert all([n for n, _ in r] == ["train", "target"] for r in rows[4:8])  # each batch half and half
    train_rows = [row["input_ids"][1] for r in rows for n, row in r if n == "train"]
    batches = zip(range(10), _stream(7, 10).forever(), strict=False)  # 20 train rows: 8 + 4 + 8
    plain = [x["input_ids"][:, 1].tolist() for _, (_, x) in batches]
    assert train_rows == [
        v for batch in plain for v in batch
    ]  # train continues its own order, never restarts
    for g in range(12):  # random access = iteration; tokens without building the batch
        batch = mixed.batch(*mixed.batch_id(g))
        assert batch["input_ids"][:, 0].tolist() == [7 if n == "train" else 9 for n, _ in rows[g]]
        assert mixed.batch_tokens(g) == int(batch["loss_mask"].sum())
    assert [b for b, _ in mixed.forever((0, 3))] == [mixed.batch_id(g) for g in range(3, 12)]


def test_row_mixing_does_not_depend_on_the_micro_batch_split():
    """Micro-batch 4 x 2 positions per step holds the rows of micro-batch 8 x 1 position: same data per step."""

    def rows(batch: int) -> list[list[int]]:
        sources = {"train": _stream(7, 40, batch=batch), "target": _stream(9, 24, batch=batch)}
        per_step = 8 // batch
        mixed = MixedStream(sources, [Segment(0, 6 * per_step, {"train": 0.75, "target": 0.25})])
        return [r["input_ids"] for g in range(6 * per_step) for _, r in mixed.rows(g)]

    assert rows(8) == rows(4)


def test_sources_built_elsewhere_take_whole_positions():
    mixed = MixedStream({"inc": _stream(5, 8)}, [Segment(0, 8, {"inc": 0.5, "replay": 0.5})])
    replay = [g for g in range(8) if mixed.locate(g).source == "replay"]
    assert len(replay) == 4 and [mixed.locate(g).position for g in replay] == [0, 1, 2, 3]
    assert [mixed.position_of(b) for b, _ in mixed.forever()] == [g for g in range(8) if g not in replay]
    with pytest.raises(KeyError, match="replay"):
        mixed.batch(*mixed.batch_id(replay[0]))
    with pytest.raises(ValueError, match="contiguous"):
        MixedStream({"inc": _stream(5, 8)}, [Segment(0, 2, {"inc": 1}), Segment(3, 4, {"inc": 1})])
    assert math.isfinite(mixed.num_batches)
