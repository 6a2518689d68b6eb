"""The optional extras (peft, wandb, submitit, ray, deepspeed) are really optional: a single-process distillation
runs with all of them unimportable, and each feature that needs one fails with a line naming the extra to install.

The subprocesses hide the extras the way an environment without them would look: a meta-path finder in front of
the standard one finds neither their modules nor their distributions, so `import ray` raises ModuleNotFoundError and
`importlib.util.find_spec("ray")` is None."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from distill.errors import ConfigError
from launch import extras
from launch.extras import EXTRA_MODULES, check_launcher_extras, extra_of

ROOT = Path(__file__).resolve().parents[1]
HIDDEN = ("peft", "wandb", "submitit", "ray", "deepspeed")

HIDE_EXTRAS = f"""
import sys
from importlib.machinery import PathFinder
HIDDEN = {HIDDEN!r}

def hidden(name):
    return name.split(".")[0] in HIDDEN

class Hiding:
    @classmethod
    def find_spec(cls, name, path=None, target=None):
        return None if hidden(name) else PathFinder.find_spec(name, path, target)

    @classmethod
    def find_distributions(cls, *args, **kwargs):
        return (d for d in PathFinder.find_distributions(*args, **kwargs) if not hidden(d.metadata["Name"].lower()))

    @classmethod
    def invalidate_caches(cls):
        PathFinder.invalidate_caches()

sys.meta_path[:] = [Hiding if finder is PathFinder else finder for finder in sys.meta_path]
"""
RUN_CLI = """
import runpy
sys.argv = ["distill", *sys.argv[1:]]
runpy.run_module("launch.cli", run_name="__main__", alter_sys=True)
"""


def _python(code: str, *args: str) -> subprocess.CompletedProcess:
    env = {key: value for key, value in os.environ.items() if key != "HYDRA_FULL_ERROR"}
    return subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, cwd=ROOT, env=env, timeout=600
    )


def _distill(*args: str) -> subprocess.CompletedProcess:
    return _python(HIDE_EXTRAS + RUN_CLI, *args)


def test_the_extras_are_hidden_in_the_subprocess():
    probe = """
import importlib, importlib.metadata, importlib.util
for name in HIDDEN:
    assert importlib.util.find_spec(name) is None, name
    try:
        importlib.import_module(name)
    except ModuleNotFoundError:
        pass
    else:
        raise AssertionError(name)
try:
    importlib.metadata.version("peft")
except importlib.metadata.PackageNotFoundError:
    pass
else:
    raise AssertionError("peft's distribution is visible")
import transformers  # the core dependencies still import
from distill.errors import ConfigError
try:
    import distill.models.lora
except ConfigError as err:
    print(err)
"""
    proc = _python(HIDE_EXTRAS + probe)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # The library path (no CLI check in front) says the same as the command line.
    assert (
        "student.lora.enabled=true needs peft, which is not installed: pip install -e '.[peft]'"
        in proc.stdout
    )


@pytest.mark.slow
def test_a_single_process_run_needs_no_extra(tiny_teacher, base_overrides, tmp_path):
    run_dir = tmp_path / "run"
    proc = _distill(
        *base_overrides,
        "cluster=local_single",
        "train.steps=2",
        "eval.generate_examples=2",
        f"hydra.run.dir={run_dir}",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (run_dir / "eval.json").is_file() and (run_dir / "student").is_dir()


FEATURES = {
    "lora": (["student.lora.enabled=true"], "student.lora.enabled=true needs peft", "peft"),
    "wandb": (["tracking.wandb=true"], "tracking.wandb=true needs wandb", "tracking"),
    "ray": (["cluster=local_ray"], "cluster=local_ray (cluster.mode=ray) needs ray, deepspeed", "cluster"),
    "slurm": (
        ["-m", "hydra/launcher=submitit_slurm"],
        "hydra/launcher=submitit_slurm needs submitit",
        "slurm",
    ),
    # No up-front check here: the import of ray on use is turned into the same line.
    "teacher-cache on ray": (["teacher-cache", "cluster=local_ray"], "this command needs ray", "cluster"),
}


@pytest.mark.slow
@pytest.mark.parametrize("feature", FEATURES)
def test_each_feature_names_its_missing_extra(feature, tiny_teacher, base_overrides, tmp_path):
    args, needs, extra = FEATURES[feature]
    subcommand = [args[0]] if args[0] == "teacher-cache" else []
    rest = args[len(subcommand) :]
    folders = [f"hydra.run.dir={tmp_path / 'run'}", f"hydra.sweep.dir={tmp_path / 'sweep'}"]
    proc = _distill(*subcommand, *rest, *base_overrides, "train.steps=2", *folders)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    (line,) = [ln for ln in proc.stderr.splitlines() if ln.startswith("distill: ")]
    assert line.startswith(f"distill: ConfigError: {needs}"), line
    assert f"which {'are' if ', ' in needs else 'is'} not installed: pip install -e '.[{extra}]'" in line


def test_the_extras_table_matches_pyproject():
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    optional = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    for extra, modules in EXTRA_MODULES.items():
        packages = " ".join(optional[extra]).replace("_", "-")
        for module in modules:
            assert module.removeprefix("hydra_plugins.").replace("_", "-") in packages, (extra, module)


def test_the_launcher_check_reads_only_a_multirun_on_submitit(monkeypatch):
    monkeypatch.setitem(EXTRA_MODULES, "slurm", ("no_such_module_for_this_test",))
    check_launcher_extras(["hydra/launcher=submitit_slurm"])  # no multirun: no launcher starts
    check_launcher_extras(["-m", "hydra/launcher=basic"])
    with pytest.raises(
        ConfigError, match=r"hydra/launcher=submitit_local needs no_such_module_for_this_test"
    ):
        check_launcher_extras(["--multirun", "hydra/launcher=submitit_local"])
    assert extras.missing_extra_message("x", "slurm", ["a", "b"]).startswith("x needs a, b, which are not")


def test_only_modules_of_an_extra_are_user_errors():
    assert extra_of(ModuleNotFoundError(name="ray._private.worker")) == "cluster"
    assert extra_of(ModuleNotFoundError(name="wandb")) == "tracking"
    assert extra_of(ModuleNotFoundError(name="rayon")) is None
    assert extra_of(ModuleNotFoundError(name="torch")) is None
