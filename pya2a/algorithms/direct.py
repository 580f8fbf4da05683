"""``direct``: nonblocking Isend/Irecv to every peer, throttled, peers staggered by rank.

Step k (k = 1..p-1) pairs this rank with ``dst = rank + k`` and ``src = rank - k`` (mod p), so
at any moment every rank sends to a different peer instead of all hitting rank 0 first. At
most ``window`` steps are in flight (option ``window``, env ``PYA2A_DIRECT_WINDOW``, default
32 as MPICH's throttle): a window of p-1 posts everything at once, a window of 1 is pairwise.
Zero-byte blocks are skipped on both sides (their counts agree when the call is correct).
"""

from __future__ import annotations

import os

from mpi4py import MPI

from ..bufspec import VSpec
from . import AlgorithmInfo, Bound, Context, register
from ._common import TAG_DIRECT, sides

__all__ = ["schedule", "run", "cost", "prepare"]

DEFAULT_WINDOW = 32


def schedule(rank: int, size: int) -> list[tuple[int, int]]:
    """(dst, src) of steps 1..p-1, in posting order."""
    return [((rank + k) % size, (rank - k) % size) for k in range(1, size)]


def _window(ctx: Context) -> int:
    w = ctx.options.get("window") or int(os.environ.get("PYA2A_DIRECT_WINDOW", DEFAULT_WINDOW))
    return max(1, int(w))


def run(send: VSpec, recv: VSpec, ctx: Context) -> None:
    """Exchange all blocks with throttled Isend/Irecv."""
    t = ctx.transport
    s = sides(send, recv, t)
    r, p = ctx.rank, ctx.size
    t.copy(s.rb, int(s.rd[r]), s.sb, int(s.sd[r]), int(s.rc[r]))
    steps = schedule(r, p)
    w = _window(ctx)
    sc, sd, rc, rd = s.sc.tolist(), s.sd.tolist(), s.rc.tolist(), s.rd.tolist()
    for lo in range(0, len(steps), w):
        reqs = []
        for dst, src in steps[lo:lo + w]:
            if rc[src]:
                reqs.append(t.irecv(s.rb, rd[src], rc[src], src, TAG_DIRECT))
            if sc[dst]:
                reqs.append(t.isend(s.sb, sd[dst], sc[dst], dst, TAG_DIRECT))
        t.waitall(reqs)


def _bind(send: VSpec, recv: VSpec, ctx: Context, groups: list[list[tuple[int, int]]],
          tag: int) -> Bound | None:
    """Persistent Send_init/Recv_init per block, started group by group (plans)."""
    if ctx.transport.device is not None or ctx.in_place:
        return None
    s = sides(send, recv, ctx.transport)
    comm, r = ctx.comm, ctx.rank
    sc, sd, rc, rd = s.sc.tolist(), s.sd.tolist(), s.rc.tolist(), s.rd.tolist()
    batches = []
    for group in groups:
        reqs = []
        for dst, src in group:
            if rc[src]:
                reqs.append(comm.Recv_init([s.rb[rd[src]:rd[src] + rc[src]], MPI.BYTE], src, tag))
            if sc[dst]:
                reqs.append(comm.Send_init([s.sb[sd[dst]:sd[dst] + sc[dst]], MPI.BYTE], dst, tag))
        if reqs:
            batches.append(reqs)
    n = rc[r]
    mine = (s.rb[rd[r]:rd[r] + n], s.sb[sd[r]:sd[r] + n]) if n else None
    startall, waitall = MPI.Prequest.Startall, MPI.Request.Waitall

    def run_bound() -> None:
        if mine is not None:
            mine[0][...] = mine[1]
        for reqs in batches:
            startall(reqs)
            waitall(reqs)

    def free() -> None:
        for reqs in batches:
            for q in reqs:
                if q:
                    q.Free()
        batches.clear()

    return Bound(run=run_bound, free=free)


def prepare(send: VSpec, recv: VSpec, ctx: Context) -> Bound | None:
    """Bind to these buffers with persistent point-to-point requests (same schedule as run)."""
    steps = schedule(ctx.rank, ctx.size)
    w = _window(ctx)
    return _bind(send, recv, ctx, [steps[lo:lo + w] for lo in range(0, len(steps), w)],
                 TAG_DIRECT)


def cost(p: int, m: float, params: dict) -> float:
    """Like native plus our per-message software overhead: o + (p-1)(ts + tp + m tw)."""
    return params["o"] + (p - 1) * (params["ts"] + params["tp"] + m * params["tw"])


register(AlgorithmInfo(name="direct", run=run, cost=cost, schedule=schedule,
                       doc=__doc__ or "", prepare=prepare))
