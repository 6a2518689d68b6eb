"""slurm/distill.sbatch on a real Slurm (slurmctld + two slurmd "nodes" on this machine, see the `local_slurm`
fixture): the Ray head starts on node1 and a worker on node2 through srun, the driver trains the tiny online
run across them, then Ray is torn down.

One job lives through what a long job on a shared cluster meets (one job, so the suite starts Ray on Slurm three
times, not four):
1. The worker's first `ray start` is made to fail at once (a `ray` shim first on PATH, as a GCS that does not
   answer in 30 s fails it): the script starts it again.
2. `scontrol requeue` of the running job (hard stop) resumes from the last periodic checkpoint.
3. The Slurm time-limit signal (USR1 to the batch shell, as `--signal=B:USR1@300` sends it) makes the driver
   checkpoint after its current step and exit 75, and the script requeues itself; the third run finishes.
At the end: both Slurm nodes joined the Ray cluster in every run, the teacher and student actors sat on
different Ray nodes, the metrics of all three runs form the uninterrupted curve's steps, each once, the student
export and eval.json exist, and no Ray process or temp dir of the job survives it.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from distill.tracking.metrics_log import read_metrics

ROOT = Path(__file__).parent.parent
SBATCH = ROOT / "slurm" / "distill.sbatch"
pytestmark = [pytest.mark.slow, pytest.mark.distributed, pytest.mark.slurm]

# The tiny online run (train.steps from the test), split over the two Slurm nodes.
RUN = [
    "train.log_every=1",
    "data.num_train=80",
    "eval.generate_examples=0",
    "eval.max_batches=1",
]


def _slurm(env: dict[str, str], *args: str) -> str:
    return subprocess.run(args, env=env, capture_output=True, text=True, check=True).stdout


def _job(env: dict[str, str], job: str) -> dict[str, str]:
    """`scontrol show job` as key -> value (jobs stay visible for MinJobAge = 300 s after they end)."""
    out = _slurm(env, "scontrol", "show", "job", job)
    return dict(re.findall(r"(\w+)=(\S*)", out))


def _submit(env: dict[str, str], tmp: Path, overrides: list[str], activate: str = sys.prefix) -> str:
    job_env = {**env, "DISTILL_ENV": activate, "DISTILL_RUN_DIR": str(tmp / "run")}
    out = subprocess.run(
        ["sbatch", "--parsable", "-N", "2", f"--output={tmp}/job.out", str(SBATCH), *overrides],
        env=job_env,
        cwd=tmp,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return out.strip().split(";")[0]


def _wait(env: dict[str, str], job: str, until, what: str, tmp: Path, timeout: float = 600) -> dict[str, str]:
    """Poll until `until(job_info)` holds. A requeued job waits out Slurm's fixed requeue delay (BeginTime,
    ~2 min) on a real cluster; the test starts it 2 s from now instead, once per restart. Not at once: a job
    started within the second of its requeue gets "Job credential revoked" from slurmd (the revocation has
    one-second resolution) and ends FAILED, which happened once in CI."""
    deadline = time.monotonic() + timeout
    expedited: set[str] = set()
    while True:
        info = _job(env, job)
        if until(info):
            return info
        if info["JobState"] in ("FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"):
            pytest.fail(f"job {job} {info['JobState']} waiting for {what}:\n{_tail(tmp)}")
        if (
            info["JobState"] == "PENDING"
            and info.get("Reason") == "BeginTime"
            and info["Restarts"] not in expedited
        ):
            subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now+2"], env=env, check=False)
            expedited.add(info["Restarts"])
        if time.monotonic() > deadline:
            pytest.fail(
                f"job {job} still {info['JobState']} after {timeout:.0f} s waiting for {what}:\n{_tail(tmp)}"
            )
        time.sleep(1)


def _tail(tmp: Path, lines: int = 60) -> str:
    log = tmp / "job.out"
    return (
        "\n".join(log.read_text(errors="replace").splitlines()[-lines:]) if log.exists() else "(no job.out)"
    )


def _no_ray_left(job: str) -> list[str]:
    """Command lines of processes still using the job's Ray temp dir."""
    ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True, check=True).stdout
    return [line for line in ps.splitlines() if f"/ray-{job}/" in line or f"ray-{job} " in line]


def _latest_step(run_dir: Path) -> int | None:
    pointer = run_dir / "checkpoints" / "latest"
    return int(pointer.read_text().strip().removeprefix("step-")) if pointer.is_file() else None


def _failing_first_join(tmp: Path) -> str:
    """An activate script: the project's environment, then a `ray` shim whose first worker start (one joining
    an --address) fails at once. Failure injection: everything else runs the real `ray`."""
    shim = tmp / "shim"
    shim.mkdir()
    (shim / "ray").write_text(
        "#!/usr/bin/env bash\n"
        f'if [[ " $* " == *" start "* && " $* " == *" --address="* && ! -e {tmp}/injected ]]; then\n'
        f"  touch {tmp}/injected; echo 'injected: ray start fails' >&2; exit 1\n"
        "fi\n"
        f'exec {sys.prefix}/bin/ray "$@"\n'
    )
    (shim / "ray").chmod(0o755)
    activate = tmp / "activate"
    activate.write_text(f"source {sys.prefix}/bin/activate\nexport PATH={shim}:$PATH\n")
    return str(activate)


def test_a_job_across_two_nodes_survives_a_failed_join_a_requeue_and_the_time_limit(
    local_slurm, tiny_teacher, base_overrides, tmp_path
):
    steps = 24  # ~0.3 s each: a window of seconds in which the signal lands mid-run
    overrides = [*base_overrides, *RUN, f"train.steps={steps}", "checkpoint.every_steps=4"]
    job = _submit(local_slurm, tmp_path, overrides, activate=_failing_first_join(tmp_path))
    run_dir = tmp_path / "run"

    # 2. A hard requeue once the first checkpoint exists: the job restarts from it.
    _wait(local_slurm, job, lambda i: _latest_step(run_dir) is not None, "a checkpoint", tmp_path)
    _slurm(local_slurm, "scontrol", "requeue", job)
    _wait(
        local_slurm, job, lambda i: i["Restarts"] == "1" and i["JobState"] == "RUNNING", "restart", tmp_path
    )

    # 3. The time-limit warning once the second run has trained a step past its checkpoint.
    def trained_past_resume(info: dict[str, str]) -> bool:
        log = (tmp_path / "job.out").read_text(errors="replace")
        restored = re.findall(r"restored \S+step-(\d+)", log)
        if not restored or not (run_dir / "metrics.jsonl").exists():
            return False
        return read_metrics(run_dir / "metrics.jsonl")[-1]["step"] >= int(restored[-1])

    _wait(local_slurm, job, trained_past_resume, "a step after the resume", tmp_path)
    _slurm(local_slurm, "scancel", "--batch", "--signal=USR1", job)
    info = _wait(
        local_slurm,
        job,
        lambda i: i["JobState"] == "COMPLETED" and i["Restarts"] == "2",
        "completion",
        tmp_path,
    )
    assert info["NodeList"] == "node[1-2]" and info["ExitCode"] == "0:0"

    log = (tmp_path / "job.out").read_text()
    # 1. The worker's first `ray start` failed at once and the script started it again.
    assert "injected: ray start fails" in log and "failed with 1 (try 1 of 3)" in log, _tail(tmp_path)
    restored = [int(s) for s in re.findall(r"restored \S+step-(\d+)", log)]
    stopped = [int(s) for s in re.findall(r"stopped after step \d+; checkpoint \S+step-(\d+)", log)]
    assert len(restored) == 2 and len(stopped) == 1, _tail(tmp_path)
    assert restored[0] % 4 == 0 and restored[0] >= 4  # the periodic checkpoint before the hard requeue
    assert restored[1] == stopped[0] > restored[0]  # the checkpoint the signal asked for
    assert "driver exited with 75" in log and "requeueing job" in log
    assert log.count("2 Ray nodes alive") == 3  # every run had both nodes
    # Each step once, in order: the rewound metrics of the runs join into the whole curve.
    assert [r["step"] for r in read_metrics(run_dir / "metrics.jsonl")] == list(range(steps))
    # One Ray node per Slurm node: the teacher actor on one, the student rank on the other.
    stats = json.loads((run_dir / "online_stats.json").read_text())
    (teacher_nodes,) = stats["teacher_nodes"]
    assert len(set(teacher_nodes) | set(stats["student_nodes"])) == 2
    assert list((run_dir / "student").glob("*.safetensors"))
    assert (run_dir / "eval.json").is_file()
    assert _no_ray_left(job) == []
    assert not (Path(os.environ.get("TMPDIR", "/tmp")) / f"ray-{job}").exists()  # the job's Ray temp dir
