"""Intra-node GPU all-to-all over CUDA/HIP IPC (the ``ipc`` algorithm).

Ranks of one node, one GPU each, every pair peer-accessible (NVLink / NVSwitch or
xGMI). One kernel launch moves every peer block; ranks signal each other with
sequence-numbered flags in peer memory, so there is no host barrier and no
allocation per call, calls are stream-ordered and capturable in a CUDA graph.

Counts are exchanged device-side: each rank knows only its own ``sendcounts`` and
``recvcounts`` (which must agree pairwise, as in MPI). In the default push method
a receiver writes, into each sender's control block, where that sender must store
its block (the receiver's buffer if it is symmetric, else its staging slot for that
sender), with the call number as flag; the sender stores its block there and raises
a per-chunk flag in the receiver's control block. See docs/gpu-ipc.md for costs.

Example::

    eng = IpcAlltoallv(comm, capacity_bytes=1 << 24)
    recv = eng.alloc_symmetric(nbytes)           # receives in place, no staging copy
    eng.alltoallv(send, sc, sd, recv, rc, rd)    # counts/displs in bytes, numpy int64
    eng.free()
"""

from __future__ import annotations

import ctypes
import os
from typing import Any

import numpy as np

from .ipc import (
    CTRL_BYTES,
    MAX_CHUNKS,
    MAX_PEERS,
    STAGED,
    IpcGroup,
    SymmetricAlloc,
    _cupy,
    check_ipc,
)

__all__ = ["IpcAlltoallv", "METHODS"]

METHODS = ("push", "pull", "ce")

_P = MAX_PEERS
# Must match struct Args in kernels/ipc_alltoallv.cu (all fields 8 bytes wide).
_ARGS_DTYPE = np.dtype(
    [
        ("sendbuf", np.uint64),
        ("recvbuf", np.uint64),
        ("ctrl", np.uint64),
        ("peer_ctrl", np.uint64, (_P,)),
        ("my_key", np.uint64),
        ("stage_off", np.uint64),
        ("slot_bytes", np.int64),
        ("scount", np.int64, (_P,)),
        ("sdispl", np.int64, (_P,)),
        ("rcount", np.int64, (_P,)),
        ("rdispl", np.int64, (_P,)),
        ("rank", np.int64),
        ("p", np.int64),
        ("bpp", np.int64),
        ("min_chunk", np.int64),
        ("max_chunks", np.int64),
        ("mode", np.int64),
    ]
)
_THREADS = 512
_KERNEL_FILE = os.path.join(os.path.dirname(__file__), "kernels", "ipc_alltoallv.cu")
_MODULES: dict[int, Any] = {}


def _module(cp: Any, device: int) -> Any:
    """The compiled RawModule for ``device`` (compiled once per process and device)."""
    mod = _MODULES.get(device)
    if mod is None:
        with open(_KERNEL_FILE, encoding="utf-8") as f:
            src = f.read()
        opts: tuple[str, ...] = ("-std=c++17",)
        mod = cp.RawModule(code=src, options=opts)
        _MODULES[device] = mod
    return mod


def _ptr_nbytes(buf: Any) -> tuple[int, int]:
    """Device address and size in bytes of a CuPy array or ``__cuda_array_interface__`` object."""
    data = getattr(buf, "data", None)
    ptr = getattr(data, "ptr", None)
    if ptr is not None and hasattr(buf, "nbytes"):
        if not buf.flags.c_contiguous:
            raise ValueError("IpcAlltoallv: buffers must be C-contiguous")
        return int(ptr), int(buf.nbytes)
    cai = getattr(buf, "__cuda_array_interface__", None)
    if cai is None:
        raise TypeError(f"IpcAlltoallv: expected a device array, got {type(buf).__name__}")
    if cai.get("strides") is not None:
        raise ValueError("IpcAlltoallv: buffers must be C-contiguous")
    n = int(np.dtype(cai["typestr"]).itemsize)
    for d in cai["shape"]:
        n *= int(d)
    return int(cai["data"][0]), n


def _stream_ptr(cp: Any, stream: Any) -> int:
    if stream is None:
        return int(cp.cuda.get_current_stream().ptr)
    if isinstance(stream, int):
        return stream
    for attr in ("ptr", "cuda_stream"):
        v = getattr(stream, attr, None)
        if v is not None:
            return int(v)
    raise TypeError(f"IpcAlltoallv: cannot use {type(stream).__name__} as a stream")


class IpcPlan:
    """A prepared call: arguments packed once, :meth:`run` only launches."""

    def __init__(self, eng: IpcAlltoallv, args: np.ndarray, grid: int, method: str,
                 copies: list[tuple[int, int, int]], self_copy: tuple[int, int, int]) -> None:
        self._eng = eng
        self._args = args
        self._grid = grid
        self._method = method
        self._copies = copies
        self._self_copy = self_copy

    def run(self, *, stream: Any = None) -> None:
        """Launch the exchange on ``stream`` (default: current stream); no host sync."""
        self._eng._launch(self._args, self._grid, self._method, self._copies,
                          self._self_copy, _stream_ptr(self._eng._cp, stream))


class IpcAlltoallv:
    """All-to-all(v) between the GPUs of one node through IPC-mapped memory.

    Args:
        comm: mpi4py intracommunicator; all ranks on one node, one GPU each
            (check with :meth:`available` first). Collective.
        capacity_bytes: largest block (bytes) one rank receives from one peer in one
            call when the receive buffer is not symmetric; sizes the staging slots
            (``size * capacity_bytes`` of device memory per rank). Must be the same
            on every rank.
        device: CUDA device ordinal; default the current device.
        min_chunk: bytes per chunk below which a pair's block is not split across
            more thread blocks (same on every rank).
    """

    @staticmethod
    def available(comm: Any, *, device: int | None = None) -> tuple[bool, str]:
        """Collective: ``(True, "ok")`` if the backend can run on ``comm``, else ``(False, why)``.

        Same answer on every rank. Needs CuPy, all ranks on one node, one distinct GPU
        per rank, at most 8 ranks, and peer access between every pair of GPUs.
        """
        return check_ipc(comm, device)

    def __init__(self, comm: Any, capacity_bytes: int, *, device: int | None = None,
                 min_chunk: int = 32 * 1024) -> None:
        cp = _cupy()
        self._cp = cp
        if capacity_bytes < 0:
            raise ValueError("IpcAlltoallv: capacity_bytes must be >= 0")
        self.group = IpcGroup(comm, device=device)
        self.rank = self.group.rank
        self.size = self.group.size
        self.device = self.group.device
        p = self.size
        if p > MAX_PEERS:
            raise ValueError(f"IpcAlltoallv: at most {MAX_PEERS} ranks, got {p}")
        self.slot_bytes = (int(capacity_bytes) + 255) // 256 * 256
        caps = self.group.comm.allgather(self.slot_bytes)
        if len(set(caps)) != 1:
            raise ValueError(f"IpcAlltoallv: capacity_bytes differs across ranks: {caps}")
        with cp.cuda.Device(self.device):
            sms = cp.cuda.Device(self.device).attributes["MultiProcessorCount"]
            self._mod = _module(cp, self.device)
            self._k_main = self._mod.get_function("pya2a_ipc_alltoallv")
            self._k_pre = self._mod.get_function("pya2a_ipc_ce_pre")
            self._k_post = self._mod.get_function("pya2a_ipc_ce_post")
            self._streams = [cp.cuda.Stream(non_blocking=True) for _ in range(max(p - 1, 1))]
            self._ev_fork = cp.cuda.Event(disable_timing=True)
            self._ev_join = [cp.cuda.Event(disable_timing=True) for _ in self._streams]
        # Co-residency: every block may spin on flags from other GPUs.
        smin = min(self.group.comm.allgather(int(sms)))
        self.max_chunks = max(1, min(MAX_CHUNKS, smin // p))
        self.min_chunk = int(min_chunk)
        self.heap = self.group.allocate(CTRL_BYTES + p * self.slot_bytes)
        self._template = np.zeros((), dtype=_ARGS_DTYPE)
        t = self._template
        t["ctrl"] = self.heap.ptr
        t["peer_ctrl"][:p] = self.heap.peer_ptrs
        t["stage_off"] = CTRL_BYTES
        t["slot_bytes"] = self.slot_bytes
        t["rank"] = self.rank
        t["p"] = p
        t["min_chunk"] = self.min_chunk
        t["max_chunks"] = self.max_chunks
        self._freed = False

    # ------------------------------------------------------------------ memory
    def alloc_symmetric(self, nbytes: int, dtype: Any = np.uint8, shape: Any = None) -> Any:
        """Collective: a CuPy array in symmetric IPC memory (same ``nbytes`` on every rank).

        Receiving into such an array skips the staging copy (push); sending from one
        enables the ``pull`` method. The memory lives until :meth:`free`.
        """
        dt = np.dtype(dtype)
        if shape is None:
            shape = (int(nbytes) // dt.itemsize,)
        alloc = self.group.allocate(int(nbytes))
        return self.group.as_array(alloc, shape, dt)

    def symmetric(self, buf: Any) -> SymmetricAlloc | None:
        """The symmetric allocation holding ``buf`` on this rank, or None."""
        ptr, n = _ptr_nbytes(buf)
        return self.group.find(ptr, n)

    # ------------------------------------------------------------------ calls
    def _pack(self, sendbuf: Any, sendcounts: Any, sdispls: Any, recvbuf: Any,
              recvcounts: Any, rdispls: Any, method: str) -> tuple[np.ndarray, int, list, tuple]:
        if self._freed:
            raise ValueError("IpcAlltoallv: used after free()")
        if method not in METHODS:
            raise ValueError(f"IpcAlltoallv: unknown method {method!r}, known: {METHODS}")
        p = self.size
        sc = np.asarray(sendcounts, dtype=np.int64)
        sd = np.asarray(sdispls, dtype=np.int64)
        rc = np.asarray(recvcounts, dtype=np.int64)
        rd = np.asarray(rdispls, dtype=np.int64)
        for name, arr in (("sendcounts", sc), ("sdispls", sd), ("recvcounts", rc), ("rdispls", rd)):
            if arr.shape != (p,):
                raise ValueError(f"IpcAlltoallv: {name} has shape {arr.shape}, expected ({p},)")
        sptr, sn = _ptr_nbytes(sendbuf)
        rptr, rn = _ptr_nbytes(recvbuf)
        if p and (sc.min() < 0 or rc.min() < 0 or sd.min() < 0 or rd.min() < 0):
            raise ValueError("IpcAlltoallv: negative count or displacement")
        if p and int((sd + sc).max()) > sn:
            raise ValueError(f"IpcAlltoallv: send blocks exceed sendbuf ({sn} bytes)")
        if p and int((rd + rc).max()) > rn:
            raise ValueError(f"IpcAlltoallv: receive blocks exceed recvbuf ({rn} bytes)")
        if sc[self.rank] != rc[self.rank]:
            raise ValueError("IpcAlltoallv: sendcounts[rank] != recvcounts[rank]")
        a = self._template.copy()
        a["sendbuf"] = sptr
        a["recvbuf"] = rptr
        a["scount"][:p] = sc
        a["sdispl"][:p] = sd
        a["rcount"][:p] = rc
        a["rdispl"][:p] = rd
        copies: list[tuple[int, int, int]] = []
        self_copy = (rptr + int(rd[self.rank]), sptr + int(sd[self.rank]), int(sc[self.rank]))
        if method == "pull":
            alloc = self.group.find(sptr, sn)
            if alloc is None:
                raise ValueError("IpcAlltoallv: method 'pull' needs a symmetric sendbuf "
                                 "(alloc_symmetric)")
            a["my_key"] = alloc.key(sptr)
            a["mode"] = 1
        elif method == "push":
            alloc = self.group.find(rptr, rn)
            a["my_key"] = alloc.key(rptr) if alloc is not None else STAGED
            if alloc is None:
                self._check_slots(rc)
        else:  # ce: copy engines into the receivers' staging slots
            a["my_key"] = STAGED
            self._check_slots(rc)
            self._check_slots(sc)
            for q in range(1, p):
                dst = (self.rank + q) % p
                n = int(sc[dst])
                if n:
                    remote = self.heap.peer_ptrs[dst] + CTRL_BYTES + self.rank * self.slot_bytes
                    copies.append((remote, sptr + int(sd[dst]), n))
                else:
                    copies.append((0, 0, 0))
        m = int(max(sc.max(), rc.max())) if p else 0
        if method == "ce":
            bpp = self.max_chunks
        else:
            bpp = min(self.max_chunks, max(1, -(-m // self.min_chunk)))
        a["bpp"] = bpp
        return a, p * bpp, copies, self_copy

    def _check_slots(self, counts: np.ndarray) -> None:
        big = int(counts.max()) if counts.size else 0
        if big > self.slot_bytes:
            raise ValueError(
                f"IpcAlltoallv: a {big}-byte block exceeds capacity_bytes={self.slot_bytes}; "
                "use a symmetric receive buffer or a larger capacity")

    def _launch(self, args: np.ndarray, grid: int, method: str,
                copies: list[tuple[int, int, int]], self_copy: tuple[int, int, int],
                stream: int) -> None:
        cp = self._cp
        drv = cp.cuda.driver
        params = (ctypes.c_void_p * 1)(args.ctypes.data)
        with cp.cuda.Device(self.device):
            if method != "ce":
                drv.launchKernel(self._k_main.kernel.ptr, grid, 1, 1, _THREADS, 1, 1, 0,
                                 stream, ctypes.addressof(params), 0)
                return
            rt = cp.cuda.runtime
            drv.launchKernel(self._k_pre.kernel.ptr, 1, 1, 1, 32, 1, 1, 0,
                             stream, ctypes.addressof(params), 0)
            rt.eventRecord(self._ev_fork.ptr, stream)
            for i, (dst, src, n) in enumerate(copies):
                if n:
                    s = self._streams[i].ptr
                    rt.streamWaitEvent(s, self._ev_fork.ptr)
                    rt.memcpyAsync(dst, src, n, rt.memcpyDefault, s)
                    rt.eventRecord(self._ev_join[i].ptr, s)
                    rt.streamWaitEvent(stream, self._ev_join[i].ptr)
            d, s_, n = self_copy
            if n:
                rt.memcpyAsync(d, s_, n, rt.memcpyDefault, stream)
            drv.launchKernel(self._k_post.kernel.ptr, grid, 1, 1, _THREADS, 1, 1, 0,
                             stream, ctypes.addressof(params), 0)

    def alltoallv(self, sendbuf: Any, sendcounts: Any, sdispls: Any, recvbuf: Any,
                  recvcounts: Any, rdispls: Any, *, stream: Any = None,
                  method: str = "push") -> None:
        """Exchange blocks between all ranks; stream-ordered, returns without host sync.

        Args:
            sendbuf: contiguous CuPy array (any dtype) or ``__cuda_array_interface__``
                object on this rank's GPU.
            sendcounts, sdispls: host int64 arrays of length ``size``, in BYTES:
                block for rank ``j`` is ``sendbuf[sdispls[j] : sdispls[j] + sendcounts[j]]``.
            recvbuf: like ``sendbuf``; must not overlap it. If it lies in memory from
                :meth:`alloc_symmetric`, peers write into it directly; otherwise they
                write into staging slots and this rank copies them out.
            recvcounts, rdispls: as above for the receive side; ``recvcounts[i]`` here
                must equal ``sendcounts[me]`` on rank ``i`` (not checked: a mismatch
                hangs or truncates).
            stream: CuPy stream, raw ``cudaStream_t`` int, or torch stream; default the
                current CuPy stream.
            method: ``"push"`` (SM stores into peers), ``"pull"`` (SM loads from
                peers; sendbuf must be symmetric) or ``"ce"`` (copy engines into the
                peers' staging slots). Must be the same on every rank for one call.
        """
        args, grid, copies, self_copy = self._pack(sendbuf, sendcounts, sdispls, recvbuf,
                                                   recvcounts, rdispls, method)
        self._launch(args, grid, method, copies, self_copy, _stream_ptr(self._cp, stream))

    def plan(self, sendbuf: Any, sendcounts: Any, sdispls: Any, recvbuf: Any,
             recvcounts: Any, rdispls: Any, *, method: str = "push") -> IpcPlan:
        """Pack a call once; ``plan.run(stream=...)`` repeats it with minimal host work.

        Same arguments as :meth:`alltoallv`; the buffers are bound by address, so
        their contents may change between runs but not their location.
        """
        args, grid, copies, self_copy = self._pack(sendbuf, sendcounts, sdispls, recvbuf,
                                                   recvcounts, rdispls, method)
        return IpcPlan(self, args, grid, method, copies, self_copy)

    def free(self) -> None:
        """Collective: release symmetric memory and peer mappings. Idempotent."""
        if self._freed:
            return
        self._freed = True
        self.group.free()
