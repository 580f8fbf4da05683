"""Pieces shared by the point-to-point algorithm bodies."""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
from mpi4py import MPI

from ..core.registry import Context
from ..core.spec import VSpec
from ._forward import size_mismatch

__all__ = ["Sides", "sides", "exchange_groups", "guarded", "wait_sizes",
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
    that every send meets exactly one receive whatever the counts say, and a size that
    differs from the receive count is reported instead of hanging or going unnoticed.
    """
    return not ctx.options.get("verified", True) and ctx.transport is not None and \
        ctx.transport.device is None


def wait_sizes(reqs: list, expect: list) -> list[tuple[int, int, int]]:
    """Complete MPI requests and report receives whose size is not the expected one.

    ``expect[i]`` is ``(source, bytes)`` for a receive, None for a send. Returns
    ``(source, bytes received, bytes expected)`` per mismatch, bytes received -1 when the
    message was larger than its receive (MPI's truncation error, which the private
    communicator returns instead of aborting). Every request is complete on return.
    """
    if not reqs:
        return []
    sts = [MPI.Status() for _ in reqs]
    failed: dict[int, int] = {}
    try:
        MPI.Request.Waitall(reqs, sts)
    except MPI.Exception:
        pending = []
        for i, st in enumerate(sts):
            code = st.Get_error()
            if code == MPI.SUCCESS:
                continue
            cls = MPI.Get_error_class(code)
            if cls == MPI.ERR_PENDING:
                pending.append(i)
            else:
                failed[i] = cls
        for i in pending:
            try:
                reqs[i].Wait(sts[i])
            except MPI.Exception as e:
                failed[i] = e.Get_error_class()
    out = []
    for i, e in enumerate(expect):
        cls = failed.get(i)
        if e is None or (cls is not None and cls != MPI.ERR_TRUNCATE):
            if cls is not None:
                raise MPI.Exception(cls)
            continue
        src, want = e
        got = -1 if cls is not None else sts[i].Get_count(MPI.BYTE)
        if got != want:
            out.append((src, got, want))
    return out


def raise_mismatch(call: str, rank: int, bad: list[tuple[int, int, int]]) -> None:
    """Raise :func:`size_mismatch` for the mismatches of :func:`wait_sizes` (received in
    place: those blocks may be partly written), if any."""
    if bad:
        bad = sorted(bad)
        raise size_mismatch(call, rank, [b[0] for b in bad], [b[1] for b in bad],
                            [b[2] for b in bad], written=True)


def exchange_groups(send: VSpec, recv: VSpec, ctx: Context, groups: list[list[tuple[int, int]]],
                    tag: int, name: str = "direct") -> None:
    """Copy the own block, then post each group's (dst, src) steps and wait for the group.

    Zero-byte blocks are skipped on both sides (their counts agree when the call is
    correct), unless the counts were not verified (:func:`guarded`): then every message is
    posted and every received size checked. ``direct`` passes windows of steps,
    ``pairwise`` one step per group; ``name`` is the algorithm's, for errors.
    """
    t = ctx.transport
    s = sides(send, recv, t)
    r = ctx.rank
    t.copy(s.rb, int(s.rd[r]), s.sb, int(s.sd[r]), int(s.rc[r]))
    sc, sd, rc, rd = s.sc.tolist(), s.sd.tolist(), s.rc.tolist(), s.rd.tolist()
    if guarded(ctx):
        bad: list[tuple[int, int, int]] = []
        for group in groups:
            reqs, expect = [], []
            for dst, src in group:
                reqs.append(t.irecv(s.rb, rd[src], rc[src], src, tag))
                expect.append((src, rc[src]))
                reqs.append(t.isend(s.sb, sd[dst], sc[dst], dst, tag))
                expect.append(None)
            bad += wait_sizes(reqs, expect)
        raise_mismatch(name, r, bad)
        return
    for group in groups:
        reqs = []
        for dst, src in group:
            if rc[src]:
                reqs.append(t.irecv(s.rb, rd[src], rc[src], src, tag))
            if sc[dst]:
                reqs.append(t.isend(s.sb, sd[dst], sc[dst], dst, tag))
        t.waitall(reqs)
