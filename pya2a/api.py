"""Public entry points: Alltoall, Alltoallv, alltoallv, Comm."""

from __future__ import annotations

import os
import zlib
from collections import OrderedDict
from collections.abc import Mapping

import numpy as np
from mpi4py import MPI

from . import _fast, algorithms, select
from .algorithms import Context, ipc
from .bufspec import VSpec, in_place, is_device_buffer, parse_block, parse_vector
from .transport import HostTransport
from .validate import agree, check_counts_match, check_pair, check_uniform

__all__ = ["Alltoall", "Alltoallv", "alltoallv", "Comm", "available_algorithms", "plan",
           "explain", "Plan"]

_KEYVAL: int | None = None


class _Internal:
    """What pya2a keeps per user communicator: its private duplicate and call signatures."""

    __slots__ = ("comm", "fast")

    def __init__(self, comm: MPI.Intracomm) -> None:
        self.comm = comm
        self.fast = _fast.register(_fast.FastCache())


def _free_internal(comm: MPI.Comm, keyval: int, held: _Internal) -> None:
    held.fast.clear()
    if not MPI.Is_finalized():
        try:
            held.comm.Free()
        except MPI.Exception:
            pass


def _internal(comm: MPI.Intracomm) -> _Internal:
    global _KEYVAL
    if _KEYVAL is None:
        _KEYVAL = MPI.Comm.Create_keyval(delete_fn=_free_internal)
    held = comm.Get_attr(_KEYVAL)
    if held is None:
        # a plain Intracomm even when comm is a pya2a.Comm
        held = _Internal(MPI.Intracomm(comm).Dup())
        comm.Set_attr(_KEYVAL, held)
    return held


def internal_comm(comm: MPI.Intracomm) -> MPI.Intracomm:
    """The duplicate of ``comm`` that carries pya2a's own traffic (created once, collective).

    It is cached as an MPI attribute on ``comm`` and freed with it, so user messages on
    ``comm`` can never match ours.
    """
    return _internal(comm).comm


def _check_comm(call: str, comm: object) -> None:
    if isinstance(comm, MPI.Comm) and comm == MPI.COMM_NULL:
        raise ValueError(f"{call}: comm is MPI.COMM_NULL")
    if isinstance(comm, MPI.Intercomm):
        raise TypeError(f"{call}: intercommunicators are not supported; pass an "
                        f"intracommunicator")
    if not isinstance(comm, MPI.Intracomm):
        raise TypeError(f"{call}: comm must be an mpi4py Intracomm, not {type(comm).__name__}")


def _code(name: str) -> int:
    return zlib.crc32(name.encode())


_ENV_DATA = getattr(os.environ, "_data", None)  # POSIX: the raw mapping, keys in bytes
_ENV_KEY = b"PYA2A_ALGORITHM"


def _requested(algorithm: object) -> str:
    if algorithm == "auto":
        if isinstance(_ENV_DATA, dict) and os.name == "posix":
            # read on every call (tests and users change it at run time), without
            # os.environ's per-call key encoding: this sits on the one-shot fast path
            raw = _ENV_DATA.get(_ENV_KEY)
            return raw.decode() if raw else "auto"
        return os.environ.get("PYA2A_ALGORITHM", "auto") or "auto"
    return algorithm  # type: ignore[return-value]


def _usable(info: algorithms.AlgorithmInfo, p: int, send: VSpec, recv: VSpec) -> str | None:
    device = recv.device is not None
    if device and not info.device:
        return "does not take device buffers"
    if not device and not info.host:
        return "takes device buffers only"
    if info.needs_contiguous and not (send.contiguous and recv.contiguous):
        return "needs a contiguous datatype (size == extent); use 'native'"
    if info.supports is not None:
        return info.supports(p, send, recv, device)
    return None


def _transport(comm: MPI.Intracomm, device: int | None):
    if device is None:
        return HostTransport(comm)
    from .gpu import device as _device

    return _device.transport(comm, device)


class _Decision:
    """The agreed outcome of a one-shot call's full path, replayed on signature hits.

    ``send`` / ``recv`` are the parsed specs without their buffer objects (a cached entry
    must not keep user memory alive); each hit rebinds them to the call's own objects.
    """

    __slots__ = ("info", "opts", "plan", "send", "recv", "ctx")

    def __init__(self, info: algorithms.AlgorithmInfo, opts: dict, plan, send: VSpec,
                 recv: VSpec) -> None:
        self.info, self.opts, self.plan = info, opts, plan
        self.ctx: Context | None = None  # reusable where the transport keeps no state
        self.send = send.with_buffer(None, None)
        self.recv = recv.with_buffer(None, None)

    def usable(self) -> bool:
        """False once its one-shot plan was evicted and freed."""
        return self.plan is None or not self.plan._freed


def _exchange(call: str, kind: str, comm: MPI.Intracomm, sendmsg: object, recvmsg: object,
              algorithm: str, check: bool, options: Mapping | None = None) -> str:
    _check_comm(call, comm)
    held = _internal(comm)
    icomm = held.comm
    requested = _requested(algorithm)
    inplace = in_place(sendmsg)
    fast = held.fast
    sig = _fast.signature(kind, sendmsg, recvmsg, inplace, requested, check, options)
    hit = fast.lookup(None if sig is None else sig[0])
    if fast.agree(icomm, -1 if hit is None else hit[0]):  # collective, 2 integers
        assert sig is not None and hit is not None
        d = hit[1]
        recv = d.recv.with_buffer(sig[3], sig[4])
        send = recv if inplace else d.send.with_buffer(sig[1], sig[2])
        return _execute(icomm, kind, d, send, recv, inplace)
    number = fast.next_number()  # every rank, failed calls too: numbers stay aligned
    d, send, recv = _decide_call(call, kind, icomm, sendmsg, recvmsg, requested, check,
                                 options, inplace)
    if sig is not None:
        fast.store(sig[0], number, d)
    return _execute(icomm, kind, d, send, recv, inplace)


def _decide_call(call: str, kind: str, icomm: MPI.Intracomm, sendmsg: object,
                 recvmsg: object, requested: str, check: bool, options: Mapping | None,
                 inplace: bool) -> tuple[_Decision, VSpec, VSpec]:
    """The full path: parse, agree (raising on every rank), check, select."""
    p, rank = icomm.Get_size(), icomm.Get_rank()
    parse = parse_vector if kind == "alltoallv" else parse_block
    exc: BaseException | None = None
    send = recv = None
    rows = p if p <= ROWS_IN_RECORD else 0
    stats = np.zeros(6 + 2 * rows, dtype=np.int64)
    try:
        recv = parse(recvmsg, p, readonly=False, call=call, what="receive message",
                     name="recv")
        send = recv if inplace else parse(sendmsg, p, readonly=True, call=call,
                                          what="send message", name="send")
        check_pair(call, send, recv, rank, kind)
        if options is not None and not isinstance(options, Mapping):
            raise TypeError(f"{call}: options must be a dict, not {type(options).__name__}")
        if requested != "auto":
            info = algorithms.get(requested, call)
            why = _usable(info, p, send, recv)
            if why:
                raise ValueError(f"{call}: algorithm {requested!r} {why}")
        stats[:6] = (_code(requested), send.largest * send.tsize, send.total_bytes,
                    recv.device is not None, send.contiguous and recv.contiguous,
                    recv.total_bytes)
        if rows and send.contiguous and recv.contiguous:  # bytes to / from each rank
            stats[6:6 + p] = send.bcounts
            stats[6 + p:] = recv.bcounts
    except Exception as e:  # agreed on below, then raised on every rank
        exc = e
    table = agree(icomm, exc, stats)
    assert send is not None and recv is not None  # agree() raised otherwise
    check_uniform(call, table)
    if check:
        check_counts_match(icomm, call, send, recv)
    device = recv.device is not None
    if device:
        _load_device()
    if requested == "auto":
        from .plan import ranks_per_node

        st = select.Stats.from_records(table, p, device, ranks_per_node(icomm))
        cands = _candidates(p, send, recv)
        if "ipc" in cands and not ipc.comm_available(icomm, recv.device)[0]:
            cands = tuple(n for n in cands if n != "ipc")  # same verdict on every rank
        requested = _choose(st, cands)
    info = algorithms.get(requested, call)
    opts = dict(options or {})
    opts["max_block"] = int(table[:, 2].max())
    # One-shot plans keep their buffers' bindings; only small exchanges are worth it, and
    # the test reads the all-gathered record so every rank takes the same path.
    pl = None
    small = int(max(table[:, 3].max(), table[:, 6].max())) <= ONESHOT_MAX_BYTES
    if small and not options and not inplace and not device and info.name != "native":
        if info.prepare is not None:
            pl = _cached_plan(icomm, kind, info.name, send, recv, None, opts["max_block"])
        elif rows and info.schedule is not None and table[:, 5].all():
            sent, expected = table[:, 7:7 + p], table[:, 7 + p:7 + 2 * p]
            if np.array_equal(sent, expected.T):  # same verdict on every rank
                pl = _cached_plan(icomm, kind, info.name, send, recv, sent, opts["max_block"])
    return _Decision(info, opts, pl, send, recv), send, recv


def _execute(icomm: MPI.Intracomm, kind: str, d: _Decision, send: VSpec, recv: VSpec,
             inplace: bool) -> str:
    """Move the data as decided (the same on every rank)."""
    info = d.info
    if d.plan is not None:
        d.plan.run_specs(send, recv)
        return info.name
    ctx = d.ctx
    if ctx is None:
        transport = None if info.name == "ipc" else _transport(icomm, recv.device)
        ctx = Context(comm=icomm, rank=icomm.Get_rank(), size=icomm.Get_size(), kind=kind,
                      transport=transport, in_place=inplace, options=dict(d.opts))
        if transport is None or type(transport) is HostTransport:  # stateless: keep it
            d.ctx = ctx
    transport = ctx.transport
    if inplace:
        if info.name in ("native", "ipc"):
            info.run(None, recv, ctx)
            return info.name
        send = transport.clone(recv)
    info.run(send, recv, ctx)
    return info.name


_CHOICES: OrderedDict = OrderedDict()
_PLANS: OrderedDict = OrderedDict()
ONESHOT_CACHE = 8  # one-shot plans kept (LRU); each keeps its 2 latest buffer bindings
# Largest per-rank send or receive total (bytes) that one-shot calls bind as plans. A bound
# plan keeps references to its buffers, so big arrays are not cached (their set-up cost is
# small next to their transfer time anyway).
ONESHOT_MAX_BYTES = 1 << 22
# Up to this many ranks the agreement record also carries each rank's bytes to and from every
# rank (2p int64): every rank then knows the whole exchange, so ring/mesh/hypercube run as
# bound plans in one-shot calls too (no size messages), when send and receive sides agree.
ROWS_IN_RECORD = 64


_CANDIDATES: dict[tuple, tuple[str, ...]] = {}


def _candidates(p: int, send: VSpec, recv: VSpec) -> tuple[str, ...]:
    """Usable algorithm names, memoised on what usability depends on (AlgorithmInfo.supports).

    Every input of the key is identical on every rank once the agreement has passed (p,
    buffer kind, datatype density, the registry, the mesh grid setting).
    """
    key = (p, recv.device is not None, send.contiguous and recv.contiguous,
           len(algorithms.names()), os.environ.get("PYA2A_MESH_GRID"))
    hit = _CANDIDATES.get(key)
    if hit is None:
        hit = _CANDIDATES[key] = tuple(n for n in algorithms.names()
                                       if _usable(algorithms.get(n), p, send, recv) is None)
    return hit


def _choose(stats: select.Stats, cands: tuple[str, ...]) -> str:
    """select.choose, memoised per (stats, candidates, table): same inputs, same answer."""
    table = select.load_table()
    key = (stats, cands, id(table))
    hit = _CHOICES.get(key)
    if hit is None:
        hit = _CHOICES[key] = select.choose(stats, list(cands), table)
        if len(_CHOICES) > 256:
            _CHOICES.popitem(last=False)
    return hit


def _cached_plan(icomm: MPI.Intracomm, kind: str, name: str, send: VSpec, recv: VSpec,
                 cmat: np.ndarray | None = None, max_block: int | None = None):
    """The one-shot plan for (comm, algorithm, dtype, counts digest), made on first use.

    ``cmat`` (bytes from every rank to every rank, from the agreement record) lets the plan
    bind store-and-forward schedules (ring, mesh, hypercube) without size messages;
    ``max_block`` (the global largest block, bytes) spares algorithms that size shared
    state by it (``padded``) a collective per binding. Both are global, so both are keyed.
    """
    key = (icomm.handle, name, kind, send.tsize, send.extent, recv.extent,
           send.counts.tobytes(), send.displs.tobytes(), recv.counts.tobytes(),
           recv.displs.tobytes(), None if cmat is None else cmat.tobytes(), max_block)
    pl = _PLANS.get(key)
    if pl is None:
        from .plan import Plan

        pl = _PLANS[key] = Plan._from_specs(icomm, name, send, recv, cache_size=2)
        if cmat is not None:
            pl._cmat = np.ascontiguousarray(cmat, dtype=np.int64)
        pl._max_block = max_block
        while len(_PLANS) > ONESHOT_CACHE:
            _PLANS.popitem(last=False)[1].free()
    else:
        _PLANS.move_to_end(key)
    return pl


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
    _exchange("Alltoallv", "alltoallv", comm, sendmsg, recvmsg, algorithm, check, options)


def Alltoall(comm: MPI.Intracomm, sendmsg: object, recvmsg: object, *,
             algorithm: str = "auto", check: bool = False,
             options: Mapping | None = None) -> None:
    """Personalized all-to-all with one block size, like ``comm.Alltoall(sendmsg, recvmsg)``.

    Same arguments and errors as :func:`Alltoallv`; messages take mpi4py's ``Alltoall``
    forms (``buf``, ``[buf, count]``, ``[buf, (count, displ)]``, ``[buf, count, dtype]``, ...).
    """
    _exchange("Alltoall", "alltoall", comm, sendmsg, recvmsg, algorithm, check, options)


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
    _check_comm(call, comm)
    icomm = internal_comm(comm)
    p = icomm.Get_size()
    exc = None
    counts = np.zeros(p, dtype=np.int64)
    device = False
    try:
        device = is_device_buffer(sendbuf)
        shape = tuple(sendbuf.shape)
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
    except AttributeError:
        exc = TypeError(f"{call}: sendbuf must be an array with .shape, "
                        f"not {type(sendbuf).__name__}")
    except Exception as e:
        exc = e
    agree(icomm, exc, np.zeros(0, dtype=np.int64))
    recvcounts = np.empty(p, dtype=np.int64)
    icomm.Alltoall(counts, recvcounts)
    nrecv = int(recvcounts.sum())
    if device:
        from .gpu import device as _device

        recvbuf = _device.empty_rows(sendbuf, nrecv)
        sview, rview = _device.byte_view(sendbuf), _device.byte_view(recvbuf)
    else:
        sarr = np.asarray(sendbuf)
        recvbuf = np.empty((nrecv, *sarr.shape[1:]), dtype=sarr.dtype)
        sview, rview = _bytes(sarr), _bytes(recvbuf)
    row = (sview.nbytes // shape[0]) if shape[0] else _row_bytes(sendbuf)
    Alltoallv(comm, [sview, counts * row, MPI.BYTE], [rview, recvcounts * row, MPI.BYTE],
              algorithm=algorithm)
    return recvbuf, recvcounts


def _bytes(a: np.ndarray) -> np.ndarray:
    a = np.ascontiguousarray(a)
    return a.reshape(-1).view(np.uint8) if a.size else np.empty(0, np.uint8)


def _row_bytes(a) -> int:
    return int(np.prod(a.shape[1:], dtype=np.int64)) * np.dtype(a.dtype).itemsize


def available_algorithms(comm: MPI.Intracomm | None = None, device: object = None) -> list[str]:
    """Algorithm names that can run on ``comm`` (any size if None), host or device buffers."""
    p = None if comm is None else comm.Get_size()
    if device:
        _load_device()
    return algorithms.available(p, device=bool(device))


def _load_device() -> None:
    """Register the device-capable variants: importing pya2a.gpu.device does it, once.

    It imports without CuPy, after every built-in algorithm is registered.
    """
    from .gpu import device  # noqa: F401


class Comm(MPI.Intracomm):
    """Drop-in intracommunicator whose ``Alltoall`` / ``Alltoallv`` go through pya2a.

    It is an ``mpi4py.MPI.Intracomm`` (a second handle to the same MPI communicator), so
    every other method and every isinstance check behaves as the wrapped one's, except that
    the rest of the all-to-all family (``Ialltoall(v/w)``, ``Alltoallw``, the ``*_init``
    calls: still the library's own) raise ``TypeError`` for a device buffer when the MPI is
    not CUDA-aware, instead of crashing inside MPI.

    Args:
        comm: the communicator to wrap (default ``MPI.COMM_WORLD``).
        algorithm: default algorithm for this communicator's exchanges.
    """

    algorithm: str = "auto"
    options: dict | None = None

    def __new__(cls, comm: MPI.Intracomm | None = None, *, algorithm: str = "auto",
                options: Mapping | None = None):
        if comm is None:
            comm = MPI.COMM_WORLD
        _check_comm("Comm", comm)
        return super().__new__(cls, comm)

    def __init__(self, comm: MPI.Intracomm | None = None, *, algorithm: str = "auto",
                 options: Mapping | None = None) -> None:
        if algorithm != "auto":
            algorithms.get(algorithm, "Comm")
        self.algorithm = algorithm
        self.options = dict(options) if options else None

    def Alltoallv(self, sendbuf, recvbuf) -> None:  # noqa: N802 (mpi4py's name)
        """``MPI.Comm.Alltoallv`` through pya2a with this communicator's algorithm."""
        _exchange("Alltoallv", "alltoallv", self, sendbuf, recvbuf, self.algorithm, False,
                  self.options)

    def Alltoall(self, sendbuf, recvbuf) -> None:  # noqa: N802
        """``MPI.Comm.Alltoall`` through pya2a with this communicator's algorithm."""
        _exchange("Alltoall", "alltoall", self, sendbuf, recvbuf, self.algorithm, False,
                  self.options)


# The rest of the all-to-all family stays the library's own call, but a device buffer handed
# to an MPI that is not CUDA-aware would crash inside MPI (mpi4py passes the device pointer
# through): refuse it with a TypeError instead. Host buffers, and any buffer when MPI is
# CUDA-aware, go straight through. The check is local; every rank that passes device
# buffers raises.
_GUARDED = ("Ialltoall", "Ialltoallv", "Alltoallw", "Ialltoallw", "Alltoall_init",
            "Alltoallv_init", "Alltoallw_init")


def _message_buffer(msg: object) -> object:
    if isinstance(msg, (list, tuple)):
        return msg[0] if msg else None
    return msg


def _refuse_device_without_aware(call: str, msgs: tuple) -> None:
    for msg in msgs:
        buf = _message_buffer(msg)
        if buf is None or in_place(buf) or not is_device_buffer(buf):
            continue
        from .gpu import device as gdev

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


from .plan import Plan, explain, plan  # noqa: E402  (plan.py builds on the helpers above)
