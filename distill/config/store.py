"""Register the schema in Hydra's ConfigStore and compose configs outside `@hydra.main` (tests, tools)."""

from __future__ import annotations

from pathlib import Path

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from distill.config.schema import RunConfig

CONFIG_DIR = Path(__file__).resolve().parents[2] / "hydra_configs"


def register_configs() -> None:
    """The root schema: every YAML group is merged into it, so unknown keys fail at composition."""
    ConfigStore.instance().store(name="run_schema", node=RunConfig)


def compose(
    overrides: list[str] | None = None, run_dir: str | None = None, *, config_name: str = "config"
) -> DictConfig:
    """Compose a root config (`config`, or `demo` for `distill demo`) as `distill` would, without starting a
    Hydra job (for tests and tools)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    register_configs()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = hydra_compose(config_name=config_name, overrides=list(overrides or []))
    # ${hydra:...} interpolations only resolve inside a running Hydra job.
    OmegaConf.set_struct(cfg, False)
    cfg.run_dir = run_dir or "."
    OmegaConf.set_struct(cfg, True)
    return cfg


def resolved_yaml(cfg: DictConfig) -> str:
    return OmegaConf.to_yaml(cfg, resolve=True)
