"""A watchdog for stalled exchanges: ``PYA2A_TIMEOUT=seconds`` (off by default).

When it is on, every pya2a call on a communicator announces its arrival to every peer
with a small nonblocking message on pya2a's private duplicate (tag :data:`TAG_ARRIVAL`),
then runs as usual. A monitor thread watches the calls in progress; one that has waited
longer than the timeout prints, on each waiting rank, which call it is in, its call
number on that communicator and which peers have not arrived at it (or that all have, when
the stall is inside the exchange: a peer failed or stopped in the middle), and then ends
the whole job with ``MPI.COMM_WORLD.Abort``. A blocked MPI call cannot be interrupted to
raise instead without leaving the other ranks waiting, so aborting is the one exit that
cannot hang anyone.

A call that fails on one rank alone, before it sends anything (``Plan.run``'s buffer
errors without ``check=True``), leaves the others waiting for that rank's messages; it
sends them a failure notice (:func:`failed`, tag :data:`TAG_FAILED`) so that their report
names the rank and its error instead of "stalled inside".

Watched: one-shot ``Alltoall`` / ``Alltoallv`` / ``Alltoallw``, ``pya2a.alltoallv``, plan
creation (``pya2a.plan``), ``pya2a.explain``, ``Plan.run``, ``Plan.bind``, ``BoundPlan.run``,
``ExpertParallel`` construction, ``dispatch`` and ``combine``, and the first use of a
communicator (the ``Dup`` of its private duplicate, :func:`enter_setup`: it names the call
but not the missing ranks, since no message can be sent on a duplicate that does not exist
yet).

Nothing waits on the arrival messages: they complete in the background and are collected
at the next call on the same communicator (MPI matches them in order), so a call that
raised locally before communicating leaves nothing stuck. The monitor reads them with
``Test`` from its own thread, which needs ``MPI_THREAD_MULTIPLE`` (mpi4py's default).
The setting is read when pya2a is imported; :func:`configure` changes it at run time.
Off, the cost per call is one function call returning None.
"""

from __future__ import annotations

import os
import sys
import threading
import time

import numpy as np
from mpi4py import MPI

__all__ = ["TAG_ARRIVAL", "TAG_FAILED", "SLOT", "configure", "timeout", "enter", "enter_setup",
           "leave", "failed", "Arrivals"]

TAG_ARRIVAL = 7190  # on the private duplicate; the algorithms' tags are 7101..7130
TAG_FAILED = 7191  # a rank's call failed locally (:func:`failed`): its number and error
_REPORT_S = 0.5  # seconds between printing a report and aborting (see _fire)
NOTICE = 512  # bytes of a failure notice: the call number (int64), then the error text

_TIMEOUT: float | None = None
SLOT = "watchdog.arrivals"  # the CommState slot of a communicator's Arrivals
_lock = threading.Lock()
_drain_lock = threading.Lock()
_wake = threading.Condition(_lock)
_active: dict[int, _Guard] = {}
_thread: threading.Thread | None = None


def _parse(value: str | None) -> float | None:
    if value is None or not value.strip():
        return None
    try:
        t = float(value)
    except ValueError:
        raise ValueError(f"PYA2A_TIMEOUT must be a number of seconds, got {value!r}") from None
    if not t > 0:
        raise ValueError(f"PYA2A_TIMEOUT must be positive, got {value!r}")
    return t


def configure(seconds: float | None) -> None:
    """Set the timeout in seconds (None: off) for calls that start from now on (local)."""
    global _TIMEOUT
    _TIMEOUT = None if seconds is None else _parse(str(seconds))


def timeout() -> float | None:
    """The timeout in force (None: off)."""
    return _TIMEOUT


class Arrivals:
    """Per-communicator arrival messages (kept in the communicator's state slot)."""

    __slots__ = ("count", "pending", "notices", "__weakref__")

    def __init__(self) -> None:
        self.count = 0
        # (call number, recv requests by peer, send requests, buffers kept alive)
        self.pending: list[tuple[int, list, list, tuple]] = []
        # failure notices received from peers: (source rank, call number, error text)
        self.notices: list[tuple[int, int, str]] = []

    def fail(self, comm: MPI.Intracomm, number: int, text: str) -> None:
        """Tell every peer that call ``number`` failed here (nonblocking; collected later)."""
        out = np.zeros(NOTICE, dtype=np.uint8)
        out[:8] = np.frombuffer(np.int64(number).tobytes(), dtype=np.uint8)
        raw = text.encode(errors="replace")[:NOTICE - 8]
        out[8:8 + len(raw)] = np.frombuffer(raw, dtype=np.uint8)
        me = comm.Get_rank()
        sends = [comm.Isend([out, MPI.BYTE], q, TAG_FAILED)
                 for q in range(comm.Get_size()) if q != me]
        end = time.monotonic() + 0.05  # progress: this rank may not call MPI again soon
        while sends and not MPI.Request.Testall(sends) and time.monotonic() < end:
            time.sleep(0.001)
        self.pending.append((number, [], sends, (out,)))

    def drain(self, comm: MPI.Intracomm) -> list[tuple[int, int, str]]:
        """Receive the failure notices that have arrived (no waiting); keep those of this
        call and the one before it, and return them. Either thread may call it."""
        st = MPI.Status()
        buf = np.empty(NOTICE, dtype=np.uint8)
        with _drain_lock:
            while comm.Iprobe(MPI.ANY_SOURCE, TAG_FAILED, st):
                src = st.Get_source()
                comm.Recv([buf, MPI.BYTE], src, TAG_FAILED)
                n = int(buf[:8].view(np.int64)[0])
                text = buf[8:].tobytes().rstrip(b"\0").decode(errors="replace")
                self.notices.append((src, n, text))
            self.notices = [x for x in self.notices if x[1] >= self.count - 1]
            return list(self.notices)

    def announce(self, comm: MPI.Intracomm) -> tuple[int, list]:
        """Post this call's arrival messages; returns (call number, recv request by peer)."""
        self._collect()
        self.count += 1
        n = self.count
        self.drain(comm)  # failure notices of older calls are dropped, not left queued
        p, me = comm.Get_size(), comm.Get_rank()
        out = np.array([n], dtype=np.int64)
        inbox = np.zeros(p, dtype=np.int64)
        recvs: list = [None] * p
        sends = []
        for q in range(p):
            if q == me:
                continue
            recvs[q] = comm.Irecv([inbox[q:q + 1], MPI.INT64_T], q, TAG_ARRIVAL)
            sends.append(comm.Isend([out, MPI.INT64_T], q, TAG_ARRIVAL))
        self.pending.append((n, recvs, sends, (out, inbox)))
        return n, recvs

    def _collect(self) -> None:
        """Drop the calls whose arrival messages have all completed (no waiting)."""
        keep = []
        for entry in self.pending:
            reqs = [r for r in entry[1] if r is not None] + entry[2]
            if reqs and not MPI.Request.Testall(reqs):
                keep.append(entry)
        self.pending = keep

    def free(self) -> None:
        """Cancel what is still pending (the communicator is being freed)."""
        for _, recvs, sends, _ in self.pending:
            for r in recvs:
                if r is not None and r:
                    try:
                        r.Cancel()
                        r.Free()
                    except MPI.Exception:
                        pass
            for r in sends:
                if r:
                    try:
                        r.Free()
                    except MPI.Exception:
                        pass
        self.pending = []


class _Guard:
    __slots__ = ("call", "number", "rank", "size", "recvs", "deadline", "world", "comm",
                 "arrivals")

    def __init__(self, call: str, number: int, rank: int, size: int, recvs: list | None,
                 deadline: float, comm: MPI.Intracomm | None = None,
                 arrivals: Arrivals | None = None) -> None:
        self.call, self.number, self.rank, self.size = call, number, rank, size
        self.recvs, self.deadline = recvs, deadline  # recvs None: a set-up, no arrivals
        self.world = MPI.COMM_WORLD.Get_rank()
        self.comm, self.arrivals = comm, arrivals


def failed(g: _Guard | None, exc: BaseException) -> None:
    """The watched call ``g`` failed on this rank alone (an error the other ranks cannot
    know of, e.g. a ``Plan.run`` buffer error without ``check=True``): tell them, so that
    their watchdog names this rank and its error when it fires. Nothing when off."""
    if g is None or g.arrivals is None or g.comm is None:
        return
    g.arrivals.fail(g.comm, g.number, f"{type(exc).__name__}: {exc}")


def _watch(g: _Guard) -> _Guard:
    with _lock:
        _active[id(g)] = g
        _start()
        _wake.notify()
    return g


def enter(comm: MPI.Intracomm, call: str, arrivals: Arrivals) -> _Guard | None:
    """Start watching ``call`` on the private communicator ``comm`` (None when off).

    ``arrivals`` is the communicator's :class:`Arrivals` (kept in its state, slot
    :data:`SLOT`: :func:`pya2a.core.state.watch` finds it); the same object for every call
    on ``comm``.
    """
    t = _TIMEOUT
    if t is None:
        return None
    number, recvs = arrivals.announce(comm)
    return _watch(_Guard(call, number, comm.Get_rank(), comm.Get_size(), recvs,
                         time.monotonic() + t, comm, arrivals))


def enter_setup(comm: MPI.Comm, call: str) -> _Guard | None:
    """Start watching the set-up of pya2a's state on the user communicator ``comm`` (its
    ``Dup``; None when off). No arrival messages: the private duplicate they travel on is
    what is being made, and a message on ``comm`` itself could match the user's own, so a
    stall here names the call but not the missing ranks."""
    t = _TIMEOUT
    if t is None:
        return None
    return _watch(_Guard(call, 0, comm.Get_rank(), comm.Get_size(), None,
                         time.monotonic() + t))


def leave(g: _Guard | None) -> None:
    """Stop watching the call ``g`` (from :func:`enter`)."""
    if g is None:
        return
    with _lock:
        _active.pop(id(g), None)


def _start() -> None:
    global _thread
    if _thread is None or not _thread.is_alive():
        _thread = threading.Thread(target=_monitor, name="pya2a-watchdog", daemon=True)
        _thread.start()


def _missing(g: _Guard) -> list[int]:
    out: list[int] = []
    for q, r in enumerate(g.recvs or ()):
        if r is None:
            continue
        try:
            if not r.Test():
                out.append(q)
        except MPI.Exception:
            out.append(q)
    return out


def _fire(g: _Guard, waited: float) -> None:
    missing = _missing(g)
    where = f"call {g.number} on this communicator"
    if g.recvs is None:
        where = "setting up pya2a's state for this communicator: its MPI_Comm_dup"
        who = ("a rank of the communicator has not entered a pya2a call on it (which ranks "
               "cannot be told before the duplicate exists)")
    elif missing:
        shown = ", ".join(map(str, missing[:16])) + (" ..." if len(missing) > 16 else "")
        who = f"ranks that have not arrived: {shown}"
    else:
        who = ("every rank arrived; the exchange stalled inside (a peer failed or stopped "
               "in the middle of it)")
    notices = g.arrivals.drain(g.comm) if g.arrivals is not None and g.comm is not None \
        else []
    mine = [x for x in notices if x[1] == g.number] or notices
    if mine:
        src, n, text = mine[0]
        more = f" (and {len(mine) - 1} more ranks)" if len(mine) > 1 else ""
        who = (f"rank {src} failed in its call {n} on this communicator{more}, on that rank "
               f"alone, so the others wait for its messages: {text}")
    sys.stderr.write(f"pya2a watchdog: rank {g.rank} of {g.size} (world rank {g.world}) "
                     f"has waited {waited:.1f} s in {g.call} ({where}), more than "
                     f"PYA2A_TIMEOUT; {who}. Aborting the job.\n")
    sys.stderr.flush()
    # The launcher forwards a rank's output through a pipe, and an abort may end the job
    # before that pipe is read (seen with MPICH's hydra on a loaded machine: the report
    # was lost). A short wait lets the report out; the job ends either way.
    time.sleep(_REPORT_S)
    MPI.COMM_WORLD.Abort(1)
    time.sleep(5.0)  # Abort normally does not return; if it does, leave without MPI
    os._exit(1)


def _monitor() -> None:
    while True:
        with _lock:
            now = time.monotonic()
            due = [g for g in _active.values() if g.deadline <= now]
            if not due:
                nxt = min((g.deadline for g in _active.values()), default=None)
                _wake.wait(None if nxt is None else max(nxt - now, 0.01))
                continue
            for d in due:  # each stalled call fires once
                _active.pop(id(d), None)
        g = due[0]
        _fire(g, time.monotonic() - g.deadline + (_TIMEOUT or 0.0))


_TIMEOUT = _parse(os.environ.get("PYA2A_TIMEOUT"))
