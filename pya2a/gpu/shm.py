"""Node-shared pinned staging for device buffers (the ``shm`` algorithm's engine).

When every rank of a communicator is on one node, device data need not cross host MPI at
all: each rank copies its send blocks device -> host straight into its own region of one
host shared-memory window (``MPI.Win.Allocate_shared``, page-locked in every process with
``cudaHostRegister``), and each rank copies its incoming blocks host -> device straight out
of the peers' regions. Every byte crosses PCIe once each way and host memory is only touched
by the copy engines, so the exchange runs at the pinned host<->device bandwidth instead of
the host MPI's shared-memory bandwidth.

Window layout. A *header* window (allocated once per communicator, all headers in rank 0's
segment so one strided view polls every peer) holds per rank ``W = 4 + 2p`` int64 words::

    [EPOCH, PROGRESS, DONE, TOTAL, off[0..p), len[0..p)]

and a *data* window holds one region per rank. In exchange ``e`` rank ``r`` lays its send
blocks for peers ``r+1, r+2, ...`` (rotated, own block left out) back to back in its region,
publishes ``off`` / ``len`` per destination, then ``EPOCH = e``; downloads run in pieces on
a side stream and after each piece lands ``PROGRESS`` = bytes of the region now valid (a
prefix). Rotated order means that at any moment each receiver has one block in flight from
some sender, so the host->device copies of piece k overlap the device->host copies of piece
k+1 on every GPU. Receivers poll ``EPOCH`` / ``PROGRESS`` (no host barrier) and upload each
newly valid range on the caller's stream; when their uploads are complete they set
``DONE = e``. A rank overwrites its region in exchange ``e + 1`` only after every peer's
``DONE >= e``. The own block is a device-to-device copy.

Sizes. The data window is grown collectively from a *global* value: the all-gathered largest
block (``ctx.options["max_block"]``) bounds every region by ``(p - 1) * max_block``; only if
that exceeds the capacity are the actual per-rank needs all-reduced, so every rank takes the
same branch. Windows live until :func:`free_windows` (collective); nothing is freed in
``__del__``.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
from mpi4py import MPI

from ..core.spec import VSpec
from ..core.state import live_states, state
from ..core.validate import allreduce_max
from .staging import default_chunk, merge_ranges

__all__ = ["ShmWindow", "comm_available", "window", "free_windows", "exchange",
           "MIN_REGION", "MAX_PIECES"]

EPOCH, PROGRESS, DONE, TOTAL, HEAD = 0, 1, 2, 3, 4
MIN_REGION = 1 << 21  # bytes per rank in a fresh data window
MAX_PIECES = 48  # per exchange and rank: the download piece grows past the staging chunk
_GRAIN = 1 << 21  # region sizes are multiples of this (page-aligned segments)

_WINDOW = "shm.window"  # CommState slot


def comm_available(comm: MPI.Intracomm) -> tuple[bool, str]:
    """Collective on first use per communicator: do all its ranks share one node?

    Cached per communicator handle; the answer is agreed, so it is the same on every rank.
    """
    if state(comm).node().one_node:
        return True, "all ranks share one node"
    return False, ("needs every rank of the communicator on one node "
                   "(MPI.COMM_TYPE_SHARED split does not span it)")


def _round(n: int) -> int:
    return max(_GRAIN, -(-int(n) // _GRAIN) * _GRAIN)


def _register(backend: Any, spans: list[tuple[int, int]]) -> tuple[list[int], bool]:
    """Page-lock the address ranges ``spans`` (merged first); returns (pointers, all ok)."""
    done, ok = [], True
    for a, b in merge_ranges([s for s, _ in spans], [n for _, n in spans]):
        try:
            backend.host_register(a, b - a)
            done.append(a)
        except Exception:  # still correct through pageable memory, only slower
            ok = False
    return done, ok


def _backing(addr: int) -> str:
    """The mapping behind ``addr`` as /proc/self/maps names it ('' if unknown)."""
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                parts = line.split()
                lo, hi = (int(x, 16) for x in parts[0].split("-"))
                if lo <= addr < hi:
                    return parts[5] if len(parts) > 5 else "[anonymous]"
    except (OSError, ValueError):
        pass
    return ""


class ShmWindow:
    """Header and data windows of one communicator (collective constructor).

    Args:
        comm: an intracommunicator whose ranks all share one node.
        region: bytes per rank of the data window (rounded up to 2 MiB); 0 allocates it
            on the first :meth:`ensure`.
        backend: CUDA operations (``host_register`` / ``host_unregister``, see
            :class:`pya2a.gpu.device.CupyBackend`).
    """

    def __init__(self, comm: MPI.Intracomm, region: int, backend: Any) -> None:
        self.comm = comm
        self.backend = backend
        self.p = p = comm.Get_size()
        self.rank = r = comm.Get_rank()
        self.width = HEAD + 2 * p
        self.epoch = 0
        self.hwin = MPI.Win.Allocate_shared(8 * self.width * p if r == 0 else 0, 8, comm=comm)
        buf, _ = self.hwin.Shared_query(0)
        self.hdr = np.frombuffer(buf, dtype=np.int64, count=p * self.width).reshape(
            p, self.width)
        self.hwin.Lock_all(MPI.MODE_NOCHECK)
        self.hdr[r] = 0
        self.hwin.Sync()
        self.dwin: MPI.Win | None = None
        self.capacity = 0
        self.addrs = np.zeros(p, dtype=np.int64)
        self._pinned: list[int] = []
        self.pinned = False  # every region page-locked (else pageable copies: slower)
        self.backing = ""  # the file behind this rank's region (/proc/self/maps)
        self._keep: list[Any] = []
        comm.Barrier()
        if region > 0:
            self._alloc(region)

    def _alloc(self, region: int) -> None:
        region = _round(region)
        self.dwin = MPI.Win.Allocate_shared(region, 1, comm=self.comm)
        spans, self._keep = [], []
        for j in range(self.p):  # once per window, not per exchange
            buf, _ = self.dwin.Shared_query(j)
            mem = np.frombuffer(buf, dtype=np.uint8)
            self._keep.append(mem)
            self.addrs[j] = mem.ctypes.data if mem.size else 0
            spans.append((int(self.addrs[j]), int(mem.size)))
        self._pinned, self.pinned = _register(self.backend, spans)
        self.backing = _backing(int(self.addrs[self.rank]))
        self.capacity = region
        self.comm.Barrier()

    def _release_data(self) -> None:
        for a in self._pinned:
            self.backend.host_unregister(a)
        self._pinned = []
        self._keep = []
        if self.dwin is not None:
            self.dwin.Free()
            self.dwin = None
        self.capacity = 0

    def ensure(self, global_bound: int, local_need: int) -> None:
        """Grow the data window if needed (collective; every rank takes the same branch).

        Args:
            global_bound: an upper bound of every rank's need, identical on every rank.
            local_need: this rank's region bytes for the coming exchange.
        """
        if global_bound <= self.capacity:
            return
        need = int(allreduce_max(self.comm, int(local_need)))
        if need <= self.capacity:
            return
        cap = max(MIN_REGION, 1 << max(0, need - 1).bit_length(), 2 * self.capacity)
        self.comm.Barrier()  # every peer's uploads from the old regions are complete
        self._release_data()
        self._alloc(cap)

    def free(self) -> None:
        """Collective: unregister and free both windows."""
        self.comm.Barrier()
        self._release_data()
        self.hdr = None  # type: ignore[assignment]
        self.hwin.Unlock_all()
        self.hwin.Free()

    # -- one exchange ----------------------------------------------------------------
    def exchange(self, send: VSpec, recv: VSpec, t: Any, chunk: int) -> None:
        """Move ``send``'s blocks to their ranks' ``recv`` buffers (collective).

        ``t`` is the begun device transport: its ``stream`` (the caller's) runs the uploads
        and the own block's copy; downloads run on the backend's side stream of
        ``t.device``. Returns with every upload queued and complete.
        """
        be, p, r, hdr = self.backend, self.p, self.rank, self.hdr
        stream = t.stream
        side = be.side_stream(t.device)
        self.epoch += 1
        e = self.epoch
        # region layout: blocks for r+1, r+2, ... back to back (own block stays on the GPU)
        scount, sdispl = send.bcounts, send.bdispls
        order = (r + 1 + np.arange(p - 1, dtype=np.int64)) % p
        lens = scount[order]
        pos = np.zeros(p - 1, dtype=np.int64)
        if p > 1:
            np.cumsum(lens[:-1], out=pos[1:])
        total = int(lens.sum())
        if total > self.capacity:  # pragma: no cover - ensure() sized it
            raise RuntimeError(f"shm: region of {self.capacity} bytes < {total}")
        off = np.zeros(p, dtype=np.int64)
        ln = np.zeros(p, dtype=np.int64)
        off[order], ln[order] = pos, lens
        # pieces: merged runs (contiguous on the device and in the region), then chunks
        nz = lens > 0
        src, rpos, rlen = sdispl[order][nz], pos[nz], lens[nz]
        if src.size:
            brk = np.ones(src.size, dtype=bool)
            brk[1:] = src[1:] != src[:-1] + rlen[:-1]
            st = np.flatnonzero(brk)
            src, rpos, rlen = src[st], rpos[st], np.add.reduceat(rlen, st)
            piece = max(int(chunk), -(-total // MAX_PIECES))
            npc = -(-rlen // piece)
            run = np.repeat(np.arange(rlen.size), npc)
            k = np.arange(run.size) - np.repeat(np.cumsum(npc) - npc, npc)
            p_off = k * piece
            p_src = src[run] + p_off
            p_pos = rpos[run] + p_off
            p_len = np.minimum(piece, rlen[run] - p_off)
        else:
            p_src = p_pos = p_len = np.zeros(0, dtype=np.int64)
        p_end = p_pos + p_len
        # receive side
        rcount, rdispl = recv.bcounts, recv.bdispls
        want = np.where(np.arange(p) == r, 0, rcount)  # upper bound until the sender posts
        known = want == 0
        got = np.zeros(p, dtype=np.int64)
        src_off = np.zeros(p, dtype=np.int64)

        # wait until every peer finished reading this rank's region of the previous exchange
        self._spin(lambda: int(hdr[:, DONE].min()) >= e - 1)
        mine = hdr[r]
        mine[PROGRESS] = 0
        mine[TOTAL] = total
        mine[HEAD:HEAD + p] = off
        mine[HEAD + p:] = ln
        self.hwin.Sync()
        mine[EPOCH] = e  # after the layout (ordered stores; Sync is the memory barrier)
        self.hwin.Sync()

        # downloads start after the caller's work queued so far
        be.wait(side, be.record(stream))
        base = int(self.addrs[r])
        events = []
        for a, b, n in zip(p_src.tolist(), p_pos.tolist(), p_len.tolist(), strict=True):
            be.memcpy(base + b, send.addr + a, n, side)
            events.append(be.record(side))
        nown = min(int(rcount[r]), int(scount[r]))
        if nown:
            be.memcpy(recv.addr + int(rdispl[r]), send.addr + int(sdispl[r]), nown, stream)

        published = 0
        npieces = len(events)
        while True:
            moved = False
            while published < npieces and be.done(events[published]):
                published += 1
                moved = True
            if moved:
                mine[PROGRESS] = int(p_end[published - 1])
                self.hwin.Sync()
            if not known.all() or (got < want).any():
                self.hwin.Sync()
                ep = hdr[:, EPOCH].copy()  # epoch first, then progress (ordered loads)
                prog = hdr[:, PROGRESS].copy()
                new = ~known & (ep == e)
                if new.any():
                    idx = np.flatnonzero(new)
                    src_off[idx] = hdr[idx, HEAD + r]
                    want[idx] = np.minimum(rcount[idx], hdr[idx, HEAD + p + r])
                    known |= new
                avail = np.where(known, np.clip(prog - src_off, 0, want), 0)
                for s in np.flatnonzero(avail > got).tolist():
                    a, b = int(got[s]), int(avail[s])
                    be.memcpy(recv.addr + int(rdispl[s]) + a,
                              int(self.addrs[s]) + int(src_off[s]) + a, b - a, stream)
                    got[s] = b
                    moved = True
            if published == npieces and known.all() and not (got < want).any():
                break
            if not moved:
                os.sched_yield()
        be.sync(stream)  # uploads done: peers may reuse their regions
        mine[DONE] = e
        self.hwin.Sync()

    def _spin(self, cond) -> None:
        while True:
            self.hwin.Sync()
            if cond():
                return
            os.sched_yield()


def window(comm: MPI.Intracomm, backend: Any, global_bound: int, local_need: int) -> ShmWindow:
    """The communicator's window, made (collective) or grown to hold this exchange."""
    st = state(comm)
    win = st.slot(_WINDOW)
    if win is None or win.backend is not backend:
        # data window sized by ensure(); set_slot frees the one it replaces
        win = st.set_slot(_WINDOW, ShmWindow(comm, 0, backend))
    win.ensure(global_bound, local_need)
    return win


def free_windows() -> None:
    """Collective over every communicator that used ``shm``: free windows, unpin memory.

    Every rank must call it at the same point (e.g. before ``MPI.Finalize``), like
    :func:`pya2a.gpu.ipc_algorithm.free_engines`. Windows are also freed with their
    communicator.
    """
    for st in live_states():
        win = st.pop_slot(_WINDOW)
        if win is not None:
            win.free()


def exchange(send: VSpec, recv: VSpec, comm: MPI.Intracomm, t: Any,
             max_block: int | None) -> None:
    """One ``shm`` exchange of device buffers on ``comm`` (collective).

    Args:
        send, recv: contiguous device specs (send may be the transport's clone for in place).
        comm: the internal communicator; all its ranks on one node.
        t: the device transport, begun (its stream and backend are used).
        max_block: the largest block over all ranks in bytes (identical everywhere), or None
            to all-reduce it here.
    """
    p = comm.Get_size()
    if max_block is None:
        max_block = int(allreduce_max(comm, int(send.bcounts.max(initial=0))))
    local = int(send.bcounts.sum()) - int(send.bcounts[comm.Get_rank()])
    win = window(comm, t.backend, (p - 1) * int(max_block), local)
    chunk = int(getattr(t, "chunk", 0) or default_chunk())
    win.exchange(send, recv, t, chunk)
