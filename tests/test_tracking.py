"""W&B tracking: a real offline wandb run of a tiny job, read back from its .wandb file with wandb's own reader
(`wandb leet inspect --json`), and the guarantee that logging never waits on wandb."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from distill.config import compose
from distill.errors import ConfigError
from distill.tracking.metrics_log import read_metrics
from distill.tracking.wandb_log import WandbLog, check_wandb

SECRET = "wandb-key-that-must-never-be-written-0123456789"
# What every logged step carries on both paths (the distributed one adds more buffer figures).
STEP_KEYS = {
    "loss",
    "loss/forward_kl",
    "loss/ce",
    "stage",
    "temperature",
    "alpha",
    "buffer/depth",
    "teacher/tokens_per_s",
    "student/tokens_per_s",
    "lr",
    "grad_norm",
}


def read_wandb(run_dir: Path) -> list[dict]:
    """Records of the run's offline .wandb file(s), as wandb itself decodes them."""
    files = sorted(run_dir.glob("wandb/offline-run-*/run-*.wandb"))
    assert files, f"no offline wandb run under {run_dir}/wandb"
    wandb_cli = Path(sys.executable).parent / "wandb"
    records = []
    for f in files:
        out = subprocess.run(
            [str(wandb_cli), "leet", "inspect", "--json", str(f)], capture_output=True, text=True
        )
        assert out.returncode == 0, out.stderr
        records += [json.loads(line) for line in out.stdout.splitlines() if line.strip()]
    return records


def wandb_history(records: list[dict]) -> list[dict]:
    return [r["history"]["item"] for r in records if r["type"] == "history"]


def wandb_summary(records: list[dict]) -> dict:
    out: dict = {}
    for r in records:
        if r["type"] == "summary":
            out.update(r["summary"]["update"])
    return out


def assert_no_secret(run_dir: Path) -> None:
    for path in run_dir.rglob("*"):
        if path.is_file():
            assert SECRET.encode() not in path.read_bytes(), f"the API key was written to {path}"


@pytest.mark.slow
def test_offline_wandb_run_holds_every_metric_and_the_config(
    tiny_teacher, base_overrides, tmp_path, monkeypatch
):
    from launch.distill import run

    monkeypatch.setenv("WANDB_API_KEY", SECRET)  # present in the environment, as on a cluster
    monkeypatch.setenv("WANDB_SILENT", "true")
    # One stage: every logged step carries every term (a curriculum's warm-up logs CE only).
    overrides = [
        *base_overrides,
        "curriculum=single_stage",
        "train.steps=3",
        "train.log_every=1",
        "eval.generate_examples=0",
    ]
    cfg = compose([*overrides, "tracking.wandb=true", "tracking.wandb_mode=offline"], run_dir=str(tmp_path))
    summary = run(cfg)

    jsonl = read_metrics(tmp_path / "metrics.jsonl")
    assert set(jsonl[-1]) >= STEP_KEYS
    assert jsonl[-1]["alpha"] == pytest.approx(1.0 / 1.5)  # kd: forward_kl 1.0, ce 0.5
    assert jsonl[-1]["teacher/tokens_per_s"] > 0 and jsonl[-1]["buffer/depth"] == 0

    records = read_wandb(tmp_path)
    history = wandb_history(records)
    assert [h["_step"] for h in history] == [0, 1, 2]
    for got, want in zip(history, jsonl, strict=True):
        assert set(got) >= STEP_KEYS
        for key in STEP_KEYS:
            assert got[key] == (pytest.approx(want[key]) if isinstance(want[key], float) else want[key]), key
        # The single process's peak memory (the Ray roles: test_online_distributed's baseline).
        assert want["mem/trainer/peak_rss_mib"] > 0
        assert got["mem/trainer/peak_rss_mib"] == pytest.approx(want["mem/trainer/peak_rss_mib"])
    final = wandb_summary(records)
    assert final["eval/agreement"] == pytest.approx(summary["agreement"])
    assert final["eval/mem/trainer/peak_rss_mib"] == summary["mem/trainer/peak_rss_mib"]  # eval.json's peak
    assert final["eval/ce"] == pytest.approx(summary["ce"])
    (run_record,) = [r["run"] for r in records if r["type"] == "run"]
    config = run_record["config"]["update"]
    assert config["loss"]["terms"]["forward_kl"]["name"] == "forward_kl"
    assert config["train"]["steps"] == 3 and config["tracking"]["wandb_mode"] == "offline"
    assert_no_secret(tmp_path)


def test_log_never_waits_for_wandb(tmp_path):
    """wandb.init takes seconds; 20 000 log() calls made meanwhile return at once (a full queue drops)."""
    tracker = WandbLog(project="p", mode="offline", run_dir=tmp_path, config={"x": 1}, max_queue=1000)
    start = time.perf_counter()
    for step in range(20_000):
        tracker.log({"step": step, "loss": 1.0})
    elapsed = time.perf_counter() - start
    assert elapsed < 1.0, f"20k log() calls took {elapsed:.2f} s"
    assert tracker.dropped > 0  # the thread was still starting wandb: records dropped, not waited for
    tracker.finish({"done": 1})
    assert tracker.error is None
    assert wandb_summary(read_wandb(tmp_path))["done"] == 1


def test_online_without_a_key_fails_before_the_run(monkeypatch, tmp_path):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    with pytest.raises(ConfigError, match="WANDB_API_KEY"):
        check_wandb("online")
    with pytest.raises(ConfigError, match="wandb_mode='cloud'"):
        check_wandb("cloud")


def test_wandb_cli_is_available():
    assert shutil.which("wandb", path=str(Path(sys.executable).parent)), (
        "the wandb reader needs the wandb CLI"
    )
