"""Pieces shared by the store-and-forward algorithms: ``ring``, ``mesh`` and ``hypercube``.

A block is named by the pair (source rank, destination rank) of the original exchange. A
schedule is, for one rank, a list of :class:`Step`: whom it sends to and receives from, and
which blocks each message carries in which order. Sender and receiver compute the order
independently from (rank, size), so a message needs no header naming its blocks; only the
block *sizes* must be learned, and each algorithm does that in the cheapest way its schedule
allows (see docs/algorithms.md). The sizes travel as host int64 arrays on the internal
communicator, never through the transport, so device transports never see metadata.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
from mpi4py import MPI

from ..core.validate import parse_grid
from .tags import TAG_META

__all__ = ["Step", "blocks", "post", "meta_exchange", "meta_wait", "grid_from", "default_grid",
           "size_mismatch"]



@dataclass(frozen=True)
class Step:
    """One message of a schedule, seen from one rank.

    Attributes:
        dst: rank this step sends to.
        src: rank this step receives from.
        send: int64 array (n, 2) of (source, destination) blocks sent, in message order.
        recv: int64 array (m, 2) of blocks received, in message order.
        phase: steps of one phase depend only on earlier phases, so they may be in flight
            together (mesh); ring and hypercube steps each form their own phase.
    """

    dst: int
    src: int
    send: np.ndarray
    recv: np.ndarray
    phase: int = 0


def blocks(src, dst) -> np.ndarray:
    """(n, 2) int64 array of (source, destination) pairs; scalars broadcast."""
    s, d = np.broadcast_arrays(np.asarray(src, dtype=np.int64), np.asarray(dst, dtype=np.int64))
    return np.stack([s.ravel(), d.ravel()], axis=1) if s.size else np.zeros((0, 2), np.int64)


def post(t, reqs: list, buf, off: int, n: int, peer: int, tag: int, send: bool) -> None:
    """Start a transport send or receive of ``n`` bytes, skipping empty messages.

    Both sides know every message length before posting, so they skip the same ones.
    """
    if n > 0:
        reqs.append((t.isend if send else t.irecv)(buf, int(off), int(n), int(peer), tag))


def meta_exchange(comm: MPI.Intracomm, pairs: list[tuple[int, np.ndarray, int, np.ndarray]]
                  ) -> list[MPI.Request]:
    """Start int64 metadata messages: each (dst, out, src, inp) sends ``out``, fills ``inp``."""
    reqs = []
    for dst, out, src, inp in pairs:
        if inp.size:
            reqs.append(comm.Irecv([inp, MPI.INT64_T], src, TAG_META))
        if out.size:
            reqs.append(comm.Isend([out, MPI.INT64_T], dst, TAG_META))
    return reqs


def meta_wait(reqs: list) -> None:
    """Complete metadata requests: one Waitall for MPI requests, else each one's ``Wait``
    (the simulated network of tests/test_schedules.py runs the bodies without MPI)."""
    if not reqs:
        return
    if isinstance(reqs[0], MPI.Request):
        MPI.Request.Waitall(reqs)
    else:
        for q in reqs:
            q.Wait()


def default_grid(p: int) -> tuple[int, int]:
    """(r, c) with r * c = p, r the largest divisor of p not above sqrt(p) (prime p: 1 x p)."""
    r = max(1, int(np.sqrt(p)))
    while r * r > p:
        r -= 1
    while p % r:
        r -= 1
    return r, p // r


def grid_from(p: int, options: dict | None = None) -> tuple[int, int]:
    """The mesh grid: ``options["grid"]``, else env ``PYA2A_MESH_GRID="r,c"``, else default.

    Raises ValueError when the given grid is malformed or r * c != p.
    """
    if options and options.get("grid") is not None:
        return parse_grid(options["grid"], p, "grid")
    env = os.environ.get("PYA2A_MESH_GRID", "").strip()
    if env:
        return parse_grid(env, p, "PYA2A_MESH_GRID")
    return default_grid(p)


def size_mismatch(call: str, rank: int, sources, got, want) -> ValueError:
    """The error an algorithm raises, after its exchange completed, when blocks arrived with
    another size than the receive counts say (counts that do not match between ranks).

    The mismatched blocks were not written; the other blocks were delivered.
    """
    src, g, w = int(sources[0]), int(got[0]), int(want[0])
    more = f" (and {len(sources) - 1} more blocks)" if len(sources) > 1 else ""
    return ValueError(f"{call}: rank {src} sends {g} bytes to rank {rank}, which expects "
                      f"{w} bytes from it{more}; send and receive counts must match, as in "
                      f"MPI (the mismatched blocks were not written)")
