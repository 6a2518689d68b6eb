"""`distill`: one distillation run (`distill.run.run`: validate, train on the backend cluster.mode names,
export, evaluate, report)."""

from __future__ import annotations

from omegaconf import DictConfig

from distill.run import run
from launch.app import hydra_app

__all__ = ["main", "run"]


@hydra_app
def main(cfg: DictConfig) -> float:
    summary = run(cfg)
    return summary["ce"]  # the sweep objective for Hydra multirun / optimizers
