"""The one Hydra decorator every entry point uses: same config tree, same schema, same run folders."""

from __future__ import annotations

from collections.abc import Callable

import hydra

from distill.config import register_configs
from distill.config.store import CONFIG_DIR


def hydra_app(fn: Callable | None = None, *, config_name: str = "config") -> Callable:
    """`@hydra_app` (root config `config`) or `@hydra_app(config_name="demo")`."""
    if fn is None:
        return lambda f: hydra_app(f, config_name=config_name)
    register_configs()
    # An absolute config path: entry points are imported as `launch.*` modules, where Hydra would otherwise
    # look for a Python package named hydra_configs.
    return hydra.main(config_path=str(CONFIG_DIR), config_name=config_name, version_base="1.3")(fn)
