"""The `distill` console script: `distill [overrides]` runs a distillation; sub-commands do the rest.

Every sub-command is a Hydra app over the same config tree, so `distill eval teacher=... data.path=...` takes
the same overrides as a run.
"""

from __future__ import annotations

import importlib
import os
import sys

SUBCOMMANDS = {
    "prepare-demo": "launch.prepare_demo",
    "demo": "launch.demo",
    "eval": "launch.evaluate",
    "teacher-cache": "launch.teacher_cache",
    "generate": "launch.generate",
    "plan": "launch.plan",
    "sweep-summary": "launch.sweep",
    "export": "launch.export",
}


def main() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for a hub at run time
    # Before torch loads: OpenMP threads that spin while waiting make torch 10x+ slower as soon as another
    # process shares the cores (measured 6.5 s vs 0.49 s per step on 2 busy cores); sleeping costs ~nothing.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    os.environ.setdefault("DS_ACCELERATOR", "cpu" if not _has_cuda() else "cuda")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # per-file load/save bars drown the run's own progress
    argv = sys.argv[1:]
    if argv and argv[0] in SUBCOMMANDS:
        name = argv.pop(0)
        module = importlib.import_module(SUBCOMMANDS[name])
        sys.argv = [f"distill-{name}", *argv]
    elif argv and not argv[0].startswith("-") and "=" not in argv[0]:
        valid = ", ".join(SUBCOMMANDS)
        sys.exit(f"distill: unknown sub-command {argv[0]!r}; use one of: {valid}, or key=value overrides.")
    else:
        module = importlib.import_module("launch.distill")
    module.main()


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


if __name__ == "__main__":
    main()
