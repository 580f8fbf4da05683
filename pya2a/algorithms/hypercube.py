"""``hypercube``: ceil(log2 p) dimension exchanges, Bruck-style indexing for any p.

Each rank numbers its blocks by *position* j = 0..p-1, the destination relative to itself:
``rank ^ j`` when p is a power of two (true hypercube: partner ``rank ^ 2^k`` both ways, a
perfect matching each step), ``rank + j (mod p)`` otherwise (Bruck et al. 1997: send to
``rank + 2^k``, receive from ``rank - 2^k``). At step k every rank sends the blocks at the
positions with bit k set, about p/2 of them, and the blocks it receives take those same
positions. Invariant: before step k, position j holds the block from
``rank - (j mod 2^k)`` (``rank ^ (j mod 2^k)``) for ``that source + j`` (``^ j``), so after
the last step position j holds the block from ``rank - j`` (``rank ^ j``) for this rank.
A block is final once the step of its highest set bit is done; it is then unpacked.

Few start-ups (ceil(log2 p)) for more bytes (each block moves popcount(j) times, about
(log2 p)/2 on average): the small-message algorithm. Scratch: what every step received is
kept to the end (the all-ones position passes through every step's buffer), about
(log2 p)/2 times the rank's data; acceptable where the algorithm is meant to win.

Variable counts travel one step ahead of the data: while the data of step k are in flight,
each rank sends its step-(k+1) partner the int64 sizes of the blocks it will send it at
step k+1 (known by then: they were announced one step earlier). A round of sizes before
step 0 starts the pipeline, so it costs ceil(log2 p) + 1 rounds, not 2 ceil(log2 p) as a
separate counts pass would, and no p x p counts matrix as an all-gather would.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import numpy as np

from ..core import _pack
from ..core.registry import AlgorithmInfo, Context, register
from ..core.spec import VSpec
from ._common import sides
from ._forward import Step, blocks, meta_exchange, meta_wait, post, size_mismatch
from .tags import TAG_HYPERCUBE

__all__ = ["schedule", "run", "cost", "nsteps", "order", "peers"]


def nsteps(p: int) -> int:
    """ceil(log2 p): the number of dimension exchanges (0 for p = 1)."""
    return (p - 1).bit_length()


def _pow2(p: int) -> bool:
    return p & (p - 1) == 0


def peers(rank: int, p: int, k: int) -> tuple[int, int]:
    """(send to, receive from) at step k."""
    if _pow2(p):
        q = rank ^ (1 << k)
        return q, q
    return (rank + (1 << k)) % p, (rank - (1 << k)) % p


def _last_step(j: np.ndarray, k: int) -> np.ndarray:
    """For each position, 1 + the highest set bit of ``j mod 2^k`` (0 if none): which buffer
    (0 = the send buffer, s + 1 = what step s received) holds it before step k."""
    low = j & ((1 << k) - 1)
    out = np.zeros(j.shape, dtype=np.int64)
    for b in range(k):
        out[(low >> b) & 1 == 1] = b + 1
    return out


def order(p: int, k: int) -> np.ndarray:
    """Positions sent at step k, in message order: bit k set, grouped by holding buffer."""
    j = np.arange(p, dtype=np.int64)
    j = j[(j >> k) & 1 == 1]
    return j[np.lexsort((j, _last_step(j, k)))]


def _block_at(rank: int, p: int, j: np.ndarray, k: int) -> np.ndarray:
    """(source, destination) of the blocks at positions j before step k."""
    low = j & ((1 << k) - 1)
    if _pow2(p):
        src = rank ^ low
        return blocks(src, src ^ j)
    src = (rank - low) % p
    return blocks(src, (src + j) % p)


def schedule(rank: int, size: int) -> list[Step]:
    """ceil(log2 p) steps; step k carries the positions of :func:`order` (p, k)."""
    steps = []
    for k in range(nsteps(size)):
        o = order(size, k)
        dst, src = peers(rank, size, k)
        steps.append(Step(dst=dst, src=src, phase=k, send=_block_at(rank, size, o, k),
                          recv=_block_at(rank, size, o, k + 1)))
    return steps


class _Round(NamedTuple):
    """Rank-independent facts about one step (cached per p)."""

    order: np.ndarray  # positions sent and received, in message order
    holders: tuple  # buffer of each run of ``order`` (0 = send buffer, b = step b-1's)
    cuts: np.ndarray  # run s is order[cuts[s]:cuts[s + 1]]: one gather each
    done: np.ndarray  # indices into ``order`` of the positions that are home after this step


@functools.lru_cache(maxsize=32)
def _rounds(p: int) -> tuple[_Round, ...]:
    out = []
    for k in range(nsteps(p)):
        o = order(p, k)
        held = _last_step(o, k)
        starts = np.flatnonzero(np.diff(held)) + 1
        cuts = np.concatenate([[0], starts, [o.size]]).astype(np.int64)
        holders = tuple(int(held[a]) for a in cuts[:-1])
        done = np.flatnonzero((o >> (k + 1)) == 0).astype(np.int64)  # highest set bit is k
        for a in (o, cuts, done):
            a.setflags(write=False)
        out.append(_Round(o, holders, cuts, done))
    return tuple(out)


def run(send: VSpec, recv: VSpec, ctx: Context) -> None:
    """Dimension exchanges with sizes pipelined one step ahead (see module docstring)."""
    t = ctx.transport
    s = sides(send, recv, t)
    r, p = ctx.rank, ctx.size
    t.copy(s.rb, int(s.rd[r]), s.sb, int(s.sd[r]), int(s.rc[r]))
    rounds = _rounds(p)
    if not rounds:
        return
    pos = np.arange(p, dtype=np.int64)
    if _pow2(p):
        home = pos ^ r  # destination of position j at the start = its source at the end
        origin = home
    else:
        home = (r + pos) % p
        origin = (r - pos) % p  # source of the block that ends at position j
    where = s.rd[origin]  # its receive offset
    expect = s.rc[origin]  # and its receive count
    wrong: list[int] = []
    length = s.sc[home]  # data state: bytes at each position
    offset = s.sd[home]
    known = length.copy()  # size state, one step ahead of the data
    bufs = [s.sb]  # bufs[b]: the send buffer, then what step b - 1 received

    to, frm = peers(r, p, 0)
    incoming = np.empty(rounds[0].order.size, dtype=np.int64)
    meta_wait(meta_exchange(ctx.comm, [(to, known[rounds[0].order], frm,
                                                  incoming)]))
    known[rounds[0].order] = incoming
    for k, st in enumerate(rounds):
        to, frm = peers(r, p, k)
        runs, total = _pack.take_runs(offset, length, st.order, st.cuts)
        out = t.empty(total)
        end = 0
        for b, (offs, lens) in zip(st.holders, runs, strict=True):
            end = t.gather(bufs[b], offs, lens, out, end)
        nin = int(incoming.sum())
        inc = t.empty(nin)
        reqs: list = []
        post(t, reqs, inc, 0, nin, frm, TAG_HYPERCUBE, send=False)
        post(t, reqs, out, 0, end, to, TAG_HYPERCUBE, send=True)
        meta: list = []
        if k + 1 < len(rounds):
            o2 = rounds[k + 1].order
            to2, frm2 = peers(r, p, k + 1)
            ahead = np.empty(o2.size, dtype=np.int64)
            meta = meta_exchange(ctx.comm, [(to2, known[o2], frm2, ahead)])
        t.waitall(reqs)
        meta_wait(meta)
        bufs.append(inc)
        src_off, lens, dst_off = _pack.record_arrival(offset, length, st.order, incoming,
                                                      st.done, where)
        if lens.size:
            at = st.order[st.done]
            ok = lens == expect[at]
            if not ok.all():  # counts that do not match: those blocks are not written
                wrong.extend(int(j) for j in at[~ok])
                src_off, lens, dst_off = src_off[ok], lens[ok], dst_off[ok]
            t.pack(inc, src_off, lens, s.rb, dst_off)
        if k + 1 < len(rounds):
            known[o2] = ahead
            incoming = ahead
    if wrong:
        j = np.array(sorted(wrong), dtype=np.int64)
        raise size_mismatch("hypercube", r, origin[j], length[j], expect[j])


# Python work per step besides its messages (index arrays, one gather per holding buffer,
# unpacking), in units of tp: about 15 us per step with a no-op transport on the development
# VM at p = 16..1024 (two Cython calls build the index arrays: _pack.take_runs and
# record_arrival).
STEP_PY = 10


@functools.lru_cache(maxsize=64)
def _moved(p: int) -> int:
    """Block hops per rank: sum over steps of the positions sent = sum of popcount(j)."""
    return sum(bin(j).count("1") for j in range(p))


def cost(p: int, m: float, params: dict) -> float:
    """ceil(log2 p) rounds, each ~p/2 blocks, plus one round of sizes.

    T = o + (L+1)(ts + tp) + L STEP_PY tp + tw (m + 8) H + 2 tr m H,
    L = ceil(log2 p), H = sum_j popcount(j) (= (p/2) log2 p for a power of two: the
    textbook (ts + tw m p/2) log2 p). Every hop is gathered once and received once; the
    sizes add 8 bytes per hop.
    """
    if p == 1:
        return params["o"] + params["tr"] * m
    nk, h = nsteps(p), _moved(p)
    return (params["o"] + (nk + 1) * (params["ts"] + params["tp"]) + nk * STEP_PY * params["tp"]
            + params["tw"] * (m + 8) * h + params["tr"] * 2 * m * h)


register(AlgorithmInfo(name="hypercube", device=True, run=run, cost=cost, schedule=schedule,
                       doc=__doc__ or ""))
