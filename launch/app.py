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
from launch.extras import check_launcher_extras, extra_of, missing_extra_message

USER_ERROR_EXIT = 2
"""Exit code of a run stopped by the user's input (a ConfigError, TopologyError or CheckpointError)."""


def hydra_app(fn: Callable | None = None, *, config_name: str = "config") -> Callable:
    """`@hydra_app` (root config `config`) or `@hydra_app(config_name="demo")`."""
    if fn is None:
        return lambda f: hydra_app(f, config_name=config_name)
    register_configs()
    # An absolute config path: entry points are imported as `launch.*` modules, where Hydra would otherwise
    # look for a Python package named hydra_configs.
    app = hydra.main(config_path=str(CONFIG_DIR), config_name=config_name, version_base="1.3")(
        user_errors_exit(fn)
    )

    @functools.wraps(app)
    def entry(*args, **kwargs):
        # The launcher runs outside `fn`, so its extra is checked on the command line, before Hydra starts.
        _exit_on_user_error(lambda: check_launcher_extras(sys.argv[1:]))
        return app(*args, **kwargs)

    return entry


def user_errors_exit(fn: Callable) -> Callable:
    """A user's mistake is a message (what is wrong, the value, the fix) and exit code 2, not a traceback;
    HYDRA_FULL_ERROR=1 keeps the traceback. Anything else is a bug and keeps its traceback."""

    @functools.wraps(fn)
    def task(cfg):
        return _exit_on_user_error(lambda: fn(cfg))

    return task


def _exit_on_user_error(call: Callable):
    """`call()`; a ConfigError, or an import of a module that an optional extra provides, is one line on stderr and
    exit code 2 (the traceback with HYDRA_FULL_ERROR=1)."""
    try:
        return call()
    except ConfigError as err:
        _user_error(err, f"{type(err).__name__}: {err}")
    except ModuleNotFoundError as err:
        extra = extra_of(err)
        if extra is None:
            raise  # not an optional extra: a broken install or a bug, keep the traceback
        _user_error(err, f"ConfigError: {missing_extra_message('this command', extra, [err.name])}")


def _user_error(err: Exception, line: str) -> None:
    if os.environ.get("HYDRA_FULL_ERROR") == "1":
        raise err
    print(f"distill: {line}", file=sys.stderr)
    sys.exit(USER_ERROR_EXIT)
