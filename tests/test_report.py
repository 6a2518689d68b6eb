"""Token accuracy, the continual accuracy matrix (forgetting) and the run report (markdown tables + PNG plots)."""

from __future__ import annotations

import json
import math
import os
import re
from types import SimpleNamespace

import pytest
import torch
from matplotlib.image import imread
from torch import nn

from distill.eval import report as report_module
from distill.eval.continual import ContinualMatrix, relative_reduction
from distill.eval.metrics import heldout_metrics
from distill.eval.report import write_report


# ---- token accuracy ----------------------------------------------------------------------------------------
class _Tiny(nn.Module):
    """Embedding + linear: a causal-LM stand-in whose forward returns an object with `.logits` [B, T, V]."""

    def __init__(self, vocab: int = 7, width: int = 5) -> None:
        super().__init__()
        self.embed, self.head = nn.Embedding(vocab, width), nn.Linear(width, vocab)

    def forward(self, input_ids, attention_mask):
        return SimpleNamespace(logits=self.head(self.embed(input_ids)))


class _Fixed(nn.Module):
    """Returns the given logits whatever the input."""

    def __init__(self, logits: torch.Tensor) -> None:
        super().__init__()
        self.logits = logits

    def forward(self, input_ids, attention_mask):
        return SimpleNamespace(logits=self.logits)


def _batch(ids: list[list[int]], mask: list[list[bool]]) -> dict[str, torch.Tensor]:
    ids_t = torch.tensor(ids)
    return {"input_ids": ids_t, "attention_mask": torch.ones_like(ids_t), "loss_mask": torch.tensor(mask)}


def test_accuracy_on_hand_made_logits():
    # Labels (next tokens) at positions 0, 1, 2 are 2, 0, 1; the argmaxes are 2, 1, 1; position 3 is untrained.
    logits = torch.tensor([[[0.0, 0.0, 5.0], [0.0, 5.0, 0.0], [0.0, 5.0, 0.0], [5.0, 0.0, 0.0]]])
    out = heldout_metrics(_Fixed(logits), [_batch([[1, 2, 0, 1]], [[True, True, True, False]])])
    assert out["accuracy"] == pytest.approx(2 / 3) and out["tokens"] == 3


def test_accuracy_matches_a_naive_loop_over_batches():
    torch.manual_seed(0)
    model = _Tiny()
    batches = []
    for rows in (3, 2):  # two batches of different size: the average is per token, not per batch
        ids = torch.randint(0, 7, (rows, 6))
        mask = torch.rand(rows, 6) < 0.6
        mask[:, -1] = False  # the last position has no next token
        batches.append(_batch(ids.tolist(), mask.tolist()))
    correct = total = 0
    with torch.no_grad():
        for b in batches:
            logits = model(b["input_ids"], b["attention_mask"]).logits
            for i in range(b["input_ids"].shape[0]):
                for t in range(b["input_ids"].shape[1] - 1):
                    if b["loss_mask"][i, t]:
                        total += 1
                        correct += int(int(logits[i, t].argmax()) == int(b["input_ids"][i, t + 1]))
    out = heldout_metrics(model, batches)
    assert total > 0 and out["accuracy"] == pytest.approx(correct / total)
    assert set(out) >= {
        "ce",
        "ppl",
        "accuracy",
        "tokens",
        "tokens_per_s",
    }  # the other metrics are still there


def test_accuracy_with_nothing_trained_is_zero_not_nan():
    out = heldout_metrics(_Tiny(), [_batch([[1, 2, 3]], [[False, False, False]])])
    assert out["accuracy"] == 0.0 and out["tokens"] == 0


# ---- continual matrix --------------------------------------------------------------------------------------
def test_forgetting_higher_is_better():
    m = ContinualMatrix(
        ["a", "b", "c", "d"],
        "accuracy",
        True,
        [
            [0.5, 0.1, 0.1, 0.0],
            [0.7, 0.6, 0.2, 0.1],  # a improves after b: its best is 0.7, not its own-step 0.5
            [0.4, 0.5, 0.8, 0.1],
            [0.3, 0.65, 0.6, 0.9],  # b ends above its best earlier score: negative forgetting
        ],
    )
    f = m.forgetting()
    assert f[:3] == pytest.approx([0.7 - 0.3, 0.6 - 0.65, 0.8 - 0.6]) and f[3] is None
    assert m.average_forgetting() == pytest.approx((0.4 - 0.05 + 0.2) / 3)


def test_forgetting_lower_is_better_is_final_minus_best():
    m = ContinualMatrix(["a", "b", "c"], "ce", False, [[1.0, 5.0, 5.0], [0.8, 2.0, 4.0], [1.5, 2.5, 1.0]])
    assert m.forgetting() == [pytest.approx(0.7), pytest.approx(0.5), None]
    assert m.average_forgetting() == pytest.approx(0.6)


def test_forgetting_of_partial_and_gappy_matrices():
    one = ContinualMatrix(["a"], "accuracy", True, [[0.9]])
    assert one.forgetting() == [None] and one.average_forgetting() == 0.0
    partial = ContinualMatrix(["a", "b", "c"], "accuracy", True, [[0.5, 0.1, 0.1], [0.3, 0.6, 0.2]])
    assert partial.forgetting() == [pytest.approx(0.2), None, None]  # b is the last trained increment
    empty = ContinualMatrix(["a", "b"], "accuracy", True, [])
    assert empty.forgetting() == [None, None] and empty.average_forgetting() == 0.0
    gaps = ContinualMatrix(
        ["a", "b", "c"], "accuracy", True, [[None, 0.1, 0.1], [0.6, 0.6, 0.2], [0.5, None, 0.7]]
    )
    assert gaps.forgetting() == [
        pytest.approx(0.1),
        None,
        None,
    ]  # a: best 0.6 (row 0 not evaluated); b: no final
    assert gaps.average_forgetting() == pytest.approx(0.1)


def test_forgetting_keeps_a_diverged_final_score_visible():
    m = ContinualMatrix(["a", "b"], "ce", False, [[1.0, 3.0], [math.nan, 2.0]])
    assert math.isnan(m.forgetting()[0]) and math.isnan(m.average_forgetting())


def test_matrix_json_round_trip_and_validation():
    m = ContinualMatrix(["a", "b"], "exact_match", True, [[0.5, None], [0.25, 0.75]])
    d = json.loads(json.dumps(m.as_dict()))
    assert d["forgetting"] == [0.25, None] and d["average_forgetting"] == 0.25
    assert ContinualMatrix.from_dict(d) == m
    with pytest.raises(ValueError, match="row 1 has 1 values, expected 2"):
        ContinualMatrix(["a", "b"], "ce", False, [[1.0, 2.0], [1.0]])
    with pytest.raises(ValueError, match="3 rows for 2 increments"):
        ContinualMatrix(["a", "b"], "ce", False, [[1.0, 2.0]] * 3)


def test_relative_reduction():
    assert relative_reduction(0.2, 0.05) == pytest.approx(0.75)
    assert relative_reduction(0.2, 0.0) == pytest.approx(1.0)
    assert relative_reduction(0.1, 0.3) == pytest.approx(-2.0)  # replay forgot more
    # Nothing forgotten without replay: nothing to reduce, whatever replay did.
    assert relative_reduction(0.0, 0.0) == 0.0 and relative_reduction(-0.1, 0.1) == 0.0
    assert relative_reduction(-0.1, -0.3) == 0.0


# ---- report --------------------------------------------------------------------------------------------------
STAGES = [("warmup", range(0, 20, 2)), ("distill", range(20, 50, 2)), ("anneal", range(50, 61, 2))]


def _metrics() -> list[dict]:
    """Three stages logged every 2 steps; forward_kl is off in warmup; a NaN loss in distill; periodic eval;
    stage transitions (at odd steps, between two logged rows) and a checkpoint event."""
    rows: list[dict] = []
    for name, steps in STAGES:
        for step in steps:
            row = {
                "step": step,
                "stage": name,
                "temperature": 4.0 - 0.05 * step,
                "alpha": 0.0 if name == "warmup" else 0.5,
                "lr": 1e-3 * min(1.0, (step + 1) / 10),
                "loss": 3.0 / (1 + 0.1 * step),
                "loss/ce": 2.0 / (1 + 0.05 * step),
            }
            if name != "warmup":
                row["loss/forward_kl"] = 1.0 + 0.01 * step
            if step % 20 == 0:
                row.update({"eval/ce": 2.0 - step / 100, "eval/accuracy": step / 100, "eval/agreement": 0.5})
            rows.append(row)
    rows[15]["loss"] = math.nan
    rows.insert(10, {"event": "stage_transition", "step": 19, "from": "warmup", "to": "distill"})
    rows.insert(26, {"event": "stage_transition", "step": 49, "from": "distill", "to": "anneal"})
    rows.append({"event": "checkpoint", "step": 40})
    return rows


def _section_table(text: str, heading: str) -> list[dict[str, str]]:
    """The first markdown table after `heading`, as rows of {column: cell}."""
    lines = text[text.index(heading) :].splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("|"))
    end = next((i for i in range(start, len(lines)) if not lines[i].startswith("|")), len(lines))
    table = lines[start:end]
    cells = [
        [c.strip() for c in re.split(r"(?<!\\)\|", line)[1:-1]] for line in table
    ]  # \| is a literal pipe
    return [dict(zip(cells[0], row, strict=True)) for row in cells[2:]]


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def test_report_stage_table_plots_and_continual(tmp_path):
    metrics = _metrics()
    matrix = ContinualMatrix(
        ["a", "b", "c"], "accuracy", True, [[0.5, 0.1, 0.1], [0.3, 0.6, 0.2], [0.4, 0.5, 0.7]]
    )
    path = write_report(
        tmp_path,
        metrics=metrics,
        eval_summary={"ce": 1.25, "accuracy": 0.5},
        continual=[matrix],
        extra_tables={"Runs": [{"run": "x|y", "ce": 1.0}, {"run": "z", "ce": 2.0, "note": "late column"}]},
    )
    assert path == tmp_path / "report.md"
    text = path.read_text()
    assert text.startswith("# Distillation report\n")

    stages = _section_table(text, "## Stages")
    assert [s["stage"] for s in stages] == ["warmup", "distill", "anneal"]
    train = [r for r in metrics if "event" not in r]
    for got, (name, steps) in zip(stages, STAGES, strict=True):
        rows = [r for r in train if r["stage"] == name]
        assert (int(got["first step"]), int(got["last step"])) == (steps[0], steps[-1])
        assert int(got["logged steps"]) == len(steps)
        assert float(got["loss/ce"]) == pytest.approx(_mean([r["loss/ce"] for r in rows]), rel=1e-3)
        if name == "warmup":
            assert got["loss/forward_kl"] == "-"  # the term was off in this stage
        else:
            assert float(got["loss/forward_kl"]) == pytest.approx(
                _mean([r["loss/forward_kl"] for r in rows]), rel=1e-3
            )
        if name == "distill":
            assert got["loss"] == "nan"  # the NaN row poisons its stage's mean instead of vanishing
        else:
            assert float(got["loss"]) == pytest.approx(_mean([r["loss"] for r in rows]), rel=1e-3)
    assert stages[0]["alpha"] == "0" and stages[1]["alpha"] == "0.5"
    assert stages[0]["temperature"] == "4 -> 3.1"

    summary = _section_table(text, "## Held-out evaluation")
    assert summary == [{"metric": "accuracy", "value": "0.5"}, {"metric": "ce", "value": "1.25"}]

    cont = _section_table(text, "## Continual: accuracy")
    assert [r["after"] for r in cont] == ["a", "b", "c", "forgetting"]
    assert cont[1] == {"after": "b", "a": "0.3", "b": "0.6", "c": "0.2"}
    assert cont[-1] == {"after": "forgetting", "a": "0.1", "b": "0.1", "c": "-"}
    assert "Average forgetting: 0.1\n" in text

    runs = _section_table(text, "## Runs")
    assert runs[0] == {"run": "x\\|y", "ce": "1", "note": "-"} and runs[1]["note"] == "late column"

    for name in ("loss_terms.png", "schedules.png", "heldout.png", "continual_accuracy.png"):
        assert f"]({name})" in text
        assert (tmp_path / name).stat().st_size > 5000
        image = imread(tmp_path / name)
        assert image.shape[0] > 200 and image.shape[1] > 200 and image.std() > 0.01  # drawn, not blank
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary files left


def test_stage_bands_start_at_the_transition_event():
    rows, events = report_module._split_rows(_metrics())
    spans = report_module._stage_spans(rows, events)
    assert [(s.name, s.start, s.end) for s in spans] == [
        ("warmup", 0, 19),
        ("distill", 19, 49),
        ("anneal", 49, 60),
    ]


def test_report_of_one_row_without_eval(tmp_path):
    text = write_report(tmp_path, metrics=[{"step": 0, "loss": math.nan, "lr": 0.1}]).read_text()
    stage = _section_table(text, "## Stages")
    assert stage == [
        {
            "stage": "main",
            "first step": "0",
            "last step": "0",
            "logged steps": "1",
            "temperature": "-",
            "alpha": "-",
            "loss": "nan",
        }
    ]
    assert "heldout.png" not in text and not (tmp_path / "heldout.png").exists()
    assert "## Held-out evaluation" not in text and "Continual" not in text
    assert (
        imread(tmp_path / "loss_terms.png").shape[0] > 100
        and imread(tmp_path / "schedules.png").shape[0] > 100
    )


def test_report_of_odd_inputs(tmp_path):
    # No rows at all, only events, an all-unevaluated matrix, a metric name with a slash, a term <= 0.
    assert write_report(tmp_path, metrics=[]).read_text().startswith("# Distillation report")
    write_report(
        tmp_path,
        metrics=[{"event": "start", "step": 0}],
        continual=[ContinualMatrix(["a"], "eval/ce", False, [[None]])],
    )
    assert (tmp_path / "continual_eval_ce.png").exists()
    rows = [
        {"step": s, "stage": "main", "loss/cosine": -0.5 + 0.1 * s, "loss/ce": math.inf if s == 1 else 1.0}
        for s in range(3)
    ]
    text = write_report(
        tmp_path, metrics=rows, continual=[ContinualMatrix(["a", "b"], "ce", False, [])]
    ).read_text()
    assert "| main | 0 | 2 | 3 |" in text and "Average forgetting: 0" in text


def test_report_merges_rows_logged_twice_for_one_step(tmp_path):
    # A resumed run re-logs the steps after its checkpoint; the later value wins and each step counts once.
    rows = [{"step": s, "stage": "main", "loss/ce": 5.0} for s in range(4)]
    rows += [{"step": s, "stage": "main", "loss/ce": 1.0} for s in range(2, 4)]
    rows.append({"step": 3, "eval/ce": 0.5})  # an eval row of its own
    stage = _section_table(write_report(tmp_path, metrics=rows).read_text(), "## Stages")
    assert stage[0]["logged steps"] == "4" and float(stage[0]["loss/ce"]) == pytest.approx(3.0)
    assert (tmp_path / "heldout.png").exists()


def test_rerun_replaces_files_atomically(tmp_path, monkeypatch):
    write_report(tmp_path, metrics=_metrics(), title="first")
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}

    replaced: list[tuple[str, str]] = []
    real_replace = os.replace

    def spy(src, dst):
        replaced.append((str(src), str(dst)))
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", spy)
    write_report(tmp_path, metrics=_metrics()[:5], title="second")
    # Every file arrives by renaming a temporary sibling over it, never by writing in place.
    assert {os.path.basename(d) for _, d in replaced} == set(before)
    assert all(os.path.dirname(s) == os.path.dirname(d) == str(tmp_path) for s, d in replaced)
    assert (tmp_path / "report.md").read_text().startswith("# second\n")
    assert (tmp_path / "loss_terms.png").read_bytes() != before["loss_terms.png"]

    # A crash half-way through a re-run leaves each file whole (old or new) and no temporary files.
    monkeypatch.setattr(
        report_module, "_plot_schedules", lambda *a: (_ for _ in ()).throw(RuntimeError("boom"))
    )
    with pytest.raises(RuntimeError, match="boom"):
        write_report(tmp_path, metrics=_metrics(), title="third")
    assert (tmp_path / "report.md").read_text().startswith("# second\n")
    assert all(imread(tmp_path / n).std() > 0.01 for n in before if n.endswith(".png"))
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def _memory_rows() -> list[dict]:
    """A Ray run's logged steps: students on CUDA (two ranks), two buffer shards and a driver on the CPU."""
    rows = []
    for step in range(0, 10, 2):
        row = {"step": step, "stage": "main", "loss": 1.0}
        for rank in range(2):
            figures = {
                "peak_rss": 900 + 10 * step + rank,
                "cuda_max_allocated": 300 + step,
                "cuda_max_reserved": 512,
            }
            row.update({f"mem/student/{rank}/{k}_mib": float(v) for k, v in figures.items()})
            row[f"mem/buffer/{rank}/peak_rss_mib"] = 80.0 + rank
        row.update(
            {
                "mem/student/peak_rss_mib": 901.0 + 10 * step,
                "mem/student/cuda_max_allocated_mib": 300.0 + step,
            }
        )
        row.update({"mem/student/cuda_max_reserved_mib": 512.0, "mem/student/rss_mib": 850.0})
        row.update({"mem/buffer/peak_rss_mib": 81.0, "mem/driver/peak_rss_mib": 700.0 + step})
        rows.append(row)
    return rows


def test_report_plots_and_tabulates_peak_memory_per_role(tmp_path):
    summary = {"ce": 1.0, "mem/student/peak_rss_mib": 981.0}  # eval.json carries the peaks too
    text = write_report(tmp_path, metrics=_memory_rows(), eval_summary=summary).read_text()
    table = _section_table(text, "## Peak memory per role")
    assert [r["role"] for r in table] == [
        "buffer",
        "buffer/0",
        "buffer/1",
        "driver",
        "student",
        "student/0",
        "student/1",
    ]
    student = next(r for r in table if r["role"] == "student")
    assert student == {
        "role": "student",
        "peak RSS (MiB)": "981",  # the last row's: peaks since start only grow
        "CUDA max allocated (MiB)": "308",
        "CUDA max reserved (MiB)": "512",
    }
    assert next(r for r in table if r["role"] == "buffer")["CUDA max allocated (MiB)"] == "-"  # CPU only
    assert _section_table(text, "## Held-out evaluation") == [{"metric": "ce", "value": "1"}]
    image = imread(tmp_path / "memory.png")
    assert image.shape[0] > 500 and image.std() > 0.01  # two panels (RSS, CUDA), drawn
    assert "memory.png" not in write_report(tmp_path / "none", metrics=[{"step": 0, "loss": 1.0}]).read_text()
