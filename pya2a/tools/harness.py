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
    """A one-line progress bar on rank 0's stderr."""

    def __init__(self, total: int, enabled: bool) -> None:
        self.total, self.done, self.enabled = total, 0, enabled
        self.t0 = time.perf_counter()
        self.tty = sys.stderr.isatty()

    def step(self, label: str) -> None:
        if not self.enabled:
            return
        self.done += 1
        frac = self.done / max(self.total, 1)
        bar = "#" * int(30 * frac)
        line = (f"[{bar:<30}] {self.done}/{self.total} {label} "
                f"{time.perf_counter() - self.t0:6.1f}s")
        if self.tty:
            sys.stderr.write("\r" + line[:110].ljust(110))
            if self.done == self.total:
                sys.stderr.write("\n")
        elif self.done == self.total or self.done % max(1, self.total // 20) == 0:
            sys.stderr.write(line + "\n")
        sys.stderr.flush()


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
