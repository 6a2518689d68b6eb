"""The run's quality report: report.md with PNG plots, from metrics.jsonl rows, the eval summary and (continual
runs) the accuracy matrices. Written at the end of every run and by bench/quality.py."""

from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; never a display
import matplotlib.pyplot as plt

from distill.eval.continual import ContinualMatrix
from distill.io import atomic_write_text


def write_report(
    run_dir: str | Path,
    *,
    metrics: Sequence[dict],
    eval_summary: dict | None = None,
    continual: Sequence[ContinualMatrix] | None = None,
    title: str = "Distillation report",
    extra_tables: dict[str, list[dict]] | None = None,
) -> Path:
    """report.md + loss_terms.png, schedules.png, heldout.png (if periodic eval rows exist) and one
    continual_<metric>.png per matrix, all written atomically into `run_dir`. Returns report.md's path."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    rows = [r for r in metrics if "event" not in r and "step" in r]
    lines = [f"# {title}", ""]
    images: list[tuple[str, str]] = []
    if rows:
        images.append(("Loss terms per stage", _plot_terms(run_dir, rows)))
        images.append(("Temperature, alpha and learning rate", _plot_schedules(run_dir, rows)))
        if any(k.startswith("eval/") for r in rows for k in r):
            images.append(("Held-out metrics", _plot_heldout(run_dir, rows)))
        lines += ["## Stages", "", *_table(_stage_rows(rows)), ""]
    if eval_summary:
        lines += ["## Held-out evaluation (end of run)", ""]
        lines += _table([{"metric": k, "value": v} for k, v in sorted(eval_summary.items())])
        lines.append("")
    for m in continual or []:
        lines += [f"## Continual: {m.metric} (rows: after increment i; columns: increment j)", ""]
        table = [
            {"after": name, **dict(zip(m.increments, row, strict=True))}
            for name, row in zip(m.increments, m.values, strict=False)
        ]
        table.append({"after": "forgetting", **dict(zip(m.increments, m.forgetting(), strict=True))})
        lines += [*_table(table), "", f"Average forgetting: {_fmt(m.average_forgetting())}", ""]
        images.append((f"Continual {m.metric}", _plot_matrix(run_dir, m)))
    for name, table in (extra_tables or {}).items():
        lines += [f"## {name}", "", *_table(table), ""]
    for caption, file in images:
        lines += [f"![{caption}]({file})", ""]
    path = run_dir / "report.md"
    atomic_write_text(path, "\n".join(lines))
    return path


# ---- tables ------------------------------------------------------------------------------------------------
def _stage_rows(rows: Sequence[dict]) -> list[dict]:
    """One row per stage, in order: its logged steps, the mean of each loss term, temperature and alpha ranges."""
    stages: list[tuple[str, list[dict]]] = []
    for r in rows:
        name = r.get("stage", "main")
        if not stages or stages[-1][0] != name:
            stages.append((name, []))
        stages[-1][1].append(r)
    terms = sorted({k for r in rows for k in r if k.startswith("loss/")})
    out = []
    for name, part in stages:
        row = {"stage": name, "first step": part[0]["step"], "last step": part[-1]["step"], "rows": len(part)}
        for t in terms:
            values = [r[t] for r in part if t in r]
            row[t] = sum(values) / len(values) if values else None
        for key in ("temperature", "alpha"):
            values = [r[key] for r in part if key in r]
            row[key] = f"{_fmt(values[0])} -> {_fmt(values[-1])}" if values else None
        out.append(row)
    return out


def _table(rows: Sequence[dict]) -> list[str]:
    if not rows:
        return ["(none)"]
    cols = list(rows[0])
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(_fmt(r.get(c)) for c in cols) + " |" for r in rows]
    return lines


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.4g}"
    return str(v)


# ---- plots ---------------------------------------------------------------------------------------------------
def _shade_stages(ax, rows: Sequence[dict]) -> None:
    """Stage spans as alternating background bands, labelled, with a line at each transition."""
    start, name = rows[0]["step"], rows[0].get("stage", "main")
    spans = []
    for r in rows[1:]:
        if r.get("stage", "main") != name:
            spans.append((start, r["step"], name))
            start, name = r["step"], r.get("stage", "main")
    spans.append((start, rows[-1]["step"] + 1, name))
    for band, (a, b, label) in enumerate(spans):
        ax.axvspan(a, b, color="0.92" if band % 2 == 0 else "0.85", zorder=0)
        ax.text(
            (a + b) / 2, 1.0, label, transform=ax.get_xaxis_transform(), ha="center", va="bottom", fontsize=8
        )
        if a != rows[0]["step"]:
            ax.axvline(a, color="0.4", linestyle="--", linewidth=0.8)


def _plot_terms(run_dir: Path, rows: Sequence[dict]) -> str:
    fig, ax = plt.subplots(figsize=(8, 4))
    _shade_stages(ax, rows)
    for term in sorted({k for r in rows for k in r if k.startswith("loss/")}):
        pts = [(r["step"], r[term]) for r in rows if term in r]
        ax.plot(*zip(*pts, strict=True), marker=".", label=term.removeprefix("loss/"))
    ax.set_xlabel("step")
    ax.set_ylabel("loss term (per token)")
    ax.set_yscale("log")
    ax.legend(fontsize=8)
    return _save(fig, run_dir / "loss_terms.png")


def _plot_schedules(run_dir: Path, rows: Sequence[dict]) -> str:
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 5), sharex=True)
    _shade_stages(top, rows)
    steps = [r["step"] for r in rows]
    for key in ("temperature", "alpha"):
        if all(key in r for r in rows):
            top.plot(steps, [r[key] for r in rows], marker=".", label=key)
    top.legend(fontsize=8)
    bottom.plot(steps, [r.get("lr", float("nan")) for r in rows], color="C2", marker=".")
    bottom.set_ylabel("learning rate")
    bottom.set_xlabel("step")
    return _save(fig, run_dir / "schedules.png")


def _plot_heldout(run_dir: Path, rows: Sequence[dict]) -> str:
    keys = sorted({k for r in rows for k in r if k.startswith("eval/")})
    fig, axes = plt.subplots(len(keys), 1, figsize=(8, 2.2 * len(keys)), sharex=True, squeeze=False)
    for ax, key in zip(axes[:, 0], keys, strict=True):
        pts = [(r["step"], r[key]) for r in rows if key in r]
        ax.plot(*zip(*pts, strict=True), marker="o")
        ax.set_ylabel(key.removeprefix("eval/"))
    axes[-1, 0].set_xlabel("step")
    return _save(fig, run_dir / "heldout.png")


def _plot_matrix(run_dir: Path, m: ContinualMatrix) -> str:
    n_rows, n_cols = len(m.values), len(m.increments)
    grid = [[float("nan") if v is None else v for v in row] for row in m.values]
    fig, ax = plt.subplots(figsize=(1.2 * n_cols + 2, 1.0 * n_rows + 1.5))
    image = ax.imshow(grid, cmap="viridis" if m.higher_is_better else "viridis_r", aspect="auto")
    for i in range(n_rows):
        for j in range(n_cols):
            ax.text(j, i, _fmt(m.values[i][j]), ha="center", va="center", color="w", fontsize=8)
    ax.set_xticks(range(n_cols), m.increments)
    ax.set_yticks(range(n_rows), [f"after {name}" for name in m.increments[:n_rows]])
    ax.set_title(m.metric)
    fig.colorbar(image)
    return _save(fig, run_dir / f"continual_{m.metric}.png")


def _save(fig, path: Path) -> str:
    """savefig to a temporary file in the same folder, then rename: a reader never sees half a PNG."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".png")
    os.close(fd)
    try:
        fig.tight_layout()
        fig.savefig(tmp, dpi=110)
        os.chmod(tmp, 0o644)  # mkstemp makes it private; a report is for everyone who can read the run
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path.name
