"""Continual distillation: increments in order, a replay buffer of earlier increments' samples with their
teacher outputs, and an evaluation of the student on every increment after each one.

Shared by the single-process and the distributed path (no Ray here). The run's `MixedStream` lays each
increment's data and its `replay` share over the increment's stream positions; this object
- builds the replay batch of a `replay` position from the frozen snapshot of the buffer taken when the
  increment started (a pure function of the snapshot and the position, so both paths build the same batch and
  the driver can build it ahead of the step),
- offers every consumed new-data TeacherBatch of a committed step to the buffer (reservoir sampling, in stream
  order), and at the end of an increment evaluates the student and freezes the next snapshot,
- saves and restores all of it with the run's checkpoints, so a resumed run continues exactly.
"""

from __future__ import annotations

import copy
import json
import logging
from collections.abc import Callable, Sequence
from pathlib import Path

from distill.batch import BatchId, TeacherBatch
from distill.curriculum.build import REPLAY
from distill.curriculum.stages import Curriculum
from distill.data.mixing import MixedStream
from distill.data.replay import ReplayBuffer
from distill.errors import CheckpointError
from distill.eval.continual import ContinualMatrix
from distill.io import atomic_write_json
from distill.training.modes import StepHooks

log = logging.getLogger(__name__)

# After increment i: {metric: value} on each increment's held-out set, by increment name.
Evaluate = Callable[[int], dict[str, dict[str, float]]]
MATRIX_METRICS = (("accuracy", True), ("ce", False), ("exact_match", True))
_LIVE, _FROZEN, _STATE = "replay.safetensors", "replay_frozen.safetensors", "continual.json"


class ContinualRun(StepHooks):
    """Replay and after-increment evaluation of one continual run (see the module docstring), as step hooks:
    replay batches are stored batches, a step's new-data batches are kept for the replay buffer, and an
    increment's end evaluates the student, so no step may overlap the next.

    evaluate(i): called once increment i's last step is committed; returns the metrics of the CURRENT student
    on every increment's held-out set. results_path: where the accuracy matrices are kept up to date.
    """

    needs_teacher = True  # every consumed batch's teacher outputs go to the replay buffer

    def overlaps(self, step: int) -> bool:
        return False  # replay batches and the buffer update sit between every two steps

    def __init__(
        self,
        curriculum: Curriculum,
        stream: MixedStream,
        replay: ReplayBuffer,
        *,
        per_step: int,
        batch_size: int,
        pad_id: int,
        evaluate: Evaluate,
        results_path: Path,
    ) -> None:
        self.curriculum, self.stream, self.replay = curriculum, stream, replay
        self.per_step, self.batch_size, self.pad_id = per_step, batch_size, pad_id
        self.evaluate, self.results_path = evaluate, Path(results_path)
        self.increments = [s.name for s in curriculum.stages]
        self.ends = {end - 1: i for i, (_, end, _) in enumerate(curriculum.spans())}  # last step -> increment
        self.frozen = copy.deepcopy(replay)
        self.snapshot = self.frozen.snapshot()
        self.rows: list[dict[str, dict[str, float]]] = []  # after increment i: metrics by increment name
        self._built: tuple[int, list] = (-1, [])  # the last step's replay batches (asked for twice per step)

    # ---- per step ------------------------------------------------------------------------------------------
    def positions(self, step: int) -> range:
        return range(step * self.per_step, (step + 1) * self.per_step)

    def is_replay(self, position: int) -> bool:
        return self.stream.locate(position).source == REPLAY

    def stored_batches(self, step: int) -> list[tuple[BatchId, TeacherBatch]]:
        """The replay batches of `step` (ids and payloads), built from the increment's frozen snapshot."""
        if self._built[0] == step:
            return self._built[1]
        out = []
        for g in self.positions(step):
            if self.is_replay(g):
                batch_id = self.stream.batch_id(g)
                out.append((batch_id, self.snapshot.batch(batch_id, g, self.batch_size, pad_id=self.pad_id)))
        self._built = (step, out)
        return out

    def batch_tokens(self, position: int) -> int | None:
        """Trained tokens of the replay batch at `position`; None for a new-data position."""
        if not self.is_replay(position):
            return None
        batch_id = self.stream.batch_id(position)
        built = dict(self.stored_batches(position // self.per_step))
        return int(built[batch_id].loss_mask.sum())

    def kept_batches(self, step: int) -> list[BatchId]:
        """The ids of `step`'s batches that came from the teacher (in stream order): what `after_commit` offers."""
        return [self.stream.batch_id(g) for g in self.positions(step) if not self.is_replay(g)]

    def after_commit(self, step: int, scored: Sequence[TeacherBatch]) -> None:
        """Offer the committed step's new-data TeacherBatches (in `kept_batches` order) to the replay buffer; at an
        increment's end, evaluate and freeze the snapshot the next increment replays from."""
        increment = self.curriculum.stage_index(step)
        for batch in scored:
            self.replay.offer(batch, increment)
        if step in self.ends:
            self._end_increment(self.ends[step])

    def _end_increment(self, i: int) -> None:
        self.rows = self.rows[:i]
        self.rows.append(self.evaluate(i))
        self.frozen = copy.deepcopy(self.replay)
        self.snapshot = self.frozen.snapshot()
        self._built = (-1, [])
        log.info(
            "increment %s",
            json.dumps({"increment": self.increments[i], "replay": self.replay.counts(), **self._row_log(i)}),
        )
        self.write_results()

    def _row_log(self, i: int) -> dict:
        return {f"{name}/accuracy": m.get("accuracy") for name, m in self.rows[i].items()}

    # ---- results -------------------------------------------------------------------------------------------
    def matrices(self) -> list[ContinualMatrix]:
        """One matrix per metric the evaluations report: rows after increment i, columns increment j."""
        out = []
        for metric, higher in MATRIX_METRICS:
            if not self.rows or all(metric not in m for row in self.rows for m in row.values()):
                continue
            values = [[row.get(name, {}).get(metric) for name in self.increments] for row in self.rows]
            out.append(ContinualMatrix(self.increments, metric, higher, values))
        return out

    def write_results(self) -> None:
        matrices = self.matrices()
        atomic_write_json(
            self.results_path,
            {
                "increments": self.increments,
                "completed": len(self.rows),
                "evaluations": self.rows,
                "matrices": [m.as_dict() for m in matrices],
                "average_forgetting": {m.metric: m.average_forgetting() for m in matrices},
                "replay": {str(k): v for k, v in self.replay.counts().items()},
            },
        )

    # ---- checkpoints ---------------------------------------------------------------------------------------
    def save(self, folder: Path) -> None:
        """Into a checkpoint folder: the live buffer, the frozen snapshot's buffer and the evaluations so far."""
        folder = Path(folder)
        self.replay.save(folder / _LIVE)
        self.frozen.save(folder / _FROZEN)
        atomic_write_json(folder / _STATE, {"evaluations": self.rows})

    def load(self, folder: Path | None) -> None:
        """Restore from a checkpoint folder (None: the state at step 0, after a restart without checkpoint)."""
        r = self.replay
        if folder is None:
            self.replay = ReplayBuffer(r.capacity, seed=r.seed, quota=r.quota)
            self.frozen = copy.deepcopy(self.replay)
            self.rows = []
        else:
            folder = Path(folder)
            if not (folder / _STATE).is_file():
                raise CheckpointError(
                    f"{folder} has no {_STATE}: it was not written by a continual run (mode=continual)"
                )
            self.replay = ReplayBuffer.load(folder / _LIVE, capacity=r.capacity, seed=r.seed, quota=r.quota)
            self.frozen = ReplayBuffer.load(folder / _FROZEN, capacity=r.capacity, seed=r.seed, quota=r.quota)
            self.rows = json.loads((folder / _STATE).read_text())["evaluations"]
        self.snapshot = self.frozen.snapshot()
        self._built = (-1, [])
        self.write_results()
