"""Peak memory of this process, as `mem/<role>/<figure>_mib` metrics (metrics.jsonl, W&B, eval.json, report).

Peaks since the process started, never since the last report. The peak that decides an OOM is the highest
point of the whole run, and a per-interval peak cannot be had for both figures anyway: the kernel keeps one
peak RSS per process (`ru_maxrss`) and offers no reset, and resetting CUDA's (`reset_peak_memory_stats`) would
be a process-wide side effect on anything else that reads them (DeepSpeed's memory reports, the bench scripts).
The curve over the logged steps still shows when the peak was reached: where it steps up.

A measurement is a syscall, a read of /proc/self/statm and two reads of the CUDA caching allocator's counters:
microseconds, no device synchronisation, so actors take one with every reply they already send. This module
imports nothing heavy (the buffer shard processes never load torch): CUDA is read only where torch is already
imported and has initialised CUDA itself, so a measurement never initialises CUDA (nor, by the same token,
reports zeros for a process that never used it).
"""

from __future__ import annotations

import os
import resource
import sys
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, fields

MEMORY_PREFIX = "mem/"
MIB = 1 << 20
# The figures of a `MemoryPeaks` that are peaks (eval.json keeps these); `rss` is the current size.
PEAK_FIGURES = ("peak_rss", "cuda_max_allocated", "cuda_max_reserved")


@dataclass(frozen=True)
class MemoryPeaks:
    """One process's memory in bytes. CUDA figures are None where the process never initialised CUDA."""

    peak_rss: int
    """Highest resident set size since the process started (`getrusage(RUSAGE_SELF).ru_maxrss`)."""
    rss: int | None = None
    """Resident set size now (None where neither /proc nor psutil can tell)."""
    cuda_max_allocated: int | None = None
    """`torch.cuda.max_memory_allocated()` of the current device: the most tensors ever held at once."""
    cuda_max_reserved: int | None = None
    """`torch.cuda.max_memory_reserved()`: the most the caching allocator ever held (nvidia-smi adds the CUDA
    context on top)."""

    def metrics(self, role: str) -> dict[str, float]:
        """`mem/<role>/<figure>_mib` for every figure this process has, in MiB (one decimal)."""
        return {
            memory_key(role, f.name): round(value / MIB, 1)
            for f in fields(self)
            if (value := getattr(self, f.name)) is not None
        }

    @staticmethod
    def highest(peaks: Iterable[MemoryPeaks]) -> MemoryPeaks:
        """Figure-wise maximum over several processes of one role (a figure none of them has stays None)."""
        peaks = list(peaks)
        assert peaks, "the highest of no processes"

        def top(name: str) -> int | None:
            return max((v for p in peaks if (v := getattr(p, name)) is not None), default=None)

        return MemoryPeaks(**{f.name: top(f.name) for f in fields(MemoryPeaks)})


def measure() -> MemoryPeaks:
    """This process's memory now (see the module docstring for what "peak" means and what it costs)."""
    cuda = _cuda_peaks()
    rss = _current_rss()
    # The kernel counts pages in per-CPU batches, so its high-water mark can trail the size statm reports by a
    # few hundred KiB (either way, by a read or two): the peak is at least the size now.
    return MemoryPeaks(
        peak_rss=max(_peak_rss(), rss or 0),
        rss=rss,
        cuda_max_allocated=cuda[0] if cuda else None,
        cuda_max_reserved=cuda[1] if cuda else None,
    )


def role_metrics(role: str, processes: Mapping[str, MemoryPeaks]) -> dict[str, float]:
    """Metrics of a role played by several processes: `mem/<role>/...` is the maximum over them, and with
    more than one, each also as `mem/<role>/<name>/...` (e.g. `mem/student/1/peak_rss_mib`).

    processes: name -> that process's measurement (a student rank, "<replica>.<tp rank>" of a teacher)."""
    if not processes:
        return {}
    out = MemoryPeaks.highest(processes.values()).metrics(role)
    if len(processes) > 1:
        for name, peaks in processes.items():
            out.update(peaks.metrics(f"{role}/{name}"))
    return out


def memory_key(role: str, figure: str) -> str:
    return f"{MEMORY_PREFIX}{role}/{figure}_mib"


def split_key(key: str) -> tuple[str, str]:
    """`mem/student/1/peak_rss_mib` -> ("student/1", "peak_rss"): the role may hold slashes, the figure not."""
    role, _, figure = key.removeprefix(MEMORY_PREFIX).rpartition("/")
    return role, figure.removesuffix("_mib")


def final_peaks(rows: Iterable[Mapping[str, object]]) -> dict[str, float]:
    """The run's peaks per role: each peak key's maximum over the metrics rows. Not simply the last row: a
    process restarted after a failure (a student world, a teacher replica) starts counting again from zero."""
    out: dict[str, float] = {}
    for row in rows:
        for key, value in row.items():
            if _is_peak(key) and isinstance(value, int | float):
                out[key] = max(out.get(key, value), value)
    return dict(sorted(out.items()))


class RssGrowth:
    """`with RssGrowth() as growth:` the highest resident size the block reached above where it started, in bytes
    (`growth.peak`), sampled every `interval` seconds by a thread. For one part of a process's life (loading and
    running one exported model), where the kernel's ru_maxrss only knows the whole process; a sampled peak can
    miss a spike shorter than the interval."""

    def __init__(self, interval: float = 0.005) -> None:
        self.interval, self.peak = interval, 0
        self._stop = threading.Event()
        self._start = 0

    def _sample(self) -> None:
        while True:
            now = _current_rss()
            if now is not None:
                self.peak = max(self.peak, now - self._start)
            if self._stop.wait(self.interval):
                return

    def __enter__(self) -> RssGrowth:
        self._start = _current_rss() or 0
        self._thread = threading.Thread(target=self._sample, name="rss-growth", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def _is_peak(key: str) -> bool:
    return key.startswith(MEMORY_PREFIX) and split_key(key)[1] in PEAK_FIGURES


def _peak_rss() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # Linux reports KiB, macOS bytes


def _current_rss() -> int | None:
    try:
        with open("/proc/self/statm", encoding="ascii") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")  # fields: size, resident, ...
    except OSError:
        pass
    try:  # no /proc (macOS): psutil, where installed (DeepSpeed and Ray bring it)
        import psutil
    except ImportError:
        return None
    return int(psutil.Process().memory_info().rss)


def _cuda_peaks() -> tuple[int, int] | None:
    """(max allocated, max reserved) bytes of the current CUDA device, or None where this process has not
    initialised CUDA (torch not even imported included): asking would initialise it."""
    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_initialized():
        return None
    return int(torch.cuda.max_memory_allocated()), int(torch.cuda.max_memory_reserved())
