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
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np

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
    the communicator), each has a GPU, no two ranks drive the same GPU, at most
    ``MAX_PEERS`` ranks, and ``deviceCanAccessPeer`` holds for every pair. The answer
    and reason are the same on every rank.
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
    pcis = comm.allgather(pci)
    if not reason and len(set(pcis)) != size and all(pcis):
        reason = "two ranks share one GPU (IPC within one device is refused)"
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
    reasons = comm.allgather(reason)
    for r, why in enumerate(reasons):
        if why:
            return False, f"rank {r}: {why}"
    return True, "ok"


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
        self.allocs: list[SymmetricAlloc] = []
        self._table_ptr = 0  # device address of the key table (set with allocation 0)

    def allocate(self, nbytes: int) -> SymmetricAlloc:
        """Collective: cudaMalloc ``nbytes`` on every rank, exchange handles, open peers."""
        if len(self.allocs) >= MAX_ALLOCS:
            raise ValueError(f"IpcGroup: at most {MAX_ALLOCS} symmetric allocations")
        nbytes = int(nbytes)
        sizes = self.comm.allgather(nbytes)
        if len(set(sizes)) != 1:
            raise ValueError(f"IpcGroup.allocate: sizes differ across ranks: {sizes}")
        rt = self._cp.cuda.runtime
        with self._cp.cuda.Device(self.device):
            ptr = rt.malloc(max(nbytes, 1))
            handle = bytes(rt.ipcGetMemHandle(ptr))
            handles = self.comm.allgather(handle)
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
