"""Weights & Biases mirror of metrics.jsonl, off the hot path.

`WandbLog.log` only puts the record on a bounded queue (never waits: a full queue drops the record and counts
it); a daemon thread imports wandb, starts the run and sends. So a slow network, a W&B outage or wandb's own
start-up (seconds) never delays a training step. metrics.jsonl stays the record of truth.

The API key is read by wandb itself from WANDB_API_KEY (or ~/.netrc); this module never reads, logs or passes
it, and the logged config is the run's resolved config, which holds no secrets. A requeued run continues the
same W&B run: its id is kept in `<run_dir>/wandb_run_id`.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import queue
import threading
from pathlib import Path
from typing import Any

from distill.errors import ConfigError
from distill.io import atomic_write_text

log = logging.getLogger(__name__)
_CLOSE = object()


class NullLog:
    """The tracker when W&B is off: every call is free."""

    dropped = 0

    def log(self, record: dict[str, Any]) -> None:
        pass

    def finish(self, summary: dict[str, Any] | None = None, timeout: float = 0) -> None:
        pass


class WandbLog(NullLog):
    def __init__(
        self,
        *,
        project: str,
        mode: str,
        run_dir: str | Path,
        config: dict[str, Any],
        entity: str | None = None,
        name: str | None = None,
        max_queue: int = 10_000,
    ) -> None:
        check_wandb(mode)
        self.run_dir = Path(run_dir)
        self.dropped = 0
        self.error: BaseException | None = None
        self._queue: queue.Queue = queue.Queue(maxsize=max_queue)
        id_file = self.run_dir / "wandb_run_id"
        self.run_id = id_file.read_text().strip() if id_file.is_file() else _new_id()
        atomic_write_text(id_file, self.run_id + "\n")
        init = dict(project=project, entity=entity, name=name, mode=mode, config=config)
        self._thread = threading.Thread(target=self._work, args=(init,), name="wandb-log", daemon=True)
        self._thread.start()

    def log(self, record: dict[str, Any]) -> None:
        """Queue one metrics record (with its `step`); never blocks."""
        try:
            self._queue.put_nowait(dict(record))
        except queue.Full:
            self.dropped += 1

    def finish(self, summary: dict[str, Any] | None = None, timeout: float = 120) -> None:
        """Send the queued records and `summary` (final eval figures), then close the run. Waits at most
        `timeout` seconds (the end of the run, not a step)."""
        try:
            self._queue.put(("summary", dict(summary or {})), timeout=timeout)
            self._queue.put(_CLOSE, timeout=timeout)
        except queue.Full:
            log.warning("wandb: queue still full after %.0f s; closing without the rest", timeout)
        self._thread.join(timeout)
        if self._thread.is_alive():
            log.warning("wandb: still sending after %.0f s; leaving it to finish in the background", timeout)
        if self.dropped:
            log.warning("wandb: %d records dropped (queue full); metrics.jsonl has them all", self.dropped)

    def _work(self, init: dict[str, Any]) -> None:
        run = None
        try:
            import wandb

            settings = wandb.Settings(console="off", x_disable_stats=True, silent=True)
            run = wandb.init(
                **init,
                dir=str(self.run_dir),
                id=self.run_id,
                resume="allow",
                settings=settings,
                reinit="create_new",
            )
            while True:
                item = self._queue.get()
                if item is _CLOSE:
                    break
                if isinstance(item, tuple):  # ("summary", values)
                    run.summary.update(item[1])
                    continue
                step = item.pop("step", None)
                run.log(item, step=step)
        except BaseException as err:  # never let tracking take the run down; drain so log() stays free
            self.error = err
            log.warning("wandb logging stopped: %r; metrics.jsonl continues", err)
            while self._queue.get() is not _CLOSE:
                pass
        finally:
            if run is not None:
                run.finish()


def check_wandb(mode: str) -> None:
    """ConfigError before any cluster time is spent: wandb missing, a bad mode, or online without a key."""
    if mode not in ("online", "offline", "disabled"):
        raise ConfigError(f"tracking.wandb_mode={mode!r}: use online, offline or disabled.")
    if importlib.util.find_spec("wandb") is None:
        raise ConfigError(
            "tracking.wandb=true needs wandb, which is not installed: pip install -e '.[tracking]' (the project's "
            "`tracking` extra), or leave tracking.wandb=false (metrics.jsonl has every metric)"
        )
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    has_netrc = netrc.is_file() and "api.wandb.ai" in netrc.read_text(errors="ignore")
    if mode == "online" and not os.environ.get("WANDB_API_KEY") and not has_netrc:
        raise ConfigError(
            "tracking.wandb_mode=online needs a W&B API key in the environment (WANDB_API_KEY) or `wandb login`; "
            "keys are never read from the config. Or use tracking.wandb_mode=offline and `wandb sync` later."
        )


def open_wandb(cfg, run_dir: str | Path) -> NullLog:
    """The run's tracker: a WandbLog when tracking.wandb is on, else a NullLog."""
    t = cfg.tracking
    if not t.wandb:
        return NullLog()
    from omegaconf import OmegaConf

    return WandbLog(
        project=t.project,
        mode=t.wandb_mode,
        run_dir=run_dir,
        config=OmegaConf.to_container(cfg, resolve=True),
        entity=t.entity,
        name=t.run_name,
    )


def _new_id() -> str:
    return os.urandom(4).hex()
