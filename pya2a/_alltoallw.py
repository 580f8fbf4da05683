"""``Alltoallw``: per-peer datatypes decoded once, packed into contiguous runs, moved by pya2a.

Each peer's block (``count`` elements of its datatype at a byte displacement) is decoded once
into byte runs (:mod:`pya2a.core.dtypes`), and a copy plan (:class:`pya2a.core._typepack.
TypeCopy` on the host, one table for the pack kernel on a device) packs all blocks back to
back in type-map order, which is what ``MPI_Pack`` writes: two ranks whose datatypes have
matching type signatures therefore agree on every packed byte. The packed blocks move one of
two ways:

* :class:`ShmPlan` (host buffers, every rank on one node, ``algorithm="auto"`` or
  ``"shm"``): each rank packs into its own region of a node-shared window, the call's
  agreement is the one synchronisation, and each rank unpacks its blocks straight out of the
  senders' regions: two copies of every byte, no messages.
* :class:`WPlan` (a named Alltoallv algorithm, ranks on several nodes, device buffers): pack
  into a staging buffer, exchange the staging buffers with the Alltoallv algorithm (decided
  once, like a one-shot Alltoallv), unpack.

On host buffers a rank's block to itself skips the staging: it is copied in one pass from
the send buffer to the receive buffer (:meth:`TypeCopy.copy_block`), which is all an exchange
on a one-rank communicator does (the slab decomposition of a pencil FFT has such
communicators along its undivided axis).

Plans are cached per communicator under the layouts, counts and displacements, so a repeated
exchange (a distributed FFT calls the same few every transform) decodes nothing and allocates
nothing. As with the one-shot Alltoallv path, each rank also keeps the *signature* of recent
valid calls (buffer size and kind, counts, displacements, datatype handles, algorithm,
options): when every rank finds its signature under the same entry number (one ``Allreduce``
of two integers), the call skips parsing and agreement and runs the plan. A datatype freed
and its handle value reused is caught by the layout cache
(:func:`pya2a.core.dtypes.generation`).

Datatypes the decoder does not take (``DARRAY``, Fortran 90 types, ...) and ``MPI.BOTTOM``
buffers go to the MPI library's own ``Alltoallw`` for host buffers; on device buffers they
raise ``TypeError``. The decision is agreed, so all ranks take the same path.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

import numpy as np
from mpi4py import MPI

from . import _oneshot, select
from .algorithms.direct import DEFAULT_WINDOW
from .core import dtypes, watchdog
from .core._msg import wside
from .core._typepack import TypeCopy
from .core.devices import gpu_device
from .core.registry import name_code, raw_env
from .core.registry import requested as resolve
from .core.spec import _acquire, in_place, int_vector
from .core.state import CommState, check_comm, state
from .core.validate import (
    agree,
    allreduce_max,
    call_settings,
    check_options,
    ranges_overlap,
    window_setting,
)

__all__ = ["Alltoallw", "WPlan", "WCache", "stats"]

CAPACITY = 16  # plans (each with two staging buffers) kept per communicator

# How many exchanges took each path, for tests and benchmarks: 'hit' (signature agreed),
# 'full' (parsed and agreed), 'mpi' (the MPI library's own Alltoallw).
stats: dict[str, int] = {"hit": 0, "full": 0, "mpi": 0}
chosen: set[str] = set()  # algorithms the plans made in this process use ("mpi": the MPI's own)


class _Side:
    """One parsed Alltoallw message: buffer, counts, byte displacements, datatypes, layouts."""

    __slots__ = ("obj", "addr", "nbytes", "device", "keepalive", "counts", "displs", "types",
                 "layouts", "bottom")

    def __init__(self) -> None:
        self.bottom = False
        self.device: int | None = None
        self.layouts: list = []

    @property
    def decodable(self) -> bool:
        return not self.bottom and all(self.layouts)

    def key(self) -> tuple:
        """What the copy plan of this side depends on (not the buffer address)."""
        return (tuple(lay.serial if lay else 0 for lay in self.layouts),
                self.counts.tobytes(), self.displs.tobytes())


def _split(call: str, what: str, msg: object) -> tuple[object, object, object, object]:
    """(buffer, counts, displacements, datatypes) of an Alltoallw message, as mpi4py reads it."""
    if not isinstance(msg, (list, tuple)):
        raise TypeError(f"{call}: {what} must be a list or tuple [buf, (counts, displs), "
                        f"datatypes], not {type(msg).__name__}")
    n = len(msg)
    if n == 2:
        return msg[0], None, None, msg[1]
    if n == 3:
        cd = msg[1]
        if not isinstance(cd, (list, tuple)) or len(cd) != 2:
            raise ValueError(f"{call}: {what}: expecting (counts, displs) as the second item")
        return msg[0], cd[0], cd[1], msg[2]
    if n == 4:
        return msg[0], msg[1], msg[2], msg[3]
    raise ValueError(f"{call}: {what}: expecting 2 to 4 items, got {n}")


def _parse(call: str, what: str, name: str, msg: object, p: int, readonly: bool) -> _Side:
    o_buf, o_counts, o_displs, o_types = _split(call, what, msg)
    s = _Side()
    if o_counts is None and o_displs is None:
        s.counts = np.ones(p, dtype=np.int64)
        s.displs = np.zeros(p, dtype=np.int64)
    else:
        if o_counts is None or o_displs is None:
            raise TypeError(f"{call}: {what}: give both counts and displacements or neither")
        s.counts = int_vector(call, what, name + "counts", o_counts, p)
        s.displs = int_vector(call, what, name + "displs", o_displs, p)
    if isinstance(o_types, (str, bytes)) or not hasattr(o_types, "__len__"):
        raise TypeError(f"{call}: {what}: datatypes must be a sequence of {p} MPI.Datatype")
    types = list(o_types)
    if len(types) != p:
        raise ValueError(f"{call}: {name}types has {len(types)} entries, expected {p}")
    for j, t in enumerate(types):
        if not isinstance(t, MPI.Datatype):
            raise TypeError(f"{call}: {name}types[{j}] must be an MPI.Datatype, "
                            f"not {type(t).__name__}")
    s.types = tuple(types)
    bad = np.flatnonzero(s.counts < 0)
    if bad.size:
        j = int(bad[0])
        raise ValueError(f"{call}: {name}counts[{j}] = {s.counts[j]} is negative")
    for j, t in enumerate(types):
        if s.counts[j] and t == MPI.DATATYPE_NULL:
            raise ValueError(f"{call}: {name}types[{j}] is MPI.DATATYPE_NULL")
    if o_buf is None or o_buf is MPI.BOTTOM:
        if o_counts is None:
            raise ValueError(f"{call}: {what}: MPI.BOTTOM needs counts and displacements")
        s.bottom, s.obj, s.addr, s.nbytes, s.keepalive = True, o_buf, 0, 0, None
        return s
    b = _acquire(call, what, o_buf, readonly)
    s.obj, s.addr, s.nbytes, s.device, s.keepalive = b.obj, b.addr, b.nbytes, b.device, \
        b.keepalive
    s.layouts = [dtypes.layout(t) if c else _EMPTY
                 for t, c in zip(types, s.counts.tolist(), strict=True)]
    for j, lay in enumerate(s.layouts):
        c = int(s.counts[j])
        if not c or not lay:
            continue
        lo, hi = lay.span(c)
        d = int(s.displs[j])
        if lay.size and (d + lo < 0 or d + hi > s.nbytes):
            raise ValueError(
                f"{call}: {what} block {j} (displacement {d} bytes, count {c}, datatype "
                f"extent {lay.extent}) touches bytes [{d + lo}, {d + hi}), outside the "
                f"{s.nbytes}-byte buffer")
    return s


_EMPTY = dtypes.Layout(np.zeros(0, np.int64), np.zeros(0, np.int64), 0, 0, 1, 0, 0, serial=0)


def _copy_plan(side: _Side) -> TypeCopy:
    """The Cython pack/unpack plan of one side (layouts deduplicated)."""
    ids: dict[int, int] = {}
    uniq: list[dtypes.Layout] = []
    lid = np.empty(len(side.layouts), dtype=np.int64)
    for j, lay in enumerate(side.layouts):
        k = ids.get(id(lay))
        if k is None:
            k = ids[id(lay)] = len(uniq)
            uniq.append(lay)
        lid[j] = k
    starts = np.zeros(len(uniq) + 1, dtype=np.int64)
    np.cumsum([lay.runs for lay in uniq], out=starts[1:])
    offs = np.concatenate([lay.offs for lay in uniq]) if uniq else np.zeros(0, np.int64)
    lens = np.concatenate([lay.lens for lay in uniq]) if uniq else np.zeros(0, np.int64)
    return TypeCopy(offs, lens, starts, [lay.extent for lay in uniq], lid, side.displs,
                    side.counts, [lay.size for lay in uniq])


def _run_table(side: _Side, copy: TypeCopy) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every run of every block as (buffer offset, staging offset, bytes), merged where both
    sides continue: the table one pack-kernel launch walks on a device."""
    bo, so, ln = [], [], []
    for j, lay in enumerate(side.layouts):
        c = int(side.counts[j])
        if not c or not lay or not lay.size:
            continue
        origin = int(side.displs[j])
        if lay.dense:
            bo.append(np.array([origin + int(lay.offs[0])], np.int64))
            ln.append(np.array([c * lay.extent], np.int64))
        else:
            el = origin + np.arange(c, dtype=np.int64) * lay.extent
            bo.append((el[:, None] + lay.offs[None, :]).reshape(-1))
            ln.append(np.tile(lay.lens, c))
        so.append(int(copy.positions[j]) + np.cumsum(ln[-1]) - ln[-1])
    if not ln:
        z = np.zeros(0, np.int64)
        return z, z, z
    return _merged(np.concatenate(bo), np.concatenate(so), np.concatenate(ln))


def _merged(b: np.ndarray, s: np.ndarray, n: np.ndarray) -> tuple[np.ndarray, ...]:
    """Runs (b, s, n) with each run that continues the one before on both sides joined to
    it."""
    cont = np.empty(n.size, dtype=bool)
    cont[0] = False
    cont[1:] = (b[1:] == b[:-1] + n[:-1]) & (s[1:] == s[:-1] + n[:-1])
    heads = np.flatnonzero(~cont)
    return b[heads], s[heads], np.add.reduceat(n, heads).astype(np.int64)


def _composed(send: tuple, recv: tuple) -> tuple[np.ndarray, ...]:
    """(send offset, receive offset, bytes) runs that copy what the send table packs straight
    to where the receive table unpacks it, with no staging between: both tables are
    (buffer offset, staging offset, bytes) over the same staging bytes (one rank's block to
    itself)."""
    sb, ss, sn = send
    rb, rs, rn = recv
    if not sn.size:
        return sb, rb, sn
    end = int(ss[-1] + sn[-1])
    assert end == int(rs[-1] + rn[-1]), "the two layouts hold different byte counts"
    cuts = np.union1d(ss, rs)  # every place a run starts on either side
    i = np.searchsorted(ss, cuts, side="right") - 1
    k = np.searchsorted(rs, cuts, side="right") - 1
    lens = np.diff(np.append(cuts, end)).astype(np.int64)
    return _merged(sb[i] + cuts - ss[i], rb[k] + cuts - rs[k], lens)


class _DeviceCopy:
    """Copies between a device buffer and staging (or another buffer) by a run table: one
    launch of the pack kernel per direction."""

    def __init__(self, buf_off: np.ndarray, stage_off: np.ndarray, lens: np.ndarray) -> None:
        self.buf_off, self.stage_off, self.lens = buf_off, stage_off, lens
        self._resident: dict = {}

    def _launch(self, src: int, src_off: np.ndarray, dst: int, dst_off: np.ndarray,
                pack: bool) -> None:
        be = gpu_device().backend()
        stream = be.current_stream()
        table = getattr(be, "pack_table", None)
        if table is None:  # backends without resident tables (tests' emulated device)
            be.pack(src, src_off, self.lens, dst, dst_off, stream)
            return
        key = (be.current_device(), pack)
        tab = self._resident.get(key)
        if tab is None:
            tab = self._resident[key] = be.upload_table(src_off, dst_off, self.lens)
        table(src, tab, dst, stream)

    def pack(self, buf: int, stage: int) -> None:
        if self.lens.size:
            self._launch(buf, self.buf_off, stage, self.stage_off, True)

    def unpack(self, stage: int, buf: int) -> None:
        if self.lens.size:
            self._launch(stage, self.stage_off, buf, self.buf_off, False)


class WPlan:
    """A decided Alltoallw: copy plans, staging buffers, the staging exchange's decision.

    ``run(send_addr, recv_addr)`` packs from the send buffer (the receive buffer when in
    place), runs the staging exchange and unpacks into the receive buffer. Made collectively
    (the staging exchange is agreed on like any Alltoallv); reused by address-free lookups.
    """

    def __init__(self, st: CommState, send: _Side, recv: _Side, inplace: bool,
                 requested: str, check: bool, options: Mapping | None, like: object) -> None:
        self.icomm = st.comm
        self.inplace = inplace
        self.layouts = [lay for lay in (*send.layouts, *recv.layouts) if lay]
        self.generation = dtypes.generation()
        self.rcopy = _copy_plan(recv)
        self.scopy = self.rcopy if inplace else _copy_plan(send)
        self.device = recv.device
        slen, rlen = self.scopy.lengths, self.rcopy.lengths
        self.me = -1
        # one rank with device buffers: the send layout copied straight into the receive
        # layout by one kernel launch (nothing at all in place); no staging, no exchange
        self.local: _DeviceCopy | None = None
        self.alone = self.device is not None and st.comm.Get_size() == 1
        sdis, rdis = self.scopy.positions, self.rcopy.positions
        if self.alone:
            slen = rlen = sdis = rdis = np.zeros(1, np.int64)
            if not inplace:
                self.local = _DeviceCopy(*_composed(_run_table(send, self.scopy),
                                                    _run_table(recv, self.rcopy)))
        if self.device is None:
            # the block to itself is copied straight from buffer to buffer (nothing at all in
            # place): it stays out of the staging buffers and the exchange
            self.me = st.comm.Get_rank()
            self.scopy.skip = self.rcopy.skip = self.me
            slen, rlen = slen.copy(), rlen.copy()
            slen[self.me] = rlen[self.me] = 0
            self.sstage = np.empty(max(self.scopy.nbytes, 1), dtype=np.uint8)
            self.rstage = np.empty(max(self.rcopy.nbytes, 1), dtype=np.uint8)
            self.saddr, self.raddr = self.sstage.ctypes.data, self.rstage.ctypes.data
            self.dsend = self.drecv = None
        else:
            gdev = gpu_device()
            view = gdev.byte_view(like)
            if self.alone:  # the (empty) exchange is still decided: name, usable()
                self.sstage, self.rstage = gdev.empty_rows(view, 1), gdev.empty_rows(view, 1)
                self.dsend = self.drecv = None
            else:
                self.sstage = gdev.empty_rows(view, max(self.scopy.nbytes, 1))
                self.rstage = gdev.empty_rows(view, max(self.rcopy.nbytes, 1))
                self.drecv = _DeviceCopy(*_run_table(recv, self.rcopy))
                self.dsend = self.drecv if inplace else _DeviceCopy(*_run_table(send, self.scopy))
        smsg = [self.sstage, (slen, sdis), MPI.BYTE]
        rmsg = [self.rstage, (rlen, rdis), MPI.BYTE]
        self.decision, self.sspec, self.rspec = _oneshot._decide_call(
            "Alltoallw", "alltoallv", st, smsg, rmsg, requested, check, options, False)
        if self.device is not None:
            self.saddr, self.raddr = self.sspec.addr, self.rspec.addr
        self.algorithm = self.decision.info.name
        chosen.add(self.algorithm)

    def usable(self) -> bool:
        """False once a layout it uses was freed or its staging plan was evicted."""
        if self.generation != dtypes.generation():
            if not all(lay.alive[0] for lay in self.layouts):
                return False
            self.generation = dtypes.generation()
        return self.decision.usable()

    def run(self, send_addr: int, recv_addr: int) -> str:
        """One exchange between the buffers at these addresses (checked by the caller)."""
        if self.alone:
            if self.local is not None:
                self.local.pack(send_addr, recv_addr)
            return self.algorithm
        src = recv_addr if self.inplace else send_addr
        if self.device is None:
            self.scopy.pack(src, self.saddr)
            if not self.inplace:
                self.scopy.copy_block(self.me, send_addr, self.rcopy, self.me, recv_addr)
        else:
            self.dsend.pack(src, self.saddr)
        _oneshot._execute(self.icomm, "alltoallv", self.decision, self.sspec, self.rspec, False)
        if self.device is None:
            self.rcopy.unpack(self.raddr, recv_addr)
        else:
            self.drecv.unpack(self.raddr, recv_addr)
        return self.algorithm


class _Arena:
    """Node-shared memory for the ``shm`` path: one region per rank, in two halves.

    Exchange ``e`` of the communicator writes half ``e % 2`` of each region. A rank writes
    half ``e % 2`` only after the agreement of exchange ``e - 1`` completed, which every
    rank entered only after it had read everything of exchange ``e - 2`` from that half: one
    collective per exchange orders all writes and reads. Grown collectively (every rank takes
    the same branch from an all-reduced size); freed with the communicator.
    """

    GRAIN = 1 << 16

    def __init__(self, icomm: MPI.Intracomm) -> None:
        self.comm = icomm
        self.win: MPI.Win | None = None
        self.half = 0  # bytes per half region
        self.bases = np.zeros(icomm.Get_size(), dtype=np.int64)
        self.epoch = 0  # completed exchanges: the same on every rank
        self.gen = 0  # changes whenever the window is reallocated
        self._keep: list = []

    def ensure(self, need: int) -> None:
        """Collective: make every half region at least the largest ``need`` of any rank."""
        need = allreduce_max(self.comm, int(need))
        if self.win is not None and need <= self.half:
            return
        self.free()
        half = max(self.GRAIN, -(-need // self.GRAIN) * self.GRAIN)
        self.win = MPI.Win.Allocate_shared(2 * half, 1, comm=self.comm)
        self._keep = []
        for j in range(self.comm.Get_size()):
            buf, _ = self.win.Shared_query(j)
            mem = np.frombuffer(buf, dtype=np.uint8)
            self._keep.append(mem)
            self.bases[j] = mem.ctypes.data
        self.win.Lock_all(MPI.MODE_NOCHECK)
        self.half = half
        self.gen += 1

    def free(self) -> None:
        """Release the window (collective: every rank frees it at the same point)."""
        if self.win is not None and not MPI.Is_finalized():
            try:
                self.win.Unlock_all()
                self.win.Free()
            except MPI.Exception:
                pass
        self.win, self._keep, self.half = None, [], 0


class ShmPlan:
    """Alltoallw through node-shared memory: pack into my region, one collective, unpack.

    Every rank packs its blocks for all peers into its own region of a shared window; after
    the call's agreement (the one collective, which also says that every rank has packed)
    each rank unpacks its incoming blocks straight out of the senders' regions. Two copies
    of every byte and no message passing. All ranks of the communicator share one node.
    """

    algorithm = "shm"

    def __init__(self, icomm: MPI.Intracomm, arena: _Arena, send: _Side, recv: _Side,
                 inplace: bool) -> None:
        p, me = icomm.Get_size(), icomm.Get_rank()
        self.icomm, self.arena, self.inplace = icomm, arena, inplace
        self.layouts = [lay for lay in (*send.layouts, *recv.layouts) if lay]
        self.generation = dtypes.generation()
        self.rcopy = _copy_plan(recv)
        self.scopy = self.rcopy if inplace else _copy_plan(send)
        self.me = me
        self.scopy.skip = self.rcopy.skip = me  # copied straight across (see finish)
        # unpack from rank me + 1 first, then on: the ranks read p different regions at once
        self.rcopy.first = (me + 1) % p
        # my region holds the blocks for the other ranks back to back (mine is not in it)
        own = int(self.scopy.lengths[me])
        self.spos = self.scopy.positions - np.where(np.arange(p) > me, own, 0)
        self.spos[me] = 0
        # (position, length) of my block in each sender's region, one row per sender
        mine = np.ascontiguousarray(np.stack([self.spos, self.scopy.lengths], 1))
        theirs = np.empty((p, 2), dtype=np.int64)
        icomm.Alltoall(mine, theirs)
        exc = None
        bad = np.flatnonzero(theirs[:, 1] != self.rcopy.lengths)
        if bad.size:
            j = int(bad[0])
            exc = ValueError(f"Alltoallw: rank {j} sends {theirs[j, 1]} bytes to rank {me}, "
                             f"whose datatypes and counts take {self.rcopy.lengths[j]}")
        agree(icomm, exc, np.zeros(0, dtype=np.int64))
        self.rpos = np.ascontiguousarray(theirs[:, 0])
        arena.ensure(self.scopy.nbytes - own)
        self._gen = -1
        chosen.add("shm")

    def _addresses(self) -> None:
        a = self.arena
        me = self.icomm.Get_rank()
        self.dst = [np.ascontiguousarray(a.bases[me] + h * a.half + self.spos)
                    for h in (0, 1)]
        self.src = [np.ascontiguousarray(a.bases + h * a.half + self.rpos) for h in (0, 1)]
        self._gen = a.gen

    def usable(self) -> bool:
        if self.arena.win is None:
            return False
        if self.generation != dtypes.generation():
            if not all(lay.alive[0] for lay in self.layouts):
                return False
            self.generation = dtypes.generation()
        return True

    def pack(self, send_addr: int, recv_addr: int) -> None:
        """Pack into this rank's half for the coming exchange (before its agreement)."""
        if self._gen != self.arena.gen:
            self._addresses()
        self.scopy.pack_to(recv_addr if self.inplace else send_addr,
                           self.dst[self.arena.epoch & 1])
        self.arena.win.Sync()

    def finish(self, send_addr: int, recv_addr: int) -> str:
        """After the agreement: unpack every incoming block from its sender's region, and
        copy this rank's block to itself from buffer to buffer (one pass, no region)."""
        a = self.arena
        a.win.Sync()
        self.rcopy.unpack_from(self.src[a.epoch & 1], recv_addr)
        if not self.inplace:  # in place the block to itself stays where it is
            self.scopy.copy_block(self.me, send_addr, self.rcopy, self.me, recv_addr)
        a.epoch += 1
        return "shm"

    def run(self, send_addr: int, recv_addr: int) -> str:
        """The whole exchange (the call was agreed already): pack, barrier, unpack."""
        self.pack(send_addr, recv_addr)
        self.icomm.Barrier()
        return self.finish(send_addr, recv_addr)


class _MPIw:
    """The MPI library's own Alltoallw (datatypes pya2a does not decode, MPI.BOTTOM)."""

    algorithm = "mpi"

    def __init__(self, icomm: MPI.Intracomm) -> None:
        self.icomm = icomm

    @staticmethod
    def usable() -> bool:
        return True

    def call(self, sendmsg: object, recvmsg: object) -> str:
        stats["mpi"] += 1
        chosen.add("mpi")
        MPI.Intracomm.Alltoallw(self.icomm, MPI.IN_PLACE if in_place(sendmsg) else sendmsg,
                                recvmsg)
        return "mpi"


class WCache(_oneshot.FastCache):
    """Per-communicator Alltoallw call signatures (as the one-shot Alltoallv's), plans, and
    the node-shared window of the ``shm`` path."""

    __slots__ = ("plans", "arena")

    def __init__(self) -> None:
        super().__init__()
        self.plans: OrderedDict[tuple, Any] = OrderedDict()
        self.arena: _Arena | None = None

    def plan(self, key: tuple) -> Any:
        """This rank's usable plan for ``key``, or None (local)."""
        hit = self.plans.get(key)
        if hit is not None:
            if hit.usable():
                self.plans.move_to_end(key)
                return hit
            del self.plans[key]
        return None

    def keep(self, key: tuple, wplan: Any) -> None:
        self.plans[key] = wplan
        while len(self.plans) > CAPACITY:
            self.plans.popitem(last=False)

    def clear(self) -> None:
        """Forget every plan and signature (local; numbering continues)."""
        super().clear()
        self.plans.clear()

    def free(self) -> None:
        """Forget everything and release the shared window (collective: Comm.Free)."""
        self.clear()
        super().free()  # the agreement's persistent request
        if self.arena is not None:
            self.arena.free()


# ---- signatures -----------------------------------------------------------------------------
_NO = _oneshot._NO  # "no signature": the same sentinel as the one-shot path


def _signature(sendmsg: object, recvmsg: object, inplace: bool, requested: str, check: bool,
               options: Mapping | None):
    """(key, send address, send keepalive, receive address, receive keepalive) of a call
    whose messages ``_msg.wside`` signs, or None (the full path)."""
    opt = _oneshot.options_key(options)
    if opt is _NO:
        return None
    r = wside(recvmsg, False)
    if r is None:
        return None
    s = (None, 0, None) if inplace else wside(sendmsg, True)
    if s is None:
        return None
    if s[0] is not None and s[0][6] == r[0][6] and ranges_overlap(s[1], s[0][1], r[1], r[0][1]):
        return None  # overlapping buffers: the full path refuses them on every rank
    return (requested, check, opt, raw_env(b"PYA2A_MESH_GRID"), inplace, s[0], r[0]), s[1], \
        s[2], r[1], r[2]


# ---- the call -------------------------------------------------------------------------------
_SLOT = "alltoallw"  # CommState slot of the communicator's WCache


def Alltoallw(comm: MPI.Intracomm, sendmsg: object, recvmsg: object, *,  # noqa: N802
              algorithm: str = "auto", check: bool = False,
              options: Mapping | None = None) -> str:
    """Generalized all-to-all with a datatype per peer, like ``comm.Alltoallw(smsg, rmsg)``.

    Args:
        comm: an mpi4py intracommunicator.
        sendmsg: ``[buf, (counts, displs), datatypes]``, ``[buf, counts, displs, datatypes]``
            or ``[buf, datatypes]`` (one element per peer at displacement 0), exactly as
            mpi4py's ``Comm.Alltoallw``: ``displs`` in **bytes**, ``datatypes`` a sequence of
            p ``MPI.Datatype``; or ``MPI.IN_PLACE`` / ``None`` to send from the receive
            buffer with the receive layout.
        recvmsg: the receive message, same forms.
        algorithm: "auto" (``PYA2A_ALGORITHM`` overrides): the node-shared path when every
            rank is on one node (host buffers), else the selected Alltoallv algorithm on
            staging buffers; "shm" forces the node-shared path; an Alltoallv algorithm name
            moves the packed blocks through staging buffers with it. Same on every rank.
        check: also verify that every rank sends each peer as many bytes as the peer expects.
        options: algorithm options, as for :func:`pya2a.Alltoallv`.

    Returns:
        What moved the data: "shm", an Alltoallv algorithm's name, or "mpi" (the MPI
        library's own Alltoallw).

    Device buffers (CuPy, torch) are packed and unpacked by a kernel on the current stream
    (stream-ordered: the receive buffer is written when that stream gets there); datatypes
    pya2a cannot decode raise ``TypeError`` there (on the host they go to the MPI's own
    call).

    Raises:
        TypeError, ValueError, BufferError: bad arguments on any rank, raised on every rank
            before any data moves.
    """
    call = "Alltoallw"
    check_comm(call, comm)
    st = state(comm, call)
    guard = watchdog.enter(st.comm, call, st.slot(watchdog.SLOT, watchdog.Arrivals)) \
        if watchdog.timeout() is not None else None
    try:
        return _alltoallw(call, st, sendmsg, recvmsg, algorithm, check, options)
    finally:
        watchdog.leave(guard)


def _alltoallw(call: str, st: CommState, sendmsg: object, recvmsg: object, algorithm: str,
               check: bool, options: Mapping | None) -> str:
    icomm, cache = st.comm, st.slot(_SLOT, WCache)
    requested = resolve(algorithm)
    inplace = in_place(sendmsg)
    sig = _signature(sendmsg, recvmsg, inplace, requested, check, options)
    hit = cache.lookup(None if sig is None else sig[0])
    entry = None if hit is None else hit[1]
    if type(entry) is ShmPlan:
        entry.pack(sig[1], sig[3])  # harmless if the agreement fails (see _Arena)
    if cache.agree(icomm, -1 if hit is None else hit[0]):
        assert sig is not None and hit is not None
        stats["hit"] += 1
        if type(entry) is ShmPlan:
            return entry.finish(sig[1], sig[3])
        if isinstance(entry, _MPIw):
            return entry.call(sendmsg, recvmsg)
        return entry.run(sig[1], sig[3])
    number = cache.next_number()  # every rank, failed calls too: numbers stay aligned
    stats["full"] += 1
    p, rank = icomm.Get_size(), icomm.Get_rank()
    exc: BaseException | None = None
    send = recv = None
    valid_options: dict | None = None
    rec = np.zeros(4, dtype=np.int64)
    try:
        recv = _parse(call, "receive message", "recv", recvmsg, p, readonly=False)
        send = recv if inplace else _parse(call, "send message", "send", sendmsg, p,
                                           readonly=True)
        if (send.device is None) != (recv.device is None):
            raise TypeError(f"{call}: send and receive buffers must both be host or both "
                            f"be device buffers")
        valid_options = check_options(call, options, p)
        window_setting(valid_options, DEFAULT_WINDOW)  # unparsable: fails every rank here
        if send is not recv and not send.bottom and not recv.bottom and \
                send.device == recv.device and \
                ranges_overlap(send.addr, send.nbytes, recv.addr, recv.nbytes):
            raise ValueError(f"{call}: send and receive buffers overlap; pass MPI.IN_PLACE "
                             f"as the send message for an in-place exchange")
        decodable = send.decodable and recv.decodable
        if decodable:
            sb = int(send.counts[rank]) * send.layouts[rank].size
            rb = int(recv.counts[rank]) * recv.layouts[rank].size
            if sb != rb:
                raise ValueError(f"{call}: rank {rank} sends itself {sb} bytes but expects "
                                 f"{rb} from itself")
        rec[:] = (name_code(requested), recv.device is not None, decodable, 0)
    except Exception as e:  # agreed on below, then raised on every rank
        exc = e
    # the same settings as a one-shot Alltoallv (check, options, mesh grid, in place, tuning
    # table): a rank whose differ would take another path and leave the others waiting
    settings = call_settings("alltoallw", check, valid_options, inplace, p, select.load_table())
    table = agree(icomm, exc, rec, settings, call)
    assert send is not None and recv is not None  # agree() raised otherwise
    if (table[:, 1] != table[0, 1]).any():
        raise ValueError(f"{call}: ranks asked for different algorithms (algorithm must be "
                         f"the same on every rank)")
    if (table[:, 2] != table[0, 2]).any():
        raise TypeError(f"{call}: some ranks pass device buffers and others host buffers")
    if not table[:, 3].all():
        if table[0, 2]:
            why = [lay.reason for lay in (*send.layouts, *recv.layouts) if not lay]
            raise TypeError(f"{call}: a datatype pya2a cannot decode on device buffers"
                            f"{' (' + why[0] + ')' if why else ' (on another rank)'}; the "
                            f"MPI library's own Alltoallw cannot take device buffers either "
                            f"unless it is CUDA-aware")
        entry: Any = _MPIw(icomm)
        if sig is not None:
            cache.store(sig[0], number, entry)
        return entry.call(sendmsg, recvmsg)
    opt = _oneshot.options_key(options)
    pkey = (requested, check, ("id", id(options)) if opt is _NO else opt, inplace, recv.device,
            None if inplace else send.key(), recv.key())
    wplan = cache.plan(pkey)
    # every rank must agree to reuse: a plan missing anywhere is made again everywhere
    if not cache.agree(icomm, 0 if wplan is not None else -1):
        if _use_shm(st, requested, bool(table[0, 2])):
            if cache.arena is None:
                cache.arena = _Arena(icomm)
            wplan = ShmPlan(icomm, cache.arena, send, recv, inplace)
        else:
            wplan = WPlan(st, send, recv, inplace, requested, check, options,
                          recv.obj if recv.device is not None else None)
        cache.keep(pkey, wplan)
    if sig is not None:
        cache.store(sig[0], number, wplan)
    return wplan.run(send.addr, recv.addr)


def _use_shm(st: CommState, requested: str, device: bool) -> bool:
    """Collective, the same answer on every rank: take the node-shared path?"""
    if device or requested not in ("auto", "shm"):
        return False
    one_node = st.node().one_node
    if requested == "shm" and not one_node:
        raise ValueError("Alltoallw: algorithm 'shm' needs every rank on one node")
    return one_node
