"""Each loss term's share of the gradient norm: the measurement against a float64 reference, shares summing to
1 in a real run's metrics.jsonl, and the warning when one term drowns the others."""

from __future__ import annotations

import logging

import pytest
import torch

from distill.tracking.dominance import DominanceWatch
from distill.tracking.metrics_log import read_metrics
from distill.training.grad_shares import measure_shares, shares_of


def test_shares_match_separate_float64_backwards_and_sum_to_one():
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(6, 4, dtype=torch.float64))
    b = torch.nn.Parameter(torch.randn(4, dtype=torch.float64))
    x = torch.randn(8, 6, dtype=torch.float64)
    y = x @ w + b
    terms = {"a": 3.0 * y.pow(2).sum(), "b": y.sin().sum(), "c": (b * 0.1).sum()}
    shares = measure_shares(terms, [w, b])
    # The naive reference: one fresh graph and one backward per term, norms over both parameters.
    norms = {}
    for label in terms:
        w.grad = b.grad = None
        fresh = {
            "a": lambda: 3.0 * (x @ w + b).pow(2).sum(),
            "b": lambda: (x @ w + b).sin().sum(),
            "c": lambda: (b * 0.1).sum(),
        }[label]()
        fresh.backward()
        gw = w.grad if w.grad is not None else torch.zeros_like(w)
        norms[label] = float(torch.cat([gw.flatten(), b.grad.flatten()]).norm())
    total = sum(norms.values())
    for label in terms:
        assert shares[label] == pytest.approx(norms[label] / total, rel=1e-6)
    assert sum(shares.values()) == pytest.approx(1.0, abs=1e-12)
    # The caller's own backward still works after the measurement (the graph was retained).
    w.grad = b.grad = None
    sum(terms.values()).backward()
    assert w.grad is not None


def test_shares_of_zero_norms_are_equal():
    assert shares_of({"a": 0.0, "b": 0.0}) == {"a": 0.5, "b": 0.5}


def test_watch_warns_once_after_a_dominant_streak(caplog):
    watch = DominanceWatch(threshold=0.9, patience=3)

    def rec(step, h):
        return {"step": step, "stage": "distill", "grad_share/hidden": h, "grad_share/kl": 1 - h}

    with caplog.at_level(logging.WARNING):
        assert watch.observe(rec(0, 0.95)) is None
        assert watch.observe(rec(1, 0.5)) is None  # the streak breaks
        assert watch.observe(rec(2, 0.95)) is None
        assert watch.observe(rec(3, 0.97)) is None
        message = watch.observe(rec(4, 0.99))
        assert message is not None and "'hidden'" in message and "loss.terms.hidden.weight" in message
        assert watch.observe(rec(5, 0.99)) is None  # once per term
    assert sum("holds" in r.message for r in caplog.records) == 1
    # A single active term holds everything by definition: never a warning.
    lone = DominanceWatch(patience=1)
    assert lone.observe({"step": 0, "grad_share/ce": 1.0}) is None


def test_run_logs_shares_that_sum_to_one_and_warns_when_a_term_dominates(
    tiny_teacher, base_overrides, tmp_path, caplog
):
    from distill.config import compose
    from distill.run import run

    cfg = compose(
        [
            *base_overrides,
            "loss=kd_features",
            "curriculum=single_stage",
            "loss.terms.hidden.weight=1000",
            "train.steps=6",
            "train.log_every=1",
            "eval.generate_examples=0",
        ],
        run_dir=str(tmp_path / "run"),
    )
    with caplog.at_level(logging.WARNING, logger="distill.tracking.dominance"):
        run(cfg)
    rows = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "loss" in r]
    assert len(rows) == 6
    for row in rows:
        shares = {k: v for k, v in row.items() if k.startswith("grad_share/")}
        assert set(shares) == {
            "grad_share/forward_kl",
            "grad_share/ce",
            "grad_share/hidden",
            "grad_share/attention",
        }
        assert sum(shares.values()) == pytest.approx(1.0, abs=1e-6)
    assert rows[-1]["grad_share/hidden"] > 0.9
    assert any("'hidden' holds" in r.message for r in caplog.records)
    report = (tmp_path / "run" / "report.md").read_text()
    assert "grad_shares.png" in report and "grad_share/hidden" in report
    assert (tmp_path / "run" / "grad_shares.png").stat().st_size > 0
