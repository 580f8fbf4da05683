"""Transfer primitives that algorithm bodies are written against.

An algorithm walks its schedule with the transport it is handed: ``HostTransport`` moves
host bytes with MPI point-to-point calls and packs with :mod:`pya2a._pack`; device transports
(staged through host memory, CUDA-aware MPI, IPC) provide the same methods for device
buffers, so one algorithm body serves CPU and GPU. Buffers are flat byte arrays of the
transport's own kind (NumPy uint8 here); offsets and lengths are in bytes.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np
from mpi4py import MPI

from . import _pack
from .devices import gpu_device
from .spec import VSpec

__all__ = ["HostTransport", "transport_for"]


class HostTransport:
    """Host memory over MPI point-to-point on the internal communicator."""

    device = None

    def __init__(self, comm: MPI.Intracomm) -> None:
        self.comm = comm

    def native(self, send: VSpec | None, recv: VSpec, kind: str) -> None:
        """The MPI library's own Alltoall(v) on the parsed messages (``native``)."""
        smsg = MPI.IN_PLACE if send is None else None
        if kind == "alltoall":
            rmsg = [recv.obj, (int(recv.counts[0]), int(recv.displs[0])), recv.datatype]
            if smsg is None:
                smsg = [send.obj, (int(send.counts[0]), int(send.displs[0])), send.datatype]
            self.comm.Alltoall(smsg, rmsg)
        else:
            self.comm.Alltoallv(smsg if smsg is not None else send.message(), recv.message())

    def buffer(self, spec: VSpec) -> np.ndarray:
        """The whole buffer of ``spec`` as a flat uint8 array (a view)."""
        return spec.host_bytes()

    def clone(self, spec: VSpec) -> VSpec:
        """A read-only private copy of ``spec``'s buffer (the send side of an in-place call)."""
        tmp = self.buffer(spec).copy()
        return dataclasses.replace(spec, obj=tmp, addr=tmp.ctypes.data, readonly=True,
                                   keepalive=tmp)

    def empty(self, nbytes: int) -> np.ndarray:
        """A scratch byte buffer."""
        return np.empty(int(nbytes), dtype=np.uint8)

    def isend(self, buf: np.ndarray, off: int, n: int, dest: int, tag: int) -> MPI.Request:
        """Start sending ``buf[off:off+n]`` to ``dest``."""
        return self.comm.Isend([buf[off:off + n], MPI.BYTE], dest, tag)

    def irecv(self, buf: np.ndarray, off: int, n: int, source: int, tag: int) -> MPI.Request:
        """Start receiving ``n`` bytes from ``source`` into ``buf[off:off+n]``."""
        return self.comm.Irecv([buf[off:off + n], MPI.BYTE], source, tag)

    def sendrecv(self, sbuf: np.ndarray, soff: int, sn: int, dest: int,
                 rbuf: np.ndarray, roff: int, rn: int, source: int, tag: int) -> None:
        """Send ``sn`` bytes to ``dest`` while receiving ``rn`` bytes from ``source``."""
        self.comm.Sendrecv([sbuf[soff:soff + sn], MPI.BYTE], dest, tag,
                           [rbuf[roff:roff + rn], MPI.BYTE], source, tag)

    @staticmethod
    def waitall(reqs: Sequence[MPI.Request]) -> None:
        """Complete all requests."""
        if reqs:
            MPI.Request.Waitall(list(reqs))

    @staticmethod
    def copy(dst: np.ndarray, doff: int, src: np.ndarray, soff: int, n: int) -> None:
        """Local copy of ``n`` bytes (regions may not partially overlap)."""
        if n:
            dst[doff:doff + n] = src[soff:soff + n]

    @staticmethod
    def pack(src: np.ndarray, src_off: np.ndarray, lens: np.ndarray, dst: np.ndarray,
             dst_off: np.ndarray) -> None:
        """Copy block i from ``src[src_off[i]:]`` to ``dst[dst_off[i]:]``, ``lens[i]`` bytes."""
        _pack.pack(src, src_off, lens, dst, dst_off)

    @staticmethod
    def gather(src: np.ndarray, offs: np.ndarray, lens: np.ndarray, dst: np.ndarray,
               start: int = 0) -> int:
        """Pack blocks of ``src`` back to back into ``dst``; returns the end offset."""
        return _pack.gather(src, offs, lens, dst, start)

    @staticmethod
    def scatter(src: np.ndarray, dst: np.ndarray, offs: np.ndarray, lens: np.ndarray,
                start: int = 0) -> int:
        """Unpack back-to-back blocks of ``src`` into ``dst``; returns the end offset."""
        return _pack.scatter(src, dst, offs, lens, start)


def transport_for(comm: MPI.Intracomm, device: int | None) -> Any:
    """The transport for an exchange on ``comm``: host, or staged / CUDA-aware device."""
    if device is None:
        return HostTransport(comm)
    return gpu_device().transport(comm, device)
