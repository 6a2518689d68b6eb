"""Run modes as step hooks: periodic evaluation and the chain that combines a run mode with it (pure, no models)."""

from __future__ import annotations

from distill.training.modes import ChainedHooks, PeriodicEval, StepHooks


class Recording(StepHooks):
    """Keeps two batch ids per step, stores one, and records what it is handed."""

    def __init__(self, tag: int, overlap: bool = True) -> None:
        self.tag, self.overlap, self.seen = tag, overlap, []

    def overlaps(self, step: int) -> bool:
        return self.overlap

    def stored_batches(self, step):
        return [((self.tag, step), f"stored-{self.tag}")]

    def kept_batches(self, step):
        return [(self.tag, 10 * step), (self.tag, 10 * step + 1)]

    def after_commit(self, step, kept):
        self.seen.append((step, list(kept)))


def test_periodic_eval_writes_numeric_metrics_after_every_nth_step_and_blocks_overlap():
    rows = []
    hook = PeriodicEval(
        3, evaluate=lambda: {"ce": 1.5, "tokens": 7, "note": "x", "flag": True}, write=rows.append
    )
    for step in range(7):
        hook.after_commit(step, [])
    assert rows == [
        {"step": 2, "eval/ce": 1.5, "eval/tokens": 7},
        {"step": 5, "eval/ce": 1.5, "eval/tokens": 7},
    ]
    assert [s for s in range(7) if not hook.overlaps(s)] == [2, 5]


def test_chained_hooks_hand_each_hook_its_own_kept_batches_in_order():
    a, b = Recording(1), Recording(2, overlap=False)
    chain = ChainedHooks(a, b)
    assert chain.kept_batches(3) == [(1, 30), (1, 31), (2, 30), (2, 31)]
    chain.after_commit(3, ["a30", "a31", "b30", "b31"])
    assert a.seen == [(3, ["a30", "a31"])] and b.seen == [(3, ["b30", "b31"])]
    assert chain.stored_batches(3) == [((1, 3), "stored-1"), ((2, 3), "stored-2")]
    assert not chain.overlaps(0) and ChainedHooks(a).overlaps(0)
    assert ChainedHooks().kept_batches(0) == [] and ChainedHooks().matrices() is None
