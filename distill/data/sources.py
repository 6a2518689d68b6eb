"""The named data sources a run draws from: `train` and `data.subsets`, mixed by curriculum stages or laid out
as continual increments. Pure functions of the config."""

from __future__ import annotations

from distill.errors import ConfigError


def data_sources(cfg) -> list[str]:
    """The data sources the run draws from (curriculum mixes or continual increments), in first-use order."""
    if cfg.mode == "continual":
        return list(cfg.continual.increments)
    names: list[str] = []
    for stage in cfg.curriculum.stages:
        names += [n for n in stage.data if n not in names]
    return names


def validate_sources(cfg) -> None:
    """ConfigError naming a source that neither `train` nor a `data.subsets` entry defines."""
    known = ["train", *cfg.data.subsets]
    for name in data_sources(cfg):
        if name not in known:
            where = "continual.increments" if cfg.mode == "continual" else "a curriculum stage's data mix"
            raise ConfigError(
                f"{where} names dataset {name!r}, which is not defined; known: {known}. Define it under "
                f"data.subsets (e.g. +data.subsets={{{name}: {{domains: [baking]}}}} on the command line) or fix the name."
            )
