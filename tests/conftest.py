"""Shared fixtures: one tiny task-trained teacher per test session, built by the real prepare-demo code."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# See launch/cli.py: spinning OpenMP threads stall shared cores.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
# DeepSpeed's JIT-built ops, shared by every process of the session (and by `make setup`, which builds the CPU comm
# op there): the Ray student actors get it from here (distill.cluster.student_group forwards it).
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache/distill/torch_extensions"))

# Small enough for seconds per run, big enough that the teacher has learned something worth distilling.
TEST_OVERRIDES = [
    "experiment=ci_tiny",
    "prepare.teacher_steps=150",
    "prepare.teacher_batch_size=16",
    "prepare.teacher_train_size=2000",
    "prepare.teacher_levels=[1]",
    "prepare.vocab_size=384",
    "prepare.eval_examples=16",
    "tracking.progress=false",
]


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    """DISTILL_TEST_CACHE keeps the trained test teacher between local sessions; CI starts empty."""
    keep = os.environ.get("DISTILL_TEST_CACHE")
    if keep:
        return Path(keep)
    if os.environ.get("PYTEST_XDIST_WORKER"):  # the workers share one (prepare_demo locks what it builds)
        shared = tmp_path_factory.getbasetemp().parent / "distill-cache"
        shared.mkdir(exist_ok=True)
        return shared
    return tmp_path_factory.mktemp("distill-cache")


@pytest.fixture(scope="session")
def base_overrides(cache_dir) -> list[str]:
    return [*TEST_OVERRIDES, f"prepare.cache_dir={cache_dir}"]


@pytest.fixture(scope="session")
def tiny_teacher(base_overrides) -> Path:
    """The test teacher's folder (trained once per session by `prepare_demo`)."""
    from distill.config import compose
    from distill.models.resolve import demo_teacher_dir
    from launch.prepare_demo import prepare_demo

    cfg = compose(base_overrides)
    prepare_demo(cfg)
    return demo_teacher_dir(cfg)


@pytest.fixture(scope="session")
def second_teacher(tiny_teacher, tmp_path_factory) -> Path:
    """Another teacher on the test teacher's tokenizer (several-teacher runs): the same architecture, other
    (random, seeded) weights, so its outputs differ from the test teacher's everywhere."""
    from distill.models.loading import load_causal_lm, load_tokenizer, save_model
    from distill.models.tiny import build_model

    folder = tmp_path_factory.mktemp("teachers") / "other"
    config = load_causal_lm(tiny_teacher).config
    save_model(build_model(config, seed=11), load_tokenizer(tiny_teacher), folder)
    return folder


@pytest.fixture(scope="session")
def ray_cluster():
    """One simulated two-node Ray cluster for the whole session (each node: 2 CPUs, its own object store). Under
    `make test`'s two pytest-xdist workers, each worker's session starts its own."""
    import tempfile

    import ray
    from ray.cluster_utils import Cluster

    # ray.cluster_utils writes $TMPDIR/ray/ray_current_cluster and fails if the folder is missing.
    os.makedirs(os.path.join(tempfile.gettempdir(), "ray"), exist_ok=True)
    store = 256 * 2**20
    cluster = Cluster(
        initialize_head=True,
        head_node_args={
            "num_cpus": 2,
            "resources": {"node_a": 1},
            "object_store_memory": store,
            "include_dashboard": False,
        },
    )
    cluster.add_node(num_cpus=2, resources={"node_b": 1}, object_store_memory=store)
    ray.init(address=cluster.address, logging_level="ERROR")
    yield cluster
    ray.shutdown()
    cluster.shutdown()


@pytest.fixture(scope="session")
def local_slurm() -> Iterator[dict[str, str]]:
    """A real Slurm on this machine (munged, slurmctld, two slurmd "nodes"; scripts/local_slurm.sh installs the
    Debian packages if missing). Returns the environment for sbatch/squeue; skips, saying why, only where the
    daemons cannot be installed or started (not root, no apt)."""
    import subprocess
    import sys

    script = Path(__file__).parent.parent / "scripts" / "local_slurm.sh"
    env = {**os.environ, "LOCAL_SLURM_NODES": "2", "LOCAL_SLURM_CPUS": "1"}
    proc = subprocess.run(["bash", str(script), "start"], env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        reason = f"local Slurm unavailable: {proc.stderr.strip()[-600:]}"
        print(reason, file=sys.stderr)
        pytest.skip(reason)
    conf = proc.stdout.split("export SLURM_CONF=")[1].split()[0]
    yield {**os.environ, "SLURM_CONF": conf}
    # Only the session that started the daemons stops them, and not while another session's jobs run.
    queued = subprocess.run(["squeue", "-h"], env={**env, "SLURM_CONF": conf}, capture_output=True, text=True)
    if "# started=1" in proc.stdout and not queued.stdout.strip():
        subprocess.run(["bash", str(script), "stop"], env=env, capture_output=True, text=True)
