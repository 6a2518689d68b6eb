"""The one Hydra decorator every entry point uses: same config tree, same schema, same run folders, and the
same way of reporting a user's mistake."""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable

import hydra

from distill.config import register_configs
from distill.config.store import CONFIG_DIR
from distill.errors import ConfigError

USER_ERROR_EXIT = 2
"""Exit code of a run stopped by the user's input (a ConfigError, TopologyError or CheckpointError)."""


def hydra_app(fn: Callable | None = None, *, config_name: str = "config") -> Callable:
    """`@hydra_app` (root config `config`) or `@hydra_app(config_name="demo")`."""
    if fn is None:
        return lambda f: hydra_app(f, config_name=config_name)
    register_configs()
    # An absolute config path: entry points are imported as `launch.*` modules, where Hydra would otherwise
    # look for a Python package named hydra_configs.
    return hydra.main(config_path=str(CONFIG_DIR), config_name=config_name, version_base="1.3")(
        user_errors_exit(fn)
    )


def user_errors_exit(fn: Callable) -> Callable:
    """A user's mistake is a message (what is wrong, the value, the fix) and exit code 2, not a traceback;
    HYDRA_FULL_ERROR=1 keeps the traceback. Anything else is a bug and keeps its traceback."""

    @functools.wraps(fn)
    def task(cfg):
        try:
            return fn(cfg)
        except ConfigError as err:
            if os.environ.get("HYDRA_FULL_ERROR") == "1":
                raise
            print(f"distill: {type(err).__name__}: {err}", file=sys.stderr)
            sys.exit(USER_ERROR_EXIT)

    return task
