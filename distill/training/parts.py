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
    cache_identity: dict | None = None
    """With `teacher.cache`: what the cache was checked to agree on (its readers check it again); None: the
    teacher scores online."""
    teachers: list | None = None
    """With several `teachers`: their `distill.run.teachers.SetMember`s in the set's order (rows' `teacher` index
    into it); None: `teacher` alone."""

    @property
    def run_dir(self) -> Path:
        return Path(self.cfg.run_dir)

    def stage_teachers(self, batch_id) -> dict[str, float] | None:
        """Several teachers: the multipliers (`curriculum.stages[i].teachers`) of the stage that trains batch
        `batch_id`; None for held-out batches (epoch < 0) and stages that keep every teacher as configured."""
        if batch_id[0] < 0:
            return None
        step = self.stream.position_of(tuple(batch_id)) // self.topology.batches_per_step
        return self.curriculum.plan(min(step, self.curriculum.total_steps - 1)).teachers or None


@dataclass
class Trained:
    """What a backend hands back: the student in this process (exported to run_dir/student already) and the
    teacher's side of the evaluation: its outputs for the held-out batches (`distill.eval.metrics.TeacherOutputs`,
    scored where the teacher lives: the actors before they stop, the offline cache, the local engine), or None
    (cross-tokenizer runs, a cache without them). The driver never builds a teacher model for it."""

    student: Any
    teacher: Any = None
