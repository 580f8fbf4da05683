"""``pairwise``: p-1 exchange steps, one peer at a time.

When p is a power of two, step k pairs ``rank`` with ``rank ^ k`` (both sides send and receive
with the same partner, a perfect matching each step). Otherwise step k sends to ``rank + k``
and receives from ``rank - k`` (mod p). One message each way per step: no contention at the
receiver, the schedule of choice for large blocks.
"""

from __future__ import annotations

from ..bufspec import VSpec
from . import AlgorithmInfo, Context, register
from ._common import TAG_PAIRWISE, sides

__all__ = ["schedule", "run", "cost"]


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


def cost(p: int, m: float, params: dict) -> float:
    """p-1 serialized steps: o + (p-1)(ts + tp + m tw)."""
    return params["o"] + (p - 1) * (params["ts"] + params["tp"] + m * params["tw"])


register(AlgorithmInfo(name="pairwise", run=run, cost=cost, schedule=schedule,
                       doc=__doc__ or ""))
