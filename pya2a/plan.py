"""Persistent plans: validate, select and schedule once, then run many times.

A :class:`Plan` fixes the communicator, counts, displacements, datatype and algorithm. Its
creation is collective: arguments are checked on every rank with the same error agreement as
the one-shot calls (an error anywhere raises everywhere), the counts are checked against the
peers' (what i sends to j is what j expects from i), and the algorithm is chosen from global
values. For host buffers the plan then makes its *program* once
(:mod:`pya2a.algorithms._bound`): the whole exchange as a table of copies, messages and
waits at offsets from the two buffers' starts (peers, byte counts, scratch: everything that
does not depend on where the buffers are). ``plan.run(sendbuf, recvbuf)`` on a buffer pair
seen for the first time reads the buffers' addresses and sizes (:func:`pya2a.core.spec.bind`)
and runs the program there: one C loop of memcpys and ``MPI_Isend`` / ``MPI_Irecv`` /
``MPI_Waitall``, nothing allocated, so any number of distinct buffers (a new receive array
every call) costs about what a repeated pair does. A pair run again is bound: persistent
``Send_init`` / ``Recv_init`` requests made in one C loop; up to ``cache_size`` (256) pairs
are remembered by address (least recently used forgotten, its requests freed), and a
repeated run on them does no parsing: only ``Startall`` / ``Waitall`` and the copies. A
binding holds an address range, not the caller's object, so buffers keep no memory alive.
Algorithms without a program (device buffers, ``hierarchical``, a store-and-forward
schedule whose scratch is too large) bind per pair as before, or run their own code.

Runs are not collective-agreed (that would cost the Allgather plans exist to avoid): buffer
errors in ``run`` (too small, read-only, wrong kind) raise on the rank that has them, before
any data moves. ``plan.run(..., check=True)`` agrees on them collectively instead.

``native`` plans call the library's Alltoallv with prebuilt arguments; ``plan.bind(sendbuf,
recvbuf)`` (collective: every rank binds at the same point) returns a :class:`BoundPlan`
whose ``run()`` starts an ``MPI_Alltoallv_init`` persistent collective where the MPI has it
(MPI 4: MPICH 4+, Open MPI 5).
"""

from __future__ import annotations

import sys
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
from mpi4py import MPI

from . import algorithms, select
from .algorithms._bound import (
    bind_schedule,
    bind_scratch_ok,
    in_place_program,
    make_program,
    pair_reader,
    schedule_program,
    schedule_steps,
)
from .core import _msg, log, watchdog
from .core import spec as _spec
from .core.devices import load_device_algorithms
from .core.registry import Bound, Context, execute, name_code, refusal, usable
from .core.registry import requested as resolve
from .core.spec import VSpec, in_place
from .core.state import check_comm, internal_comm, ranks_per_node, watch
from .core.transport import transport_for
from .core.validate import (
    agree,
    call_settings,
    check_buffer_dtype,
    check_counts_match,
    check_layout,
    check_uniform,
    ranges_overlap,
)

__all__ = ["Plan", "BoundPlan", "Explanation", "plan", "explain"]

_IN_PLACE = MPI.IN_PLACE
_UNMADE = object()  # a plan's program not made yet
DEFAULT_CACHE = 256  # buffer pairs remembered per plan; bindings hold address ranges only


@dataclass
class _Entry:
    bound: Bound
    scratch: tuple | None  # (dst view, src view) copied before each in-place run


@dataclass
class Explanation:
    """What ``auto`` would do for an exchange, and why.

    Attributes:
        choice: the algorithm ``auto`` picks (or the override in force).
        override: where an override came from ("algorithm=", "PYA2A_ALGORITHM") or None.
        stats: the global inputs of the selector (identical on every rank).
        ranking: per candidate: predicted_s, model_s, correction, tuned_p; fastest first.
        excluded: algorithm -> why it cannot run this exchange.
        table: provenance of the tuning table in use.
    """

    choice: str
    override: str | None
    stats: select.Stats
    ranking: list[dict]
    excluded: dict[str, str]
    table: dict

    def __str__(self) -> str:
        s = self.stats
        lines = [f"pya2a auto selection: p={s.p} ranks/node={s.ranks_per_node or '?'} "
                 f"bytes/peer (busiest rank)={s.m_eff:.0f} mean={s.mean_block:.0f} "
                 f"max block={s.max_block} imbalance={s.imbalance:.2f} "
                 f"{'device' if s.device else 'host'}",
                 "tuning table: " + (self.table.get("path") or "built-in defaults, measured on "
                                     "another machine (`python -m pya2a tune` measures "
                                     "this one)"),
                 f"{'algorithm':<14}{'predicted us':>14}{'model us':>12}{'x corr':>9}"
                 f"{'tuned p':>9}"]
        for r in self.ranking:
            mark = " <- chosen" if r["algorithm"] == self.choice else ""
            lines.append(f"{r['algorithm']:<14}{r['predicted_s'] * 1e6:>14.1f}"
                         f"{r['model_s'] * 1e6:>12.1f}{r['correction']:>9.2f}"
                         f"{r['tuned_p'] if r['tuned_p'] else '-':>9}{mark}")
        for name, why in self.excluded.items():
            lines.append(f"{name:<14}{'excluded':>14}  {why}")
        if self.override:
            lines.append(f"override: {self.choice!r} from {self.override}")
        return "\n".join(lines)


def _decide(icomm: MPI.Intracomm, send: VSpec, recv: VSpec, table_rows: np.ndarray,
            algorithm: str, requested: str) -> tuple[str, Explanation]:
    p = icomm.Get_size()
    device = recv.device is not None
    stats = select.Stats.from_records(table_rows, p, device, ranks_per_node(icomm))
    cands, excluded = [], {}
    if device:
        load_device_algorithms()
    for n in algorithms.names():
        why = usable(algorithms.get(n), p, send, recv)
        if why is None:
            why = refusal(icomm, recv.device, n, auto=True)
        if why is None:
            cands.append(n)
        else:
            excluded[n] = why
    table = select.load_table()
    order = select.ranking(stats, cands, table) if cands else []
    if requested != "auto":
        why = excluded.get(requested)
        if why is not None and requested in algorithms.names():
            # the same verdict on every rank: usable() was agreed, refusal() is collective
            raise ValueError(f"plan: algorithm {requested!r} is not available on this "
                             f"communicator: {why}")
        choice = requested
        override = "algorithm=" if algorithm != "auto" else "PYA2A_ALGORITHM"
    else:
        choice, override = select.choose(stats, cands, table), None
    log.decision(icomm, "plan", choice, table_rows, lambda: order, override or "")
    return choice, Explanation(choice, override, stats, order, excluded, table["provenance"])


class BoundPlan:
    """A plan bound to two buffers (``Plan.bind``): ``run()`` takes no arguments."""

    def __init__(self, plan: Plan, entry: _Entry) -> None:
        self._plan = plan
        self._entry = entry
        self.algorithm = plan.algorithm

    def run(self) -> None:
        """One exchange on the bound buffers (no allocation, no parsing)."""
        e = self._entry
        if e is None:
            raise ValueError("BoundPlan.run: the bound plan was freed")
        guard = watch(self._plan.comm, "BoundPlan.run") \
            if watchdog.timeout() is not None else None
        try:
            if e.scratch is not None:
                e.scratch[0][...] = e.scratch[1]
            e.bound.run()
        finally:
            watchdog.leave(guard)

    def free(self) -> None:
        """Release the persistent requests (local; call on every rank before MPI ends)."""
        if self._entry is not None:
            self._entry.bound.free()
            self._entry = None

    def __enter__(self) -> BoundPlan:
        return self

    def __exit__(self, *exc: object) -> None:
        self.free()


class Plan:
    """A persistent Alltoallv: fixed counts, datatype and algorithm; run on any buffers.

    Args:
        comm: an mpi4py intracommunicator (creation is collective over it).
        sendcounts: p non-negative integers, elements of ``dtype`` sent to each rank (or one
            integer for all).
        recvcounts: p integers, elements received from each rank.
        dtype: NumPy dtype (or typecode) or ``MPI.Datatype`` of the elements.
        senddispls, recvdispls: p element offsets of the blocks (default: packed, the prefix
            sums of the counts).
        device: None for host buffers, or the CUDA device ordinal of device buffers.
        algorithm: "auto" (``PYA2A_ALGORITHM`` overrides) or a name; same on every rank.
        cache_size: buffer pairs remembered and bound (least recently used forgotten;
            default 256). Any number of distinct pairs can be run: one not remembered runs
            the plan's program unbound. A binding holds address ranges, never the objects.

    Raises:
        TypeError, ValueError: bad arguments, or counts that do not match the peers', on any
            rank: raised on every rank.
    """

    def __init__(self, comm: MPI.Intracomm, sendcounts: object, recvcounts: object,
                 dtype: object, *, senddispls: object = None, recvdispls: object = None,
                 device: int | None = None, algorithm: str = "auto",
                 cache_size: int = DEFAULT_CACHE) -> None:
        call = "plan"
        check_comm(call, comm)
        icomm = internal_comm(comm, call)
        guard = watch(icomm, call) if watchdog.timeout() is not None else None
        try:
            self._create(icomm, sendcounts, recvcounts, dtype, senddispls, recvdispls, device,
                         algorithm, cache_size)
        finally:
            watchdog.leave(guard)

    def _create(self, icomm: MPI.Intracomm, sendcounts: object, recvcounts: object,
                dtype: object, senddispls: object, recvdispls: object, device: int | None,
                algorithm: str, cache_size: int) -> None:
        """The collective part of creation: agree, check the counts, choose, schedule."""
        call = "plan"
        p, rank = icomm.Get_size(), icomm.Get_rank()
        requested = resolve(algorithm)
        exc: BaseException | None = None
        stats = np.zeros(7, dtype=np.int64)  # the 7th: send counts equal receive counts
        send = recv = None
        try:
            dt = _spec.element_type(call, dtype)
            sc = _spec.counts_vector(call, "sendcounts", sendcounts, p)
            rc = _spec.counts_vector(call, "recvcounts", recvcounts, p)
            sd = _spec.displs_vector(call, "senddispls", senddispls, sc)
            rd = _spec.displs_vector(call, "recvdispls", recvdispls, rc)
            dev = None if device is None else int(device)
            send = _spec.template(sc, sd, dt, dev)
            recv = _spec.template(rc, rd, dt, dev)
            check_layout(call, send, recv, rank)
            if requested != "auto":
                why = usable(algorithms.get(requested, call), p, send, recv)
                if why:
                    raise ValueError(f"{call}: algorithm {requested!r} {why}")
            sb = sc * send.tsize
            stats[:] = (name_code(requested), int(sb.max()) if p else 0, int(sb.sum()),
                        dev is not None, send.contiguous and recv.contiguous,
                        int((rc * recv.tsize).sum()),
                        bool(np.array_equal(sb, rc * recv.tsize)))
        except Exception as e:  # agreed on below, then raised on every rank
            exc = e
        settings = call_settings("alltoallv", True, None, False, p, select.load_table())
        rows = agree(icomm, exc, stats, settings, call)
        assert send is not None and recv is not None  # agree() raised otherwise
        check_uniform(call, rows)
        check_counts_match(icomm, call, send, recv)
        self.algorithm, self._explanation = _decide(icomm, send, recv, rows, algorithm,
                                                        requested)
        self._init(icomm, send, recv, cache_size)
        self._in_place_ok = bool(rows[:, 7].all())  # the same on every rank
        self._max_block = int(rows[:, 2].max())  # global: algorithms size shared state by it
        info = self._info
        if info.prepare is None and info.schedule is not None and self.device is None and \
                send.contiguous:  # same on every rank: the algorithm and buffer kind agree
            row = np.ascontiguousarray(send.counts * send.tsize, dtype=np.int64)
            cmat = np.empty((p, p), dtype=np.int64)
            icomm.Allgather(row, cmat)
            if bind_scratch_ok(icomm, self._schedule(), cmat):
                self._cmat = cmat

    def _init(self, icomm: MPI.Intracomm, send: VSpec, recv: VSpec, cache_size: int) -> None:
        self.comm = icomm
        self.size, self.rank = icomm.Get_size(), icomm.Get_rank()
        self.sendcounts, self.senddispls = send.counts, send.displs
        self.recvcounts, self.recvdispls = recv.counts, recv.displs
        self.datatype = send.datatype
        self.device = recv.device
        self._send_t, self._recv_t = send, recv
        self._info = algorithms.get(self.algorithm)
        self._cache_size = max(1, int(cache_size))
        self._by_addr: OrderedDict[tuple, _Entry] = OrderedDict()
        self._last: tuple | None = None  # (send object, recv object, entry) of the last run
        self._progs: dict[bool, object] = {}  # in place? -> the exchange program, or None
        self._formats: dict[str, bool] = {}  # buffer formats that passed the dtype check
        self._pair, self._find = pair_reader()
        self._needs = (send.nbytes, recv.nbytes)  # bytes the plan's blocks need
        self._freed = False
        self._cmat: np.ndarray | None = None  # bytes (src, dst), for bind_schedule
        self._max_block: int | None = None  # largest block over all ranks, bytes
        self._steps: list | None = None  # this rank's schedule, made on first need
        self._in_place_ok = False  # every rank's send counts equal its receive counts

    @classmethod
    def _from_specs(cls, icomm: MPI.Intracomm, algorithm: str, send: VSpec, recv: VSpec,
                    cache_size: int = 2) -> Plan:
        """An already-validated plan for the one-shot cache (no communication)."""
        self = cls.__new__(cls)
        self.algorithm = algorithm
        self._explanation = None
        self._init(icomm, send.with_buffer(None, None), recv.with_buffer(None, None),
                   cache_size)
        return self

    # ---- binding ---------------------------------------------------------------------------
    def _schedule(self) -> list | None:
        """This rank's store-and-forward schedule (computed once per plan), or None."""
        if self._steps is None:
            self._steps = schedule_steps(self._info, self._ctx())
        return self._steps

    def _ctx(self, kind: str = "alltoallv", **options: object) -> Context:
        if self._max_block is not None:
            options.setdefault("max_block", self._max_block)
        return Context(comm=self.comm, rank=self.rank, size=self.size, kind=kind,
                       transport=(transport_for(self.comm, self.device)
                                  if self._info.uses_transport else None),
                       in_place=False,
                       options=dict(options))

    def _make_entry(self, send: VSpec | None, recv: VSpec, ctx: Context) -> _Entry:
        info, t = self._info, ctx.transport
        scratch = None
        if send is None and not info.takes_in_place:
            if self.device is not None:  # pragma: no cover - GPU path: fresh copy per run
                r, c = recv, ctx
                return _Entry(Bound(run=lambda: execute(info, t.clone(r), r, c)), None)
            send = t.clone(recv)
            scratch = (t.buffer(send), t.buffer(recv))
        bound = info.prepare(send, recv, ctx) if info.prepare is not None else None
        if bound is None and info.prepare is None and self._cmat is not None:
            bound = bind_schedule(info, send, recv, ctx, self._cmat, self._schedule())
        if bound is None:
            if send is None:
                ctx.in_place = True
            s, r, c = send, recv, ctx
            bound = Bound(run=lambda: execute(info, s, r, c))
        return _Entry(bound, scratch)

    def _specs(self, sendbuf: object, recvbuf: object) -> tuple[tuple, VSpec | None, VSpec]:
        """The plan's templates on these buffers (checked), and their address key."""
        if in_place(sendbuf) and not self._in_place_ok:  # a global fact: raised on every rank
            raise ValueError("Plan.run: in place needs every rank's send counts equal to its "
                             "receive counts (the receive blocks are what is sent); this "
                             "plan's differ on some rank")
        recv = _spec.bind(self._recv_t, recvbuf, False, "Plan.run", "receive buffer")
        check_buffer_dtype("Plan.run", "receive buffer", recvbuf, self.datatype)
        if in_place(sendbuf):
            send = None
            key: tuple = (None, recv.addr, recv.nbytes)
        else:
            send = _spec.bind(self._send_t, sendbuf, True, "Plan.run", "send buffer")
            check_buffer_dtype("Plan.run", "send buffer", sendbuf, self.datatype)
            if (send.device is None) != (recv.device is None):
                raise TypeError("Plan.run: send and receive buffers must both be host or "
                                "both be device buffers")
            if ranges_overlap(send.addr, send.nbytes, recv.addr, recv.nbytes):
                raise ValueError("Plan.run: send and receive buffers overlap; pass "
                                 "MPI.IN_PLACE as the send buffer for an in-place exchange")
            key = (send.addr, send.nbytes, recv.addr, recv.nbytes)
        if (recv.device is None) != (self.device is None):
            raise TypeError(f"Plan.run: the plan is for "
                            f"{'host' if self.device is None else 'device'} buffers")
        return key, send, recv

    def _bind(self, sendbuf: object, recvbuf: object, ctx: Context | None = None,
              persistent: bool = False) -> tuple[tuple, _Entry]:
        key, send, recv = self._specs(sendbuf, recvbuf)
        entry = self._host_entry(send, recv, persistent)
        if entry is None:
            entry = self._make_entry(send, recv, ctx or self._ctx())
        return key, entry

    def _program(self, inplace: bool):
        """The exchange program for host buffers (made on first need), or None.

        Made from the templates and global facts only (``_cmat``, ``_max_block``), so every
        rank that has one sends the same messages as a rank that binds without one.
        """
        progs = self._progs
        if inplace in progs:
            return progs[inplace]
        prog = made = None
        info, ctx = self._info, self._ctx()
        send_t, recv_t = self._send_t, self._recv_t
        try:
            if self.device is None and inplace and info.takes_in_place:
                made = info.program(None, recv_t, ctx) if info.program is not None else None
            elif self.device is None:
                s = recv_t if inplace else send_t
                if info.program is not None:
                    made = info.program(s, recv_t, ctx)
                elif self._cmat is not None and s.contiguous and recv_t.contiguous:
                    steps = self._schedule()
                    if steps is not None:
                        made = (*schedule_program(s, recv_t, ctx, self._cmat, steps), None)
                if made is not None and inplace:
                    made = (*in_place_program(made[0], made[1], recv_t.nbytes), made[2])
            if made is not None:
                prog = make_program(self.comm, *made)
        except ValueError:  # a table the C loop does not take: bind as before
            prog = None
        progs[inplace] = prog
        return prog

    def _host_entry(self, send: VSpec | None, recv: VSpec, persistent: bool) -> _Entry | None:
        """A run of the plan's program on these buffers, or None where there is none.

        ``persistent``: bind now (``Plan.bind``); otherwise the first run posts
        non-persistent requests and a second run on the same pair binds.
        """
        if recv.device is not None or recv.obj is MPI.BOTTOM or \
                (send is not None and send.obj is MPI.BOTTOM):
            return None
        prog = self._program(send is None)
        if prog is None:
            return None
        if persistent and prog.collective:
            return None  # native / padded: their persistent collective, from prepare
        # a Binding serves as the entry itself (``bound`` is itself, ``scratch`` None)
        if send is None:
            return prog.bind(0, 0, recv.addr, recv.nbytes, persistent)
        return prog.bind(send.addr, send.nbytes, recv.addr, recv.nbytes, persistent)

    def _entry(self, sendbuf: object, recvbuf: object) -> _Entry:
        last = self._last  # None once freed
        if last is not None and last[0] is sendbuf and last[1] is recvbuf:
            return last[2]
        if self._freed:
            raise ValueError("Plan.run: the plan was freed")
        # a new object may still be the same memory (a fresh view): look up by address
        inplace = sendbuf is None or sendbuf is _IN_PLACE
        got = self._pair(sendbuf, recvbuf, inplace)
        if got is not None:
            key = got[0]
        else:
            recv_mem = _address(recvbuf)
            send_mem = (None,) if inplace else _address(sendbuf)
            key = (*send_mem, *recv_mem) if send_mem[0] is not None else (None, *recv_mem)
        by_addr = self._by_addr
        entry = by_addr.get(key)
        if entry is None:
            # A new pair of C-contiguous host buffers runs the program from their address,
            # size and format alone (Program.quick: large enough, no overlap, a format that
            # passed the full check on this plan before); anything else takes the full
            # check (_specs), which raises what is wrong.
            if got is not None:
                prog = self._progs.get(inplace, _UNMADE)
                if prog is _UNMADE:
                    prog = self._program(inplace)
                if prog is not None and (not inplace or self._in_place_ok):
                    need = self._needs
                    entry = prog.quick(key, got[1], got[2], self._formats, need[0], need[1])
            if entry is None:
                key, entry = self._bind(sendbuf, recvbuf)
                if got is not None:  # these buffers' element types passed the full check
                    self._formats[got[2]] = True
                    if not inplace:
                        self._formats[got[1]] = True
            by_addr[key] = entry
            if len(by_addr) > self._cache_size:
                self._evict()
        else:
            by_addr.move_to_end(key)
        self._last = (sendbuf, recvbuf, entry)
        return entry

    def _insert(self, key: tuple, entry: _Entry) -> None:
        self._by_addr[key] = entry
        self._evict()

    def _evict(self) -> None:
        """Forget the least recently used pairs beyond ``cache_size`` (their requests freed:
        local, cheaper than making them)."""
        while len(self._by_addr) > self._cache_size:
            _, old = self._by_addr.popitem(last=False)
            if self._last is not None and old is self._last[2]:
                self._last = None
            old.bound.free()

    def run_bound(self, key: tuple) -> bool:
        """Run the binding for ``(send addr, send nbytes, recv addr, recv nbytes)``, if any.

        The one-shot hit path: no spec is built when the buffers are already bound.
        """
        entry = self._by_addr.get(key)
        if entry is None:
            return False
        entry.bound.run()
        return True

    def run_specs(self, send: VSpec, recv: VSpec) -> None:
        """Run on already parsed and agreed specs (the one-shot API's cached path).

        Bindings are keyed by address and hold address ranges, not the caller's objects.
        """
        key = (send.addr, send.nbytes, recv.addr, recv.nbytes)
        entry = self._by_addr.get(key)
        if entry is None:
            entry = self._host_entry(send, recv, False) or \
                self._make_entry(_detached(send), _detached(recv), self._ctx())
            self._insert(key, entry)
        else:
            self._by_addr.move_to_end(key)
        entry.bound.run()

    # ---- public ----------------------------------------------------------------------------
    def run(self, sendbuf: object, recvbuf: object, *, check: bool = False) -> None:
        """One exchange: ``sendbuf`` blocks to every rank, ``recvbuf`` blocks from them.

        Args:
            sendbuf: buffer holding the send blocks at ``senddispls`` (elements of the plan's
                dtype), or ``MPI.IN_PLACE`` / None to send from ``recvbuf``.
            recvbuf: writable buffer large enough for every receive block.
            check: agree on buffer errors collectively (one Allgather) before moving data;
                must be the same on every rank.
        """
        if not check and watchdog.timeout() is None:  # a pair run before: no Python lookup
            last = self._last
            if last is not None and last[0] is sendbuf and last[1] is recvbuf:
                entry = last[2]
            else:
                entry = self._find(self._by_addr, sendbuf, recvbuf,
                                   sendbuf is None or sendbuf is _IN_PLACE)
                if entry is not None:
                    self._last = (sendbuf, recvbuf, entry)
            if entry is not None:
                if entry.scratch is not None:
                    entry.scratch[0][...] = entry.scratch[1]
                entry.bound.run()
                return
        guard = watch(self.comm, "Plan.run") if watchdog.timeout() is not None else None
        try:
            if check:
                exc = None
                try:
                    entry = self._entry(sendbuf, recvbuf)
                except Exception as e:
                    exc = e
                agree(self.comm, exc, np.zeros(0, dtype=np.int64))
            else:
                try:
                    entry = self._entry(sendbuf, recvbuf)
                except Exception as e:  # this rank alone: the others wait for its messages
                    watchdog.failed(guard, e)
                    raise
            if entry.scratch is not None:
                entry.scratch[0][...] = entry.scratch[1]
            entry.bound.run()
        finally:
            watchdog.leave(guard)

    __call__ = run

    def bind(self, sendbuf: object, recvbuf: object) -> BoundPlan:
        """Bind to two buffers for argument-free runs (collective: all ranks together).

        With ``native`` and an MPI-4 library this creates the persistent collective
        (``MPI_Alltoallv_init``); other algorithms bind persistent point-to-point requests.
        Buffer errors are agreed on collectively.
        """
        exc = None
        entry = None
        guard = watch(self.comm, "Plan.bind") if watchdog.timeout() is not None else None
        try:
            try:
                _, entry = self._bind(sendbuf, recvbuf, self._ctx(persistent_collective=True),
                                      persistent=True)
            except Exception as e:
                exc = e
            try:
                agree(self.comm, exc, np.zeros(0, dtype=np.int64))
            except Exception:
                if entry is not None:
                    entry.bound.free()
                raise
        finally:
            watchdog.leave(guard)
        assert entry is not None
        return BoundPlan(self, entry)

    def explain(self) -> Explanation | None:
        """The selection made when the plan was created (None for internal plans)."""
        return self._explanation

    def free(self) -> None:
        """Release every binding's requests (local, not collective). Idempotent."""
        if self._freed:
            return
        self._freed = True
        self._last = None
        if MPI.Is_finalized():
            self._by_addr.clear()
            return
        while self._by_addr:
            _, e = self._by_addr.popitem()
            e.bound.free()

    def __enter__(self) -> Plan:
        return self

    def __exit__(self, *exc: object) -> None:
        self.free()

    def __del__(self) -> None:
        # Local only: freeing inactive persistent requests never communicates.
        try:
            if not getattr(self, "_freed", True) and not sys.is_finalizing():
                self.free()
        except Exception:
            pass

    def __repr__(self) -> str:
        return (f"<pya2a.Plan algorithm={self.algorithm!r} p={self.size} "
                f"send={int(self.sendcounts.sum())} recv={int(self.recvcounts.sum())} "
                f"bindings={len(self._by_addr)}>")


def _detached(spec: VSpec) -> VSpec:
    """``spec`` over its address range instead of the caller's object (host memory)."""
    if spec.device is not None or spec.obj is MPI.BOTTOM:
        return spec
    mem = MPI.buffer.fromaddress(spec.addr, spec.nbytes, spec.readonly) if spec.nbytes \
        else bytearray()
    return spec.with_buffer(mem, mem)


def _address(buf: object) -> tuple[int, int]:
    """(address, nbytes) of a host buffer, or of a device array via the array interface."""
    hit = _msg.address(buf)
    if hit is not None:
        return hit
    try:
        mem = MPI.buffer(buf)
        return (mem.address, mem.nbytes)
    except Exception:
        cai = getattr(buf, "__cuda_array_interface__", None)
        if cai is not None:
            return (int(cai["data"][0]), id(buf))
        return (id(buf), -1)


def plan(comm: MPI.Intracomm, sendcounts: object, recvcounts: object, dtype: object, *,
         senddispls: object = None, recvdispls: object = None, device: int | None = None,
         algorithm: str = "auto", cache_size: int = DEFAULT_CACHE) -> Plan:
    """Create a persistent :class:`Plan` (collective). See :class:`Plan` for arguments."""
    return Plan(comm, sendcounts, recvcounts, dtype, senddispls=senddispls,
                recvdispls=recvdispls, device=device, algorithm=algorithm,
                cache_size=cache_size)


def explain(comm: MPI.Intracomm, sendcounts: object, recvcounts: object = None,
            dtype: object = "B", *, device: int | None = None,
            algorithm: str = "auto") -> Explanation:
    """How ``auto`` ranks the algorithms for an exchange (collective; nothing moves).

    Args:
        comm: the communicator of the exchange.
        sendcounts: p counts of ``dtype`` elements this rank sends to each rank.
        recvcounts: p counts expected from each rank; None exchanges ``sendcounts`` to get
            them (one Alltoall).
        dtype: element type (default bytes).
        device: None for host buffers, else the device ordinal.
        algorithm: an override to report ("auto" shows the selector's own choice).

    Returns:
        :class:`Explanation` (print it for a table); identical on every rank.
    """
    if recvcounts is None:
        check_comm("explain", comm)
        icomm = internal_comm(comm, "explain")
        p = icomm.Get_size()
        sc = np.zeros(p, dtype=np.int64)
        exc = None
        guard = watch(icomm, "explain") if watchdog.timeout() is not None else None
        try:
            try:
                sc = _spec.counts_vector("explain", "sendcounts", sendcounts, p).copy()
            except Exception as e:
                exc = e
            agree(icomm, exc, np.zeros(0, dtype=np.int64))
            rc = np.empty(p, dtype=np.int64)
            icomm.Alltoall(sc, rc)
        finally:
            watchdog.leave(guard)
        recvcounts = rc
    pl = Plan(comm, sendcounts, recvcounts, dtype, device=device, algorithm=algorithm)
    out = pl.explain()
    pl.free()
    assert out is not None
    return out

