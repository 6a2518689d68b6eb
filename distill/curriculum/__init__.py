"""Curriculum stages and schedules (temperature, alpha, term weights, LR restarts) as pure functions of the step."""

from distill.curriculum.schedules import Ramp, ramp_value
from distill.curriculum.stages import FEATURES, HARD, SOFT, Curriculum, Stage, StepPlan, Transition

__all__ = ["FEATURES", "HARD", "SOFT", "Curriculum", "Ramp", "Stage", "StepPlan", "Transition", "ramp_value"]
