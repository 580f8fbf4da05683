"""Device buffers over an MPI that cannot take device pointers: pinned host staging.

:class:`StagedTransport` gives every algorithm body the same transfer primitives as
:class:`pya2a.transport.HostTransport`, for device buffers, without ever handing a device
pointer to MPI. Each device buffer of the exchange gets a *mirror*: a pinned host buffer of
the same size, taken from a per-device pool that is allocated once and reused across calls.

Data flow of one exchange (three engines run at once):

* device -> host: send-side ranges are copied into their mirror on a side stream in chunks
  of ``chunk`` bytes (``PYA2A_STAGE_CHUNK``, default 4 MiB), the first block an algorithm
  asks for first, then every other block in rotated order; one CUDA event per chunk.
* MPI: messages larger than a chunk travel as several MPI messages of one chunk each (both
  sides cut them identically), so chunk k goes out as soon as its own copy has landed,
  while chunk k+1 is still crossing PCIe.
* host -> device: each received chunk is copied to the device on the caller's stream as soon
  as its MPI request completes.

Coherence: the device copy of every byte is always current in stream order (host writes
are uploaded eagerly); the mirror's valid ranges are tracked per buffer, so a byte is
downloaded at most once unless the device writes it again. Local rearrangement between two
device buffers runs on the GPU (copy engine or the pack kernel); between a device buffer and
host scratch (intermediate hops of store-and-forward algorithms) it runs on the host with
:mod:`pya2a._pack`, so forwarded data crosses PCIe once in each direction, never per hop.

The CUDA calls go through a small *backend* object (:class:`pya2a.gpu.device.CupyBackend`
on real GPUs; the tests substitute an asynchronous host emulation), so this module never
imports CuPy itself.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
from mpi4py import MPI

from ..core import _pack
from ..core.spec import VSpec

__all__ = ["IntervalSet", "PinnedPool", "StagedBuf", "StagedTransport", "DeviceTransport",
           "default_chunk", "pool"]

MiB = 1 << 20
DEFAULT_CHUNK = 4 * MiB
# above this many separate runs, a host->device scatter goes as one upload + one pack kernel
_MAX_RUNS = 8
# send buffers whose blocks span at most this many bytes are downloaded in one copy
_SMALL = 1 << 20


def default_chunk() -> int:
    """Staging chunk in bytes: ``PYA2A_STAGE_CHUNK`` (accepts a K/M/G suffix) or 4 MiB."""
    raw = os.environ.get("PYA2A_STAGE_CHUNK", "").strip().upper()
    if not raw:
        return DEFAULT_CHUNK
    mult = {"K": 1 << 10, "M": MiB, "G": 1 << 30}.get(raw[-1], 1)
    try:
        val = int(float(raw.rstrip("KMGB") or 0) * mult)
    except ValueError:
        raise ValueError(f"PYA2A_STAGE_CHUNK={raw!r} is not a byte count") from None
    if val < 4096:
        raise ValueError(f"PYA2A_STAGE_CHUNK must be at least 4096 bytes, got {val}")
    return val


class IntervalSet:
    """Sorted disjoint half-open byte ranges ``[lo, hi)``."""

    __slots__ = ("iv",)

    def __init__(self) -> None:
        self.iv: list[tuple[int, int]] = []

    def add(self, a: int, b: int) -> None:
        """Include ``[a, b)`` (merging neighbours)."""
        if a >= b:
            return
        out: list[tuple[int, int]] = []
        placed = False
        for x, y in self.iv:
            if y < a:
                out.append((x, y))
            elif x > b:
                if not placed:
                    out.append((a, b))
                    placed = True
                out.append((x, y))
            else:
                a, b = min(a, x), max(b, y)
        if not placed:
            out.append((a, b))
        self.iv = out

    def remove(self, a: int, b: int) -> None:
        """Exclude ``[a, b)``."""
        if a >= b or not self.iv:
            return
        out: list[tuple[int, int]] = []
        for x, y in self.iv:
            if y <= a or x >= b:
                out.append((x, y))
                continue
            if x < a:
                out.append((x, a))
            if y > b:
                out.append((b, y))
        self.iv = out

    def gaps(self, a: int, b: int) -> list[tuple[int, int]]:
        """The parts of ``[a, b)`` not in the set, in order."""
        out: list[tuple[int, int]] = []
        cur = a
        for x, y in self.iv:
            if y <= cur:
                continue
            if x >= b:
                break
            if x > cur:
                out.append((cur, x))
            cur = max(cur, y)
            if cur >= b:
                break
        if cur < b:
            out.append((cur, b))
        return out

    def overlaps(self, a: int, b: int) -> bool:
        """True if some byte of ``[a, b)`` is in the set."""
        return any(x < b and a < y for x, y in self.iv)

    def clear(self) -> None:
        """Remove everything."""
        self.iv = []


def merge_ranges(offs: Sequence[int], lens: Sequence[int]) -> list[tuple[int, int]]:
    """Sorted union of the non-empty ranges ``[offs[i], offs[i] + lens[i])``."""
    iv = sorted((int(o), int(o) + int(n)) for o, n in zip(offs, lens, strict=True) if n > 0)
    out: list[tuple[int, int]] = []
    for a, b in iv:
        if out and a <= out[-1][1]:
            if b > out[-1][1]:
                out[-1] = (out[-1][0], b)
        else:
            out.append((a, b))
    return out


class PinnedPool:
    """Pinned host buffers for one device, allocated on first need and reused.

    ``take(n)`` hands out the smallest cached buffer of at least ``n`` bytes (allocating a
    new one, rounded up to 2 MiB, if none fits); ``give`` returns it. At most ``keep`` free
    buffers are cached. Not thread-safe: one exchange at a time per process and device.
    """

    def __init__(self, backend: Any, keep: int = 8) -> None:
        self.backend = backend
        self.keep = keep
        self.free: list[np.ndarray] = []
        self.allocated_bytes = 0

    def take(self, nbytes: int) -> np.ndarray:
        """A pinned uint8 array of at least ``nbytes`` (its full capacity; slice it)."""
        best = None
        for i, buf in enumerate(self.free):
            if buf.size >= nbytes and (best is None or buf.size < self.free[best].size):
                best = i
        if best is not None:
            return self.free.pop(best)
        cap = max(2 * MiB, -(-int(nbytes) // (2 * MiB)) * 2 * MiB)
        buf = self.backend.pinned(cap)
        self.allocated_bytes += cap
        return buf

    def give(self, buf: np.ndarray) -> None:
        """Return a buffer from :meth:`take`."""
        self.free.append(buf)
        if len(self.free) > self.keep:
            self.free.sort(key=lambda b: b.size)
            drop = self.free.pop(0)
            self.allocated_bytes -= drop.size


_POOLS: dict[tuple[int, int], PinnedPool] = {}


def pool(backend: Any, device: int) -> PinnedPool:
    """The process-wide pinned pool of ``device`` for ``backend``."""
    key = (id(backend), device)
    p = _POOLS.get(key)
    if p is None:
        p = _POOLS[key] = PinnedPool(backend)
    return p


@dataclasses.dataclass(eq=False)
class StagedBuf:
    """A device buffer of the exchange and its pinned host mirror.

    Offsets given to the transport are bytes from the device buffer's start; the same
    offset indexes ``host``.
    """

    ptr: int
    nbytes: int
    host: np.ndarray  # pinned uint8, len >= nbytes
    base: np.ndarray  # the pool buffer (returned at finish)
    readonly: bool
    blocks: list[tuple[int, int]]  # (offset, length) per peer, for send-side prefetch
    have: IntervalSet = dataclasses.field(default_factory=IntervalSet)  # valid or in flight
    pending: list = dataclasses.field(default_factory=list)  # [lo, hi, event] downloads
    uploaded: IntervalSet = dataclasses.field(default_factory=IntervalSet)  # read by H2D
    prefetched: bool = False

    @property
    def hptr(self) -> int:
        """Host address of the mirror."""
        return self.host.ctypes.data


class _Req:
    """One MPI request of a staged operation; a receive knows where to upload."""

    __slots__ = ("req", "done", "sb", "lo", "hi")

    def __init__(self, req: MPI.Request, sb: StagedBuf | None = None, lo: int = 0,
                 hi: int = 0) -> None:
        self.req = req
        self.done = False
        self.sb = sb
        self.lo = lo
        self.hi = hi


class _Op:
    """What isend / irecv return: the chunk requests of one message."""

    __slots__ = ("reqs",)

    def __init__(self) -> None:
        self.reqs: list[_Req] = []


class DeviceTransport:
    """Common part of the device transports: device scope, caller's stream, lifecycle.

    A transport may serve many exchanges (a plan keeps one): each exchange begins on first
    use (:meth:`begin`: enter the buffers' device, take the caller's current stream) and
    ends with :meth:`finish`, which the executor (:func:`pya2a.core.registry.execute`)
    always calls.
    """

    staged = False

    def __init__(self, comm: MPI.Intracomm, device: int, backend: Any) -> None:
        self.comm = comm
        self.device = device
        self.backend = backend
        self.rank = comm.Get_rank()
        self.stream: Any = None
        self._scope: Any = None
        self.active = False

    def begin(self) -> None:
        """Start an exchange (idempotent until :meth:`finish`)."""
        if self.active:
            return
        self._scope = self.backend.use_device(self.device)
        self._scope.__enter__()
        self.stream = self.backend.current_stream()  # uploads and kernels run here
        self.active = True
        self._begin()

    def _begin(self) -> None:
        """Per-exchange state (subclasses)."""

    def _leave(self) -> None:
        if self.active:
            self.active = False
            scope, self._scope = self._scope, None
            scope.__exit__(None, None, None)

    def finish(self, ok: bool = True) -> None:  # pragma: no cover - overridden
        """Complete the exchange: device results visible, buffers returned."""
        if self.active:
            try:
                self.backend.sync(self.stream)
            finally:
                self._leave()

    def native(self, send: VSpec | None, recv: VSpec, kind: str) -> None:
        """The MPI library's own Alltoall(v) on device buffers (``native``).

        One rank: the exchange is the own block, a device-to-device copy in stream order
        (staging it through host memory cost 10 ms for 32 MiB on an H200).
        """
        if self.comm.Get_size() == 1 and (send is None or (send.contiguous and
                                                           recv.contiguous)):
            self.begin()
            n = int(recv.bcounts[0])
            if send is not None and n > 0:
                self.backend.memcpy(recv.addr + int(recv.bdispls[0]),
                                    send.addr + int(send.bdispls[0]), n, self.stream)
            return
        self._native(send, recv, kind)

    def _native(self, send: VSpec | None, recv: VSpec, kind: str) -> None:
        raise NotImplementedError


class StagedTransport(DeviceTransport):
    """Device buffers through pinned host mirrors; MPI only ever sees host memory.

    Args:
        comm: the internal communicator of the exchange.
        device: CUDA/HIP ordinal of the buffers.
        backend: CUDA operations (see :class:`pya2a.gpu.device.CupyBackend`).
        chunk: staging / MPI message chunk in bytes (default :func:`default_chunk`).
    """

    staged = True

    def __init__(self, comm: MPI.Intracomm, device: int, backend: Any,
                 chunk: int | None = None) -> None:
        super().__init__(comm, device, backend)
        self.chunk = int(chunk or default_chunk())
        self.out: Any = None
        self.pool: PinnedPool | None = None
        self._bufs: dict[int, StagedBuf] = {}
        self._specs: list[VSpec] = []  # keep specs alive: _bufs is keyed by id()
        self._scratch: list[np.ndarray] = []
        self._device_tmp: list[object] = []
        self._live: list[_Req] = []
        self._dev_dirty = True

    def _begin(self) -> None:
        self.out = self.backend.side_stream(self.device)  # device -> host downloads
        self.pool = pool(self.backend, self.device)
        self._live = []
        # downloads start after the caller's earlier work on its stream
        self._dev_dirty = True

    # -- buffers ---------------------------------------------------------------------
    def buffer(self, spec: VSpec) -> StagedBuf:
        """The staged view of ``spec``'s device buffer (one per spec per exchange)."""
        self.begin()
        sb = self._bufs.get(id(spec))
        if sb is not None:
            return sb
        if spec.device is None:
            raise TypeError("StagedTransport.buffer: host buffer given to a device transport")
        base = self.pool.take(spec.nbytes)
        blocks = []
        if spec.contiguous:
            blocks = list(zip(spec.bdispls.tolist(), spec.bcounts.tolist(), strict=True))
        sb = StagedBuf(spec.addr, spec.nbytes, base[:spec.nbytes], base, spec.readonly, blocks)
        self._bufs[id(spec)] = sb
        self._specs.append(spec)
        return sb

    def clone(self, spec: VSpec) -> VSpec:
        """A read-only device copy of ``spec``'s buffer (send side of an in-place call)."""
        self.begin()
        keep, ptr = self.backend.alloc(spec.nbytes)
        if spec.nbytes:
            self.backend.memcpy(ptr, spec.addr, spec.nbytes, self.stream)
        self._dev_dirty = True
        self._device_tmp.append(keep)
        return dataclasses.replace(spec, obj=keep, addr=ptr, readonly=True, keepalive=keep)

    def empty(self, nbytes: int) -> np.ndarray:
        """Host scratch (pinned): intermediate hops never go back to the device."""
        self.begin()
        base = self.pool.take(nbytes)
        self._scratch.append(base)
        return base[:int(nbytes)]

    # -- coherence -------------------------------------------------------------------
    def _fence(self) -> None:
        """Make later downloads wait for device work queued so far on the caller's stream."""
        if self._dev_dirty:
            self.backend.wait(self.out, self.backend.record(self.stream))
            self._dev_dirty = False

    def _download(self, sb: StagedBuf, lo: int, hi: int) -> None:
        self._fence()
        be, c = self.backend, self.chunk
        for a in range(lo, hi, c):
            b = min(a + c, hi)
            be.memcpy(sb.hptr + a, sb.ptr + a, b - a, self.out)
            sb.pending.append([a, b, be.record(self.out)])
        sb.have.add(lo, hi)

    def _request_host(self, sb: StagedBuf, a: int, b: int) -> None:
        """Queue downloads for the bytes of ``[a, b)`` the mirror lacks (no waiting)."""
        for lo, hi in sb.have.gaps(a, b):
            self._download(sb, lo, hi)
        if sb.readonly and not sb.prefetched and sb.blocks:
            # the rest of the send buffer streams down behind the first request, in the
            # order direct/pairwise-shift walk peers; the own block is copied on the device
            sb.prefetched = True
            spans = [(o, o + n) for o, n in sb.blocks if n > 0]
            lo = min((s[0] for s in spans), default=0)
            hi = max((s[1] for s in spans), default=0)
            if hi - lo <= _SMALL:  # small exchange: one copy, one event, no per-block calls
                for g in sb.have.gaps(lo, hi):
                    self._download(sb, *g)
                return
            p = len(sb.blocks)
            first = next((j for j, (o, n) in enumerate(sb.blocks) if o <= a < o + n),
                         self.rank)
            for k in range(1, p + 1):
                j = (first + k) % p
                o, n = sb.blocks[j]
                if j == self.rank or n <= 0:
                    continue
                for lo, hi in sb.have.gaps(o, o + n):
                    self._download(sb, lo, hi)

    def _events(self, sb: StagedBuf, a: int, b: int) -> list:
        """Download events covering ``[a, b)`` not yet known complete."""
        be = self.backend
        out, keep = [], []
        for item in sb.pending:
            if item[0] < b and a < item[1]:
                if be.done(item[2]):
                    continue
                out.append(item[2])
            keep.append(item)
        if len(keep) != len(sb.pending):
            sb.pending = keep
        return out

    def _await(self, events: list) -> None:
        """Wait for copy events while keeping MPI progressing (and uploading arrivals)."""
        be = self.backend
        evs = [e for e in events if not be.done(e)]
        while evs:
            if self._live:
                self._progress(block=False)
            else:
                be.event_sync(evs[0])
            evs = [e for e in evs if not be.done(e)]

    def _host_ready(self, sb: StagedBuf, a: int, b: int) -> None:
        """The mirror holds the current bytes of ``[a, b)`` when this returns."""
        if a < b:
            self._request_host(sb, a, b)
            self._await(self._events(sb, a, b))

    def _write_begin(self, sb: StagedBuf, a: int, b: int) -> None:
        """Before the host writes ``[a, b)`` of a mirror: no copy may still touch it."""
        if a >= b:
            return
        self._await(self._events(sb, a, b))
        if sb.uploaded.overlaps(a, b):
            self.backend.sync(self.stream)
            for other in self._bufs.values():
                other.uploaded.clear()

    def _write_end(self, sb: StagedBuf, a: int, b: int) -> None:
        """After the host wrote ``[a, b)`` of a mirror: upload it on the caller's stream."""
        if a >= b:
            return
        sb.have.add(a, b)
        self.backend.memcpy(sb.ptr + a, sb.hptr + a, b - a, self.stream)
        sb.uploaded.add(a, b)

    def _device_wrote(self, sb: StagedBuf, ranges: list[tuple[int, int]]) -> None:
        for a, b in ranges:
            sb.have.remove(a, b)
        self._dev_dirty = True

    # -- point to point --------------------------------------------------------------
    def _chunks(self, off: int, n: int) -> list[tuple[int, int]]:
        if n <= 0:
            return [(off, off)]
        c = self.chunk
        return [(a, min(a + c, off + n)) for a in range(off, off + n, c)]

    def isend(self, buf: StagedBuf | np.ndarray, off: int, n: int, dest: int,
              tag: int) -> _Op:
        """Send ``n`` bytes from ``off``; chunk k leaves once its own download landed."""
        op = _Op()
        if isinstance(buf, StagedBuf):
            self._request_host(buf, off, off + n)
            host = buf.host
            for a, b in self._chunks(off, n):
                self._await(self._events(buf, a, b))
                op.reqs.append(_Req(self.comm.Isend([host[a:b], MPI.BYTE], dest, tag)))
        else:
            for a, b in self._chunks(off, n):
                op.reqs.append(_Req(self.comm.Isend([buf[a:b], MPI.BYTE], dest, tag)))
        self._live.extend(op.reqs)
        return op

    def irecv(self, buf: StagedBuf | np.ndarray, off: int, n: int, source: int,
              tag: int) -> _Op:
        """Receive ``n`` bytes at ``off``; each chunk is uploaded as soon as it arrives."""
        op = _Op()
        if isinstance(buf, StagedBuf):
            self._write_begin(buf, off, off + n)
            for a, b in self._chunks(off, n):
                req = self.comm.Irecv([buf.host[a:b], MPI.BYTE], source, tag)
                op.reqs.append(_Req(req, buf, a, b))
        else:
            for a, b in self._chunks(off, n):
                op.reqs.append(_Req(self.comm.Irecv([buf[a:b], MPI.BYTE], source, tag)))
        self._live.extend(op.reqs)
        return op

    def sendrecv(self, sbuf, soff: int, sn: int, dest: int, rbuf, roff: int, rn: int,
                 source: int, tag: int) -> None:
        """Send ``sn`` bytes to ``dest`` while receiving ``rn`` bytes from ``source``."""
        r = self.irecv(rbuf, roff, rn, source, tag)
        s = self.isend(sbuf, soff, sn, dest, tag)
        self.waitall([r, s])

    def _progress(self, block: bool) -> bool:
        live = self._live
        if not live:
            return False
        reqs = [r.req for r in live]
        idx = MPI.Request.Waitsome(reqs) if block else MPI.Request.Testsome(reqs)
        if not idx:
            return False
        for i in idx:
            r = live[i]
            r.done = True
            if r.sb is not None:
                self._write_end(r.sb, r.lo, r.hi)
        self._live = [r for r in live if not r.done]
        return True

    def waitall(self, reqs: Sequence[_Op]) -> None:
        """Complete the given operations (uploading received chunks as they land)."""
        todo = [r for op in reqs for r in op.reqs if not r.done]
        while todo:
            self._progress(block=True)
            todo = [r for r in todo if not r.done]

    # -- local rearrangement ---------------------------------------------------------
    def copy(self, dst, doff: int, src, soff: int, n: int) -> None:
        """Local copy of ``n`` bytes between any two buffers of the exchange."""
        if n <= 0:
            return
        ds, ss = isinstance(dst, StagedBuf), isinstance(src, StagedBuf)
        if ds and ss:
            self.backend.memcpy(dst.ptr + doff, src.ptr + soff, n, self.stream)
            self._device_wrote(dst, [(doff, doff + n)])
            return
        if ss:
            self._host_ready(src, soff, soff + n)
            src = src.host
        if ds:
            self._write_begin(dst, doff, doff + n)
            dst.host[doff:doff + n] = src[soff:soff + n]
            self._write_end(dst, doff, doff + n)
        else:
            dst[doff:doff + n] = src[soff:soff + n]

    def pack(self, src, src_off: np.ndarray, lens: np.ndarray, dst,
             dst_off: np.ndarray) -> None:
        """Copy block i from ``src[src_off[i]:]`` to ``dst[dst_off[i]:]``, ``lens[i]`` bytes."""
        src_off = np.ascontiguousarray(src_off, dtype=np.int64)
        dst_off = np.ascontiguousarray(dst_off, dtype=np.int64)
        lens = np.ascontiguousarray(lens, dtype=np.int64)
        if not lens.size or not lens.any():
            return
        ds, ss = isinstance(dst, StagedBuf), isinstance(src, StagedBuf)
        if ds and ss:
            _check_blocks("pack", src_off, lens, src.nbytes)
            _check_blocks("pack", dst_off, lens, dst.nbytes)
            self.backend.pack(src.ptr, src_off, lens, dst.ptr, dst_off, self.stream)
            self._device_wrote(dst, merge_ranges(dst_off, lens))
            return
        hsrc = src
        if ss:
            for a, b in merge_ranges(src_off, lens):
                self._request_host(src, a, b)
            for a, b in merge_ranges(src_off, lens):
                self._await(self._events(src, a, b))
            hsrc = src.host
        if not ds:
            _pack.pack(hsrc, src_off, lens, dst, dst_off)
            return
        runs = merge_ranges(dst_off, lens)
        lo, hi = runs[0][0], runs[-1][1]
        self._write_begin(dst, lo, hi)
        _pack.pack(hsrc, src_off, lens, dst.host, dst_off)
        if len(runs) <= _MAX_RUNS:
            for a, b in runs:
                self._write_end(dst, a, b)
            return
        # many scattered runs: one upload of the span, then one kernel puts the blocks
        keep, tmp = self.backend.alloc(hi - lo)
        self._device_tmp.append(keep)
        self.backend.memcpy(tmp, dst.hptr + lo, hi - lo, self.stream)
        dst.uploaded.add(lo, hi)
        self.backend.pack(tmp, dst_off - lo, lens, dst.ptr, dst_off, self.stream)
        for a, b in runs:
            dst.have.add(a, b)

    def gather(self, src, offs: np.ndarray, lens: np.ndarray, dst, start: int = 0) -> int:
        """Pack blocks of ``src`` back to back into ``dst``; returns the end offset."""
        lens = np.ascontiguousarray(lens, dtype=np.int64)
        dst_off = _exclusive(lens, start)
        end = int(start) + int(lens.sum())
        _check_total("gather", start, end, _size(dst))
        self.pack(src, offs, lens, dst, dst_off)
        return end

    def scatter(self, src, dst, offs: np.ndarray, lens: np.ndarray, start: int = 0) -> int:
        """Unpack back-to-back blocks of ``src`` into ``dst``; returns the end offset."""
        lens = np.ascontiguousarray(lens, dtype=np.int64)
        src_off = _exclusive(lens, start)
        end = int(start) + int(lens.sum())
        _check_total("scatter", start, end, _size(src))
        self.pack(src, src_off, lens, dst, offs)
        return end

    # -- the MPI library's own collective, staged ------------------------------------
    def _native(self, send: VSpec | None, recv: VSpec, kind: str) -> None:
        """MPI's Alltoall(v) on the host mirrors (whole-buffer staging, no pipelining)."""
        rb = self.buffer(recv)
        rr = _spec_ranges(recv)
        if send is None:
            self._host_ready_ranges(rb, rr)
            smsg = MPI.IN_PLACE
        else:
            sb = self.buffer(send)
            self._host_ready_ranges(sb, _spec_ranges(send))
            if not recv.contiguous:  # bytes between a datatype's pieces must survive
                self._host_ready(rb, 0, rb.nbytes)
            smsg = _host_message(send, sb.host, kind)
        if rr:
            self._write_begin(rb, rr[0][0], rr[-1][1])
        rmsg = _host_message(recv, rb.host, kind)
        if kind == "alltoall":
            self.comm.Alltoall(smsg, rmsg)
        else:
            self.comm.Alltoallv(smsg, rmsg)
        for a, b in rr:
            self._write_end(rb, a, b)

    def _host_ready_ranges(self, sb: StagedBuf, ranges: list[tuple[int, int]]) -> None:
        for a, b in ranges:
            self._request_host(sb, a, b)
        for a, b in ranges:
            self._await(self._events(sb, a, b))

    # -- end of exchange -------------------------------------------------------------
    def finish(self, ok: bool = True) -> None:
        """Wait for the last uploads, return mirrors and scratch to the pool.

        After a failure with MPI requests still pending, their host buffers are not reused
        (MPI may still write them); they are left to the garbage collector.
        """
        if not self.active:
            return
        try:
            if ok and self._live:
                self.waitall([_as_op(self._live)])
            self.backend.sync(self.out)
            self.backend.sync(self.stream)
        finally:
            if ok and not self._live:
                for sb in self._bufs.values():
                    self.pool.give(sb.base)
                for base in self._scratch:
                    self.pool.give(base)
            self._bufs.clear()
            self._specs.clear()
            self._scratch.clear()
            self._device_tmp.clear()
            self._leave()


def _as_op(reqs: list[_Req]) -> _Op:
    op = _Op()
    op.reqs = list(reqs)
    return op


def _size(buf) -> int:
    return buf.nbytes if isinstance(buf, StagedBuf) else int(buf.size)


def _exclusive(lens: np.ndarray, start: int) -> np.ndarray:
    out = np.empty_like(lens)
    if lens.size:
        out[0] = 0
        np.cumsum(lens[:-1], out=out[1:])
    return out + int(start)


def _check_total(what: str, start: int, end: int, size: int) -> None:
    if start < 0 or end > size:
        raise ValueError(f"{what}: bytes {start}..{end} do not fit in {size} bytes")


def _check_blocks(what: str, offs: np.ndarray, lens: np.ndarray, size: int) -> None:
    bad = (lens < 0) | (offs < 0) | (offs + lens > size)
    if bad.any():
        i = int(np.argmax(bad))
        raise ValueError(f"{what}: block {i} (offset {offs[i]}, length {lens[i]}) outside "
                         f"a buffer of {size} bytes")


def _spec_ranges(spec: VSpec) -> list[tuple[int, int]]:
    """Bytes an MPI call may touch in ``spec``'s buffer (exact for dense datatypes)."""
    if spec.contiguous:
        return merge_ranges(spec.bdispls.tolist(), spec.bcounts.tolist())
    nz = spec.counts > 0
    if not nz.any():
        return []
    lo = spec.displs[nz] * spec.extent + spec.true_lb
    hi = (spec.displs[nz] + spec.counts[nz] - 1) * spec.extent + spec.true_lb + spec.true_extent
    return [(max(0, int(lo.min())), min(spec.nbytes, int(hi.max())))]


def _host_message(spec: VSpec, host: np.ndarray, kind: str) -> list:
    if kind == "alltoall":
        return [host, (int(spec.counts[0]), int(spec.displs[0])), spec.datatype]
    return [host, (spec.counts, spec.mpi_displs()), spec.datatype]


class AwareTransport(DeviceTransport):
    """Device pointers straight to a CUDA-aware MPI; rearrangement with the pack kernel.

    MPI is handed a raw address (``MPI.buffer.fromaddress``); before any MPI call the
    caller's stream is synchronised if device work was queued since the last one.
    """

    staged = False

    def __init__(self, comm: MPI.Intracomm, device: int, backend: Any) -> None:
        super().__init__(comm, device, backend)
        self._dirty = True
        self._keep: list[object] = []

    def _begin(self) -> None:
        self._dirty = True

    def _mpi_ready(self) -> None:
        if self._dirty:
            self.backend.sync(self.stream)
            self._dirty = False

    def buffer(self, spec: VSpec) -> _DevBuf:
        """The device buffer of ``spec`` as (address, size)."""
        self.begin()
        return _DevBuf(spec.addr, spec.nbytes, spec.keepalive)

    def clone(self, spec: VSpec) -> VSpec:
        """A read-only device copy of ``spec``'s buffer."""
        self.begin()
        keep, ptr = self.backend.alloc(spec.nbytes)
        if spec.nbytes:
            self.backend.memcpy(ptr, spec.addr, spec.nbytes, self.stream)
        self._dirty = True
        self._keep.append(keep)
        return dataclasses.replace(spec, obj=keep, addr=ptr, readonly=True, keepalive=keep)

    def empty(self, nbytes: int) -> _DevBuf:
        """Device scratch."""
        self.begin()
        keep, ptr = self.backend.alloc(nbytes)
        self._keep.append(keep)
        return _DevBuf(ptr, int(nbytes), keep)

    def _msg(self, buf: _DevBuf, off: int, n: int) -> list:
        if off < 0 or n < 0 or off + n > buf.nbytes:
            raise ValueError(f"bytes {off}..{off + n} outside a {buf.nbytes}-byte buffer")
        return [MPI.buffer.fromaddress(buf.ptr + off, n), MPI.BYTE]

    def isend(self, buf: _DevBuf, off: int, n: int, dest: int, tag: int) -> MPI.Request:
        """Start sending device bytes."""
        self._mpi_ready()
        return self.comm.Isend(self._msg(buf, off, n), dest, tag)

    def irecv(self, buf: _DevBuf, off: int, n: int, source: int, tag: int) -> MPI.Request:
        """Start receiving into device memory."""
        self._mpi_ready()
        return self.comm.Irecv(self._msg(buf, off, n), source, tag)

    def sendrecv(self, sbuf: _DevBuf, soff: int, sn: int, dest: int, rbuf: _DevBuf,
                 roff: int, rn: int, source: int, tag: int) -> None:
        """Blocking exchange of device bytes."""
        self._mpi_ready()
        self.comm.Sendrecv(self._msg(sbuf, soff, sn), dest, tag, self._msg(rbuf, roff, rn),
                           source, tag)

    @staticmethod
    def waitall(reqs: Sequence[MPI.Request]) -> None:
        """Complete all requests."""
        if reqs:
            MPI.Request.Waitall(list(reqs))

    def copy(self, dst: _DevBuf, doff: int, src: _DevBuf, soff: int, n: int) -> None:
        """Device-to-device copy on the caller's stream."""
        if n > 0:
            self.backend.memcpy(dst.ptr + doff, src.ptr + soff, n, self.stream)
            self._dirty = True

    def pack(self, src: _DevBuf, src_off: np.ndarray, lens: np.ndarray, dst: _DevBuf,
             dst_off: np.ndarray) -> None:
        """All blocks in one kernel launch."""
        src_off = np.ascontiguousarray(src_off, dtype=np.int64)
        dst_off = np.ascontiguousarray(dst_off, dtype=np.int64)
        lens = np.ascontiguousarray(lens, dtype=np.int64)
        if lens.size and lens.any():
            _check_blocks("pack", src_off, lens, src.nbytes)
            _check_blocks("pack", dst_off, lens, dst.nbytes)
            self.backend.pack(src.ptr, src_off, lens, dst.ptr, dst_off, self.stream)
            self._dirty = True

    def gather(self, src: _DevBuf, offs: np.ndarray, lens: np.ndarray, dst: _DevBuf,
               start: int = 0) -> int:
        """Pack blocks back to back into ``dst``; returns the end offset."""
        lens = np.ascontiguousarray(lens, dtype=np.int64)
        end = int(start) + int(lens.sum())
        _check_total("gather", start, end, dst.nbytes)
        self.pack(src, offs, lens, dst, _exclusive(lens, start))
        return end

    def scatter(self, src: _DevBuf, dst: _DevBuf, offs: np.ndarray, lens: np.ndarray,
                start: int = 0) -> int:
        """Unpack back-to-back blocks into ``dst``; returns the end offset."""
        lens = np.ascontiguousarray(lens, dtype=np.int64)
        end = int(start) + int(lens.sum())
        _check_total("scatter", start, end, src.nbytes)
        self.pack(src, _exclusive(lens, start), lens, dst, offs)
        return end

    def _native(self, send: VSpec | None, recv: VSpec, kind: str) -> None:
        """MPI's own collective on raw device addresses (the MPI is CUDA-aware)."""
        self.begin()
        self._mpi_ready()
        smsg = MPI.IN_PLACE if send is None else _raw_message(send, kind)
        rmsg = _raw_message(recv, kind)
        if kind == "alltoall":
            self.comm.Alltoall(smsg, rmsg)
        else:
            self.comm.Alltoallv(smsg, rmsg)

    def finish(self, ok: bool = True) -> None:
        """Synchronise the caller's stream; drop scratch."""
        if not self.active:
            return
        try:
            self.backend.sync(self.stream)
        finally:
            self._keep.clear()
            self._leave()


def _raw_message(spec: VSpec, kind: str) -> list:
    buf = MPI.buffer.fromaddress(spec.addr, spec.nbytes)
    if kind == "alltoall":
        return [buf, (int(spec.counts[0]), int(spec.displs[0])), spec.datatype]
    return [buf, (spec.counts, spec.mpi_displs()), spec.datatype]


@dataclasses.dataclass(frozen=True)
class _DevBuf:
    ptr: int
    nbytes: int
    keepalive: object = None
