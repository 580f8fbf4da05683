"""Intra-node GPU all-to-all over CUDA/HIP IPC (the ``ipc`` algorithm).

Ranks of one node, every pair of GPUs peer-accessible (NVLink / NVSwitch or xGMI);
several ranks may share a GPU (docs/gpu-ipc.md, "Ranks sharing a GPU"). One kernel
launch moves every peer block; ranks signal each other with sequence-numbered flags in
peer memory, so there is no host barrier and no allocation per call, calls are
stream-ordered and capturable in a CUDA graph.

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
    eng.alltoallv(send, sc, sd, pool_buf, rc, rd, method="ce")  # registered: copies in place
    eng.free()

Receive buffers that are not symmetric (a CuPy pool array, a torch tensor) can be
*registered* (:meth:`IpcAlltoallv.register_recv`, collective): every rank finds its
buffer's ``cudaMalloc`` allocation, exports its IPC handle with the offset from the
allocation base, and opens the peers' handles once (process-wide cache, reference
counted). Per call only a one-int64 ``Allgather`` (a digest of each rank's buffer identity:
allocation id, offset, size, rdispls) runs; handles and displacements are all-gathered
only for a combination of buffers not seen among the last ``KEEP_MAPS``.
``push`` and ``ce`` then write straight into the peers' buffers (no staging copy).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
from collections import OrderedDict
from typing import Any

import numpy as np

from ..core._pack import int64_key as _int64_key
from ..core.validate import allgather_object
from . import cupy as _cupy
from . import loader
from .ipc import (
    CTRL_BYTES,
    KEY_SHIFT,
    MAX_CHUNKS,
    MAX_PEERS,
    STAGED,
    IpcGroup,
    SymmetricAlloc,
    allocation_of,
    check_ipc,
    close_handle,
    export_handle,
    grid_budget,
    mapped,
    open_handle,
)

__all__ = ["IpcAlltoallv", "METHODS"]

METHODS = ("ll", "push", "pull", "ce")

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
        ("ll_off", np.uint64),
        ("ll_slot", np.int64),
        ("self_blocks", np.int64),
        ("ce_sub", np.int64),
        ("reg_base", np.uint64, (_P,)),
    ]
)
_THREADS = 512

# Programmatic dependent launch (Hopper and later): single-launch calls may go through
# cuLaunchKernelEx with CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION, so the next
# call's grid is scheduled while this one drains; the kernels begin with griddepcontrol.wait
# (the previous grid complete, its memory visible) and then release their own dependents.
# Measured on 4 x H200 (bench/results/gpu_ll_latency_h200x4.json): about 1 us less per ll
# plan call at 128 B-256 KiB (4.12 -> 3.12 us at 128 B; in a graph 3.07 -> 2.59 us). On by
# default where the driver has cuLaunchKernelEx and the GPU is sm_90+; PYA2A_IPC_PDL=0 turns
# it off.
# Launches go through the Cython module _launch (one C call into a dlopen'ed libcuda);
# without it (not built, or no libcuda, e.g. ROCm) through CuPy, and without PDL.
try:
    from . import _launch as _fastlaunch
except ImportError:  # extension not built: CuPy launches
    _fastlaunch = None


def _fast_launch() -> Any:
    """The Cython launcher module if it can reach the driver, else None."""
    if _fastlaunch is not None and _fastlaunch.available():
        return _fastlaunch
    return None


def pdl_supported(cp: Any, device: int) -> bool:
    """Whether this driver and GPU can launch with programmatic dependent launch (sm_90+)."""
    fl = _fast_launch()
    if fl is None or not fl.has_launch_ex():
        return False
    major = cp.cuda.Device(device).compute_capability[:-1]
    return int(major or 0) >= 9


def _pdl_wanted(cp: Any, device: int, shared: bool = False) -> bool:
    """PDL for this rank (it only orders this rank's own stream, so ranks need not agree):
    ``PYA2A_IPC_PDL=0|1`` decides; by default on where supported, except when ranks share
    the GPU (there an early-resident next grid takes SMs that other ranks' kernels need)."""
    env = os.environ.get("PYA2A_IPC_PDL", "")
    if env == "0" or (shared and env != "1"):
        return False
    return pdl_supported(cp, device)


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


_I64 = np.dtype(np.int64)


def _counts_key(x: Any) -> bytes:
    if type(x) is np.ndarray and x.dtype == _I64:
        return x.tobytes()
    return np.asarray(x, dtype=np.int64).tobytes()


def _buf_key(buf: Any) -> tuple:
    data = getattr(buf, "data", None)
    if data is not None and hasattr(data, "ptr"):  # CuPy: address, size and layout
        c = getattr(buf, "_c_contiguous", None)  # CuPy's attribute; .flags builds an object
        return (data.ptr, buf.nbytes, buf.flags.c_contiguous if c is None else c)
    return _ptr_nbytes(buf)


def _layout_key(sendcounts: Any, sdispls: Any, recvcounts: Any, rdispls: Any) -> Any:
    """Cache key of the counts and displacements (one bytes object in the common case)."""
    k = _int64_key(sendcounts, sdispls, recvcounts, rdispls)
    if k is None:
        k = (_counts_key(sendcounts), _counts_key(sdispls), _counts_key(recvcounts),
             _counts_key(rdispls))
    return k


class Registration:
    """Where every rank's receive buffer is, as agreed by :meth:`IpcAlltoallv.register_recv`.

    Attributes:
        epoch: increases with every exchange (part of the engine's call cache key).
        bases: per rank, the base of its receive buffer's allocation in this process
            (kernel argument ``reg_base``; 0 where not registered).
        addr: per rank, the address in this process of that rank's receive buffer (its
            first byte), or None where that rank receives through staging slots.
        rdispls: per rank, its receive displacements in bytes (as registered).
        my_key: this rank's kernel key for its receive buffer (``push``), STAGED if none.
        everyone: True if every rank's receive buffer is reachable (same on every rank).
        handles: peer handles this registration keeps mapped.
    """

    __slots__ = ("epoch", "addr", "bases", "rdispls", "my_key", "everyone", "handles", "ident")

    def __init__(self, epoch: int, addr: list, bases: list, rdispls: list, my_key: int,
                 handles: list, ident: tuple) -> None:
        self.epoch = epoch
        self.addr = addr
        self.bases = bases
        self.rdispls = rdispls
        self.my_key = my_key
        self.everyone = all(a is not None for a in addr)
        self.handles = handles
        self.ident = ident

    @property
    def direct_here(self) -> bool:
        """This rank's receive buffer is written in place by its peers."""
        return self.my_key != STAGED


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


KEY_REGISTERED = 255  # kernels/ipc_alltoallv.cu: key index of a registered buffer


def _in_place() -> Any:
    from mpi4py import MPI

    return MPI.IN_PLACE


class _Call:
    """One packed call: kernel argument block, grid, and copy-engine work."""

    __slots__ = ("args", "params", "paddr", "grid", "method", "copies", "self_copy", "qvals",
                 "qparams", "launcher")

    def __init__(self, args: np.ndarray, grid: int, method: str,
                 copies: list[tuple[int, int, int, int, int]],
                 self_copy: tuple[int, int, int], fn: int) -> None:
        self.args = args
        self.params = (ctypes.c_void_p * 1)(args.ctypes.data)
        self.paddr = ctypes.addressof(self.params)
        self.grid = grid
        self.method = method
        self.copies = copies
        self.self_copy = self_copy
        # ce_flag(args, q, j) parameter blocks, one per sub-copy
        self.qvals = [(ctypes.c_int64(c[0]), ctypes.c_int64(c[4])) for c in copies]
        self.qparams = [(ctypes.c_void_p * 3)(args.ctypes.data, ctypes.addressof(q),
                                              ctypes.addressof(j)) for q, j in self.qvals]
        # single-launch methods: one C call per run (Cython launcher), when available
        fl = _fast_launch()
        self.launcher = (fl.Launcher(fn, grid, _THREADS, args.ctypes.data, args)
                         if fl is not None and method != "ce" else None)


class IpcPlan:
    """A prepared call: arguments packed once, :meth:`run` only launches."""

    def __init__(self, eng: IpcAlltoallv, call: _Call, reg: Registration | None = None) -> None:
        self._eng = eng
        self._call = call
        self.method = call.method
        self._reg = reg  # keeps the peers' mappings it writes into open
        if reg is not None:
            eng._pin(reg, 1)

    def __del__(self) -> None:
        reg = getattr(self, "_reg", None)
        if reg is not None:
            self._eng._pin(reg, -1)

    def run(self, *, stream: Any = None) -> None:
        """Launch the exchange on ``stream`` (default: current stream); no host sync."""
        self._eng._launch(self._call, _stream_ptr(self._eng._cp, stream))


class IpcAlltoallv:
    """All-to-all(v) between the GPUs of one node through IPC-mapped memory.

    Args:
        comm: mpi4py intracommunicator; all ranks on one node, a GPU each or several
            ranks sharing one (check with :meth:`available` first). Collective.
        capacity_bytes: largest block (bytes) one rank receives from one peer in one
            call when the receive buffer is not symmetric; sizes the staging slots
            (``size * capacity_bytes`` of device memory per rank). Same on every rank.
        device: CUDA device ordinal; default the current device.
        ll_bytes: largest block per pair the ``ll`` method takes (its buffers cost
            ``4 * size * ll_bytes`` per rank). Same on every rank.
        min_chunk: bytes per chunk below which a pair's block is not split across
            more thread blocks (same on every rank).
        ll_min_chunk: the same for the ``ll`` method.
        ce_sub: copy-engine path: copies (each flagged) per staged block.
    """

    LL_MAX_DEFAULT = 256 * 1024
    # Method thresholds in bytes per pair, measured on 4 x H200 (docs/gpu-ipc.md).
    LL_UPTO = 256 * 1024
    CE_FROM = 32 * 1024 * 1024
    # From this size on an eager call registers its receive buffer (a ~5 us host
    # collective per call, noise next to the transfer) so peers write in place.
    DIRECT_FROM = 4 * 1024 * 1024
    # Registrations (combinations of every rank's receive buffer) kept, LRU; their peer
    # mappings stay open, older ones are closed unless a plan uses them.
    KEEP_MAPS = 8

    @staticmethod
    def available(comm: Any, *, device: int | None = None) -> tuple[bool, str]:
        """Collective: ``(True, "ok")`` if the backend can run on ``comm``, else ``(False, why)``.

        Same answer on every rank. Needs CuPy, all ranks on one node, at most 8 ranks,
        and peer access between every pair of distinct GPUs; ranks may share a GPU
        (fast under MPS, time-sliced without; :func:`pya2a.gpu.ipc.device_share`).
        """
        return check_ipc(comm, device)

    def __init__(self, comm: Any, capacity_bytes: int, *, device: int | None = None,
                 ll_bytes: int = LL_MAX_DEFAULT, min_chunk: int = 32 * 1024,
                 ll_min_chunk: int = 2 * 1024, ce_sub: int = 1) -> None:
        cp = _cupy()
        self._cp = cp
        if capacity_bytes < 0 or ll_bytes < 0:
            raise ValueError("IpcAlltoallv: capacity_bytes and ll_bytes must be >= 0")
        self.group = IpcGroup(comm, device=device)
        self.rank = self.group.rank
        self.size = self.group.size
        self.device = self.group.device
        p = self.size
        if p > MAX_PEERS:
            raise ValueError(f"IpcAlltoallv: at most {MAX_PEERS} ranks, got {p}")
        self.slot_bytes = (int(capacity_bytes) + 255) // 256 * 256
        self.ll_bytes = (int(ll_bytes) + 255) // 256 * 256
        self.ll_slot = 2 * self.ll_bytes
        conf = (self.slot_bytes, self.ll_bytes, int(min_chunk), int(ll_min_chunk), int(ce_sub))
        confs = allgather_object(self.group.comm, conf)
        if len(set(confs)) != 1:
            raise ValueError(f"IpcAlltoallv: settings differ across ranks: {confs}")
        with cp.cuda.Device(self.device):
            sms = cp.cuda.Device(self.device).attributes["MultiProcessorCount"]
            self._mod = loader.module("ipc_alltoallv.cu", self.device)
            self._fn = {m: loader.function_ptr(self._mod, f"pya2a_ipc_{k}") for m, k in (
                ("push", "alltoallv"), ("ll", "ll"), ("pre", "ce_pre"), ("post", "ce_post"),
                ("flag", "ce_flag"))}
            self._fn["pull"] = self._fn["push"]
            self._streams = [cp.cuda.Stream(non_blocking=True) for _ in range(2)]
            self._ev_fork = cp.cuda.Event(disable_timing=True)
            self._ev_join = [cp.cuda.Event(disable_timing=True) for _ in self._streams]
        # Co-residency (docs/gpu-ipc.md, "Progress"): every block may spin on flags from
        # other ranks, so every rank's grid must be resident at once. A GPU of its own:
        # at most the SM count. Ranks sharing a GPU: grid_budget's share each (halved
        # when PDL may make the next grid resident early), less one block for the
        # copy-engine path's flag kernel; PDL is off there unless asked for.
        share = self.group.share
        self.share = share
        self.pdl = _pdl_wanted(cp, self.device, shared=share.ranks_per_device > 1)
        budget = grid_budget(int(sms), share.ranks_per_device, 2 if self.pdl else 1)
        self.grid_max = max(1, budget - 1) if share.ranks_per_device > 1 else budget
        smin = min(allgather_object(self.group.comm, self.grid_max))
        # a few roles for the own block, the rest split evenly between the peers (a
        # smaller grid walks the roles: the kernels work with any grid size)
        self.self_max = max(1, min(8, smin // 16))
        reserve = 1 if share.ranks_per_device <= 1 else 0  # an SM for the ce flag kernel
        self.max_chunks = max(1, min(MAX_CHUNKS,
                                     (smin - self.self_max - reserve) // max(p - 1, 1)))
        self.min_chunk = int(min_chunk)
        self.ll_min_chunk = int(ll_min_chunk)
        self.ll_off = CTRL_BYTES + p * self.slot_bytes
        self.heap = self.group.allocate(self.ll_off + 2 * p * self.ll_slot)
        # LL lines carry call numbers >= 1: zeroed buffers never match a stale tag
        with cp.cuda.Device(self.device):
            cp.cuda.runtime.memset(self.heap.ptr + self.ll_off, 0, 2 * p * self.ll_slot)
            cp.cuda.runtime.deviceSynchronize()
        self.group.comm.Barrier()
        self._launchk = cp.cuda.driver.launchKernel
        self._getdev = cp.cuda.runtime.getDevice
        self._template = np.zeros((), dtype=_ARGS_DTYPE)
        t = self._template
        t["ctrl"] = self.heap.ptr
        t["peer_ctrl"][:p] = self.heap.peer_ptrs
        t["stage_off"] = CTRL_BYTES
        t["slot_bytes"] = self.slot_bytes
        t["rank"] = self.rank
        t["p"] = p
        t["max_chunks"] = self.max_chunks
        t["ll_off"] = self.ll_off
        t["ll_slot"] = self.ll_slot
        self._cache: dict[tuple, _Call] = {}
        # registered receive buffers (register_recv)
        self._reg: Registration | None = None
        self._epoch = 0
        self._maps: OrderedDict[bytes, int] = OrderedDict()  # handle -> pins by plans
        self._regs: OrderedDict[bytes, Registration] = OrderedDict()
        self._digests = np.zeros(p, dtype=np.int64)
        # sub-copies per staged block on the copy-engine path (same on every rank);
        # 4 measured no faster at 256 MiB and slower below (4 x H200)
        self.ce_sub = max(1, min(int(ce_sub), self.max_chunks))
        self._freed = False

    # ------------------------------------------------------------------ memory
    def alloc_symmetric(self, nbytes: int, dtype: Any = np.uint8, shape: Any = None) -> Any:
        """Collective: a CuPy array in symmetric IPC memory (same ``nbytes`` on every rank).

        Receiving into such an array skips the staging copy (``push``, ``ce`` plans);
        sending from one enables the ``pull`` method. The memory lives until :meth:`free`.
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

    @classmethod
    def choose(cls, max_bytes_per_pair: int, *, inplace_plan: bool = False,
               direct: bool = False) -> str:
        """Method for a call whose largest block is ``max_bytes_per_pair`` bytes.

        Pass values that are the same on every rank (e.g. all-reduced max), so that
        every rank picks the same method. ``inplace_plan``: the call runs through
        :meth:`plan` with symmetric receive buffers on every rank; ``direct``: every
        rank's receive buffer is registered (:attr:`Registration.everyone`). Either way
        large blocks go by copy engines straight into place.
        """
        if max_bytes_per_pair <= cls.LL_UPTO:
            return "ll"
        if (inplace_plan or direct) and max_bytes_per_pair >= cls.CE_FROM:
            return "ce"
        return "push"

    # ------------------------------------------------------------ registration
    def _ident(self, rptr: int, rn: int, rdispls: Any) -> tuple:
        sym = self.group.find(rptr, rn)
        d = _counts_key(rdispls)
        if sym is not None:
            return ("s", sym.index, rptr - sym.ptr, rn, d)
        info = allocation_of(rptr)
        if info is None or not info.ipc or rptr + rn > info.base + info.size:
            return ("n", rptr, rn, d)
        return ("u", info.buffer_id, info.base, info.size, rptr - info.base, rn, d)

    def register_recv(self, recvbuf: Any, rdispls: Any) -> Registration:
        """Collective: agree where every rank's receive buffer is, so peers write in place.

        Every rank passes its own receive buffer and displacements (bytes). A buffer in
        symmetric memory needs nothing more; any other device buffer whose allocation
        CUDA IPC can export (``cudaMalloc``, the CuPy pool, torch) is exported as
        (handle, offset from the allocation base) and opened by the peers once.
        Buffers that cannot be exported (``cudaMallocAsync`` pools, managed memory)
        stay staged, for that rank only. Cost when the combination of buffers was seen
        recently: one driver query and a one-int64 ``Allgather``.
        """
        if self._freed:
            raise ValueError("IpcAlltoallv: used after free()")
        rptr, rn = _ptr_nbytes(recvbuf)
        ident = self._ident(rptr, rn, rdispls)
        me, p = self.rank, self.size
        # one int64 per rank: a digest of its buffer identity; the gathered vector names
        # the combination, so ranks alternating between buffers hit the cache too
        self._digests[me] = int.from_bytes(
            hashlib.blake2b(repr(ident).encode(), digest_size=8).digest(), "little", signed=True)
        comm = self.group.comm
        comm.Allgather(_in_place(), self._digests)
        combo = self._digests.tobytes()
        reg = self._regs.get(combo)
        if reg is not None:  # every rank's digest as cached: every rank hits, same buffers
            self._regs.move_to_end(combo)
            self._reg = reg
            return reg
        handle = export_handle(allocation_of(rptr)) if ident[0] == "u" else None  # type: ignore[arg-type]
        kind = ident[0] if ident[0] != "u" or handle is not None else "n"
        if kind == "s":
            mine: tuple = ("s", ident[1], ident[2], [int(x) for x in np.asarray(rdispls)])
        elif kind == "u":
            mine = ("u", handle, ident[4], [int(x) for x in np.asarray(rdispls)])
        else:
            mine = ("n", None, 0, [int(x) for x in np.asarray(rdispls)])
        allv = allgather_object(comm, mine)
        addr: list = [None] * p
        bases: list[int] = [0] * p
        handles: list[bytes] = []
        failed: list[int] = []
        for r, (k, h, off, _d) in enumerate(allv):
            if k == "s":
                base = self.group.allocs[h].peer_ptrs[r]
            elif k == "u" and r == me:
                base = rptr - off
            elif k == "u":
                q = self._open(h)
                if q is None:
                    failed.append(r)
                    continue
                handles.append(h)
                base = q
            else:
                continue
            bases[r] = base
            addr[r] = base + off
        # a receiver is written in place only if every sender could map it
        bad = set().union(*allgather_object(comm, failed))
        for r in bad:
            addr[r] = None
        for r in bad:
            bases[r] = 0
        if addr[me] is None:
            my_key = STAGED
        elif kind == "s":
            my_key = (ident[1] << KEY_SHIFT) | ident[2]
        else:  # peers find my allocation's base in their kernel arguments (reg_base)
            my_key = (KEY_REGISTERED << KEY_SHIFT) | ident[4]
        self._epoch += 1
        reg = Registration(self._epoch, addr, bases, [d for _k, _h, _o, d in allv], my_key,
                           handles, ident)
        self._reg = reg
        self._regs[combo] = reg
        if len(self._regs) > self.KEEP_MAPS:
            self._regs.popitem(last=False)
        self._evict()
        return reg

    def _open(self, handle: bytes) -> int | None:
        if handle in self._maps:
            self._maps.move_to_end(handle)
            return mapped(handle)
        q = open_handle(handle)
        if q is not None:
            self._maps[handle] = 0
        return q

    def _pin(self, reg: Registration, d: int) -> None:
        for h in reg.handles:
            if h in self._maps:
                self._maps[h] += d

    def _evict(self) -> None:
        """Unmap peer buffers that no cached registration and no plan uses any more."""
        used = {h for reg in self._regs.values() for h in reg.handles}
        spare = [h for h, pins in self._maps.items() if pins <= 0 and h not in used]
        if not spare:
            return
        self._cp.cuda.runtime.deviceSynchronize()  # nothing queued may still write there
        for h in spare:
            del self._maps[h]
            close_handle(h)

    # ------------------------------------------------------------------ calls
    def _pack(self, sendbuf: Any, sendcounts: Any, sdispls: Any, recvbuf: Any,
              recvcounts: Any, rdispls: Any, method: str,
              reg: Registration | None = None) -> _Call:
        if self._freed:
            raise ValueError("IpcAlltoallv: used after free()")
        if method not in METHODS:
            raise ValueError(f"IpcAlltoallv: unknown method {method!r}, known: {METHODS}")
        p, me = self.size, self.rank
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
        if sc[me] != rc[me]:
            raise ValueError("IpcAlltoallv: sendcounts[rank] != recvcounts[rank]")
        a = self._template.copy()
        a["sendbuf"] = sptr
        a["recvbuf"] = rptr
        a["scount"][:p] = sc
        a["sdispl"][:p] = sd
        a["rcount"][:p] = rc
        a["rdispl"][:p] = rd
        copies: list[tuple[int, int, int, int, int]] = []  # (q, dst, src, n, sub index)
        self_copy = (rptr + int(rd[me]), sptr + int(sd[me]), int(sc[me]))
        min_chunk = self.min_chunk
        if method == "ll":
            big = int(max(sc.max(), rc.max())) if p else 0
            if big > self.ll_bytes:
                raise ValueError(f"IpcAlltoallv: method 'll' takes blocks up to {self.ll_bytes} "
                                 f"bytes (ll_bytes), got {big}")
            min_chunk = self.ll_min_chunk
        elif method == "pull":
            alloc = self.group.find(sptr, sn)
            if alloc is None:
                raise ValueError("IpcAlltoallv: method 'pull' needs a symmetric sendbuf "
                                 "(alloc_symmetric)")
            a["my_key"] = alloc.key(sptr)
            a["mode"] = 1
        elif method == "push":
            if reg is not None:
                a["my_key"] = reg.my_key
                a["reg_base"][:p] = reg.bases
            else:
                alloc = self.group.find(rptr, rn)
                a["my_key"] = alloc.key(rptr) if alloc is not None else STAGED
            if a["my_key"] == STAGED:
                self._check_slots(rc)
        else:  # ce: copy engines into the receivers' staging slots or their own buffers
            staged_here = reg is None or reg.addr[me] is None
            a["my_key"] = STAGED if staged_here else 0
            if staged_here:
                self._check_slots(rc)
            a["ce_sub"] = self.ce_sub
            for q in range(1, p):
                dst = (me + q) % p
                n = int(sc[dst])
                if not n:
                    continue
                if reg is None or reg.addr[dst] is None:
                    if n > self.slot_bytes:
                        self._check_slots(sc)
                    base = self.heap.peer_ptrs[dst] + CTRL_BYTES + me * self.slot_bytes
                    nsub = self.ce_sub  # staged at dst: split so dst copies out early
                else:  # straight into dst's receive buffer, at dst's rdispls[me]
                    base = reg.addr[dst] + reg.rdispls[dst][me]
                    nsub = 1
                sub = (-(-n // nsub) + 255) // 256 * 256
                for j in range(nsub):
                    lo, hi = j * sub, min(n, (j + 1) * sub)
                    if lo < hi:
                        copies.append((q, base + lo, sptr + int(sd[dst]) + lo, hi - lo, j))
        a["min_chunk"] = min_chunk
        m = int(max(sc.max(), rc.max())) if p else 0
        if method == "ce":
            bpp = self.max_chunks
        else:
            bpp = min(self.max_chunks, max(1, -(-m // min_chunk)))
        nself = int(sc[me]) if p else 0
        # one SM copies ~100 GB/s locally: enough blocks to stay off the critical path
        self_blocks = min(self.self_max, max(1, -(-nself // (128 << 10))))
        a["bpp"] = bpp
        a["self_blocks"] = self_blocks
        roles = self_blocks + max(p - 1, 0) * bpp
        return _Call(a, min(roles, self.grid_max), method, copies, self_copy,
                     self._fn.get(method, 0))

    def _check_slots(self, counts: np.ndarray) -> None:
        big = int(counts.max()) if counts.size else 0
        if big > self.slot_bytes:
            raise ValueError(
                f"IpcAlltoallv: a {big}-byte block exceeds capacity_bytes={self.slot_bytes}; "
                "use a symmetric receive buffer or a larger capacity")

    def _launch(self, call: _Call, stream: int) -> None:
        if self._getdev() != self.device:
            with self._cp.cuda.Device(self.device):
                return self._launch(call, stream)
        launch = self._launchk
        params = call.paddr
        if call.method != "ce":  # the common path: one launch, nothing else
            fast = call.launcher
            if fast is None:
                launch(self._fn[call.method], call.grid, 1, 1, _THREADS, 1, 1, 0, stream,
                       params, 0)
                return
            rc = fast.run(stream, self.pdl)
            if rc and self.pdl:
                # a driver that refuses the attribute: plain launches from now on (PDL only
                # orders this rank's own stream, so ranks need not agree on it)
                self.pdl = False
                import warnings

                warnings.warn(f"pya2a ipc: cuLaunchKernelEx refused programmatic dependent "
                              f"launch (CUresult {rc}); using plain launches", RuntimeWarning,
                              stacklevel=3)
                rc = fast.run(stream, False)
            if rc:
                raise RuntimeError(f"pya2a ipc: kernel launch failed (CUresult {rc})")
            return
        cp = self._cp
        rt = cp.cuda.runtime
        launch(self._fn["pre"], 1, 1, 1, 32, 1, 1, 0, stream, params, 0)
        rt.eventRecord(self._ev_fork.ptr, stream)
        # Peer copies go in phase order q = 1..p-1 (rank me -> me+q) on one stream:
        # every GPU sends to one peer and receives from one at a time, and one copy
        # engine saturates a GPU's NVLink egress (one stream per peer measured 2x
        # slower back to back: phases drift into each other and collide at receivers).
        cs = self._streams[0].ptr
        rt.streamWaitEvent(cs, self._ev_fork.ptr)
        for i, (_q, dst, src, n, _j) in enumerate(call.copies):
            rt.memcpyAsync(dst, src, n, 4, cs)  # cudaMemcpyDefault
            launch(self._fn["flag"], 1, 1, 1, 32, 1, 1, 0, cs,
                   ctypes.addressof(call.qparams[i]), 0)
        rt.eventRecord(self._ev_join[0].ptr, cs)
        d, s_, n = call.self_copy
        if n:
            ss = self._streams[1].ptr
            rt.streamWaitEvent(ss, self._ev_fork.ptr)
            rt.memcpyAsync(d, s_, n, 4, ss)
            rt.eventRecord(self._ev_join[1].ptr, ss)
        # ce_post waits for the peers' flags and copies staging slots out while
        # later phases are still arriving
        launch(self._fn["post"], call.grid, 1, 1, _THREADS, 1, 1, 0, stream, params, 0)
        rt.streamWaitEvent(stream, self._ev_join[0].ptr)
        if n:
            rt.streamWaitEvent(stream, self._ev_join[1].ptr)

    def alltoallv(self, sendbuf: Any, sendcounts: Any, sdispls: Any, recvbuf: Any,
                  recvcounts: Any, rdispls: Any, *, stream: Any = None,
                  method: str = "push", direct: bool | None = None,
                  registration: Registration | None = None) -> _Call:
        """Exchange blocks between all ranks; stream-ordered, returns without host sync.

        Args:
            sendbuf: contiguous CuPy array (any dtype) or ``__cuda_array_interface__``
                object on this rank's GPU.
            sendcounts, sdispls: host int64 arrays of length ``size``, in BYTES:
                block for rank ``j`` is ``sendbuf[sdispls[j] : sdispls[j] + sendcounts[j]]``.
            recvbuf: like ``sendbuf``; must not overlap it. For ``push``, if it lies in
                memory from :meth:`alloc_symmetric` or is registered (``direct``),
                peers write into it directly; otherwise they write into staging slots
                and this rank copies them out.
            recvcounts, rdispls: as above for the receive side; ``recvcounts[i]`` here
                must equal ``sendcounts[me]`` on rank ``i`` (not checked: a mismatch
                hangs or truncates).
            stream: CuPy stream, raw ``cudaStream_t`` int, or torch stream; default the
                current CuPy stream.
            method: ``"ll"`` (small blocks, up to ``ll_bytes``: data and flag in one
                8-byte store, staged), ``"push"`` (SM stores into peers), ``"pull"``
                (SM loads from peers; sendbuf must be symmetric) or ``"ce"`` (copy
                engines). Must be the same on every rank for one call; :meth:`choose`
                picks one from a global size.
            direct: ``push``/``ce`` only: register ``recvbuf`` (:meth:`register_recv`,
                collective: a one-int64 Allgather per call, an all-gather of handles
                when a buffer changed) so that peers write straight into it. Default: True for
                ``ce``, False otherwise. Must be the same on every rank.
            registration: the result of this call's :meth:`register_recv` on the same
                ``recvbuf`` and ``rdispls``, when the caller registered already.

        Packed arguments are cached per (buffers, counts, displacements, method,
        registration), so a repeated call costs about as little host time as :meth:`plan`.
        Returns the packed call, which :meth:`launch` repeats without any of that lookup.
        """
        reg = registration
        if reg is None and method in ("push", "ce") and (direct or (direct is None
                                                                    and method == "ce")):
            reg = self.register_recv(recvbuf, rdispls)
        key = (method, _buf_key(sendbuf), _buf_key(recvbuf),
               _layout_key(sendcounts, sdispls, recvcounts, rdispls),
               reg.epoch if reg is not None else 0)
        call = self._cache.get(key)
        if call is None:
            if reg is not None and method == "ce" and reg.rdispls[self.rank] != [
                    int(x) for x in np.asarray(rdispls)]:
                raise ValueError("IpcAlltoallv: registration made with other rdispls")
            call = self._pack(sendbuf, sendcounts, sdispls, recvbuf, recvcounts, rdispls,
                              method, reg)
            if len(self._cache) >= 256:
                self._cache.clear()
            self._cache[key] = call
        self._launch(call, _stream_ptr(self._cp, stream))
        return call

    def launch(self, call: _Call, stream: Any = None) -> None:
        """Repeat a call returned by :meth:`alltoallv` (same buffers, counts, method)."""
        if self._freed:
            raise ValueError("IpcAlltoallv: used after free()")
        self._launch(call, _stream_ptr(self._cp, stream))

    def plan(self, sendbuf: Any, sendcounts: Any, sdispls: Any, recvbuf: Any,
             recvcounts: Any, rdispls: Any, *, method: str = "push") -> IpcPlan:
        """Pack a call once; ``plan.run(stream=...)`` repeats it with minimal host work.

        Same arguments as :meth:`alltoallv`; the buffers are bound by address, so their
        contents may change between runs but not their location. Collective when
        ``method == "ce"``: the ranks register their receive buffers
        (:meth:`register_recv`), so the copy engines write straight into them (symmetric
        or any exportable device buffer; the plan keeps the peers' mappings open).
        """
        reg = self.register_recv(recvbuf, rdispls) if method == "ce" else None
        call = self._pack(sendbuf, sendcounts, sdispls, recvbuf, recvcounts, rdispls, method,
                          reg)
        return IpcPlan(self, call, reg)

    def free(self) -> None:
        """Collective: release symmetric memory and peer mappings. Idempotent."""
        if self._freed:
            return
        self._freed = True
        self._cache.clear()
        if self._maps:
            with self._cp.cuda.Device(self.device):
                self._cp.cuda.runtime.deviceSynchronize()
            for h in self._maps:
                close_handle(h)
            self._maps.clear()
        self._reg = None
        self._regs.clear()
        self.group.free()
