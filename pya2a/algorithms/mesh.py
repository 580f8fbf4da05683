"""``mesh``: two-phase exchange on an r x c process grid, rows first, then columns.

Rank ``q`` sits at row ``q // c``, column ``q % c``. Phase 1 (c-1 steps, all in flight
together): rank (i, j) sends to each row peer (i, j') the r blocks for column j', that is for
ranks (0, j'), ..., (r-1, j'). Local regroup: the blocks now held are reordered by
destination row. Phase 2 (r-1 steps, in flight together): rank (i, j) sends to each column
peer (i', j) the c blocks for (i', j), one from every rank of row i. (r-1)+(c-1) messages per
rank instead of p-1, each c or r blocks long; every byte crosses the network twice.

The grid is ``options["grid"]``, else env ``PYA2A_MESH_GRID="r,c"``, else the factor pair of
p nearest sqrt(p) (r <= c). A prime p has only 1 x p, where phase 1 is a direct exchange and
phase 2 is empty: the algorithm degenerates to ``direct`` (and, like ``direct``, posts
every pair's message and checks received sizes when the counts were not verified). With
rows = nodes (c = ranks per node) phase 1 stays on the node and phase 2 sends one aggregated
message per remote node.

Variable counts: phase 1 messages carry blocks of the sender's send counts; one round of r
int64 to each row peer before phase 1 tells the receiver their sizes. Phase 2 messages carry
a rank's own blocks; their sizes (c int64 from each column peer) travel during phase 1, so a
block whose size differs from the receive count (counts that do not match between ranks) is
left unwritten and reported instead of overwriting its neighbours.
"""

from __future__ import annotations

import numpy as np

from ..core.registry import AlgorithmInfo, Context, register
from ..core.spec import VSpec
from ._common import guarded, probed_groups, raise_mismatch, sides
from ._forward import (
    Step,
    blocks,
    default_grid,
    grid_from,
    meta_exchange,
    meta_wait,
    post,
    size_mismatch,
)
from .tags import TAG_MESH

__all__ = ["schedule", "run", "cost", "grid_from"]


def schedule(rank: int, size: int, grid: tuple[int, int] | None = None) -> list[Step]:
    """Phase 1 steps (row peers j+1.. j+c-1) then phase 2 steps (column peers i+1..)."""
    r, c = grid if grid is not None else grid_from(size)
    i, j = divmod(rank, c)
    rows = np.arange(r)
    cols = np.arange(c)
    steps = []
    for k in range(1, c):
        jo, ji = (j + k) % c, (j - k) % c
        steps.append(Step(dst=i * c + jo, src=i * c + ji, phase=1,
                          send=blocks(rank, rows * c + jo),
                          recv=blocks(i * c + ji, rows * c + j)))
    for k in range(1, r):
        io, ii = (i + k) % r, (i - k) % r
        steps.append(Step(dst=io * c + j, src=ii * c + j, phase=2,
                          send=blocks(i * c + cols, io * c + j),
                          recv=blocks(ii * c + cols, rank)))
    return steps


def _c(a: np.ndarray) -> np.ndarray:
    """A flat C-contiguous int64 copy or view, as the block movers take."""
    return np.ascontiguousarray(a, dtype=np.int64).reshape(-1)


def _direct(t, s, rank: int, p: int, check: bool = False) -> None:
    """All blocks straight from the send to the receive buffer (a 1 x p or p x 1 grid).

    ``check`` (counts not verified, :func:`guarded`): every pair's message is posted, empty
    ones too, and received by matched probe, as in ``direct`` (:func:`probed_groups`).
    """
    if check:
        steps = [((rank + k) % p, (rank - k) % p) for k in range(1, p)]
        raise_mismatch("mesh", rank, probed_groups(t, s, [steps], TAG_MESH))
        return
    reqs: list = []
    for k in range(1, p):
        dst, src = (rank + k) % p, (rank - k) % p
        post(t, reqs, s.rb, s.rd[src], s.rc[src], src, TAG_MESH, send=False)
        post(t, reqs, s.sb, s.sd[dst], s.sc[dst], dst, TAG_MESH, send=True)
    t.waitall(reqs)


def run(send: VSpec, recv: VSpec, ctx: Context) -> None:
    """Two-phase exchange (see module docstring)."""
    t = ctx.transport
    s = sides(send, recv, t)
    q, p = ctx.rank, ctx.size
    r, c = grid_from(p, ctx.options)
    if r == 1 or c == 1:
        t.copy(s.rb, int(s.rd[q]), s.sb, int(s.sd[q]), int(s.rc[q]))
        _direct(t, s, q, p, guarded(ctx))
        return
    i, j = divmod(q, c)
    sc, sd = s.sc.reshape(r, c), s.sd.reshape(r, c)  # [dest row, dest column]
    rc, rd = s.rc.reshape(r, c), s.rd.reshape(r, c)  # [source row, source column]
    peers = [(j + k) % c for k in range(1, c)]  # phase 1 send order; receive from (j - k)
    lpeers = [(j - k) % c for k in range(1, c)]

    # lens1[j2, i2]: bytes of block (i, j2) -> (i2, j), held after phase 1.
    lens1 = np.empty((c, r), dtype=np.int64)
    lens1[j] = sc[:, j]
    outs = [np.ascontiguousarray(sc[:, jo]) for jo in peers]
    reqs = meta_exchange(ctx.comm, [(i * c + jo, out, i * c + ji, lens1[ji])
                                    for jo, out, ji in zip(peers, outs, lpeers, strict=True)])
    meta_wait(reqs)
    # lens2[ii, j2]: bytes of block (ii, j2) -> this rank, announced by the column peer that
    # forwards it in phase 2; sent now, it travels while phase 1 moves the data
    lens2 = np.empty((r, c), dtype=np.int64)
    lens2[i] = lens1[:, i]
    outs2 = [np.ascontiguousarray(lens1[:, (i + k) % r]) for k in range(1, r)]
    reqs2 = meta_exchange(ctx.comm, [(((i + k) % r) * c + j, outs2[k - 1],
                                      ((i - k) % r) * c + j, lens2[(i - k) % r])
                                     for k in range(1, r)])

    # Phase 1: regroup the send buffer by destination column, exchange along the row.
    cols = np.array(peers, dtype=np.int64)
    stage1 = t.empty(int(sc[:, cols].sum()))
    t.gather(s.sb, _c(sd[:, cols].T), _c(sc[:, cols].T), stage1, 0)
    arena = t.empty(int(lens1.sum()))
    aoff = np.zeros(c + 1, dtype=np.int64)
    np.cumsum(lens1.sum(axis=1), out=aoff[1:])
    t.gather(s.sb, _c(sd[:, j]), _c(sc[:, j]), arena, int(aoff[j]))
    reqs = []
    soff = 0
    col_bytes = sc.sum(axis=0).tolist()
    al = aoff.tolist()
    for jo, ji in zip(peers, lpeers, strict=True):
        post(t, reqs, arena, al[ji], al[ji + 1] - al[ji], i * c + ji, TAG_MESH, False)
        post(t, reqs, stage1, soff, col_bytes[jo], i * c + jo, TAG_MESH, True)
        soff += col_bytes[jo]
    t.waitall(reqs)
    del stage1

    # Local regroup: block (i, j2) -> (i2, j) sits at arena offset boff[j2, i2].
    boff = (aoff[:c, None] + np.cumsum(lens1, axis=1) - lens1)
    meta_wait(reqs2)
    fits = lens2 == rc  # blocks whose size is the receive count (all, in a correct call)
    own = fits[i]  # own row: home
    t.pack(arena, _c(boff[own, i]), _c(lens1[own, i]), s.rb, _c(rd[i][own]))
    rows = np.array([(i + k) % r for k in range(1, r)], dtype=np.int64)
    stage2 = t.empty(int(lens1[:, rows].sum()))
    t.gather(arena, _c(boff[:, rows].T), _c(lens1[:, rows].T), stage2, 0)

    # Phase 2: along the column; a source row whose blocks lie back to back in the receive
    # buffer (the usual layout) is received in place, others through a buffer + scatter.
    reqs = []
    soff = 0
    late = []
    out_bytes = lens1.sum(axis=0).tolist()  # to each destination row
    in_bytes = lens2.sum(axis=1).tolist()  # from each source row, as announced
    in_place = (rd[:, 1:] == rd[:, :-1] + rc[:, :-1]).all(axis=1).tolist()
    row_fits = fits.all(axis=1).tolist()
    first = rd[:, 0].tolist()
    unfit = []
    for k in range(1, r):
        io, ii = (i + k) % r, (i - k) % r
        post(t, reqs, stage2, soff, out_bytes[io], io * c + j, TAG_MESH, True)
        soff += out_bytes[io]
        if not row_fits[ii]:
            unfit.append(ii)
        elif in_place[ii]:
            post(t, reqs, s.rb, first[ii], in_bytes[ii], ii * c + j, TAG_MESH, False)
        else:
            late.append(ii)
    inbuf = t.empty(sum(in_bytes[ii] for ii in late + unfit)) if late or unfit else None
    pos = 0
    for ii in late + unfit:
        post(t, reqs, inbuf, pos, in_bytes[ii], ii * c + j, TAG_MESH, False)
        pos += in_bytes[ii]
    t.waitall(reqs)
    if late:
        t.scatter(inbuf, s.rb, _c(rd[late]), _c(rc[late]), 0)
    if fits.all():
        return
    pos = sum(in_bytes[ii] for ii in late)
    for ii in unfit:  # deliver the blocks that fit, leave the others unwritten
        offs = pos + np.cumsum(lens2[ii]) - lens2[ii]
        ok = fits[ii]
        t.pack(inbuf, _c(offs[ok]), _c(lens2[ii][ok]), s.rb, _c(rd[ii][ok]))
        pos += in_bytes[ii]
    bad = np.argwhere(~fits)  # (source row, source column)
    raise size_mismatch("mesh", q, bad[:, 0] * c + bad[:, 1], lens2[~fits], rc[~fits])


# Python work per call besides the messages (grid, index arrays, four gathers), in units of
# tp: about 40 us with a no-op transport on the development VM at p = 16..256.
CALL_PY = 25


def cost(p: int, m: float, params: dict, grid: tuple[int, int] | None = None) -> float:
    """Two phases of concurrent messages on an r x c grid, m bytes per block.

    T = o + CALL_PY tp + (ts + tp) + (c-1)(ts + tp + r m tw) + (r-1)(ts + tp + c m tw)
        + 3 tr p m

    The first (ts + tp) is the round of phase-1 sizes. Phase 1 sends c-1 messages of r
    blocks, phase 2 r-1 messages of c blocks: 2p - r - c blocks on the wire in r + c - 2
    messages. Rearrangement: phase-1 gather, regroup, own row (about 3 p m bytes copied).
    A 1 x p or p x 1 grid is a direct exchange: o + (p-1)(ts + tp + m tw).
    """
    if grid is None:
        try:
            grid = grid_from(p)
        except ValueError:  # a PYA2A_MESH_GRID for another p: price the default grid
            grid = default_grid(p)
    r, c = grid
    if r == 1 or c == 1:
        return params["o"] + (p - 1) * (params["ts"] + params["tp"] + m * params["tw"])
    per = params["ts"] + params["tp"]
    return (params["o"] + CALL_PY * params["tp"] + per + (c - 1) * (per + r * m * params["tw"])
            + (r - 1) * (per + c * m * params["tw"]) + params["tr"] * 3 * p * m)


def supports(p: int, send: VSpec | None, recv: VSpec | None, device: bool) -> str | None:
    """Unusable only when PYA2A_MESH_GRID is set and does not factor p."""
    try:
        grid_from(p)
    except ValueError as e:
        return "needs r * c = p: " + str(e).removeprefix("mesh: ")
    return None


register(AlgorithmInfo(name="mesh", device=True, run=run, cost=cost, schedule=schedule,
                       supports=supports, schedule_options=("grid",), doc=__doc__ or ""))
