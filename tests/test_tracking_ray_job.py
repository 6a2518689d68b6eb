"""`ray job submit -- distill ...` against a running Ray cluster (a real `ray start --head` with its job server on
localhost), with W&B on: the online distributed run is the job's entrypoint, connects with cluster.address=auto
(RAY_ADDRESS, set by the job supervisor), and its offline W&B run holds the distributed path's metrics."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from distill.tracking.metrics_log import read_metrics
from tests.test_tracking import STEP_KEYS, read_wandb, wandb_history, wandb_summary

ROOT = Path(__file__).parent.parent
BIN = Path(sys.executable).parent
# Clear of slurm/ray_cluster.py's per-job blocks' first ports, and below the ephemeral range (32768 and up), where
# another process's outgoing connection may hold any port.
PORT = 20000 + (os.getpid() % 127) * 100 + 50


@pytest.fixture
def ray_head(tmp_path):
    """A one-node Ray cluster started the way a user starts one; stopped by signalling its `ray start`
    (never `ray stop`, which would stop every Ray instance on this machine)."""
    temp = Path(f"/tmp/ray-jobtest-{os.getpid()}")
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "RAY_AUTH_MODE": "disabled"}
    cmd = [
        str(BIN / "ray"),
        "start",
        "--head",
        "--block",
        f"--temp-dir={temp}",
        "--node-ip-address=127.0.0.1",
        f"--port={PORT}",
        f"--ray-client-server-port={PORT + 1}",
        "--include-dashboard=true",  # the job server lives in the dashboard process
        "--dashboard-host=127.0.0.1",
        f"--dashboard-port={PORT + 2}",
        f"--node-manager-port={PORT + 8}",
        f"--object-manager-port={PORT + 9}",
        f"--dashboard-agent-listen-port={PORT + 10}",
        f"--dashboard-agent-grpc-port={PORT + 11}",
        "--num-cpus=2",
        f"--object-store-memory={256 * 2**20}",
        "--disable-usage-stats",
    ]
    log = (tmp_path / "head.log").open("w")
    head = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait = [
            sys.executable,
            str(ROOT / "slurm" / "ray_cluster.py"),
            "wait",
            f"127.0.0.1:{PORT}",
            "1",
            "180",
        ]
        subprocess.run([*wait, str(head.pid)], env=env, check=True)
        yield env, f"http://127.0.0.1:{PORT + 2}"
    finally:
        head.send_signal(signal.SIGTERM)
        head.wait(timeout=120)
        log.close()
        subprocess.run(["rm", "-rf", str(temp)], check=False)


@pytest.mark.slow
@pytest.mark.distributed
def test_ray_job_submit_runs_distill_with_wandb(ray_head, tiny_teacher, base_overrides, tmp_path):
    env, dashboard = ray_head
    run_dir = tmp_path / "run"
    entrypoint = [
        "distill",
        "cluster=local_ray",
        "cluster.address=auto",
        *base_overrides,
        "curriculum=single_stage",
        "train.steps=3",
        "train.log_every=1",
        "eval.generate_examples=0",
        "eval.max_batches=1",
        "tracking.wandb=true",
        f"hydra.run.dir={run_dir}",
    ]
    job_env = {
        **env,
        "WANDB_SILENT": "true",
        "TORCH_EXTENSIONS_DIR": os.environ["TORCH_EXTENSIONS_DIR"],
    }
    proc = subprocess.run(
        [str(BIN / "ray"), "job", "submit", f"--address={dashboard}", "--", *entrypoint],
        env=job_env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0 and "succeeded" in proc.stdout, proc.stdout[-4000:] + proc.stderr[-2000:]

    jsonl = read_metrics(run_dir / "metrics.jsonl")
    assert [r["step"] for r in jsonl] == [0, 1, 2]
    assert list((run_dir / "student").glob("*.safetensors"))
    history = wandb_history(read_wandb(run_dir))
    assert [h["_step"] for h in history] == [0, 1, 2]
    for got in history:
        assert set(got) >= STEP_KEYS | {"buffer/producer_wait_s", "buffer/consumer_wait_s"}
        assert got["teacher/tokens_per_s"] > 0 and got["student/tokens_per_s"] > 0
    assert "eval/agreement" in wandb_summary(read_wandb(run_dir))
