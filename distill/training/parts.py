"""RunParts: what a run builds once and hands to the backend that trains it (in-process or Ray); Trained: what
the backend hands back."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from distill.config.topology import Topology
from distill.curriculum.stages import Curriculum
from distill.data.build import RunData
from distill.data.mixing import MixedStream


@dataclass
class RunParts:
    cfg: Any
    """The composed, validated RunConfig (DictConfig)."""
    topology: Topology
    teacher_path: Path
    teacher_tokenizer: Any
    tokenizer: Any
    """The student's tokenizer: the teacher's, or with a token map the student's own."""
    teacher_hidden_size: int
    data: RunData
    curriculum: Curriculum
    stream: MixedStream
    """The numbered micro-batch stream: step s, rank r, micro-step j read position s*A*W + r*A + j."""

    @property
    def run_dir(self) -> Path:
        return Path(self.cfg.run_dir)


@dataclass
class Trained:
    """What a backend hands back: the student in this process (exported to run_dir/student already) and the
    teacher engine it scored with, if it has one here (the Ray backend's teachers live in actors)."""

    student: Any
    teacher: Any = None
