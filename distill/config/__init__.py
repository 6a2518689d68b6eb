"""Typed configs (Hydra ConfigStore), topology validation and run-level checks."""

from distill.config.schema import (
    CheckpointConfig,
    ClusterConfig,
    DataConfig,
    EvalConfig,
    LossConfig,
    LossTermConfig,
    OptimizerConfig,
    PrepareConfig,
    RunConfig,
    StudentConfig,
    TeacherConfig,
    TrackingConfig,
    TrainConfig,
)
from distill.config.store import compose, register_configs, resolved_yaml
from distill.config.topology import ModelShape, Topology

__all__ = [
    "CheckpointConfig",
    "ClusterConfig",
    "DataConfig",
    "EvalConfig",
    "LossConfig",
    "LossTermConfig",
    "ModelShape",
    "OptimizerConfig",
    "PrepareConfig",
    "RunConfig",
    "StudentConfig",
    "TeacherConfig",
    "Topology",
    "TrackingConfig",
    "TrainConfig",
    "compose",
    "register_configs",
    "resolved_yaml",
]
