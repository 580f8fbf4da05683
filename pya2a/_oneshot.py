"""Signatures of one-shot calls, so that a repeated call skips parsing, agreement and selection.

A one-shot ``Alltoallv`` must agree across ranks before any data moves (a bad argument on
one rank raises on every rank). The full agreement all-gathers a record of ``6 + 2p``
integers and is followed by parsing, checks and selection: tens of microseconds at small p,
hundreds at p = 64. Applications call the same exchange over and over, so each rank keeps,
per communicator, the *signature* of its recent valid calls: everything its parse and checks
depended on (buffer addresses, sizes, formats, counts, displacements, datatypes, algorithm,
options). A call whose signature is cached on this rank, under the same entry number on
every rank, is a call every rank has already validated and agreed on in exactly this form.
One ``Allreduce`` of two integers establishes that; any other outcome takes the full path.

Entry numbers are consistent across ranks by construction: every full-path call (collective:
all ranks take it together) draws the next number from a per-communicator counter on every
rank, failed calls included. A signature is only computed for forms whose meaning is fixed
by what it records: NumPy arrays, ``bytes`` / ``bytearray``, contiguous CuPy arrays and
contiguous CUDA torch tensors (on CuPy's current stream) as buffers; Python ints, flat
lists / tuples of Python ints and NumPy integer arrays as counts and displacements; typecode
strings and *predefined* MPI datatypes (a derived datatype's handle may be reused for another
layout after ``Free``). Anything else always takes the full path, which stays the reference
behaviour.

What a cached entry does not see: a changed tuning table or ``PYA2A_MESH_GRID`` applies to
signatures not cached yet (``clear()`` forgets them all). ``PYA2A_ALGORITHM`` is part of the
signature.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

import numpy as np
from mpi4py import MPI

from . import algorithms, select
from .core import log
from .core.devices import load_device_algorithms
from .core.registry import Context, available_here, execute, name_code, usable
from .core.registry import requested as resolve
from .core.spec import VSpec, in_place, parse_block, parse_vector
from .core.state import CommState, check_comm, live_states, state
from .core.transport import HostTransport, transport_for
from .core.validate import agree, check_counts_match, check_pair, check_uniform
from .plan import Plan

__all__ = ["FastCache", "signature", "clear", "exchange"]

_SIGNATURES = "oneshot.signatures"  # CommState slots
_PLANS = "oneshot.plans"

CAPACITY = 64  # signatures kept per communicator (least recently used evicted)
_NO = object()  # "this part has no signature": take the full path
_INT_CHARS = frozenset(np.typecodes["AllInteger"])  # NumPy integer type codes

_PREDEFINED: frozenset[int] = frozenset(
    dt.handle for dt in MPI._typedict.values() if dt != MPI.DATATYPE_NULL) | frozenset(
    getattr(MPI, n).handle for n in ("BYTE", "PACKED", "CHAR", "WCHAR", "SHORT", "INT",
                                      "LONG", "LONG_LONG", "FLOAT", "DOUBLE", "LONG_DOUBLE",
                                      "INT8_T", "INT16_T", "INT32_T", "INT64_T", "UINT8_T",
                                      "UINT16_T", "UINT32_T", "UINT64_T", "C_BOOL")
    if getattr(MPI, n, MPI.DATATYPE_NULL) != MPI.DATATYPE_NULL)

# buffer types by how their signature is taken: 1 NumPy / bytes-like, 2 CuPy array,
# 3 torch tensor, 0 none (always the full path)
_KIND: dict[type, int] = {np.ndarray: 1, bytes: 1, bytearray: 1}


def _kind(t: type) -> int:
    k = _KIND.get(t)
    if k is None:
        top = t.__module__.split(".")[0]
        k = 2 if (top == "cupy" and t.__name__ == "ndarray") else \
            3 if (top == "torch" and t.__name__ in ("Tensor", "Parameter")) else 0
        _KIND[t] = k
    return k


def _torch(obj: Any) -> tuple[Any, Any] | None:
    """Signature of a CUDA tensor whose producer stream is CuPy's current stream.

    The full path imports the tensor through DLPack on CuPy's current stream, which makes
    that stream wait for torch's current stream; a tensor signature is only taken when the
    two are the same stream (the common case), so skipping that import changes nothing.
    """
    if not obj.is_cuda or obj.requires_grad or not obj.is_contiguous():
        return None
    import cupy
    import torch

    dev = obj.device.index
    if torch.cuda.current_stream(dev).cuda_stream != cupy.cuda.get_current_stream().ptr:
        return None
    return (torch.Tensor, obj.data_ptr(), obj.numel() * obj.element_size(), obj.dtype,
            dev), obj


def _buffer(obj: Any) -> tuple[Any, Any] | None:
    """(signature, keepalive) of a buffer object, or None where it has no signature."""
    t = type(obj)
    k = _kind(t)
    if k == 1:
        try:
            m = MPI.buffer(obj)  # BufferError if not contiguous: the full path says so
        except Exception:
            return None
        fmt = obj.dtype if t is np.ndarray else t
        return (m.address, m.nbytes, m.readonly, fmt), m
    if k == 2:
        try:
            c = getattr(obj, "_c_contiguous", None)  # CuPy's own flag: no Flags object
            if not (obj.flags.c_contiguous if c is None else c):
                return None
            mem = obj.data
            return (t, mem.ptr, obj.nbytes, obj.dtype, mem.device_id), obj
        except Exception:
            return None
    if k == 3:
        try:
            return _torch(obj)
        except Exception:
            return None
    return None


def _part(x: Any) -> Any:
    """Signature of a counts / displacements / datatype item of a message."""
    t = type(x)
    if t is int or t is str or x is None:
        return x
    if t is list or t is tuple:
        s = None
        if not x or type(x[0]) is int:  # (a pair of arrays would be summed elementwise)
            try:
                s = sum(x)
            except TypeError:
                s = None
        if type(s) is int:  # a flat sequence of Python ints
            return (t, tuple(x))
        if len(x) == 2:  # (counts, displs)
            a, b = _part(x[0]), _part(x[1])
            return _NO if a is _NO or b is _NO else (t, a, b)
        return _NO
    if t is np.ndarray:
        c = x.dtype.char
        if c not in _INT_CHARS or x.ndim != 1:
            return _NO
        return (c, x.tobytes())  # the type code and the bytes fix the values and the length
    if t is MPI.Datatype or isinstance(x, MPI.Datatype):
        h = x.handle
        return ("T", h) if h in _PREDEFINED else _NO
    return _NO


def _message(msg: Any) -> tuple[Any, Any, Any] | None:
    """(signature, buffer object, keepalive) of one message, or None."""
    t = type(msg)
    if t is list or t is tuple:
        n = len(msg)
        if n < 2 or n > 4:
            return None
        buf = msg[0]
        b = _buffer(buf)
        if b is None:
            return None
        p1 = _part(msg[1])
        if p1 is _NO:
            return None
        if n == 2:
            return (t, b[0], p1), buf, b[1]
        p2 = _part(msg[2])
        if p2 is _NO:
            return None
        if n == 3:
            return (t, b[0], p1, p2), buf, b[1]
        p3 = _part(msg[3])
        if p3 is _NO:
            return None
        return (t, b[0], p1, p2, p3), buf, b[1]
    b = _buffer(msg)
    if b is None:
        return None
    return b[0], msg, b[1]


def signature(kind: str, sendmsg: Any, recvmsg: Any, inplace: bool, requested: str,
              check: bool, options: Any) -> tuple[tuple, Any, Any, Any, Any] | None:
    """(key, send object, send keepalive, recv object, recv keepalive), or None.

    The key determines everything the full path's parsing and local checks depend on.
    """
    if options is not None:
        try:
            opt = tuple(sorted(options.items()))
            hash(opt)
        except Exception:
            return None
    else:
        opt = None
    r = _message(recvmsg)
    if r is None:
        return None
    if inplace:
        s = (None, None, None)
    else:
        s = _message(sendmsg)
        if s is None:
            return None
    return ((kind, requested, check, opt, inplace, s[0], r[0]), s[1], s[2], r[1], r[2])


class FastCache:
    """Per-communicator signatures of valid calls -> their agreed decision.

    ``seq`` numbers full-path calls identically on every rank; an entry is
    ``(number, decision)``.
    """

    __slots__ = ("seq", "entries", "_buf", "__weakref__")

    def __init__(self) -> None:
        self.seq = 0
        self.entries: OrderedDict[tuple, tuple[int, Any]] = OrderedDict()
        self._buf = np.empty(2, dtype=np.int64)

    def next_number(self) -> int:
        """Number of the full-path call now starting (same on every rank)."""
        self.seq += 1
        return self.seq

    def lookup(self, key: tuple | None) -> tuple[int, Any] | None:
        """This rank's entry for ``key`` if it is still usable (local, no communication)."""
        if key is None:
            return None
        hit = self.entries.get(key)
        if hit is None or not hit[1].usable():
            return None
        self.entries.move_to_end(key)
        return hit

    def agree(self, comm: MPI.Intracomm, number: int) -> bool:
        """Collective: True iff every rank found an entry, and the same one."""
        buf = self._buf
        buf[0] = number
        buf[1] = -number
        comm.Allreduce(MPI.IN_PLACE, buf, op=MPI.MAX)
        return number >= 0 and int(buf[0]) == number and int(buf[1]) == -number

    def store(self, key: tuple, number: int, decision: Any) -> None:
        """Remember a validated, agreed call's decision under this rank's signature."""
        self.entries[key] = (number, decision)
        self.entries.move_to_end(key)
        while len(self.entries) > CAPACITY:
            self.entries.popitem(last=False)

    def clear(self) -> None:
        """Forget every signature (local; numbering continues)."""
        self.entries.clear()


def clear() -> None:
    """Forget every cached signature on every communicator (e.g. after re-tuning).

    Local: the next call with any signature takes the full path on this rank, which makes
    every rank take it.
    """
    for st in live_states():
        cache = st.slot(_SIGNATURES)
        if cache is not None:
            cache.clear()


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


def exchange(call: str, kind: str, comm: MPI.Intracomm, sendmsg: object, recvmsg: object,
              algorithm: str, check: bool, options: Mapping | None = None) -> str:
    check_comm(call, comm)
    st = state(comm)
    icomm = st.comm
    requested = resolve(algorithm)
    inplace = in_place(sendmsg)
    fast = st.slot(_SIGNATURES, FastCache)
    sig = signature(kind, sendmsg, recvmsg, inplace, requested, check, options)
    hit = fast.lookup(None if sig is None else sig[0])
    if fast.agree(icomm, -1 if hit is None else hit[0]):  # collective, 2 integers
        assert sig is not None and hit is not None
        d = hit[1]
        recv = d.recv.with_buffer(sig[3], sig[4])
        send = recv if inplace else d.send.with_buffer(sig[1], sig[2])
        return _execute(icomm, kind, d, send, recv, inplace)
    number = fast.next_number()  # every rank, failed calls too: numbers stay aligned
    d, send, recv = _decide_call(call, kind, st, sendmsg, recvmsg, requested, check,
                                 options, inplace)
    if sig is not None:
        fast.store(sig[0], number, d)
    return _execute(icomm, kind, d, send, recv, inplace)


def _decide_call(call: str, kind: str, st: CommState, sendmsg: object,
                 recvmsg: object, requested: str, check: bool, options: Mapping | None,
                 inplace: bool) -> tuple[_Decision, VSpec, VSpec]:
    """The full path: parse, agree (raising on every rank), check, select."""
    icomm = st.comm
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
            why = usable(info, p, send, recv)
            if why:
                raise ValueError(f"{call}: algorithm {requested!r} {why}")
        stats[:6] = (name_code(requested), send.largest * send.tsize, send.total_bytes,
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
        load_device_algorithms()
    if requested == "auto":
        stats_ = select.Stats.from_records(table, p, device, st.node().max_local)
        cands = available_here(icomm, recv.device, _candidates(p, send, recv))
        requested = _choose(stats_, cands)
        log.decision(icomm, call, requested, table, lambda: select.ranking(stats_, list(cands)))
    else:
        log.decision(icomm, call, requested, table, override="algorithm= or PYA2A_ALGORITHM")
    info = algorithms.get(requested, call)
    opts = dict(options or {})
    opts["max_block"] = int(table[:, 2].max())
    # One-shot plans keep their buffers' bindings; only small exchanges are worth it, and
    # the test reads the all-gathered record so every rank takes the same path.
    pl = None
    small = int(max(table[:, 3].max(), table[:, 6].max())) <= ONESHOT_MAX_BYTES
    if small and not options and not inplace and not device and info.oneshot_plan:
        if info.prepare is not None:
            pl = _cached_plan(st, kind, info.name, send, recv, None, opts["max_block"])
        elif rows and info.schedule is not None and table[:, 5].all():
            sent, expected = table[:, 7:7 + p], table[:, 7 + p:7 + 2 * p]
            if np.array_equal(sent, expected.T):  # same verdict on every rank
                pl = _cached_plan(st, kind, info.name, send, recv, sent, opts["max_block"])
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
        transport = transport_for(icomm, recv.device) if info.uses_transport else None
        ctx = Context(comm=icomm, rank=icomm.Get_rank(), size=icomm.Get_size(), kind=kind,
                      transport=transport, in_place=inplace, options=dict(d.opts))
        if transport is None or type(transport) is HostTransport:  # stateless: keep it
            d.ctx = ctx
    if inplace:
        if info.takes_in_place:
            execute(info, None, recv, ctx)
            return info.name
        send = ctx.transport.clone(recv)
    execute(info, send, recv, ctx)
    return info.name


_CHOICES: OrderedDict = OrderedDict()
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
                                       if usable(algorithms.get(n), p, send, recv) is None)
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


def _cached_plan(st: CommState, kind: str, name: str, send: VSpec, recv: VSpec,
                 cmat: np.ndarray | None = None, max_block: int | None = None):
    """The one-shot plan for (comm, algorithm, dtype, counts digest), made on first use.

    ``cmat`` (bytes from every rank to every rank, from the agreement record) lets the plan
    bind store-and-forward schedules (ring, mesh, hypercube) without size messages;
    ``max_block`` (the global largest block, bytes) spares algorithms that size shared
    state by it (``padded``) a collective per binding. Both are global, so both are keyed.
    """
    plans = st.slot(_PLANS, _PlanCache)
    key = (name, kind, send.tsize, send.extent, recv.extent,
           send.counts.tobytes(), send.displs.tobytes(), recv.counts.tobytes(),
           recv.displs.tobytes(), None if cmat is None else cmat.tobytes(), max_block)
    pl = plans.get(key)
    if pl is None:
        pl = plans[key] = Plan._from_specs(st.comm, name, send, recv, cache_size=2)
        if cmat is not None:
            pl._cmat = np.ascontiguousarray(cmat, dtype=np.int64)
        pl._max_block = max_block
        while len(plans) > ONESHOT_CACHE:
            plans.popitem(last=False)[1].free()
    else:
        plans.move_to_end(key)
    return pl


class _PlanCache(OrderedDict):
    """A communicator's one-shot plans (LRU), freed with its state."""

    def free(self) -> None:
        while self:
            self.popitem(last=False)[1].free()
