"""`distill`: one distillation run (`distill.run.run`: validate, train on the backend cluster.mode names,
export, evaluate, report)."""

from __future__ import annotations

from omegaconf import DictConfig

from distill.run import run
from launch.app import hydra_app
from launch.extras import check_run_extras

__all__ = ["main", "run"]


@hydra_app
def main(cfg: DictConfig) -> float:
    check_run_extras(cfg)  # a missing optional extra fails here, before any model or data is loaded
    summary = run(cfg)
    return summary["ce"]  # the sweep objective for Hydra multirun / optimizers
