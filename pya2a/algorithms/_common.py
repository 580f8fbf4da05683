"""Pieces shared by the point-to-point algorithm bodies."""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from ..core.registry import Context
from ..core.spec import VSpec

__all__ = ["Sides", "sides", "exchange_groups"]



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


def exchange_groups(send: VSpec, recv: VSpec, ctx: Context, groups: list[list[tuple[int, int]]],
                    tag: int) -> None:
    """Copy the own block, then post each group's (dst, src) steps and wait for the group.

    Zero-byte blocks are skipped on both sides (their counts agree when the call is
    correct). ``direct`` passes windows of steps, ``pairwise`` one step per group.
    """
    t = ctx.transport
    s = sides(send, recv, t)
    r = ctx.rank
    t.copy(s.rb, int(s.rd[r]), s.sb, int(s.sd[r]), int(s.rc[r]))
    sc, sd, rc, rd = s.sc.tolist(), s.sd.tolist(), s.rc.tolist(), s.rd.tolist()
    for group in groups:
        reqs = []
        for dst, src in group:
            if rc[src]:
                reqs.append(t.irecv(s.rb, rd[src], rc[src], src, tag))
            if sc[dst]:
                reqs.append(t.isend(s.sb, sd[dst], sc[dst], dst, tag))
        t.waitall(reqs)
