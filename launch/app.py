"""The one Hydra decorator every entry point uses: same config tree, same schema, same run folders."""

from __future__ import annotations

from collections.abc import Callable

import hydra

from distill.config import register_configs
from distill.config.store import CONFIG_DIR


def hydra_app(fn: Callable) -> Callable:
    register_configs()
    # An absolute config path: entry points are imported as `launch.*` modules, where Hydra would otherwise
    # look for a Python package named hydra_configs.
    return hydra.main(config_path=str(CONFIG_DIR), config_name="config", version_base="1.3")(fn)
