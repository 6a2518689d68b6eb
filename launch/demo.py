"""`distill demo`: teacher vs KD student vs CE-only student on the embedded task, same student/steps/data.

Runs prepare-demo (cached), then the configured KD run (the three-stage curriculum by default) and the CE-only
baseline (hard labels, one stage), and prints one table.
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path

from omegaconf import DictConfig, OmegaConf
from rich.console import Console
from rich.table import Table

from distill.config import LossConfig
from distill.config.schema import CurriculumConfig
from distill.config.store import CONFIG_DIR
from distill.data.build import build_data
from distill.eval.runs import evaluate
from distill.io import atomic_write_json, atomic_write_text
from distill.models.loading import load_causal_lm, load_tokenizer
from distill.models.resolve import require_teacher
from distill.xtok.build import row_encoder
from launch.app import hydra_app
from launch.distill import run
from launch.prepare_demo import prepare_demo

BASELINE_LOSS = "ce_only"  # the no-teacher baseline: hard-label cross-entropy only
COLUMNS = (
    ("ce", "held-out CE"),
    ("ppl", "ppl"),
    ("kl_to_teacher", "KL to teacher"),
    ("agreement", "top-1 agreement"),
    ("exact_match", "exact-match"),
)


def with_changes(cfg: DictConfig, **changes) -> DictConfig:
    """A copy of cfg with top-level nodes replaced (the schema still types every value)."""
    out = copy.deepcopy(cfg)
    OmegaConf.set_struct(out, False)
    for key, value in changes.items():
        out[key] = value
    OmegaConf.set_struct(out, True)
    return out


def group_config(group: str, name: str, schema) -> DictConfig:
    """hydra_configs/<group>/<name>.yaml typed by its schema dataclass (what `<group>=<name>` would give)."""
    return OmegaConf.merge(OmegaConf.structured(schema), OmegaConf.load(CONFIG_DIR / group / f"{name}.yaml"))


def teacher_row(cfg: DictConfig) -> dict:
    path = require_teacher(cfg)
    tokenizer = load_tokenizer(path)
    data = build_data(cfg, row_encoder(cfg, tokenizer))
    row = evaluate(cfg, load_causal_lm(path), tokenizer, data)
    return {**row, "kl_to_teacher": 0.0, "agreement": 1.0}


def compare(cfg: DictConfig) -> dict[str, dict]:
    prepare_demo(cfg)
    root = Path(cfg.run_dir)
    rows = {"teacher": teacher_row(cfg)}
    rows["KD student"] = run(with_changes(cfg, run_dir=str(root / "kd")))
    # The baseline trains plain CE from start to end: no curriculum stages re-weighting it.
    baseline = with_changes(
        cfg,
        run_dir=str(root / BASELINE_LOSS),
        loss=group_config("loss", BASELINE_LOSS, LossConfig),
        curriculum=group_config("curriculum", "single_stage", CurriculumConfig),
    )
    rows["CE-only student"] = run(baseline)
    atomic_write_json(root / "demo.json", rows)
    atomic_write_text(root / "demo.md", markdown_table(rows))
    print_table(rows)
    return rows


def markdown_table(rows: dict[str, dict]) -> str:
    head = "| model | " + " | ".join(title for _, title in COLUMNS) + " |"
    lines = [head, "|" + "---|" * (len(COLUMNS) + 1)]
    for name, r in rows.items():
        lines.append(f"| {name} | " + " | ".join(_fmt(key, r.get(key)) for key, _ in COLUMNS) + " |")
    return "\n".join(lines) + "\n"


def print_table(rows: dict[str, dict]) -> None:
    table = Table(title="teacher vs KD student vs CE-only student (held-out split)")
    table.add_column("model")
    for _, title in COLUMNS:
        table.add_column(title, justify="right")
    for name, r in rows.items():
        table.add_row(name, *(_fmt(key, r.get(key)) for key, _ in COLUMNS))
    # A log file is not a terminal: keep rows on one line instead of wrapping to 80 columns.
    Console(width=None if sys.stdout.isatty() else 120).print(table)


def _fmt(key: str, value) -> str:
    if value is None:
        return "-"
    return f"{value:.1%}" if key in ("agreement", "exact_match") else f"{value:.4f}"


@hydra_app(config_name="demo")
def main(cfg: DictConfig) -> None:
    compare(cfg)
