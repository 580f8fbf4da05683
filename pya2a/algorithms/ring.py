"""``ring``: store-and-forward around a ring, p-1 steps, messages shrinking by one block.

Every rank sends only to ``rank + 1`` and receives only from ``rank - 1``. At step 1 a rank
sends all its blocks but its own, ordered by destination ``rank+1, rank+2, ...``. At step k
it receives the blocks of source ``s = rank - k`` still in transit; the first one is its own
(copied out), and the rest, already in the order the next rank expects, are forwarded
verbatim at step k+1: no rearrangement after step 1. Block (s, d) travels ``d - s`` hops.

Variable counts: a rank only needs the total length of each incoming message (the first
block's length is its own receive count, the rest is forwarded untouched), and source s
knows every total that will carry its data. So one ``MPI_Alltoall`` of one int64 per pair
up front (log p rounds inside MPI) replaces all per-block headers.
"""

from __future__ import annotations

import numpy as np

from ..core.registry import AlgorithmInfo, Context, register
from ..core.spec import VSpec
from ._common import sides
from ._forward import Step, blocks, size_mismatch
from .tags import TAG_RING

__all__ = ["schedule", "run", "cost", "message_lengths"]


def schedule(rank: int, size: int) -> list[Step]:
    """Steps 1..p-1: send to rank+1 the blocks of source rank-k+1, receive source rank-k's."""
    p, r = size, rank
    steps = []
    for k in range(1, p):
        s_out, s_in = (r - k + 1) % p, (r - k) % p
        send = blocks(s_out, (r + 1 + np.arange(p - k)) % p)
        recv = blocks(s_in, (r + np.arange(p - k)) % p)
        steps.append(Step(dst=(r + 1) % p, src=(r - 1) % p, send=send, recv=recv, phase=k))
    return steps


def message_lengths(sc: np.ndarray, rank: int) -> np.ndarray:
    """Bytes of the message carrying this rank's data into each rank (0 for itself).

    The message into rank ``rank + t`` holds blocks for destinations ``rank+t .. rank+p-1``,
    a suffix sum of the counts in ring order from ``rank``.
    """
    p = sc.shape[0]
    ring = (rank + np.arange(p)) % p
    suffix = np.cumsum(sc[ring][::-1])[::-1]
    out = np.empty(p, dtype=np.int64)
    out[ring] = suffix
    out[rank] = 0
    return out


def run(send: VSpec, recv: VSpec, ctx: Context) -> None:
    """Exchange by forwarding around the ring (see module docstring)."""
    t = ctx.transport
    s = sides(send, recv, t)
    r, p = ctx.rank, ctx.size
    rc, rd = s.rc, s.rd
    t.copy(s.rb, int(rd[r]), s.sb, int(s.sd[r]), int(rc[r]))
    if p == 1:
        return
    # per pair: the length of the message carrying the sender's data in, and the block for
    # the receiver in it (checked against the receive count: a mismatch is not written)
    meta_out = np.empty((p, 2), dtype=np.int64)
    meta_out[:, 0] = message_lengths(s.sc, r)
    meta_out[:, 1] = s.sc
    meta = np.empty((p, 2), dtype=np.int64)
    ctx.comm.Alltoall(meta_out, meta)
    inlen, blk = meta[:, 0], meta[:, 1]
    blk[r] = rc[r]
    wrong = blk != rc
    nxt, prv = (r + 1) % p, (r - 1) % p
    dests = (r + 1 + np.arange(p - 1)) % p
    first = int(s.sc[dests].sum())
    size = max(first, int(inlen.max()))
    bufs = [t.empty(size), t.empty(size)]
    out, off, n = bufs[0], 0, t.gather(s.sb, s.sd[dests], s.sc[dests], bufs[0], 0)
    inc = bufs[1]
    for k in range(1, p):
        src = (r - k) % p
        m = int(inlen[src])
        own = int(blk[src])  # the sender's size: what is forwarded stays consistent
        # one Sendrecv per step (fewest Python calls); empty messages are not skipped since
        # neither side knows whether the other has anything to send back
        if k == p - 1 and not wrong[src]:  # the last message is only this rank's block
            t.sendrecv(out, off, n, nxt, s.rb, int(rd[src]), own, prv, TAG_RING)
        else:
            t.sendrecv(out, off, n, nxt, inc, 0, m, prv, TAG_RING)
        if k < p - 1:
            if not wrong[src]:
                t.copy(s.rb, int(rd[src]), inc, 0, own)
            out, off, n, inc = inc, own, m - own, out
    if wrong.any():
        bad = np.flatnonzero(wrong)
        raise size_mismatch("ring", r, bad, blk[bad], rc[bad])


# Python work per step besides the message itself (own-block copy, bookkeeping), in units
# of tp: 1-2 us per step with a no-op transport on the development VM, p = 16..1024.
STEP_PY = 1.0


def cost(p: int, m: float, params: dict) -> float:
    """Textbook ring with our overheads, m bytes per block.

    T = o + [o + L ts]_counts + (p-1)(ts + (1 + STEP_PY) tp) + tw m p(p-1)/2 + 2 tr m (p-1)

    Step k moves p-k blocks; the step-1 gather and the own-block copies are the only
    rearrangement. The counts Alltoall costs about L = ceil(log2 p) start-ups.
    """
    meta = params["o"] + max(1, (p - 1).bit_length()) * params["ts"] if p > 1 else 0.0
    return (params["o"] + meta + (p - 1) * (params["ts"] + (1 + STEP_PY) * params["tp"])
            + params["tw"] * m * p * (p - 1) / 2 + params["tr"] * 2 * m * (p - 1))


register(AlgorithmInfo(name="ring", device=True, run=run, cost=cost, schedule=schedule,
                       doc=__doc__ or ""))
