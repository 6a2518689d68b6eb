"""Hydra multirun: `distill -m loss.temperature=1,2 loss=kd,jsd` (4 tiny runs) with the basic launcher and with
hydra-submitit-launcher on the local Slurm; each run gets its own folder and the sweep a summary table."""

from __future__ import annotations

import csv
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from launch.sweep import summarize

pytestmark = pytest.mark.slow
SWEEP = ["loss.temperature=1,2", "loss=kd,jsd"]
TINY = [
    "train.steps=2",
    "curriculum=single_stage",
    "train.log_every=1",
    "eval.generate_examples=0",
    "eval.max_batches=1",
]
WANT = {("1", "kd"), ("2", "kd"), ("1", "jsd"), ("2", "jsd")}


def _distill_multirun(overrides: list[str], sweep_dir: Path, env: dict[str, str] | None = None) -> str:
    cmd = [sys.executable, "-m", "launch.cli", "-m", *SWEEP, *overrides, f"hydra.sweep.dir={sweep_dir}"]
    start = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    print(f"multirun {sweep_dir.name}: {time.monotonic() - start:.1f} s")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def _check_sweep(sweep_dir: Path) -> None:
    runs = sorted(p for p in sweep_dir.iterdir() if (p / "config.yaml").is_file())
    assert [p.name for p in runs] == ["0", "1", "2", "3"]  # one folder per run
    seen = set()
    for run in runs:
        cfg = yaml.safe_load((run / "config.yaml").read_text())
        assert cfg["run_dir"] == str(run)  # each run wrote into its own folder
        assert (run / "metrics.jsonl").is_file() and list((run / "student").glob("*.safetensors"))
        term = "jsd" if "jsd" in cfg["loss"]["terms"] else "kd"
        seen.add((f"{cfg['loss']['temperature']:g}", term))
    assert seen == WANT

    rows = list(csv.DictReader((sweep_dir / "summary.csv").open()))
    assert {(r["loss.temperature"], r["loss"]) for r in rows} == WANT
    assert all(r["status"] == "done" and float(r["eval/ce"]) > 0 and float(r["train/loss"]) > 0 for r in rows)
    jsd_rows = [r for r in rows if r["loss"] == "jsd"]
    assert all(r["train/loss/jsd"] for r in jsd_rows) and not any(
        r.get("train/loss/forward_kl") for r in jsd_rows
    )
    table = (sweep_dir / "summary.md").read_text().splitlines()
    assert table[0].startswith("| run | ") and len(table) == 2 + 4


def test_basic_launcher_sweep_with_summary_callback(tiny_teacher, base_overrides, tmp_path):
    sweep = tmp_path / "basic"
    out = _distill_multirun([*base_overrides, *TINY, "hydra/callbacks=sweep_summary"], sweep)
    _check_sweep(sweep)
    assert "sweep summary (4 runs)" in out


def test_submitit_launcher_on_local_slurm(local_slurm, tiny_teacher, base_overrides, tmp_path):
    sweep = tmp_path / "submitit"
    launcher = [
        "hydra/launcher=submitit_slurm",
        "hydra.launcher.partition=debug",
        "hydra.launcher.cpus_per_task=1",
        "hydra.launcher.timeout_min=30",
        f"hydra.launcher.submitit_folder={sweep}/.submitit/%j",
    ]
    out = _distill_multirun(
        [*base_overrides, *TINY, *launcher, "hydra/callbacks=sweep_summary"], sweep, local_slurm
    )
    assert "sweep summary (4 runs)" in out  # the callback ran in the submitting process after the jobs
    _check_sweep(sweep)
    # The command-line route to the same table (the run folders were written by Slurm jobs).
    (sweep / "summary.csv").unlink()
    assert len(summarize(sweep)) == 4
    _check_sweep(sweep)
    logs = list((sweep / ".submitit").glob("*/*_log.out"))
    assert len(logs) == 4  # four Slurm jobs ran them


def test_sweep_summary_cli_marks_unfinished_runs(tmp_path):
    (tmp_path / "0" / ".hydra").mkdir(parents=True)
    (tmp_path / "0" / "config.yaml").write_text("run_dir: x\n")
    (tmp_path / "0" / ".hydra" / "overrides.yaml").write_text("- loss.temperature=2\n")
    (tmp_path / "0" / "metrics.jsonl").write_text('{"step": 0, "loss": 3.5, "loss/ce": 1.0}\n')
    out = subprocess.run(
        [sys.executable, "-m", "launch.cli", "sweep-summary", str(tmp_path)], capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    assert "| run | loss.temperature | train/step | train/loss | train/loss/ce | status |" in out.stdout
    assert "| 0 | 2 | 0 | 3.5 | 1 | incomplete |" in out.stdout
    empty = subprocess.run(
        [sys.executable, "-m", "launch.cli", "sweep-summary", str(tmp_path / "0")],
        capture_output=True,
        text=True,
    )
    assert empty.returncode == 1 and "no run folders" in empty.stderr
