"""Per-communicator state: the one place pya2a keeps anything about a communicator.

A :class:`CommState` is attached to the user's communicator as an MPI attribute and freed
with it (``Comm.Free`` or ``MPI.Finalize`` runs the attribute's delete callback). It holds

- the private duplicate that carries all of pya2a's traffic (user messages never match it),
- the node layout, computed once with buffer-based collectives,
- named slots for anything an algorithm or backend keeps per communicator (one-shot
  signatures and plans, IPC engines, shared-memory windows, hierarchical sub-communicators,
  CUDA-awareness agreed over the ranks), each released with the state.

Nothing is keyed by a communicator's handle value: MPI hands freed handle values out again,
so a cache keyed by them would find a dead communicator's state.

The private duplicate carries a second attribute pointing back at the state, so code that
only holds the duplicate (algorithms get ``ctx.comm``) finds the same holder with
:func:`state`.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
from mpi4py import MPI

from . import watchdog

__all__ = ["CommState", "NodeLayout", "state", "internal_comm", "check_comm",
           "ranks_per_node", "live_states", "watch"]

_USER_KEYVAL: int | None = None
_INTERNAL_KEYVAL: int | None = None
_LIVE: weakref.WeakSet[CommState] = weakref.WeakSet()
_LOCK = threading.Lock()


@dataclass(frozen=True)
class NodeLayout:
    """How the ranks of a communicator sit on nodes (the same value on every rank).

    Attributes:
        local_rank, local_size: this rank's place among the ranks of its node.
        leader: the lowest rank (in the communicator) on this rank's node.
        max_local: the largest number of ranks on one node.
        one_node: every rank shares one node.
        contiguous: nodes hold consecutive ranks, all nodes the same number of them.
        leaders, local_ranks, local_sizes: for every rank, the leader of its node, its
            place on the node and its node's number of ranks (int64, length p each).
    """

    local_rank: int
    local_size: int
    leader: int
    max_local: int
    one_node: bool
    contiguous: bool
    leaders: np.ndarray
    local_ranks: np.ndarray
    local_sizes: np.ndarray


def _node_layout(comm: MPI.Intracomm) -> NodeLayout:
    p, rank = comm.Get_size(), comm.Get_rank()
    local = comm.Split_type(MPI.COMM_TYPE_SHARED, key=rank)
    try:
        mine = np.array([rank, local.Get_rank(), local.Get_size()], dtype=np.int64)
        lead = np.zeros(1, dtype=np.int64)
        if local.Get_rank() == 0:
            lead[0] = rank
        local.Bcast(lead, root=0)
    finally:
        local.Free()
    row = np.array([int(lead[0]), int(mine[1]), int(mine[2])], dtype=np.int64)
    table = np.empty((p, 3), dtype=np.int64)
    comm.Allgather(row, table)
    leaders = np.ascontiguousarray(table[:, 0])
    sizes = table[:, 2]
    max_local = int(sizes.max())
    contiguous = bool(p % max_local == 0 and
                      np.array_equal(leaders, np.arange(p) // max_local * max_local) and
                      (sizes == max_local).all())
    return NodeLayout(local_rank=int(mine[1]), local_size=int(mine[2]), leader=int(lead[0]),
                      max_local=max_local, one_node=bool(max_local == p),
                      contiguous=contiguous, leaders=leaders,
                      local_ranks=np.ascontiguousarray(table[:, 1]),
                      local_sizes=np.ascontiguousarray(sizes))


class CommState:
    """What pya2a keeps for one user communicator (see the module docstring).

    Attributes:
        comm: the private duplicate carrying pya2a's traffic.
    """

    __slots__ = ("comm", "_node", "_slots", "_closed", "__weakref__")

    def __init__(self, icomm: MPI.Intracomm) -> None:
        self.comm = icomm
        self._node: NodeLayout | None = None
        self._slots: dict[str, Any] = {}
        self._closed = False

    def node(self) -> NodeLayout:
        """The node layout (collective on first use, then cached)."""
        if self._node is None:
            self._node = _node_layout(self.comm)
        return self._node

    def slot(self, name: str, make: Callable[[], Any] | None = None) -> Any:
        """The object kept under ``name``; ``make()`` creates it when missing (None: no)."""
        hit = self._slots.get(name)
        if hit is None and make is not None:
            hit = self._slots[name] = make()
        return hit

    def set_slot(self, name: str, value: Any) -> Any:
        """Keep ``value`` under ``name``, releasing what was there (see :meth:`close`)."""
        old = self._slots.get(name)
        if old is not None and old is not value:
            _release(old)
        self._slots[name] = value
        return value

    def pop_slot(self, name: str) -> Any:
        """Remove and return the object under ``name`` (not released)."""
        return self._slots.pop(name, None)

    def close(self) -> None:
        """Release every slot (objects with ``free()`` or ``clear()``), then the duplicate.

        Runs from the attribute's delete callback: inside ``Comm.Free`` of the user's
        communicator, which every rank calls collectively, or at ``MPI.Finalize``.
        """
        if self._closed:
            return
        self._closed = True
        slots, self._slots = self._slots, {}
        for value in reversed(list(slots.values())):
            _release(value)
        if not MPI.Is_finalized():
            try:
                self.comm.Free()
            except MPI.Exception:
                pass


def _release(value: Any) -> None:
    for meth in ("free", "clear"):
        fn = getattr(value, meth, None)
        if callable(fn):
            try:
                fn()
            except Exception:  # a release must never stop the others
                pass
            return


def _delete(comm: MPI.Comm, keyval: int, held: CommState) -> None:
    held.close()


def _keyvals() -> tuple[int, int]:
    global _USER_KEYVAL, _INTERNAL_KEYVAL
    if _INTERNAL_KEYVAL is None:
        with _LOCK:  # two threads' first calls must not make two pairs of keyvals
            if _INTERNAL_KEYVAL is None:
                _USER_KEYVAL = MPI.Comm.Create_keyval(delete_fn=_delete)
                _INTERNAL_KEYVAL = MPI.Comm.Create_keyval()
    assert _USER_KEYVAL is not None and _INTERNAL_KEYVAL is not None
    return _USER_KEYVAL, _INTERNAL_KEYVAL


def state(comm: MPI.Intracomm, call: str = "pya2a") -> CommState:
    """The state of ``comm`` (collective on first use: duplicates the communicator).

    ``comm`` may be a user communicator or pya2a's private duplicate of one. ``call`` names
    the call that needs it, for the watchdog (``PYA2A_TIMEOUT``) watching the first use.
    """
    user_kv, internal_kv = _keyvals()
    held = comm.Get_attr(user_kv)
    if held is None:
        held = comm.Get_attr(internal_kv)
        if held is None:
            # a plain Intracomm even when comm is a pya2a.Comm
            guard = watchdog.enter_setup(comm, call) if watchdog.timeout() is not None \
                else None
            try:
                dup = MPI.Intracomm(comm).Dup()
            finally:
                watchdog.leave(guard)
            # errors raise on pya2a's own messages (an error in a stamped exchange is a
            # disagreement to detect, never an abort), whatever the user's handler
            dup.Set_errhandler(MPI.ERRORS_RETURN)
            held = CommState(dup)
            _LIVE.add(held)
            dup.Set_attr(internal_kv, held)
            comm.Set_attr(user_kv, held)
    return held


def watch(comm: MPI.Intracomm, call: str) -> Any:
    """Start the watchdog (``PYA2A_TIMEOUT``) on ``call`` over ``comm`` (a user communicator
    or the private duplicate): its guard for :func:`pya2a.core.watchdog.leave`, or None when
    the watchdog is off. On first use of ``comm`` the ``Dup`` is watched too."""
    if watchdog.timeout() is None:
        return None
    st = state(comm, call)
    return watchdog.enter(st.comm, call, st.slot(watchdog.SLOT, watchdog.Arrivals))


def live_states() -> Iterator[CommState]:
    """Every communicator state not yet closed (in no particular order)."""
    return (st for st in list(_LIVE) if not st._closed)


def internal_comm(comm: MPI.Intracomm, call: str = "pya2a") -> MPI.Intracomm:
    """The duplicate of ``comm`` that carries pya2a's own traffic (created once, collective;
    ``call`` as for :func:`state`)."""
    return state(comm, call).comm


def ranks_per_node(icomm: MPI.Intracomm) -> int:
    """Largest number of ranks of ``icomm`` sharing a node (collective on first use).

    ``PYA2A_RANKS_PER_NODE`` does not change it: that setting describes the layout for
    ``hierarchical`` only.
    """
    return state(icomm).node().max_local


def check_comm(call: str, comm: object) -> None:
    """TypeError / ValueError unless ``comm`` is a usable intracommunicator (local check)."""
    if isinstance(comm, MPI.Comm) and comm == MPI.COMM_NULL:
        raise ValueError(f"{call}: comm is MPI.COMM_NULL")
    if isinstance(comm, MPI.Intercomm):
        raise TypeError(f"{call}: intercommunicators are not supported; pass an "
                        f"intracommunicator")
    if not isinstance(comm, MPI.Intracomm):
        raise TypeError(f"{call}: comm must be an mpi4py Intracomm, not {type(comm).__name__}")
