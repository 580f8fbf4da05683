"""The timing harness shared by ``bench`` and ``tune``: timed collective calls, progress,
provenance of results."""

from __future__ import annotations

import datetime
import os
import platform
import socket
import sys
import time
from collections.abc import Callable

__all__ = ["time_call", "Progress", "provenance", "mpi4py_version"]


def time_call(comm, fn: Callable[[], None], warmup: int, iters: int, max_time: float,
              sync: Callable[[], None] | None = None) -> tuple[float, float, float, int]:
    """Time ``fn`` (collective) on every rank: (avg, min, max) over ranks of the mean per call.

    One warm-up call is always made; the rest of ``warmup`` and the ``iters`` timed calls are
    cut so a point takes about ``max_time`` seconds, judged from the slowest rank's first
    call, so every rank makes the same number of calls (at least one timed).
    """
    from mpi4py import MPI

    t0 = time.perf_counter()
    fn()
    if sync:
        sync()
    est = comm.allreduce(time.perf_counter() - t0, op=MPI.MAX)
    budget = max_time / est if est > 0 else float(iters + warmup)
    for _ in range(min(warmup - 1, int(budget / 4))):
        fn()
    n = max(1, min(iters, int(budget)))
    comm.Barrier()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    if sync:
        sync()
    t = (time.perf_counter() - t0) / n
    tsum = comm.allreduce(t, op=MPI.SUM)
    return tsum / comm.Get_size(), comm.allreduce(t, op=MPI.MIN), \
        comm.allreduce(t, op=MPI.MAX), n


class Progress:
    """Progress on rank 0's stderr: a bar redrawn in place on a terminal, otherwise a line
    at each quarter of the work (so logs of mpiexec runs stay short).

    ``drop(n)`` takes ``n`` steps off the total when work is skipped (an algorithm no longer
    timed at larger sizes), so the bar ends at its total.
    """

    WIDTH = 30

    def __init__(self, total: int, enabled: bool, stream=None) -> None:
        self.total, self.done, self.enabled = max(int(total), 0), 0, enabled
        self.stream = sys.stderr if stream is None else stream
        self.t0 = time.perf_counter()
        try:
            self.tty = self.stream.isatty()
        except (AttributeError, ValueError):
            self.tty = False
        self._quarter = 0
        self._open = False

    def _line(self, label: str) -> str:
        frac = self.done / max(self.total, 1)
        bar = "#" * int(self.WIDTH * frac)
        return (f"[{bar:<{self.WIDTH}}] {self.done}/{self.total} {label} "
                f"{time.perf_counter() - self.t0:.1f}s")

    def step(self, label: str) -> None:
        """One unit of work is starting (``label`` says which)."""
        if not self.enabled:
            return
        self.done = min(self.done + 1, self.total)
        self._show(label)

    def drop(self, n: int) -> None:
        """``n`` steps of the total will not be run."""
        self.total = max(self.done, self.total - max(int(n), 0))

    def _show(self, label: str) -> None:
        try:
            if self.tty:
                self.stream.write("\r" + self._line(label)[:110].ljust(110))
                self._open = True
            else:
                q = 4 * self.done // max(self.total, 1)
                if q > self._quarter or self.done == 1:
                    self._quarter = q
                    self.stream.write(self._line(label) + "\n")
            self.stream.flush()
        except (BrokenPipeError, OSError, ValueError):
            self.enabled = False

    def close(self) -> None:
        """End the bar's line (terminal) or print the last line (log)."""
        if not self.enabled:
            return
        try:
            if self.tty and self._open:
                self.stream.write("\r" + self._line("done")[:110].ljust(110) + "\n")
            elif not self.tty and self._quarter < 4:
                self.stream.write(self._line("done") + "\n")
            self.stream.flush()
        except (BrokenPipeError, OSError, ValueError):
            pass
        self.enabled = False


def provenance(comm, command: str) -> dict:
    """Where and how a result was measured: host, versions, p, ranks per node, date, command."""
    from mpi4py import MPI

    import pya2a

    from ..core.state import internal_comm, ranks_per_node

    lib = MPI.Get_library_version().replace("\x00", "").strip().splitlines()
    return {"host": socket.gethostname(), "platform": platform.platform(),
            "cpu_count": os.cpu_count(), "python": platform.python_version(),
            "pya2a": pya2a.__version__, "mpi4py": mpi4py_version(),
            "mpi_library": lib[0] if lib else "", "mpi_version": "{}.{}".format(*MPI.Get_version()),
            "p": comm.Get_size(), "ranks_per_node": ranks_per_node(internal_comm(comm)),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "command": command}


def mpi4py_version() -> str:
    """mpi4py's version string."""
    import mpi4py

    return getattr(mpi4py, "__version__", "?")
