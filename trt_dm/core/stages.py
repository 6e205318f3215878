"""Wall time and peak memory per pipeline stage, and a memory check that refuses a stage before the OS kills it.

    with stages.recording() as log:           # e.g. around `trt-dm engine`
        with stages.stage("calibration"):
            with stages.stage("calibration/trajectories"): ...
    log.rows  # [{"stage", "seconds", "peak_rss_mb", "rss_after_mb"}, ...] in the order the stages ended

Peak memory is the process's resident set high-water mark (Linux ``VmHWM``), reset at every stage boundary
(``/proc/self/clear_refs``) and folded into every open stage, so nested stages each get their own peak and an
outer stage's peak is the maximum over everything inside it. Outside Linux the peaks are ``None``.
``stage()`` outside ``recording()`` only times nothing and costs nothing, so library code can mark its stages
unconditionally.
"""
from __future__ import annotations

import contextlib
import contextvars
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable


def _status_mb(key: str) -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def rss_reset() -> None:
    """Reset this process's peak resident set size (Linux: writing 5 to /proc/self/clear_refs)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def rss_peak_mb() -> float | None:
    return _status_mb("VmHWM:")


def rss_now_mb() -> float | None:
    return _status_mb("VmRSS:")


def available_mb() -> float | None:
    """Memory the kernel says a new allocation can still get (MemAvailable), in MiB; None where unknown."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def import_detached(module: str) -> None:
    """Import ``module`` (if not yet imported) in a thread of its own. modelopt keeps tracebacks of errors it
    catches while importing its optional plugins, and a traceback keeps its frames' callers alive (``f_back``):
    imported from inside a function, it pins whatever that function and its callers hold (measured: a 3.4 GB
    copy of the SD 1.5 UNet, for the rest of the process)."""
    import importlib
    import sys
    import threading
    if module not in sys.modules:
        errors: list[BaseException] = []

        def run():
            try:
                importlib.import_module(module)
            except BaseException as e:  # re-raised in the caller's thread
                errors.append(e)
        t = threading.Thread(target=run, name=f"import {module}")
        t.start()
        t.join()
        if errors:
            raise errors[0]


def release_memory() -> None:
    """Give freed memory back to the OS: a garbage collection, then glibc's malloc_trim (where there is one):
    after a multi-GB model copy is dropped its small tensors' heap pages otherwise stay resident."""
    import gc
    gc.collect()
    try:
        import ctypes
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class InsufficientMemoryError(RuntimeError):
    """A stage's measured memory need exceeds what this machine has available: refused before starting it."""


def require_memory(need_mb: float, what: str, how: str) -> None:
    """Raise ``InsufficientMemoryError`` when ``need_mb`` (an estimate: ``how`` says from what) is more than the
    memory available now (after giving freed memory back: a finished stage's heap pages would otherwise count as
    used). Unknown availability (not Linux) passes."""
    release_memory()
    avail = available_mb()
    if avail is not None and need_mb > avail:
        raise InsufficientMemoryError(
            f"{what} needs about {need_mb / 1024:.1f} GiB of memory ({how}); {avail / 1024:.1f} GiB is available "
            f"here; free memory or use a machine with more")


@dataclass
class _Open:
    name: str
    t0: float
    peak: float = 0.0


@dataclass
class StageLog:
    rows: list[dict] = field(default_factory=list)
    on_stage: Callable[[list[dict]], None] | None = None  # called after every stage (e.g. to write the rows out)
    _open: list[_Open] = field(default_factory=list)

    def _fold(self) -> None:
        peak = rss_peak_mb()
        if peak is not None:
            for s in self._open:
                s.peak = max(s.peak, peak)
        rss_reset()

    @contextlib.contextmanager
    def stage(self, name: str):
        release_memory()
        self._fold()
        s = _Open(name, time.perf_counter())
        self._open.append(s)
        try:
            yield
        finally:
            self._fold()
            self._open.remove(s)
            now = rss_now_mb()
            self.rows.append({"stage": name, "seconds": round(time.perf_counter() - s.t0, 2),
                              "peak_rss_mb": round(s.peak) if now is not None else None,
                              "rss_after_mb": round(now) if now is not None else None})
            if self.on_stage is not None:
                self.on_stage(self.rows)

    def table(self) -> str:
        w = max([56, *(len(r["stage"]) for r in self.rows)])  # long graph names: the columns still line up
        lines = [f"{'stage':{w}s} {'wall s':>9s} {'peak RSS GiB':>13s}"]
        for r in self.rows:
            peak = f"{r['peak_rss_mb'] / 1024:.2f}" if r["peak_rss_mb"] is not None else "n/a"
            lines.append(f"{r['stage']:{w}s} {r['seconds']:9.1f} {peak:>13s}")
        return "\n".join(lines)


_CURRENT: contextvars.ContextVar[StageLog | None] = contextvars.ContextVar("trt_dm_stages", default=None)


@contextlib.contextmanager
def recording(on_stage: Callable[[list[dict]], None] | None = None):
    """Collect the stages marked inside this block (in this thread / context) into a new ``StageLog``;
    ``on_stage(rows)`` after each one (so a process killed mid-way leaves what it finished)."""
    log = StageLog(on_stage=on_stage)
    token = _CURRENT.set(log)
    try:
        yield log
    finally:
        _CURRENT.reset(token)


@contextlib.contextmanager
def stage(name: str):
    """Mark a stage: recorded into the active ``recording()``, if any; otherwise nothing happens."""
    log = _CURRENT.get()
    if log is None:
        yield
        return
    with log.stage(name):
        yield
