"""Input checks and collective error agreement.

A bad argument on one rank must not leave the others waiting in a collective. Each call
therefore checks its arguments locally, then all ranks exchange a small record (an error code
plus the statistics the selector needs) in one ``Allgather`` before any data moves. If any
rank failed, every rank raises: the failing rank its own exception, the others the same type
with the failing rank's message. The user's receive buffer is untouched in that case.
"""

from __future__ import annotations

import zlib

import numpy as np
from mpi4py import MPI

from . import _pack
from .spec import VSpec

__all__ = ["CollectiveError", "agree", "check_pair", "check_layout", "check_counts_match",
           "check_pairs_match", "check_uniform", "error_code", "same_everywhere"]

# Error kinds carried in the agreement record; 0 = no error.
_KINDS: list[type[BaseException]] = [TypeError, ValueError, BufferError, OverflowError,
                                      KeyError, MemoryError]


class CollectiveError(RuntimeError):
    """Another rank failed with an exception that is not a TypeError/ValueError/BufferError."""


def error_code(exc: BaseException | None) -> int:
    """Code of ``exc`` for the agreement record: 0 none, 1.. known kinds, 99 other."""
    if exc is None:
        return 0
    for i, kind in enumerate(_KINDS):
        if isinstance(exc, kind):
            return i + 1
    return 99


def agree(comm: MPI.Intracomm, exc: BaseException | None, stats: np.ndarray) -> np.ndarray:
    """All-gather ``[error code, *stats]`` and raise on every rank if any rank failed.

    Args:
        comm: the internal communicator (all ranks of the call).
        exc: this rank's exception from local validation, or None.
        stats: int64 vector of per-rank statistics, the same length on every rank.

    Returns:
        int64 array of shape (p, 1 + len(stats)): every rank's record (column 0 is 0).
    """
    rec = np.empty(1 + stats.size, dtype=np.int64)
    rec[0] = error_code(exc)
    rec[1:] = stats
    table = np.empty((comm.Get_size(), rec.size), dtype=np.int64)
    comm.Allgather(rec, table)
    bad = np.flatnonzero(table[:, 0])
    if bad.size == 0:
        return table
    root = int(bad[0])
    payload = None
    if comm.Get_rank() == root:
        assert exc is not None  # internal invariant: root's code was nonzero
        payload = (str(exc) if not isinstance(exc, KeyError) else str(exc.args[0]))
    payload = comm.bcast(payload, root=root)
    if exc is not None:
        raise exc
    code = int(table[root, 0])
    kind = _KINDS[code - 1] if code <= len(_KINDS) else CollectiveError
    raise kind(f"{payload} [raised on rank {root}]")


def check_uniform(call: str, table: np.ndarray) -> None:
    """Raise (on every rank: all see the same table) if ranks disagree on what must match.

    ``table`` is the all-gathered record of an exchange: column 1 the requested algorithm's
    code, column 4 whether the buffers are on a device.
    """
    if (table[:, 1] != table[0, 1]).any():
        raise ValueError(f"{call}: ranks asked for different algorithms "
                         f"(algorithm must be the same on every rank)")
    if (table[:, 4] != table[0, 4]).any():
        raise TypeError(f"{call}: some ranks pass device buffers and others host buffers")


def check_pair(call: str, send: VSpec, recv: VSpec, rank: int, kind: str) -> None:
    """Local consistency checks between this rank's send and receive specs."""
    if (send.device is None) != (recv.device is None):
        where = "device" if send.device is not None else "host"
        other = "device" if recv.device is not None else "host"
        raise TypeError(f"{call}: send buffer is in {where} memory but receive buffer in "
                        f"{other} memory; use the same kind for both")
    if send.device is not None and send.device != recv.device:
        raise ValueError(f"{call}: send buffer is on device {send.device}, receive buffer on "
                         f"device {recv.device}")
    if kind == "alltoall":
        sb = int(send.counts[0]) * send.tsize
        rb = int(recv.counts[0]) * recv.tsize
        if sb != rb:
            raise ValueError(f"{call}: send block is {sb} bytes ({send.counts[0]} x "
                             f"{send.tsize}) but receive block is {rb} bytes "
                             f"({recv.counts[0]} x {recv.tsize})")
    elif send.tsize != recv.tsize:
        raise ValueError(f"{call}: send datatype size {send.tsize} differs from receive "
                         f"datatype size {recv.tsize}")
    check_layout(call, send, recv, rank)
    if send is not recv and send.nbytes and recv.nbytes:
        if send.addr < recv.addr + recv.nbytes and recv.addr < send.addr + send.nbytes \
                and send.device == recv.device:
            raise ValueError(f"{call}: send and receive buffers overlap; pass MPI.IN_PLACE "
                             f"as the send message for an in-place exchange")


def check_layout(call: str, send: VSpec, recv: VSpec, rank: int) -> None:
    """Checks of the block tables alone (no buffers needed): own block, receive overlaps."""
    if int(send.counts[rank]) * send.tsize != int(recv.counts[rank]) * recv.tsize:
        raise ValueError(f"{call}: rank {rank} sends itself {send.counts[rank]} elements but "
                         f"expects {recv.counts[rank]} from itself")
    if recv.contiguous:
        hit = _pack.blocks_overlap(recv.bdispls, recv.bcounts)
        if hit is not None:
            raise ValueError(f"{call}: receive blocks {hit[0]} and {hit[1]} overlap")


def check_counts_match(comm: MPI.Intracomm, call: str, send: VSpec, recv: VSpec) -> None:
    """``check=True``: what rank i sends to j must equal, in bytes, what j expects from i."""
    p = comm.Get_size()
    sent = np.ascontiguousarray(send.counts * send.tsize, dtype=np.int64)
    incoming = np.empty(p, dtype=np.int64)
    comm.Alltoall(sent, incoming)
    want = recv.counts * recv.tsize
    exc = None
    bad = np.flatnonzero(incoming != want)
    if bad.size:
        j = int(bad[0])
        exc = ValueError(f"{call}: rank {j} sends {incoming[j]} bytes to rank "
                         f"{comm.Get_rank()}, which expects {want[j]} bytes (check=True)")
    agree(comm, exc, np.zeros(0, dtype=np.int64))


def same_everywhere(comm: MPI.Intracomm, value: str) -> bool:
    """Collective: True iff ``value`` is the same string on every rank (buffer-based)."""
    h = np.array([zlib.crc32(value.encode()), -zlib.crc32(value.encode())], dtype=np.int64)
    comm.Allreduce(MPI.IN_PLACE, h, op=MPI.MAX)
    return int(h[0]) == -int(h[1])


def check_pairs_match(call: str, sent: np.ndarray, expected: np.ndarray,
                      in_place: bool = False) -> None:
    """Raise on every rank unless rank i sends rank j what j expects from i (all in bytes).

    ``sent[i, j]`` / ``expected[j, i]`` come from the all-gathered agreement record, which
    every rank holds whole, so every rank reaches the same verdict with no communication.
    """
    bad = np.argwhere(sent != expected.T)
    if bad.size:
        i, j = (int(x) for x in bad[0])
        extra = (" (in place: each rank's receive counts are also its send counts, so they "
                 "must be symmetric)") if in_place else ""
        raise ValueError(f"{call}: rank {i} sends {int(sent[i, j])} bytes to rank {j}, "
                         f"which expects {int(expected[j, i])} bytes from rank {i}{extra}")
