"""The optional extras of pyproject.toml ([project.optional-dependencies]) and the settings that need them, checked
when a command starts: a missing extra is one line naming what to install, never an import traceback mid-run.

The single-process path (cluster.mode=local, no LoRA, no W&B, no Slurm launcher) imports none of them.
"""

from __future__ import annotations

import importlib.util
import re
from collections.abc import Sequence

from distill.errors import ConfigError

EXTRA_MODULES: dict[str, tuple[str, ...]] = {
    "cluster": ("ray", "deepspeed"),
    "tracking": ("wandb",),
    "slurm": ("submitit", "hydra_plugins.hydra_submitit_launcher"),
    "peft": ("peft",),
    "export": ("onnx", "onnxruntime", "onnxscript", "gguf"),
}
"""Extra -> the modules it provides (tests/test_optional_extras.py checks the names against pyproject.toml)."""

# `hydra/launcher=submitit_slurm` (or submitit_local), as given on the command line of a multirun.
_SUBMITIT_LAUNCHER = re.compile(r"^[+~]*hydra/launcher=(submitit_\w+)$")


def missing_extra_message(setting: str, extra: str, missing: Sequence[str]) -> str:
    verb = "is" if len(missing) == 1 else "are"
    return (
        f"{setting} needs {', '.join(missing)}, which {verb} not installed: pip install -e '.[{extra}]' "
        f"(the project's `{extra}` extra)"
    )


def require_extra(extra: str, setting: str) -> None:
    """ConfigError naming `setting`, the missing modules and the pip command, unless `extra` is installed."""
    missing = [module for module in EXTRA_MODULES[extra] if not _importable(module)]
    if missing:
        raise ConfigError(missing_extra_message(setting, extra, missing))


def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # its parent package is missing, or half-imported
        return False


def run_extras(cfg) -> list[tuple[str, str]]:
    """(setting, extra) for every optional feature a run's config turns on."""
    needs = []
    if cfg.cluster.mode == "ray":
        needs.append((f"cluster={cfg.cluster.name} (cluster.mode=ray)", "cluster"))
    if cfg.student.lora.enabled:
        needs.append(("student.lora.enabled=true", "peft"))
    if cfg.tracking.wandb:
        needs.append(("tracking.wandb=true", "tracking"))
    if cfg.export.formats:
        needs.append((f"export.formats={list(cfg.export.formats)}", "export"))
    return needs


def check_run_extras(cfg) -> None:
    """Before anything is loaded: ConfigError for the first feature the run turns on whose extra is missing."""
    for setting, extra in run_extras(cfg):
        require_extra(extra, setting)


def check_launcher_extras(argv: Sequence[str]) -> None:
    """A multirun on the Slurm launcher needs the `slurm` extra. Checked on the command line, before Hydra starts:
    without the plugin Hydra only says the launcher config is unknown, without submitit it fails mid-sweep."""
    if not {"-m", "--multirun"} & set(argv):
        return  # only a multirun starts a launcher
    for arg in argv:
        if match := _SUBMITIT_LAUNCHER.match(arg):
            require_extra("slurm", f"hydra/launcher={match.group(1)}")


def extra_of(err: ModuleNotFoundError) -> str | None:
    """The extra that provides the module an import did not find, or None for a module of no extra."""
    name = err.name or ""
    for extra, modules in EXTRA_MODULES.items():
        if any(name == module or name.startswith(module + ".") for module in modules):
            return extra
    return None
