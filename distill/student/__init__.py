"""The student side: the one DeepSpeed seam (engine build, step, save, load, export HF).

`build_ds_config` is pure and imports no deepspeed; the engine names are loaded on first use, so importing
`distill.student` for the config alone stays light.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from distill.student.ds_config import PRECISIONS, ZERO_STAGES, build_ds_config

if TYPE_CHECKING:
    from distill.student.engine import StudentEngine, destroy_distributed, init_distributed_from_env

_ENGINE_NAMES = ("StudentEngine", "destroy_distributed", "init_distributed_from_env")

__all__ = [
    "PRECISIONS",
    "ZERO_STAGES",
    "StudentEngine",
    "build_ds_config",
    "destroy_distributed",
    "init_distributed_from_env",
]


def __getattr__(name: str) -> Any:
    if name in _ENGINE_NAMES:
        from distill.student import engine

        return getattr(engine, name)
    raise AttributeError(f"module 'distill.student' has no attribute {name!r}")
