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
}


def main() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for a hub at run time
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


if __name__ == "__main__":
    main()
