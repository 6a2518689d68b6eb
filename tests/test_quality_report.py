"""The continual accuracy matrix (forgetting) and the run report (markdown tables + PNG plots)."""

from __future__ import annotations

import math

import pytest
from matplotlib.image import imread

from distill.eval.continual import ContinualMatrix, relative_reduction
from distill.eval.report import write_report


def test_forgetting_is_best_earlier_minus_final():
    acc = ContinualMatrix(
        ["a", "b", "c"], "accuracy", True, [[0.5, 0.1, 0.1], [0.3, 0.6, 0.2], [0.4, 0.5, 0.7]]
    )
    assert acc.forgetting()[:2] == pytest.approx([0.5 - 0.4, 0.6 - 0.5]) and acc.forgetting()[2] is None
    assert acc.average_forgetting() == pytest.approx(0.1)
    ce = ContinualMatrix(["a", "b"], "ce", False, [[1.0, 3.0], [1.5, 2.0]])
    assert ce.forgetting() == [pytest.approx(0.5), None]  # lower is better: final - best
    partial = ContinualMatrix(["a", "b", "c"], "accuracy", True, [[0.5, 0.1, 0.1]])
    assert partial.forgetting() == [None, None, None] and partial.average_forgetting() == 0.0
    assert ContinualMatrix.from_dict(acc.as_dict()) == acc
    assert relative_reduction(0.2, 0.05) == pytest.approx(0.75) and relative_reduction(0.0, 0.1) == 0.0


def _rows():
    rows = []
    for step in range(9):
        stage = "warmup" if step < 2 else "distill" if step < 7 else "finetune"
        row = {
            "step": step,
            "stage": stage,
            "temperature": 4 - 0.3 * step,
            "alpha": 0.1 * step,
            "lr": 1e-3,
            "loss": 2.0 - 0.1 * step,
            "loss/ce": 2.0 - 0.1 * step,
        }
        if stage == "distill":
            row["loss/forward_kl"] = float(step)
        if step in (4, 8):
            row["eval/ce"] = 1.5
        rows.append(row)
    rows[3]["loss"] = math.nan
    return rows


def test_report_tables_and_plots(tmp_path):
    matrix = ContinualMatrix(["a", "b"], "accuracy", True, [[0.5, 0.2], [0.4, 0.6]])
    path = write_report(
        tmp_path,
        metrics=_rows(),
        eval_summary={"ce": 1.25},
        continual=[matrix],
        extra_tables={"Runs": [{"run": "x", "ce": 1.0}]},
    )
    text = path.read_text()
    assert "| distill | 2 | 6 | 5 | 1.6 | 4 | 3.4 -> 2.2 | 0.2 -> 0.6 |" in text  # steps, rows, means, ranges
    assert "| warmup | 0 | 1 | 2 | 1.95 | - |" in text  # a term off in a stage shows as -
    assert "Average forgetting: 0.1" in text and "| forgetting | 0.1 | - |" in text
    assert "## Runs" in text and "| x | 1 |" in text
    for name in ("loss_terms.png", "schedules.png", "heldout.png", "continual_accuracy.png"):
        assert f"]({name})" in text
        image = imread(tmp_path / name)
        assert image.shape[0] > 100 and image.std() > 0.01  # a drawn figure, not a blank canvas


def test_report_of_a_short_run_without_eval(tmp_path):
    text = write_report(tmp_path, metrics=[{"step": 0, "loss": 1.0, "lr": 0.1}]).read_text()
    assert "| main | 0 | 0 | 1 |" in text and "heldout.png" not in text
    write_report(tmp_path, metrics=[])  # rewritten in place, nothing to plot
    assert not list(tmp_path.glob(".*"))  # no temporary files left behind
