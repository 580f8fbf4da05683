"""Symmetric device memory shared between the ranks of one node through CUDA/HIP IPC.

Every rank allocates the same number of bytes with plain ``cudaMalloc`` (never the
CuPy pool: an IPC handle names a whole allocation), the 64-byte handles are
all-gathered once over MPI, and every rank opens its peers' allocations once. The
result is a :class:`SymmetricAlloc` that knows each peer's base address in this
process's address space. :class:`IpcGroup` owns the allocations of one
communicator, keeps the per-allocation table that kernels use to turn a
``(allocation, offset)`` key into a peer address, and closes everything in
:meth:`IpcGroup.free` (explicitly: no collective teardown in ``__del__``).

Only the runtime calls that CuPy maps on ROCm too are used: ``malloc``,
``ipcGetMemHandle``, ``ipcOpenMemHandle``, ``ipcCloseMemHandle``,
``deviceCanAccessPeer``. Untested on AMD hardware.

Ordinary user buffers (CuPy memory pool, torch caching allocator, plain ``cudaMalloc``)
can be shared too: :func:`allocation_of` finds the ``cudaMalloc`` allocation holding a
pointer (``cuPointerGetAttributes`` through ctypes: base, size, the process-wide unique
buffer id, and whether legacy IPC can export it), :func:`export_handle` exports that
allocation once per buffer id, and :func:`open_handle` / :func:`close_handle` open a
peer's handle once per process with a reference count (CUDA maps one handle at most once
per process: a second ``cudaIpcOpenMemHandle`` fails with "already mapped").
Stream-ordered pool memory (``cudaMallocAsync``), managed and host memory are not
exportable; :func:`allocation_of` says so and callers fall back to staging.
"""

from __future__ import annotations

import ctypes
import functools
import os
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np

from ..core.validate import allgather_object
from . import cupy as _cupy

__all__ = [
    "MAX_PEERS",
    "MAX_ALLOCS",
    "CTRL_BYTES",
    "IpcGroup",
    "SymmetricAlloc",
    "AllocationInfo",
    "allocation_of",
    "export_handle",
    "open_handle",
    "close_handle",
    "mapped",
    "check_ipc",
    "DeviceShare",
    "device_share",
    "mps_client",
    "client_sms",
    "grid_budget",
]

MAX_PEERS = 8  # PYA2A_MAXP in kernels/ipc_alltoallv.cu
MAX_CHUNKS = 64  # PYA2A_MAXB
MAX_ALLOCS = 32  # PYA2A_MAXS
# Control block layout, in u64 words (kernels/ipc_alltoallv.cu, CTRL_*).
CTRL_SEQ = 0
CTRL_DONE = 1
CTRL_RDY_SEQ = 16
CTRL_RDY_KEY = 32
CTRL_FIN = 48
CTRL_FLAG = 128
CTRL_TAB = 1024
CTRL_BYTES = 64 * 1024  # control block size; staging slots start after it
KEY_SHIFT = 56
STAGED = (1 << 64) - 1  # key meaning "no symmetric buffer: use the staging slots"


class AllocationInfo(NamedTuple):
    """The device allocation holding a pointer (``cuPointerGetAttributes``).

    Attributes:
        base: start of the ``cudaMalloc`` allocation (CU_POINTER_ATTRIBUTE_RANGE_START_ADDR).
        size: its size in bytes (RANGE_SIZE).
        buffer_id: process-wide unique id of the allocation (BUFFER_ID): never reused,
            so a freed and re-made allocation at the same address gets a new one.
        ipc: True if ``cudaIpcGetMemHandle`` can export it (IS_LEGACY_CUDA_IPC_CAPABLE;
            false for ``cudaMallocAsync`` pools, managed and host memory).
    """

    base: int
    size: int
    buffer_id: int
    ipc: bool


_ATTR_MEMORY_TYPE = 2
_ATTR_BUFFER_ID = 7
_ATTR_LEGACY_IPC = 10
_ATTR_RANGE_START = 11
_ATTR_RANGE_SIZE = 12
_MEMORYTYPE_DEVICE = 2
_DRIVER: list[Any] = []  # [callable or None], loaded once


def _pointer_attributes() -> Any:
    """``cuPointerGetAttributes`` from libcuda through ctypes, or None (ROCm, no driver)."""
    if not _DRIVER:
        fn = None
        for name in ("libcuda.so.1", "libcuda.so"):
            try:
                lib = ctypes.CDLL(name)
                fn = lib.cuPointerGetAttributes
            except (OSError, AttributeError):
                continue
            fn.argtypes = [ctypes.c_uint, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_uint64]
            fn.restype = ctypes.c_int
            break
        _DRIVER.append(fn)
    return _DRIVER[0]


_NATTR = 5
_ATTR_LIST = (ctypes.c_int * _NATTR)(_ATTR_MEMORY_TYPE, _ATTR_BUFFER_ID, _ATTR_LEGACY_IPC,
                                     _ATTR_RANGE_START, _ATTR_RANGE_SIZE)
_ATTR_DATA = (ctypes.c_uint64 * _NATTR)()
_ATTR_PTRS = (ctypes.c_void_p * _NATTR)(*[ctypes.addressof(_ATTR_DATA) + 8 * i
                                          for i in range(_NATTR)])


def allocation_of(ptr: int) -> AllocationInfo | None:
    """The device allocation holding ``ptr``, or None if it cannot be found (not device
    memory, no CUDA driver library, ROCm). One driver call, about a microsecond."""
    fn = _pointer_attributes()
    if fn is None or not ptr:
        return None
    for i in range(_NATTR):
        _ATTR_DATA[i] = 0  # attributes narrower than 8 bytes leave the rest untouched
    if fn(_NATTR, ctypes.addressof(_ATTR_LIST), ctypes.addressof(_ATTR_PTRS), int(ptr)) != 0:
        return None
    mtype, bid, legacy, base, size = (int(_ATTR_DATA[i]) for i in range(_NATTR))
    if mtype & 0xFFFFFFFF != _MEMORYTYPE_DEVICE or not base or not size:
        return None
    return AllocationInfo(base, size, bid, bool(legacy & 0xFF))


_EXPORTS: OrderedDict[int, bytes] = OrderedDict()  # buffer id -> IPC handle
_EXPORTS_MAX = 256
_IMPORTS: dict[bytes, list[int]] = {}  # handle -> [mapped address, references]


def export_handle(info: AllocationInfo) -> bytes | None:
    """The 64-byte IPC handle of an allocation (cached per buffer id), None if not exportable."""
    if not info.ipc:
        return None
    h = _EXPORTS.get(info.buffer_id)
    if h is None:
        try:
            h = bytes(_cupy().cuda.runtime.ipcGetMemHandle(info.base))
        except Exception:
            _clear_last_error()
            return None
        _EXPORTS[info.buffer_id] = h
        if len(_EXPORTS) > _EXPORTS_MAX:
            _EXPORTS.popitem(last=False)
    else:
        _EXPORTS.move_to_end(info.buffer_id)
    return h


def open_handle(handle: bytes) -> int | None:
    """Map a peer's allocation (once per process; counted), its address here or None."""
    ent = _IMPORTS.get(handle)
    if ent is None:
        try:
            ptr = int(_cupy().cuda.runtime.ipcOpenMemHandle(handle))
        except Exception:
            _clear_last_error()
            return None
        ent = _IMPORTS[handle] = [ptr, 0]
    ent[1] += 1
    return ent[0]


def mapped(handle: bytes) -> int | None:
    """Address of an already opened peer handle in this process, or None."""
    ent = _IMPORTS.get(handle)
    return ent[0] if ent is not None else None


def close_handle(handle: bytes) -> None:
    """Drop one reference; unmap when none is left. The caller makes sure that no queued
    work still touches the mapping (device synchronize)."""
    ent = _IMPORTS.get(handle)
    if ent is None:
        return
    ent[1] -= 1
    if ent[1] <= 0:
        del _IMPORTS[handle]
        try:
            _cupy().cuda.runtime.ipcCloseMemHandle(ent[0])
        except Exception:
            _clear_last_error()


def _clear_last_error() -> None:
    """Reset the runtime's last error after a failed call we handled (others may check it)."""
    try:
        _cupy().cuda.runtime.getLastError()
    except Exception:
        pass


@dataclass
class SymmetricAlloc:
    """One symmetric allocation: same size on every rank, opened by every peer.

    Attributes:
        index: position in the group's table (the high byte of a key).
        nbytes: size in bytes (same on every rank).
        ptr: this rank's base address.
        peer_ptrs: base address of each rank's allocation in this process
            (``peer_ptrs[rank] == ptr``).
    """

    index: int
    nbytes: int
    ptr: int
    peer_ptrs: list[int]
    opened: list[int] = field(default_factory=list)

    def contains(self, ptr: int, nbytes: int) -> bool:
        """True if ``[ptr, ptr + nbytes)`` lies inside this rank's allocation."""
        return self.ptr <= ptr and ptr + nbytes <= self.ptr + self.nbytes

    def key(self, ptr: int) -> int:
        """Kernel key for a local address inside this allocation."""
        return (self.index << KEY_SHIFT) | (ptr - self.ptr)


def _pci_ids(runtime: Any) -> list[str]:
    return [runtime.deviceGetPCIBusId(d) for d in range(runtime.getDeviceCount())]


def check_ipc(comm: Any, device: int | None = None) -> tuple[bool, str]:
    """Collective: can every rank of ``comm`` map every other rank's GPU memory?

    True only if all ranks share one node (``Split_type(COMM_TYPE_SHARED)`` spans
    the communicator), each has a GPU, at most ``MAX_PEERS`` ranks, and
    ``deviceCanAccessPeer`` holds for every pair of distinct GPUs. Ranks may share a GPU
    (several processes per device map each other's memory through IPC too; see
    :func:`device_share` for what that means for speed and grid sizes). The answer and
    reason are the same on every rank.
    """
    from mpi4py import MPI

    reason = ""
    pci = ""
    visible: list[str] = []
    size = comm.Get_size()
    try:
        shared = comm.Split_type(MPI.COMM_TYPE_SHARED)
        try:
            if shared.Get_size() != size:
                reason = "ranks span more than one node"
        finally:
            shared.Free()
    except Exception as exc:  # pragma: no cover - MPI without shared split
        reason = f"cannot split by node: {exc}"
    if not reason and size > MAX_PEERS:
        reason = f"{size} ranks, the IPC backend supports at most {MAX_PEERS}"
    if not reason:
        try:
            cp = _cupy()
            runtime = cp.cuda.runtime
            dev = cp.cuda.Device(device).id if device is not None else cp.cuda.Device().id
            visible = _pci_ids(runtime)
            pci = visible[dev]
        except Exception as exc:
            reason = f"no usable GPU: {exc}"
    pcis = allgather_object(comm, pci)
    if not reason and all(pcis):
        cp = _cupy()
        runtime = cp.cuda.runtime
        mine = visible.index(pci)
        for r, other in enumerate(pcis):
            if other == pci:
                continue
            if other not in visible:
                reason = f"GPU of rank {r} ({other}) is not visible to rank {comm.Get_rank()}"
                break
            if not runtime.deviceCanAccessPeer(mine, visible.index(other)):
                reason = f"no peer access between GPU {pci} and {other}"
                break
    reasons = allgather_object(comm, reason)
    for r, why in enumerate(reasons):
        if why:
            return False, f"rank {r}: {why}"
    return True, "ok"


class DeviceShare(NamedTuple):
    """How the ranks of a communicator sit on their GPUs (the same on every rank).

    Attributes:
        ranks_per_device: the most ranks of the communicator on one GPU (1: a GPU each).
        mps: every rank is a client of the CUDA Multi-Process Service (:func:`mps_client`),
            so kernels of ranks sharing a GPU run at the same time; without it they
            time-slice, and a wait on another rank costs a time slice (milliseconds).
    """

    ranks_per_device: int
    mps: bool

    @property
    def fast(self) -> bool:
        """Kernels that wait for other ranks are fast here: a GPU each, or MPS."""
        return self.ranks_per_device <= 1 or self.mps


def device_share(comm: Any, device: int | None = None) -> DeviceShare:
    """Collective: how many ranks of ``comm`` share a GPU, and whether all are MPS clients.

    GPUs are told apart by PCI bus id (``CUDA_VISIBLE_DEVICES`` may number one GPU
    differently in different processes). MPS is agreed with a logical AND, so a job where
    some ranks are not clients is treated as time-sliced.
    """
    cp = _cupy()
    rt = cp.cuda.runtime
    pci = ""
    try:
        dev = int(device) if device is not None else int(rt.getDevice())
        pci = rt.deviceGetPCIBusId(dev)
    except Exception:
        dev = -1
    mine = (pci, mps_client(dev)[0] if pci else False)
    allv = allgather_object(comm, mine)
    counts: dict[str, int] = {}
    for p_, _m in allv:
        if p_:
            counts[p_] = counts.get(p_, 0) + 1
    return DeviceShare(max(counts.values(), default=1), all(m for _p, m in allv))


class _NvmlProcess(ctypes.Structure):
    _fields_ = [("pid", ctypes.c_uint), ("usedGpuMemory", ctypes.c_ulonglong),
                ("gpuInstanceId", ctypes.c_uint), ("computeInstanceId", ctypes.c_uint)]


def _nvml_pids(device_pci: str) -> tuple[set[int], set[int]] | None:
    """(MPS client pids, other compute pids) on the GPU with this PCI bus id, from NVML;
    None if NVML cannot tell (no library, an old driver, no such device)."""
    try:
        lib = ctypes.CDLL("libnvidia-ml.so.1")
    except OSError:
        return None
    try:
        if lib.nvmlInit_v2() != 0:
            return None
        handle = ctypes.c_void_p()
        if lib.nvmlDeviceGetHandleByPciBusId_v2(device_pci.encode(), ctypes.byref(handle)) != 0:
            return None
        out = []
        for fn in ("nvmlDeviceGetMPSComputeRunningProcesses_v3",
                   "nvmlDeviceGetComputeRunningProcesses_v3"):
            f = getattr(lib, fn, None)
            if f is None:
                return None
            n = ctypes.c_uint(256)
            buf = (_NvmlProcess * 256)()
            if f(handle, ctypes.byref(n), buf) != 0:
                return None
            out.append({int(buf[i].pid) for i in range(min(int(n.value), 256))})
        return out[0], out[1]
    finally:
        lib.nvmlShutdown()


@functools.cache
def mps_client(device: int) -> tuple[bool, str]:
    """Whether this process reaches ``device`` through MPS, and how that was decided.

    ``PYA2A_MPS=0|1`` overrides. Otherwise NVML is asked (after this process holds a
    context on the device) which processes have an MPS compute context there: this
    process among them means yes; this process among the plain compute processes means
    no. Where NVML cannot tell (no library, process ids of another namespace), a
    reachable MPS control pipe (``$CUDA_MPS_PIPE_DIRECTORY``, default
    ``/tmp/nvidia-mps``, holding ``control``) means yes: the CUDA driver connects every
    new context to a running daemon found there.
    """
    env = os.environ.get("PYA2A_MPS", "").strip().lower()
    if env in ("1", "true", "yes", "on"):
        return True, "PYA2A_MPS=1"
    if env in ("0", "false", "no", "off"):
        return False, "PYA2A_MPS=0"
    pid = os.getpid()
    try:
        cp = _cupy()
        with cp.cuda.Device(device):
            cp.cuda.runtime.free(0)  # a context on the device (cudaFree(0) creates it)
            pci = cp.cuda.runtime.deviceGetPCIBusId(device)
        pids = _nvml_pids(pci)
    except Exception:
        pids = None
    if pids is not None:
        if pid in pids[0]:
            return True, "NVML lists this process as an MPS client"
        if pid in pids[1]:
            return False, "NVML lists this process with its own context (no MPS)"
    pipe = os.environ.get("CUDA_MPS_PIPE_DIRECTORY", "/tmp/nvidia-mps")
    if os.path.exists(os.path.join(pipe, "control")):
        return True, f"MPS control pipe in {pipe}"
    return False, "no MPS daemon found"


def client_sms(device: int) -> int:
    """Multiprocessors this process may use on ``device`` (the device attribute; under MPS
    with ``CUDA_MPS_ACTIVE_THREAD_PERCENTAGE`` the driver reports the client's share)."""
    cp = _cupy()
    return int(cp.cuda.Device(device).attributes["MultiProcessorCount"])


def grid_budget(sms: int, ranks_per_device: int, grids_in_flight: int = 1) -> int:
    """Blocks one rank's waiting kernel may launch so that every rank's can be resident.

    A kernel that spins on another rank's flag needs that rank's kernel resident at the
    same time (MPS does not preempt; docs/gpu-ipc.md, "Progress"). With ``r`` ranks on a
    GPU of ``sms`` multiprocessors (the client's share under an MPS limit), each with up to
    ``grids_in_flight`` such grids queued (2 with programmatic dependent launch, whose next
    grid may become resident early), every rank gets ``sms // (r * grids_in_flight)``
    blocks: then all of them fit even at one block per multiprocessor, wherever the
    scheduler puts them. A GPU of its own keeps the whole device.
    """
    if ranks_per_device <= 1:
        return max(1, int(sms))
    return max(1, int(sms) // (int(ranks_per_device) * max(1, int(grids_in_flight))))


class IpcGroup:
    """Symmetric allocations shared by the ranks of one node-local communicator.

    Args:
        comm: intracommunicator whose ranks all sit on one node (see :func:`check_ipc`);
            duplicated internally so bootstrap traffic never matches user messages.
        device: CUDA device ordinal; default the current device.

    The first allocation (index 0) is made by the owner (the all-to-all engine) and
    starts with the control block; :meth:`allocate` is collective and must be called
    in the same order with the same size on every rank.
    """

    def __init__(self, comm: Any, *, device: int | None = None) -> None:
        cp = _cupy()
        self._cp = cp
        self.comm = comm.Dup()
        self.rank = self.comm.Get_rank()
        self.size = self.comm.Get_size()
        self.device = cp.cuda.Device(device).id if device is not None else cp.cuda.Device().id
        self.share = device_share(self.comm, self.device)
        self.allocs: list[SymmetricAlloc] = []
        self._table_ptr = 0  # device address of the key table (set with allocation 0)

    def allocate(self, nbytes: int) -> SymmetricAlloc:
        """Collective: cudaMalloc ``nbytes`` on every rank, exchange handles, open peers."""
        if len(self.allocs) >= MAX_ALLOCS:
            raise ValueError(f"IpcGroup: at most {MAX_ALLOCS} symmetric allocations")
        nbytes = int(nbytes)
        sizes = allgather_object(self.comm, nbytes)
        if len(set(sizes)) != 1:
            raise ValueError(f"IpcGroup.allocate: sizes differ across ranks: {sizes}")
        rt = self._cp.cuda.runtime
        with self._cp.cuda.Device(self.device):
            ptr = rt.malloc(max(nbytes, 1))
            handle = bytes(rt.ipcGetMemHandle(ptr))
            handles = allgather_object(self.comm, handle)
            peer_ptrs: list[int] = []
            opened: list[int] = []
            for r, h in enumerate(handles):
                if r == self.rank:
                    peer_ptrs.append(ptr)
                else:
                    q = rt.ipcOpenMemHandle(h)
                    opened.append(q)
                    peer_ptrs.append(q)
        alloc = SymmetricAlloc(len(self.allocs), nbytes, ptr, peer_ptrs, opened)
        self.allocs.append(alloc)
        if alloc.index == 0:
            if nbytes < CTRL_BYTES:
                raise ValueError("IpcGroup: allocation 0 must hold the control block")
            with self._cp.cuda.Device(self.device):
                rt.memset(ptr, 0, CTRL_BYTES)
            self._table_ptr = ptr + CTRL_TAB * 8
            for a in self.allocs:
                self._write_table(a)
        elif self._table_ptr:
            self._write_table(alloc)
        with self._cp.cuda.Device(self.device):
            rt.deviceSynchronize()
        self.comm.Barrier()  # peers may touch the new memory (and zeroed flags) from now on
        return alloc

    def _write_table(self, alloc: SymmetricAlloc) -> None:
        self.write_row(alloc.index, alloc.peer_ptrs)

    def write_row(self, index: int, bases: list[int]) -> None:
        """Key table row ``index``: base address of each rank's memory in this process."""
        row = np.zeros(MAX_PEERS, dtype=np.uint64)
        row[: len(bases)] = bases
        dst = self._table_ptr + index * MAX_PEERS * 8
        with self._cp.cuda.Device(self.device):
            self._cp.cuda.runtime.memcpy(dst, row.ctypes.data, row.nbytes, 1)  # H2D

    def find(self, ptr: int, nbytes: int) -> SymmetricAlloc | None:
        """The symmetric allocation holding ``[ptr, ptr+nbytes)`` on this rank, or None."""
        for a in self.allocs:
            if a.contains(ptr, nbytes):
                return a
        return None

    def as_array(self, alloc: SymmetricAlloc, shape: Any, dtype: Any, offset: int = 0) -> Any:
        """A CuPy array viewing this rank's part of ``alloc`` (keeps ``self`` alive)."""
        cp = self._cp
        mem = cp.cuda.UnownedMemory(alloc.ptr, alloc.nbytes, self, device_id=self.device)
        return cp.ndarray(shape, dtype=dtype, memptr=cp.cuda.MemoryPointer(mem, offset))

    def free(self) -> None:
        """Close peers' handles and free own allocations. Collective (one barrier)."""
        if not self.allocs:
            return
        rt = self._cp.cuda.runtime
        with self._cp.cuda.Device(self.device):
            rt.deviceSynchronize()
        # Nobody may still be writing into our memory when we free it.
        self.comm.Barrier()
        with self._cp.cuda.Device(self.device):
            for a in self.allocs:
                for q in a.opened:
                    rt.ipcCloseMemHandle(q)
            self.comm.Barrier()
            for a in self.allocs:
                rt.free(a.ptr)
        self.allocs = []
        self.comm.Free()
