"""The run's quality report: report.md with PNG plots, from metrics.jsonl rows, the eval summary and (continual
runs) the accuracy matrices. Written at the end of every run and by bench/quality.py.

Plots use matplotlib's object API with the Agg canvas rather than pyplot: nothing is registered in pyplot's
global figure list (so nothing to close or leak), the process-wide backend is left alone (importing this module
from a notebook keeps its inline plots), and no display is ever needed.
"""

from __future__ import annotations

import math
import numbers
import re
from collections.abc import Sequence
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path

from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from distill.eval.continual import ContinualMatrix
from distill.io import atomic_write_bytes, atomic_write_text
from distill.tracking.memory import MEMORY_PREFIX, final_peaks, memory_key, split_key

_DEFAULT_STAGE = "main"  # runs without a curriculum log no stage name


def write_report(
    run_dir: str | Path,
    *,
    metrics: Sequence[dict],
    eval_summary: dict | None = None,
    continual: Sequence[ContinualMatrix] | None = None,
    title: str = "Distillation report",
    extra_tables: dict[str, list[dict]] | None = None,
) -> Path:
    """Write report.md and its plots into `run_dir` (each file atomically) and return report.md's path.

    metrics: metrics.jsonl rows. Rows with an `event` key (e.g. stage_transition) are annotations drawn as
        vertical lines; every other row with a `step` is a training row (`stage`, `temperature`, `alpha`,
        `loss`, `lr`, `loss/<term>`, optionally `eval/<metric>` and `mem/<role>/<figure>_mib`).
    eval_summary: eval.json; its `mem/` keys are left to the peak-memory table (built from the rows), its `data/`
        keys (rows the data rules skipped, dropped or cut) make the Data table.
    Plots: loss_terms.png, schedules.png, heldout.png (only with eval/* columns), memory.png (only with mem/*
    columns), continual_<metric>.png.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    rows, events = _split_rows(metrics)
    spans = _stage_spans(rows, events)
    lines = [f"# {title}", ""]
    if rows:
        lines += [
            "## Stages",
            "",
            "Loss and gradient-share columns are per-stage means of the logged rows.",
            "",
        ]
        lines += [*_table(_stage_table(spans)), ""]
        lines += _image("Loss terms per stage", _plot_terms(run_dir, rows, spans, events))
        if _keys(rows, "grad_share/"):
            lines += _image(
                "Each term's share of the gradient norm", _plot_shares(run_dir, rows, spans, events)
            )
        lines += _image("Temperature, alpha and learning rate", _plot_schedules(run_dir, rows, spans, events))
        if _keys(rows, "eval/"):
            lines += ["## Held-out metrics during training", ""]
            lines += _image("Held-out metrics", _plot_heldout(run_dir, rows, spans, events))
        if _keys(rows, MEMORY_PREFIX):
            lines += _memory_section(run_dir, rows, spans, events)
    lines += _heldout_section(eval_summary or {})
    lines += _data_section(eval_summary or {})
    for m in continual or []:
        lines += [f"## Continual: {m.metric} (rows: after increment i; columns: increment j)", ""]
        table = [
            {"after": name, **dict(zip(m.increments, row, strict=True))}
            for name, row in zip(m.increments, m.values, strict=False)  # a partial matrix has fewer rows
        ]
        table.append({"after": "forgetting", **dict(zip(m.increments, m.forgetting(), strict=True))})
        lines += [*_table(table), "", f"Average forgetting: {_fmt(m.average_forgetting())}", ""]
        if m.values:
            lines += _image(f"Continual {m.metric}", _plot_matrix(run_dir, m))
    for name, table in (extra_tables or {}).items():
        lines += [f"## {name}", "", *_table(table), ""]
    path = run_dir / "report.md"
    atomic_write_text(path, "\n".join(lines))
    return path


# ---- rows and stages ---------------------------------------------------------------------------------------
@dataclass
class _Span:
    """A run of consecutive rows in one stage; [start, end) is the shaded band on the step axis."""

    name: str
    rows: list[dict]
    start: float
    end: float


def _split_rows(metrics: Sequence[dict]) -> tuple[list[dict], list[dict]]:
    """(training rows sorted by step, event rows). Rows logged twice for one step are merged, later keys
    winning: a resumed run re-logs the steps after its checkpoint, and an eval row may arrive on its own."""
    events = [r for r in metrics if "event" in r and _num(r.get("step")) is not None]
    by_step: dict[int, dict] = {}
    for r in metrics:
        if "event" not in r and _num(r.get("step")) is not None:
            by_step.setdefault(r["step"], {}).update(r)
    rows = [by_step[s] for s in sorted(by_step)]
    stage = _DEFAULT_STAGE
    for r in rows:  # a row without a stage (e.g. a lone eval row) belongs to the stage before it
        stage = r.setdefault("stage", stage)
    return rows, events


def _stage_spans(rows: list[dict], events: list[dict]) -> list[_Span]:
    spans: list[_Span] = []
    for r in rows:
        if spans and spans[-1].name == r["stage"]:
            spans[-1].rows.append(r)
            continue
        start = r["step"]
        if spans:
            # Metrics are logged every N steps; a transition event knows the exact step the stage began.
            prev_last = spans[-1].rows[-1]["step"]
            exact = [
                e["step"]
                for e in events
                if e["event"] == "stage_transition" and prev_last < e["step"] <= start
            ]
            start = exact[0] if exact else start
            spans[-1].end = start
        spans.append(_Span(r["stage"], [r], start, start))
    if spans:
        spans[-1].end = max(spans[-1].rows[-1]["step"], spans[-1].start + 1)
    return spans


def _stage_table(spans: list[_Span]) -> list[dict]:
    """One row per stage span, in order. The total `loss` is last so the per-term means sit next to the steps."""
    terms = sorted({k for s in spans for k in _keys(s.rows, "loss/")})
    terms += sorted({k for s in spans for k in _keys(s.rows, "grad_share/")})
    out = []
    for s in spans:
        row = {"stage": s.name, "first step": s.rows[0]["step"], "last step": s.rows[-1]["step"]}
        row["logged steps"] = len(s.rows)
        for t in terms:
            row[t] = _mean(s.rows, t)
        for key in ("temperature", "alpha"):
            values = [v for r in s.rows if (v := _num(r.get(key))) is not None]
            row[key] = _range(values)
        row["loss"] = _mean(s.rows, "loss")
        out.append(row)
    return out


def _mean(rows: Sequence[dict], key: str) -> float | None:
    """Mean over the rows that log `key`; a NaN anywhere stays NaN so a diverged stage cannot look healthy."""
    values = [v for r in rows if (v := _num(r.get(key))) is not None]
    return sum(values) / len(values) if values else None


def _range(values: list[float]) -> str | None:
    if not values:
        return None
    if values[0] == values[-1]:
        return _fmt(values[0])
    return f"{_fmt(values[0])} -> {_fmt(values[-1])}"  # start -> end shows which way the schedule moves


def _heldout_section(eval_summary: dict) -> list[str]:
    """The end-of-run evaluation table; eval.json's `mem/` and `data/` keys have sections of their own."""
    heldout = {k: v for k, v in eval_summary.items() if not k.startswith((MEMORY_PREFIX, _DATA_PREFIX))}
    if not heldout:
        return []
    table = _table([{"metric": k, "value": v} for k, v in sorted(heldout.items())])
    return ["## Held-out evaluation (end of run)", "", *table, ""]


_DATA_PREFIX = "data/"
_DATA_ROWS = {
    "data/skipped_rows": "bad rows skipped (data.on_bad_row=skip)",
    "data/dropped_long_rows": "rows over data.max_length dropped (data.on_long_row=drop)",
    "data/truncated_rows": "rows cut to data.max_length (data.on_long_row=truncate)",
}


def _data_section(eval_summary: dict) -> list[str]:
    """What the data rules did to the run's rows (distill/data/build.py:DataCounts), when eval.json says."""
    keys = [k for k in eval_summary if k.startswith(_DATA_PREFIX)]
    if not keys:
        return []
    order = [*_DATA_ROWS]  # the total first, each reason under it (eval.json may hold them sorted)
    keys.sort(key=lambda k: (order.index(k) if k in order else 0.5, k))
    table = [
        {"rows": _DATA_ROWS.get(k, f"skipped as {k.removeprefix('data/skipped/')}"), "count": eval_summary[k]}
        for k in keys
    ]
    return ["## Data", "", *_table(table), ""]


# ---- memory ------------------------------------------------------------------------------------------------
_MEMORY_COLUMNS = {
    "peak_rss": "peak RSS (MiB)",
    "cuda_max_allocated": "CUDA max allocated (MiB)",
    "cuda_max_reserved": "CUDA max reserved (MiB)",
}


def _memory_section(run_dir: Path, rows: list[dict], spans: list[_Span], events: list[dict]) -> list[str]:
    lines = [
        "## Peak memory per role",
        "",
        "Peaks since each process started (see distill/tracking/memory.py); a role played by several processes "
        "shows their maximum, and the table lists each process too.",
        "",
    ]
    lines += _image("Peak memory per role", _plot_memory(run_dir, rows, spans, events))
    return [*lines, *_table(_memory_table(final_peaks(rows))), ""]


def _memory_table(peaks: dict[str, float]) -> list[dict]:
    """One row per role (`trainer`, `student`, `student/0`, ...) with its peaks, whole MiB."""
    table: dict[str, dict] = {}
    for key, value in peaks.items():
        role, figure = split_key(key)
        table.setdefault(role, {"role": role})[_MEMORY_COLUMNS[figure]] = f"{value:.0f}"
    return [table[role] for role in sorted(table, key=_role_order)]


def _role_order(role: str) -> list[tuple[int, str]]:
    """`student` before `student/0`, `student/2` before `student/10`, `teacher/1.2` before `teacher/1.10`."""
    return [(int(p), "") if p.isdigit() else (-1, p) for p in re.split(r"[/.]", role)]


def _memory_roles(rows: list[dict]) -> list[str]:
    """The roles drawn: each role's maximum only (one line per role, not one per process of a 64-actor group)."""
    roles = {split_key(k)[0] for k in _keys(rows, MEMORY_PREFIX)}
    return sorted(r for r in roles if "/" not in r)


def _plot_memory(run_dir: Path, rows: list[dict], spans: list[_Span], events: list[dict]) -> str:
    """Peak RSS per role over the steps; below it, with CUDA figures, max allocated (solid) and reserved (dashed)."""
    roles = _memory_roles(rows)
    cuda = any(split_key(k)[1].startswith("cuda_") for k in _keys(rows, MEMORY_PREFIX))
    fig, axes = _figure(2 if cuda else 1, height=5.5 if cuda else 4.0)
    for ax in axes:
        _decorate(ax, spans, events)
    for i, role in enumerate(roles):
        color = f"C{i % 10}"  # a role keeps its colour in both panels
        axes[0].plot(*_series(rows, memory_key(role, "peak_rss")), marker=".", color=color, label=role)
        allocated = _series(rows, memory_key(role, "cuda_max_allocated"))
        if cuda and allocated[0]:  # roles on the CPU only (the buffer shards, a driver) stay out of it
            axes[1].plot(*allocated, marker=".", color=color, label=role)
            axes[1].plot(*_series(rows, memory_key(role, "cuda_max_reserved")), color=color, linestyle="--")
    axes[0].set_ylabel("peak RSS (MiB)")
    if cuda:
        axes[1].set_ylabel("CUDA max allocated,\nreserved dashed (MiB)")
    for ax in axes:
        ax.set_ylim(bottom=0)  # from zero: the roles' sizes compare honestly
        if ax.get_legend_handles_labels()[0]:  # not `ax.lines`: the stage lines of _decorate are lines too
            ax.legend(fontsize=8)
    axes[-1].set_xlabel("step")
    return _save(fig, run_dir / "memory.png")


# ---- markdown ----------------------------------------------------------------------------------------------
def _table(rows: Sequence[dict]) -> list[str]:
    """Markdown table; columns are the first row's keys, then any key a later row adds."""
    if not rows:
        return ["(none)"]
    cols = list(dict.fromkeys(k for r in rows for k in r))
    lines = ["| " + " | ".join(_fmt(c) for c in cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(_fmt(r.get(c)) for c in cols) + " |" for r in rows]
    return lines


def _image(caption: str, file: str) -> list[str]:
    return [f"![{caption}]({file})", ""]


def _fmt(v: object) -> str:
    if v is None:
        return "-"
    if isinstance(v, numbers.Real) and not isinstance(v, numbers.Integral):  # float, numpy floats
        v = float(v)
        return "nan" if math.isnan(v) else f"{v:.4g}"
    return str(v).replace("|", "\\|").replace("\n", " ")  # a stray pipe would split the table cell


def _num(v: object) -> float | None:
    """A plottable number, or None for missing and non-numeric values (bools are flags, not numbers)."""
    if isinstance(v, bool) or not isinstance(v, numbers.Real):
        return None
    return float(v)


def _keys(rows: Sequence[dict], prefix: str) -> list[str]:
    return sorted({k for r in rows for k in r if k.startswith(prefix)})


# ---- plots -------------------------------------------------------------------------------------------------
def _figure(nrows: int = 1, *, height: float = 4.0) -> tuple[Figure, list[Axes]]:
    fig = Figure(figsize=(8, height), layout="constrained")
    FigureCanvasAgg(fig)  # Agg for this figure only, see the module docstring
    axes = fig.subplots(nrows, 1, sharex=True, squeeze=False)[:, 0]
    return fig, list(axes)


def _series(rows: Sequence[dict], key: str) -> tuple[list[float], list[float]]:
    """(steps, values) of the rows that log `key`; infinities become gaps like NaN so the axes stay usable."""
    pts = [(r["step"], v) for r in rows if (v := _num(r.get(key))) is not None]
    return [s for s, _ in pts], [v if math.isfinite(v) else math.nan for _, v in pts]


def _decorate(ax: Axes, spans: list[_Span], events: list[dict]) -> None:
    """Stage spans as alternating labelled background bands; a dashed line at each transition and event."""
    for band, s in enumerate(spans):
        ax.axvspan(s.start, s.end, color="0.93" if band % 2 == 0 else "0.86", zorder=0, linewidth=0)
        ax.text(
            (s.start + s.end) / 2,
            1.0,
            s.name,
            transform=ax.get_xaxis_transform(),
            ha="center",
            va="bottom",
            fontsize=8,
        )
    lines = {s.start: "" for s in spans[1:]}
    for e in events:
        if e["event"] != "stage_transition":  # stage bands already name the stages
            lines[e["step"]] = str(e["event"])
        else:
            lines.setdefault(e["step"], "")
    for step, label in lines.items():
        ax.axvline(step, color="0.35", linestyle="--", linewidth=0.8)
        if label:
            ax.text(
                step, 0.02, label, transform=ax.get_xaxis_transform(), rotation=90, fontsize=7, va="bottom"
            )


def _plot_terms(run_dir: Path, rows: list[dict], spans: list[_Span], events: list[dict]) -> str:
    fig, (ax,) = _figure()
    _decorate(ax, spans, events)
    values = []
    for term in _keys(rows, "loss/"):
        steps, ys = _series(rows, term)
        ax.plot(steps, ys, marker=".", label=term.removeprefix("loss/"))
        values += [y for y in ys if not math.isnan(y)]
    if values and min(values) > 0:  # log only when every point can be shown (some terms can be <= 0)
        ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("loss term (per token)")
    if values:
        ax.legend(fontsize=8)
    return _save(fig, run_dir / "loss_terms.png")


def _plot_shares(run_dir: Path, rows: list[dict], spans: list[_Span], events: list[dict]) -> str:
    """Per measured step, each term's share of the gradient norm (they sum to 1): a drowning term shows."""
    fig, (ax,) = _figure()
    _decorate(ax, spans, events)
    for key in _keys(rows, "grad_share/"):
        steps, ys = _series(rows, key)
        ax.plot(steps, ys, marker=".", label=key.removeprefix("grad_share/"))
    ax.set_ylim(0.0, 1.0)
    ax.set_xlabel("step")
    ax.set_ylabel("share of the gradient norm")
    ax.legend(fontsize=8)
    return _save(fig, run_dir / "grad_shares.png")


def _plot_schedules(run_dir: Path, rows: list[dict], spans: list[_Span], events: list[dict]) -> str:
    fig, (top, bottom) = _figure(2, height=5.0)
    for ax in (top, bottom):
        _decorate(ax, spans, events)
    for key in ("temperature", "alpha"):
        steps, ys = _series(rows, key)
        if steps:
            top.plot(steps, ys, marker=".", label=key)
    if top.lines:
        top.legend(fontsize=8)
    bottom.plot(*_series(rows, "lr"), color="C2", marker=".")
    bottom.set_ylabel("learning rate")
    bottom.set_xlabel("step")
    return _save(fig, run_dir / "schedules.png")


def _plot_heldout(run_dir: Path, rows: list[dict], spans: list[_Span], events: list[dict]) -> str:
    keys = _keys(rows, "eval/")
    fig, axes = _figure(len(keys), height=2.2 * len(keys) + 0.5)
    for ax, key in zip(axes, keys, strict=True):
        _decorate(ax, spans, events)
        ax.plot(*_series(rows, key), marker="o")
        ax.set_ylabel(key.removeprefix("eval/"))
    axes[-1].set_xlabel("step")
    return _save(fig, run_dir / "heldout.png")


def _plot_matrix(run_dir: Path, m: ContinualMatrix) -> str:
    """Heatmap, rows "after increment i", columns "increment j", each cell's number written in it."""
    n_rows, n_cols = len(m.values), len(m.increments)
    grid = [[math.nan if v is None else float(v) for v in row] for row in m.values]
    fig = Figure(figsize=(1.2 * n_cols + 2.5, 0.8 * n_rows + 1.5), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    cmap = "viridis" if m.higher_is_better else "viridis_r"  # bright = good either way
    image = ax.imshow(grid, cmap=cmap, aspect="auto")
    for i in range(n_rows):
        for j in range(n_cols):
            if m.values[i][j] is None:
                continue
            r, g, b, _ = image.cmap(image.norm(grid[i][j]))
            ink = "black" if 0.299 * r + 0.587 * g + 0.114 * b > 0.5 else "white"  # readable on any cell
            ax.text(j, i, _fmt(m.values[i][j]), ha="center", va="center", color=ink, fontsize=8)
    ax.set_xticks(range(n_cols), m.increments)
    ax.set_yticks(range(n_rows), [f"after {name}" for name in m.increments[:n_rows]])
    ax.set_xlabel("evaluated on increment")
    ax.set_title(m.metric)
    fig.colorbar(image)
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", m.metric)  # e.g. "eval/ce" must not become a folder
    return _save(fig, run_dir / f"continual_{safe}.png")


def _save(fig: Figure, path: Path) -> str:
    """Render in memory and write atomically, so a reader never sees half a PNG. Returns the file name."""
    buf = BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    atomic_write_bytes(path, buf.getvalue())
    return path.name
