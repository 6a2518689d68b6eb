"""Run modes as step hooks: what a mode adds around the optimizer steps, whichever backend trains them.

The single-process reference loop and the Ray driver call the same hooks at the same points, so neither knows
which mode runs (continual distillation is `distill.training.continual.ContinualRun`; on-policy or several
teachers would be further hook objects, not flags in the loops).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from distill.batch import BatchId, TeacherBatch


class StepHooks:
    """mode=standard: adds nothing. Subclasses override what their mode needs.

    needs_teacher     whether every step needs teacher outputs even when no loss term reads them
    """

    needs_teacher = False

    def overlaps(self, step: int) -> bool:
        """Whether step + 1 may be sent to the ranks before `step` is committed (not when something must see
        the world between the two: an evaluation, a buffer update)."""
        return True

    def stored_batches(self, step: int) -> list[tuple[BatchId, TeacherBatch]]:
        """Batches of `step` that carry stored teacher outputs (the teacher never scores them), by id."""
        return []

    def batch_tokens(self, position: int) -> int | None:
        """Trained tokens of the stored batch at stream `position`; None for a batch the stream holds."""
        return None

    def kept_batches(self, step: int) -> list[BatchId]:
        """Ids of `step`'s teacher-scored batches the mode wants back once the step is committed."""
        return []

    def after_commit(self, step: int, kept: Sequence[TeacherBatch]) -> None:
        """Step `step` is committed on every rank; `kept` are the TeacherBatches of `kept_batches(step)`."""

    def save(self, folder: Path) -> None:
        """Add the mode's state to a checkpoint folder."""

    def load(self, folder: Path | None) -> None:
        """Restore the mode's state from a checkpoint folder (None: the state at step 0)."""

    def matrices(self) -> list | None:
        """What the run report shows of the mode (continual: the accuracy matrices), or None."""
        return None


class PeriodicEval(StepHooks):
    """`train.eval_every`: held-out metrics of the current student after every N-th step, written to
    metrics.jsonl as `eval/<metric>` keys of that step (the report plots them).

    evaluate()  the current student's held-out metrics (the backend knows where its weights are)
    write       appends a record to the run's metrics log
    """

    def __init__(self, every: int, evaluate, write) -> None:
        self.every, self.evaluate, self.write = every, evaluate, write

    def due(self, step: int) -> bool:
        return self.every > 0 and (step + 1) % self.every == 0

    def overlaps(self, step: int) -> bool:
        return not self.due(step)  # the next step must not change the weights before they are read

    def after_commit(self, step: int, kept: Sequence[TeacherBatch]) -> None:
        if self.due(step):
            summary = self.evaluate()
            self.write({"step": step, **{f"eval/{k}": v for k, v in summary.items() if _is_number(v)}})


class ChainedHooks(StepHooks):
    """Several modes' hooks as one, called in order (the run mode first, then periodic evaluation)."""

    def __init__(self, *hooks: StepHooks) -> None:
        self.hooks = hooks
        self.needs_teacher = any(h.needs_teacher for h in hooks)

    def overlaps(self, step: int) -> bool:
        return all(h.overlaps(step) for h in self.hooks)

    def stored_batches(self, step: int) -> list[tuple[BatchId, TeacherBatch]]:
        return [b for h in self.hooks for b in h.stored_batches(step)]

    def batch_tokens(self, position: int) -> int | None:
        return next((n for h in self.hooks if (n := h.batch_tokens(position)) is not None), None)

    def kept_batches(self, step: int) -> list[BatchId]:
        return [b for h in self.hooks for b in h.kept_batches(step)]

    def after_commit(self, step: int, kept: Sequence[TeacherBatch]) -> None:
        # `kept` follows `kept_batches`: each hook's ids in hook order; hand each hook its own slice.
        start = 0
        for h, ids in [(h, h.kept_batches(step)) for h in self.hooks]:
            h.after_commit(step, kept[start : start + len(ids)])
            start += len(ids)

    def save(self, folder: Path) -> None:
        for h in self.hooks:
            h.save(folder)

    def load(self, folder: Path | None) -> None:
        for h in self.hooks:
            h.load(folder)

    def matrices(self) -> list | None:
        return next((m for h in self.hooks if (m := h.matrices()) is not None), None)


def _is_number(v: object) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)
