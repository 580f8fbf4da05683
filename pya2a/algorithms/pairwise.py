"""``pairwise``: p-1 exchange steps, one peer at a time.

When p is a power of two, step k pairs ``rank`` with ``rank ^ k`` (both sides send and receive
with the same partner, a perfect matching each step). Otherwise step k sends to ``rank + k``
and receives from ``rank - k`` (mod p). One message each way per step: no contention at the
receiver, the schedule of choice for large blocks.
"""

from __future__ import annotations

from mpi4py import MPI

from ..bufspec import VSpec
from . import AlgorithmInfo, Bound, Context, register
from ._common import TAG_PAIRWISE, sides

__all__ = ["schedule", "run", "cost", "prepare"]


def schedule(rank: int, size: int) -> list[tuple[int, int]]:
    """(dst, src) for steps 1..p-1."""
    if size & (size - 1) == 0:
        return [(rank ^ k, rank ^ k) for k in range(1, size)]
    return [((rank + k) % size, (rank - k) % size) for k in range(1, size)]


def run(send: VSpec, recv: VSpec, ctx: Context) -> None:
    """Walk the schedule; each step is an Irecv + Isend + Waitall (zeros skipped)."""
    t = ctx.transport
    s = sides(send, recv, t)
    r = ctx.rank
    t.copy(s.rb, int(s.rd[r]), s.sb, int(s.sd[r]), int(s.rc[r]))
    sc, sd, rc, rd = s.sc.tolist(), s.sd.tolist(), s.rc.tolist(), s.rd.tolist()
    for dst, src in schedule(r, ctx.size):
        reqs = []
        if rc[src]:
            reqs.append(t.irecv(s.rb, rd[src], rc[src], src, TAG_PAIRWISE))
        if sc[dst]:
            reqs.append(t.isend(s.sb, sd[dst], sc[dst], dst, TAG_PAIRWISE))
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
    return _bind(send, recv, ctx, [[step] for step in schedule(ctx.rank, ctx.size)],
                 TAG_PAIRWISE)


def cost(p: int, m: float, params: dict) -> float:
    """p-1 serialized steps: o + (p-1)(ts + tp + m tw)."""
    return params["o"] + (p - 1) * (params["ts"] + params["tp"] + m * params["tw"])


register(AlgorithmInfo(name="pairwise", run=run, cost=cost, schedule=schedule,
                       doc=__doc__ or "", prepare=prepare))
