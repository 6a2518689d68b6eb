"""`distill sweep-summary <sweep dir>`: one table of a Hydra multirun's runs and their final metrics.

Every run folder under the sweep dir (Hydra's `<sweep dir>/<job num>/`) contributes a row: the overrides Hydra
swept (`.hydra/overrides.yaml`), the last logged training step (loss and every loss term) and the held-out
evaluation (`eval.json`), as train/... and eval/... columns. Written as `summary.md` and `summary.csv` in the sweep dir. Runs that did not finish
are listed with status `incomplete` rather than dropped.

Also a Hydra callback, so a sweep writes its table when it ends (any launcher: basic, submitit):
    distill -m loss.temperature=1,2 loss=kd,jsd hydra/callbacks=sweep_summary
"""

from __future__ import annotations

import csv
import io
import json
import sys
from pathlib import Path
from typing import Any

import yaml

from distill.io import atomic_write_text
from distill.tracking.metrics_log import read_metrics

TRAIN_KEYS = ("step", "loss", "tokens_per_s")
EVAL_KEYS = ("ce", "perplexity", "kl_to_teacher", "agreement", "exact_match")


def run_dirs(sweep_dir: Path) -> list[Path]:
    """Run folders (those with a config.yaml), in job-number order when the names are numbers."""
    dirs = [p.parent for p in sweep_dir.glob("*/config.yaml")]
    return sorted(dirs, key=lambda p: (not p.name.isdigit(), int(p.name) if p.name.isdigit() else 0, p.name))


def summarize_run(run_dir: Path) -> dict[str, Any]:
    row: dict[str, Any] = {"run": run_dir.name}
    overrides_file = run_dir / ".hydra" / "overrides.yaml"
    if overrides_file.is_file():
        for item in yaml.safe_load(overrides_file.read_text()) or []:
            key, _, value = item.partition("=")
            row[key.lstrip("+~")] = value
    metrics = read_metrics(run_dir / "metrics.jsonl") if (run_dir / "metrics.jsonl").is_file() else []
    if metrics:
        last = metrics[-1]
        # train/ and eval/ prefixes keep metric columns apart from swept keys (`loss=jsd` vs the loss value).
        row.update({f"train/{k}": last[k] for k in TRAIN_KEYS if k in last})
        row.update({f"train/{k}": v for k, v in last.items() if k.startswith("loss/")})
    eval_file = run_dir / "eval.json"
    if eval_file.is_file():
        summary = json.loads(eval_file.read_text())
        row.update({f"eval/{k}": summary[k] for k in EVAL_KEYS if k in summary})
    row["status"] = "done" if eval_file.is_file() and (run_dir / "student").is_dir() else "incomplete"
    return row


def summarize(sweep_dir: str | Path) -> list[dict[str, Any]]:
    """Rows of the sweep's runs; writes summary.md and summary.csv into the sweep dir."""
    sweep_dir = Path(sweep_dir)
    rows = [summarize_run(d) for d in run_dirs(sweep_dir)]
    if not rows:
        raise FileNotFoundError(f"{sweep_dir} holds no run folders (no */config.yaml); is it a multirun dir?")
    columns = list(dict.fromkeys(k for row in rows for k in row))
    columns = ["run", *[c for c in columns if c not in ("run", "status")], "status"]
    atomic_write_text(sweep_dir / "summary.csv", _csv(rows, columns))
    atomic_write_text(sweep_dir / "summary.md", _markdown(rows, columns))
    return rows


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "" if value is None else str(value)


def _markdown(rows: list[dict[str, Any]], columns: list[str]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_fmt(row.get(c)) for c in columns) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def _csv(rows: list[dict[str, Any]], columns: list[str]) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue()


try:
    from hydra.experimental.callback import Callback
except ImportError:  # pragma: no cover - hydra is a dependency; keep the CLI usable without it
    Callback = object  # type: ignore[assignment,misc]


class SweepSummaryCallback(Callback):
    """Writes the sweep's summary.md / summary.csv when a multirun ends."""

    def on_multirun_end(self, config, **kwargs) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        rows = summarize(sweep_dir)
        print(f"sweep summary ({len(rows)} runs): {sweep_dir / 'summary.md'}")
        print((sweep_dir / "summary.md").read_text())


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1 or args[0].startswith("-"):
        sys.exit("usage: distill sweep-summary <multirun sweep dir>")
    try:
        summarize(args[0])
    except FileNotFoundError as err:
        sys.exit(f"distill sweep-summary: {err}")
    print((Path(args[0]) / "summary.md").read_text(), end="")
