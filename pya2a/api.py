"""Public entry points: Alltoall, Alltoallv, Alltoallw, alltoallv, Comm, available_algorithms."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from mpi4py import MPI

from . import algorithms
from ._alltoallw import Alltoallw
from ._oneshot import exchange
from .core import watchdog
from .core.devices import gpu_device, load_device_algorithms
from .core.registry import available_here
from .core.spec import in_place, is_device_buffer
from .core.state import CommState, check_comm, internal_comm, state, watch
from .core.validate import agree
from .plan import Explanation, Plan, explain, plan

__all__ = ["Alltoall", "Alltoallv", "Alltoallw", "alltoallv", "Comm", "Cartcomm", "Graphcomm",
           "Distgraphcomm", "available_algorithms", "plan", "explain", "Plan", "Explanation"]


def Alltoallv(comm: MPI.Intracomm, sendmsg: object, recvmsg: object, *,
              algorithm: str = "auto", check: bool = False,
              options: Mapping | None = None) -> None:
    """Personalized all-to-all with per-peer counts, like ``comm.Alltoallv(sendmsg, recvmsg)``.

    Args:
        comm: an mpi4py intracommunicator.
        sendmsg: any message form mpi4py's ``Alltoallv`` takes (``buf``, ``[buf, counts]``,
            ``[buf, (counts, displs)]``, ``[buf, counts, displs, dtype]``, ...), or
            ``MPI.IN_PLACE`` / ``None`` to send from the receive buffer.
        recvmsg: the receive message, same forms.
        algorithm: "auto" (default; ``PYA2A_ALGORITHM`` overrides) or a name from
            :func:`available_algorithms`. Must be the same on every rank.
        check: also verify across ranks that every send count matches the receiver's
            receive count (one extra Alltoall of counts).
        options: algorithm options, the same on every rank, e.g. ``{"grid": (r, c)}`` for
            ``mesh`` (r * c == p; rows of the grid are consecutive ranks) or
            ``{"window": 8}`` for ``direct``.

    Device buffers (CuPy, torch, DLPack): with ``ipc`` the call is stream-ordered on the
    current CuPy stream and returns before the data lands; the staged algorithms return
    with the receive buffer written.

    Raises:
        TypeError, ValueError, BufferError: bad arguments on any rank, raised on every rank
            before any data moves.
    """
    exchange("Alltoallv", "alltoallv", comm, sendmsg, recvmsg, algorithm, check, options)


def Alltoall(comm: MPI.Intracomm, sendmsg: object, recvmsg: object, *,
             algorithm: str = "auto", check: bool = False,
             options: Mapping | None = None) -> None:
    """Personalized all-to-all with one block size, like ``comm.Alltoall(sendmsg, recvmsg)``.

    Same arguments and errors as :func:`Alltoallv`; messages take mpi4py's ``Alltoall``
    forms (``buf``, ``[buf, count]``, ``[buf, (count, displ)]``, ``[buf, count, dtype]``, ...).
    """
    exchange("Alltoall", "alltoall", comm, sendmsg, recvmsg, algorithm, check, options)


def alltoallv(comm: MPI.Intracomm, sendbuf, sendcounts, *, algorithm: str = "auto"):
    """Array in, array out: exchange rows of ``sendbuf`` and the counts themselves.

    Args:
        comm: an mpi4py intracommunicator.
        sendbuf: array of shape (n, ...) (NumPy, or a device array: CuPy, torch); rows
            ``sum(sendcounts[:j])`` .. go to rank j.
        sendcounts: p integers (rows per destination), summing to ``sendbuf.shape[0]``.
        algorithm: as for :func:`Alltoallv`.

    Returns:
        (recvbuf, recvcounts): recvbuf has shape (sum(recvcounts), *sendbuf.shape[1:]), the
        same dtype and array type (and device) as sendbuf; recvcounts is an int64 NumPy
        array of rows received from each rank.
    """
    call = "alltoallv"
    check_comm(call, comm)
    icomm = internal_comm(comm, call)
    guard = watch(icomm, call) if watchdog.timeout() is not None else None
    try:
        return _alltoallv(call, comm, icomm, sendbuf, sendcounts, algorithm)
    finally:
        watchdog.leave(guard)


def _alltoallv(call: str, comm: MPI.Intracomm, icomm: MPI.Intracomm, sendbuf, sendcounts,
               algorithm: str):
    """:func:`alltoallv` once the communicator's state exists (watched by the caller)."""
    p = icomm.Get_size()
    exc = None
    counts = np.zeros(p, dtype=np.int64)
    device = False
    row_info = np.zeros(2, dtype=np.int64)  # bytes per row, bytes per element
    try:
        device = is_device_buffer(sendbuf)
        shape = tuple(sendbuf.shape)
        if not device and np.dtype(sendbuf.dtype).hasobject:
            raise TypeError(f"{call}: sendbuf holds Python objects (dtype "
                            f"{np.dtype(sendbuf.dtype)}); they cannot travel between "
                            f"processes")
        if len(shape) < 1:
            raise ValueError(f"{call}: sendbuf must have at least one dimension")
        counts = np.asarray(sendcounts)
        if counts.ndim != 1 or counts.size != p:
            raise ValueError(f"{call}: sendcounts has {counts.size} entries, expected {p}")
        if counts.size and not np.issubdtype(counts.dtype, np.integer):
            raise TypeError(f"{call}: sendcounts must be integers, got {counts.dtype}")
        counts = counts.astype(np.int64)
        if (counts < 0).any():
            raise ValueError(f"{call}: sendcounts has negative entries")
        if int(counts.sum()) != shape[0]:
            raise ValueError(f"{call}: sendcounts sum to {int(counts.sum())} but sendbuf has "
                             f"{shape[0]} rows")
        row_info[:] = (_row_bytes(sendbuf), _item_bytes(sendbuf))
    except AttributeError:
        exc = TypeError(f"{call}: sendbuf must be an array with .shape, "
                        f"not {type(sendbuf).__name__}")
    except Exception as e:
        exc = e
    table = agree(icomm, exc, row_info)
    rows_ok = table[:, 1] == table[0, 1]
    if not rows_ok.all() or not (table[:, 2] == table[0, 2]).all():  # same on every rank
        k = int(np.argmax(~rows_ok)) if not rows_ok.all() else \
            int(np.argmax(table[:, 2] != table[0, 2]))
        raise ValueError(f"{call}: rows of sendbuf differ between ranks: rank 0 has rows of "
                         f"{table[0, 1]} bytes ({table[0, 2]}-byte elements), rank {k} of "
                         f"{table[k, 1]} bytes ({table[k, 2]}-byte elements)")
    recvcounts = np.empty(p, dtype=np.int64)
    icomm.Alltoall(counts, recvcounts)
    nrecv = int(recvcounts.sum())
    if device:
        _device = gpu_device()
        recvbuf = _device.empty_rows(sendbuf, nrecv)
        sview, rview = _device.byte_view(sendbuf), _device.byte_view(recvbuf)
    else:
        sarr = np.asarray(sendbuf)
        recvbuf = np.empty((nrecv, *sarr.shape[1:]), dtype=sarr.dtype)
        sview, rview = _bytes(sarr), _bytes(recvbuf)
    row = int(table[0, 1])
    Alltoallv(comm, [sview, counts * row, MPI.BYTE], [rview, recvcounts * row, MPI.BYTE],
              algorithm=algorithm)
    return recvbuf, recvcounts


def _bytes(a: np.ndarray) -> np.ndarray:
    a = np.ascontiguousarray(a)
    return a.reshape(-1).view(np.uint8) if a.size else np.empty(0, np.uint8)


def _item_bytes(a) -> int:
    size = getattr(a, "itemsize", None)
    if size is None:  # torch
        size = a.element_size() if hasattr(a, "element_size") else np.dtype(a.dtype).itemsize
    return int(size)


def _row_bytes(a) -> int:
    return int(np.prod(a.shape[1:], dtype=np.int64)) * _item_bytes(a)


def available_algorithms(comm: MPI.Intracomm | None = None, device: object = None) -> list[str]:
    """Algorithm names that can run on ``comm`` (any size if None), host or device buffers.

    With a communicator and ``device`` set, this is collective on its first use per
    communicator: it asks every rank whether ``ipc`` / ``shm`` can run there at all (one
    node, peer access). Host algorithm lists are local.
    """
    p = None if comm is None else comm.Get_size()
    if device:
        load_device_algorithms()
    names = algorithms.available(p, device=bool(device))
    if comm is not None and any(algorithms.get(n).comm_available for n in names):
        # collective on first use: whether ipc / shm can run on this communicator at all
        icomm = internal_comm(comm)
        names = list(available_here(icomm, _device_ordinal(device), tuple(names)))
    return names


def _device_ordinal(device: object) -> int | None:
    if not device:
        return None
    if isinstance(device, int) and not isinstance(device, bool):
        return device
    return None


class Comm(MPI.Intracomm):
    """Drop-in intracommunicator whose ``Alltoall`` / ``Alltoallv`` / ``Alltoallw`` are pya2a's.

    It is an ``mpi4py.MPI.Intracomm`` (a second handle to the same MPI communicator), so
    every other method and every isinstance check behaves as the wrapped one's, except that
    the rest of the all-to-all family (``Ialltoall(v/w)``, the ``*_init`` calls: still the
    library's own) raise ``TypeError`` for a device buffer when the MPI is not CUDA-aware,
    instead of crashing inside MPI. Communicators derived from it (``Dup``, ``Split``,
    ``Split_type``, ``Create``, ``Create_group``, ``Create_cart`` and its ``Sub``,
    ``Create_graph``, ``Create_dist_graph(_adjacent)``) are pya2a communicators too, with
    the same algorithm and options: :class:`Cartcomm`, :class:`Graphcomm` and
    :class:`Distgraphcomm` are both this class and mpi4py's topology class.

    Args:
        comm: the communicator to wrap (default ``MPI.COMM_WORLD``).
        algorithm: default algorithm for this communicator's exchanges.
        options: default algorithm options (see :func:`Alltoallv`).
    """

    algorithm: str = "auto"
    options: dict | None = None
    _state: CommState | None = None  # this communicator's pya2a state, while it is open

    def __new__(cls, comm: MPI.Intracomm | None = None, *, algorithm: str = "auto",
                options: Mapping | None = None):
        if comm is None:
            comm = MPI.COMM_WORLD
        check_comm("Comm", comm)
        # Intracomm's constructor for the topology subclasses too: Python requires the
        # constructor of the first built-in base, and the object is the same for all
        return MPI.Intracomm.__new__(cls, comm)

    def __init__(self, comm: MPI.Intracomm | None = None, *, algorithm: str = "auto",
                 options: Mapping | None = None) -> None:
        if algorithm != "auto":
            algorithms.get(algorithm, "Comm")
        self.algorithm = algorithm
        self.options = dict(options) if options else None

    def _open_state(self, call: str) -> CommState:
        """The communicator's state, looked up once and kept while it is open."""
        st = self._state
        if st is None or st._closed:
            check_comm(call, self)
            st = self._state = state(self, call)
        return st

    def Alltoallv(self, sendbuf, recvbuf) -> None:  # noqa: N802 (mpi4py's name)
        """``MPI.Comm.Alltoallv`` through pya2a with this communicator's algorithm."""
        st = self._state
        if st is None or st._closed:
            st = self._open_state("Alltoallv")
        exchange("Alltoallv", "alltoallv", self, sendbuf, recvbuf, self.algorithm, False,
                 self.options, st)

    def Alltoall(self, sendbuf, recvbuf) -> None:  # noqa: N802
        """``MPI.Comm.Alltoall`` through pya2a with this communicator's algorithm."""
        st = self._state
        if st is None or st._closed:
            st = self._open_state("Alltoall")
        exchange("Alltoall", "alltoall", self, sendbuf, recvbuf, self.algorithm, False,
                 self.options, st)

    def Alltoallw(self, sendbuf, recvbuf) -> None:  # noqa: N802
        """``MPI.Comm.Alltoallw`` through pya2a with this communicator's algorithm."""
        Alltoallw(self, sendbuf, recvbuf, algorithm=self.algorithm,
                             options=self.options)


def _adopt(parent: Comm, new: object) -> object:
    """``new`` (derived from ``parent``) as a pya2a communicator with parent's settings."""
    if not isinstance(new, MPI.Intracomm) or new == MPI.COMM_NULL:
        return new  # intercommunicators and COMM_NULL stay mpi4py's
    if not isinstance(new, Comm):
        cls = Cartcomm if isinstance(new, MPI.Cartcomm) else \
            Graphcomm if isinstance(new, MPI.Graphcomm) else \
            Distgraphcomm if isinstance(new, MPI.Distgraphcomm) else Comm
        new = cls.__new__(cls, new)
    new.algorithm = parent.algorithm
    new.options = dict(parent.options) if parent.options else None
    return new


def _deriving(name: str):
    def method(self, *args, **kwargs):
        out = getattr(super(Comm, self), name)(*args, **kwargs)
        if isinstance(out, tuple):  # Idup: (communicator, request)
            return (_adopt(self, out[0]), *out[1:])
        return _adopt(self, out)

    method.__name__ = method.__qualname__ = name
    method.__doc__ = (f"``MPI.Comm.{name}``; the new communicator is a pya2a communicator "
                      f"with this one's algorithm and options.")
    return method


_DERIVING = ("Dup", "Dup_with_info", "Clone", "Idup", "Idup_with_info", "Create",
             "Create_group", "Split", "Split_type", "Create_cart", "Create_graph",
             "Create_dist_graph", "Create_dist_graph_adjacent")
for _name in _DERIVING:
    if hasattr(MPI.Intracomm, _name):
        setattr(Comm, _name, _deriving(_name))


class Cartcomm(Comm, MPI.Cartcomm):
    """A Cartesian communicator derived from a :class:`Comm` (all-to-all through pya2a)."""

    Sub = _deriving("Sub")


class Graphcomm(Comm, MPI.Graphcomm):
    """A graph communicator derived from a :class:`Comm` (all-to-all through pya2a)."""


class Distgraphcomm(Comm, MPI.Distgraphcomm):
    """A distributed-graph communicator derived from a :class:`Comm`."""




# The rest of the all-to-all family stays the library's own call, but a device buffer handed
# to an MPI that is not CUDA-aware would crash inside MPI (mpi4py passes the device pointer
# through): refuse it with a TypeError instead. Host buffers, and any buffer when MPI is
# CUDA-aware, go straight through. The check is local; every rank that passes device
# buffers raises.
_GUARDED = ("Ialltoall", "Ialltoallv", "Ialltoallw", "Alltoall_init", "Alltoallv_init",
            "Alltoallw_init")


def _message_buffer(msg: object) -> object:
    if isinstance(msg, (list, tuple)):
        return msg[0] if msg else None
    return msg


def _refuse_device_without_aware(call: str, msgs: tuple) -> None:
    for msg in msgs:
        buf = _message_buffer(msg)
        if buf is None or in_place(buf) or not is_device_buffer(buf):
            continue
        gdev = gpu_device()
        if not gdev.cuda_aware():
            raise TypeError(
                f"{call}: device buffer with an MPI that is not CUDA-aware "
                f"({gdev.cuda_aware_reason()}): the library's own call would crash on a "
                f"device pointer. Use {call.split('.')[0]}.Alltoallv / Alltoall (pya2a moves "
                f"device buffers itself) or a CUDA-aware MPI")
        return


def _guarded(name: str):
    base = getattr(MPI.Intracomm, name)

    def method(self, *args, **kwargs):
        _refuse_device_without_aware(f"Comm.{name}", args[:2])
        return base(self, *args, **kwargs)

    method.__name__ = method.__qualname__ = name
    method.__doc__ = (f"``MPI.Comm.{name}`` (the MPI library's own call); a device buffer "
                      f"with an MPI that is not CUDA-aware raises TypeError instead of "
                      f"crashing.")
    return method


for _name in _GUARDED:
    if hasattr(MPI.Intracomm, _name):
        setattr(Comm, _name, _guarded(_name))

