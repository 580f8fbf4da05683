"""Pieces shared by the point-to-point algorithm bodies."""

from __future__ import annotations

import os
from typing import NamedTuple

import numpy as np
from mpi4py import MPI

from ..core.registry import Context
from ..core.spec import VSpec
from ._forward import size_mismatch

__all__ = ["Sides", "sides", "exchange_groups", "guarded", "probed_groups",
           "raise_mismatch"]



class Sides(NamedTuple):
    """Byte views and byte-level block tables of both sides of an exchange."""

    sb: object
    sc: np.ndarray
    sd: np.ndarray
    rb: object
    rc: np.ndarray
    rd: np.ndarray


def sides(send: VSpec, recv: VSpec, transport) -> Sides:
    """Buffers as flat bytes plus counts/displacements in bytes, as Python-friendly arrays."""
    return Sides(transport.buffer(send), send.bcounts, send.bdispls,
                 transport.buffer(recv), recv.bcounts, recv.bdispls)


def guarded(ctx: Context) -> bool:
    """Run with every message posted and every received size checked?

    True when the caller could not verify that each rank's send counts match its peers'
    receive counts (``ctx.options["verified"]`` False: a one-shot call above
    ``ROWS_IN_RECORD`` ranks without ``check=True``) and the buffers are host memory (device
    calls are always verified). Then a message is posted for every pair, empty ones too, so
    that every send meets exactly one receive whatever the counts say, and each is received
    by matched probe, so that a size that differs from the receive count is reported
    instead of hanging, being truncated or going unnoticed.
    """
    return not ctx.options.get("verified", True) and ctx.transport is not None and \
        ctx.transport.device is None


def probed_groups(t, s: Sides, groups: list[list[tuple[int, int]]], tag: int
                  ) -> list[tuple[int, int, int]]:
    """Exchange every (dst, src) step of each group, empty messages too, each message
    received by matched probe (``MPI_Improbe`` + ``MPI_Imrecv``), so none is ever truncated.

    Per group: the sends are posted, then the sources are probed until every one's message
    has matched (a pass that matched none yields the core, as MPI's own waits do when
    ranks outnumber cores); one of the receive count's size is received in place, one of
    another size whole into scratch (its block is not written). Returns ``(source, bytes
    sent, bytes expected)`` per mismatch. Every message of every group is complete on
    return. Host transport only (``t.comm``: the internal communicator).
    """
    comm, sb, rb = t.comm, s.sb, s.rb
    sc, sd, rc, rd = s.sc.tolist(), s.sd.tolist(), s.rc.tolist(), s.rd.tolist()
    st = MPI.Status()
    bad: list[tuple[int, int, int]] = []
    for group in groups:
        reqs = [t.isend(sb, sd[dst], sc[dst], dst, tag) for dst, _ in group]
        pending = [src for _, src in group]
        while pending:
            waiting = []
            for src in pending:
                msg = comm.Improbe(src, tag, st)
                if msg is None:
                    waiting.append(src)
                    continue
                got, want = st.Get_count(MPI.BYTE), rc[src]
                if got == want:
                    reqs.append(msg.Irecv([rb[rd[src]:rd[src] + want], MPI.BYTE]))
                else:
                    msg.Recv([np.empty(got, dtype=np.uint8), MPI.BYTE])
                    bad.append((src, got, want))
            if len(waiting) == len(pending):
                os.sched_yield()
            pending = waiting
        t.waitall(reqs)
    return bad


def raise_mismatch(call: str, rank: int, bad: list[tuple[int, int, int]]) -> None:
    """Raise :func:`size_mismatch` for the mismatches of :func:`probed_groups`, if any."""
    if bad:
        bad = sorted(bad)
        raise size_mismatch(call, rank, [b[0] for b in bad], [b[1] for b in bad],
                            [b[2] for b in bad])


def exchange_groups(send: VSpec, recv: VSpec, ctx: Context, groups: list[list[tuple[int, int]]],
                    tag: int, name: str = "direct") -> None:
    """Copy the own block, then post each group's (dst, src) steps and wait for the group.

    Zero-byte blocks are skipped on both sides (their counts agree when the call is
    correct), unless the counts were not verified (:func:`guarded`): then every message is
    posted and received by matched probe (:func:`probed_groups`). ``direct`` passes windows
    of steps, ``pairwise`` one step per group; ``name`` is the algorithm's, for errors.
    """
    t = ctx.transport
    s = sides(send, recv, t)
    r = ctx.rank
    t.copy(s.rb, int(s.rd[r]), s.sb, int(s.sd[r]), int(s.rc[r]))
    if guarded(ctx):
        raise_mismatch(name, r, probed_groups(t, s, groups, tag))
        return
    sc, sd, rc, rd = s.sc.tolist(), s.sd.tolist(), s.rc.tolist(), s.rd.tolist()
    for group in groups:
        reqs = []
        for dst, src in group:
            if rc[src]:
                reqs.append(t.irecv(s.rb, rd[src], rc[src], src, tag))
            if sc[dst]:
                reqs.append(t.isend(s.sb, sd[dst], sc[dst], dst, tag))
        t.waitall(reqs)
