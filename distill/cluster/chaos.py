"""Chaos drills: a seeded schedule of faults injected into a running online distillation (tests, bench/chaos.py).

One fault of each kind, each after a seeded step: a teacher actor killed (its group re-dispatches), a student
actor killed, a buffer shard killed and a whole node lost (every actor on it: the driver restores the pipeline
from its last checkpoint, `distill.cluster.driver.Driver._recover`). The node's loss is the caller's (`lose_node`):
only a simulated cluster (`ray.cluster_utils.Cluster.remove_node` + `add_node`) or an operator can take one away.
The driver's own crash needs a process to kill, so it is drilled beside this (a `distill` subprocess, SIGKILL,
then `resume=true`).
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

from distill.cluster.driver import Driver, Hooks

log = logging.getLogger(__name__)

KINDS = ("teacher", "student", "shard", "node")


@dataclass
class Fault:
    """One injected fault: `kind` after step `step` commits, on actor `target` (replica / rank / shard index)."""

    kind: str
    step: int
    target: int = 0
    injected_s: float | None = None  # perf_counter when injected
    regained_s: float | None = None  # seconds from the injection until the run committed past `step` again
    restore_s: list[float] = field(
        default_factory=list
    )  # the driver's restores (or teacher restarts) it caused

    def describe(self) -> str:
        what = {
            "teacher": "teacher replica",
            "student": "student rank",
            "shard": "buffer shard",
            "node": "node",
        }
        target = "the worker node" if self.kind == "node" else f"{what[self.kind]} {self.target}"
        return f"after step {self.step}: kill {target}"


def schedule(
    seed: int, *, steps: int, replicas: int, ranks: int, shards: int, last_step: int | None = None
) -> list[Fault]:
    """One fault of each kind at distinct seeded steps in [1, last_step) (default: the first two thirds of the
    run, so the teacher still has batches to score when its actor dies), in step order."""
    rng = random.Random(seed)
    last = last_step if last_step is not None else max(len(KINDS) + 1, (2 * steps) // 3)
    at = sorted(rng.sample(range(1, last), len(KINDS)))
    kinds = list(KINDS)
    rng.shuffle(kinds)
    sizes = {"teacher": replicas, "student": ranks, "shard": shards, "node": 1}
    return [Fault(kind, step, rng.randrange(sizes[kind])) for kind, step in zip(kinds, at, strict=True)]


class ChaosHooks(Hooks):
    """Injects `faults` (see `schedule`) as the driver commits steps; each fires once, even when a restore
    trains its step again. lose_node(): removes a node holding actors of every kind (and may add one back)."""

    def __init__(self, faults: list[Fault], lose_node: Callable[[], None] | None = None) -> None:
        self.faults, self.lose_node = faults, lose_node
        self.driver: Driver | None = None  # the run's, seen at its first step
        # fault index -> (driver restores, teacher restarts) at its injection
        self._marks: dict[int, tuple[int, int]] = {}

    def after_step(self, driver: Driver, step: int) -> None:
        self.driver, now = driver, time.perf_counter()
        for f in self.faults:  # progress regained: the run is past the fault's step again
            if f.injected_s is not None and f.regained_s is None and driver.committed > f.step + 1:
                f.regained_s = now - f.injected_s
        for i, f in enumerate(self.faults):
            if f.step == step and f.injected_s is None:
                self._marks[i] = (len(driver.restores), len(driver.teachers.restart_log))
                log.warning("chaos: %s", f.describe())
                f.injected_s = time.perf_counter()
                self._inject(driver, f)

    def _inject(self, driver: Driver, f: Fault) -> None:
        if f.kind == "teacher":
            driver.teachers.kill_actor(replica=f.target, rank=0)
        elif f.kind == "student":
            driver.students.kill_actor(f.target)
        elif f.kind == "shard":
            driver.buffer.kill_shard(f.target)
        elif f.kind == "node":
            if self.lose_node is None:
                raise ValueError("a node fault needs lose_node (a simulated cluster's remove_node)")
            self.lose_node()
        else:
            raise ValueError(f"unknown fault kind {f.kind!r}; valid: {', '.join(KINDS)}")

    def settle(self) -> list[dict]:
        """After the run: each fault's record, with the recoveries it caused. The driver's restores go to the
        student, shard and node faults (those after its injection, up to the next such fault's); the teacher
        group's restarts to the teacher fault (its replica's first restart after it) and, for a replica re-placed
        off the lost node, to the node fault. A teacher fault whose replica was then lost with the node before it
        scored again has none of its own (the node's re-placement restarted it)."""
        d = self.driver
        restores, restarts = (d.restores, d.teachers.restart_log) if d is not None else ([], [])
        hit = [i for i, f in enumerate(self.faults) if f.kind != "teacher" and i in self._marks]
        for k, i in enumerate(hit):
            end = self._marks[hit[k + 1]][0] if k + 1 < len(hit) else len(restores)
            self.faults[i].restore_s = [r["seconds"] for r in restores[self._marks[i][0] : end]]
        for i, f in enumerate(self.faults):
            if i not in self._marks or f.kind not in ("teacher", "node"):
                continue
            after = restarts[self._marks[i][1] :]
            if f.kind == "node":
                f.restore_s += [r["seconds"] for r in after if r["moved"]]
            else:
                own = [r for r in after if r["replica"] == f.target and not r["moved"]]
                f.restore_s = [r["seconds"] for r in own[:1]]
        return [asdict(f) for f in self.faults]
