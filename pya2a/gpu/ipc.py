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
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = [
    "MAX_PEERS",
    "MAX_ALLOCS",
    "CTRL_BYTES",
    "IpcGroup",
    "SymmetricAlloc",
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


def _cupy() -> Any:
    try:
        from pya2a.gpu import cupy as get
    except ImportError:  # running from a source tree without the package
        import cupy

        return cupy
    return get()


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
        row = np.zeros(MAX_PEERS, dtype=np.uint64)
        row[: self.size] = alloc.peer_ptrs
        dst = self._table_ptr + alloc.index * MAX_PEERS * 8
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
