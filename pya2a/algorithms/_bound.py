"""Bound schedules: a store-and-forward algorithm's whole exchange as precomputed copies.

When every rank knows the bytes between every pair of ranks (a plan, or a one-shot call
whose agreement record carried them), a schedule of ``ring`` / ``mesh`` / ``hypercube`` can
be bound once to two buffers: each phase becomes one list of memcpys
(:class:`pya2a.core._pack.CopyList`) plus persistent point-to-point requests of known
sizes, with no size messages at run time.
"""

from __future__ import annotations

import numpy as np
from mpi4py import MPI

from ..core.registry import AlgorithmInfo, Bound, Context
from ..core.spec import VSpec
from .tags import TAG_BOUND

__all__ = ["SCRATCH_LIMIT", "bind_schedule", "bind_scratch_ok", "schedule_steps"]

SCRATCH_LIMIT = 256 << 20  # bytes of per-binding scratch above which plans call run()


def schedule_steps(info: AlgorithmInfo, ctx: Context) -> list | None:
    """The algorithm's schedule as Step objects (blocks named (src, dst)), or None."""
    fn = info.schedule
    if fn is None:
        return None
    try:
        if "grid" in info.schedule_options:
            from ._forward import grid_from

            steps = fn(ctx.rank, ctx.size, grid_from(ctx.size, ctx.options))
        else:
            steps = fn(ctx.rank, ctx.size)
    except Exception:
        return None
    if steps and not all(hasattr(st, "send") and hasattr(st, "recv") for st in steps):
        return None
    return list(steps)


def _phases(steps: list) -> list[list]:
    """Steps grouped into runs of equal ``phase`` (steps of one phase are posted together)."""
    phases: list[list] = []
    for st in steps:
        if phases and phases[-1][0].phase == st.phase:
            phases[-1].append(st)
        else:
            phases.append([st])
    return phases


def _scratch_need(phases: list[list], cmat: np.ndarray) -> tuple[int, int]:
    """Bytes of (outgoing, incoming) scratch a bound schedule holds on this rank."""
    out_need = max((int(cmat[st.send[:, 0], st.send[:, 1]].sum()) for ph in phases
                    for st in ph), default=0)
    out_need = max(out_need, max((sum(int(cmat[st.send[:, 0], st.send[:, 1]].sum())
                                      for st in ph) for ph in phases), default=0))
    in_need = sum(int(cmat[st.recv[:, 0], st.recv[:, 1]].sum()) for ph in phases for st in ph)
    return out_need, in_need


def bind_scratch_ok(comm: MPI.Intracomm, steps: list | None, cmat: np.ndarray) -> bool:
    """Collective: True when every rank's bound-schedule scratch fits :data:`SCRATCH_LIMIT`.

    ``steps`` is this rank's schedule (:func:`schedule_steps`). The answer is the same on
    every rank (one Allreduce of the largest need), so either all ranks bind the schedule or
    all call the algorithm's ``run``.
    """
    need = sum(_scratch_need(_phases(steps), cmat)) if steps else 0
    buf = np.array([need], dtype=np.int64)
    comm.Allreduce(MPI.IN_PLACE, buf, op=MPI.MAX)
    return int(buf[0]) <= SCRATCH_LIMIT


def bind_schedule(info: AlgorithmInfo, send: VSpec, recv: VSpec, ctx: Context,
                  cmat: np.ndarray, steps: list | None = None) -> Bound | None:
    """Bind a store-and-forward schedule (ring, mesh, hypercube) to two host buffers.

    With the whole byte-count matrix ``cmat[src, dst]`` (all-gathered once when the plan was
    made) every message length, every block's place in every message and every scratch
    buffer is known here, so a run is only: gather the outgoing blocks (``_pack``), start
    and wait the persistent requests of the phase, unpack the blocks that arrived home. No
    size messages travel at run time (the one-shot ``run`` must exchange them), and nothing
    is allocated. Steps of one phase are posted together (they depend only on earlier
    phases). Returns None (plans then call ``run``) for device buffers, in-place exchanges
    and schedules that are not lists of Steps. The scratch limit is the caller's to check, on
    the largest need over all ranks (:func:`bind_scratch_ok`): with skewed counts one rank's
    scratch can exceed it while another's does not, and a rank that binds exchanges on other
    tags than one that calls ``run``, so the two would wait on each other forever. ``steps``:
    the schedule when the caller has it already (computed here otherwise).
    """
    from ..core import _pack
    from ._common import sides

    if ctx.transport.device is not None or ctx.in_place or cmat is None:
        return None
    if steps is None:
        steps = schedule_steps(info, ctx)
    if steps is None:
        return None
    s = sides(send, recv, ctx.transport)
    r, p, comm = ctx.rank, ctx.size, ctx.comm
    sd, rd = s.sd, s.rd
    loc: dict[tuple[int, int], tuple[int, int]] = {(r, d): (0, int(sd[d])) for d in range(p)}
    # one outgoing scratch shared by all steps of the largest phase; incoming ones persist
    phases = _phases(steps)
    out_need, in_need = _scratch_need(phases, cmat)
    out = np.empty(max(out_need, 1), dtype=np.uint8)
    inc_all = np.empty(max(in_need, 1), dtype=np.uint8)
    bufs = [s.sb, out, inc_all]  # where a block lives: loc[(src, dst)] = (index, offset)
    # Copies are (source address, destination address, bytes) rows, checked here once
    base = np.array([b.ctypes.data for b in bufs], dtype=np.int64)
    size = np.array([b.nbytes for b in bufs], dtype=np.int64)
    rb_addr, rb_size = int(s.rb.ctypes.data), int(s.rb.nbytes)

    def rows(src_base, src_size, offs, lens, dst_base, dst_size, dst_offs) -> np.ndarray:
        offs, lens, dst_offs = (np.asarray(x, dtype=np.int64) for x in (offs, lens, dst_offs))
        keep = lens != 0  # empty blocks touch no byte, wherever they are
        if not keep.all():
            offs, lens, dst_offs = offs[keep], lens[keep], dst_offs[keep]
            src_base = src_base[keep] if np.ndim(src_base) else src_base
            src_size = src_size[keep] if np.ndim(src_size) else src_size
        if lens.size and ((offs < 0).any() or (offs + lens > src_size).any()
                          or (dst_offs < 0).any() or (dst_offs + lens > dst_size).any()):
            raise ValueError("bind_schedule: a block lies outside its buffer")  # a bug
        return np.stack([src_base + offs, dst_base + dst_offs, lens], axis=1).reshape(-1, 3)

    before, after, phase_reqs = [], [], []  # per phase: gather rows, unpack rows, requests
    in_pos = 0
    for ph in phases:
        gathers, unpacks, reqs, moved = [], [], [], []  # gather: (buffer, offset, at, bytes)
        out_pos = 0
        for st in ph:
            blk = np.asarray(st.send, dtype=np.int64).reshape(-1, 2)
            lens = cmat[blk[:, 0], blk[:, 1]].astype(np.int64)
            start = out_pos
            for (a, b), n in zip(blk.tolist(), lens.tolist(), strict=True):
                gathers.append((*loc[(a, b)], out_pos, n))
                out_pos += n
            rblk = np.asarray(st.recv, dtype=np.int64).reshape(-1, 2)
            rl = cmat[rblk[:, 0], rblk[:, 1]].astype(np.int64)
            rtot = int(rl.sum())
            if rtot:
                reqs.insert(0, comm.Recv_init([inc_all[in_pos:in_pos + rtot], MPI.BYTE],
                                              st.src, TAG_BOUND))
            if out_pos > start:
                reqs.append(comm.Send_init([out[start:out_pos], MPI.BYTE], st.dst, TAG_BOUND))
            offs = in_pos + np.cumsum(rl) - rl
            home = rblk[:, 1] == r
            if home.any():
                unpacks.append(rows(base[2], size[2], offs[home], rl[home], rb_addr, rb_size,
                                    rd[rblk[home, 0]]))
            moved.extend(((a, b), o) for (a, b), o, h in
                         zip(rblk.tolist(), offs.tolist(), home.tolist(), strict=True) if not h)
            in_pos += rtot
        for key, o in moved:  # received blocks are forwardable from the next phase on
            loc[key] = (2, o)
        g = np.array(gathers, dtype=np.int64).reshape(-1, 4)
        before.append([rows(base[g[:, 0]], size[g[:, 0]], g[:, 1], g[:, 3], base[1], size[1],
                            g[:, 2])])
        after.append(unpacks)
        phase_reqs.append(reqs)
    n_self = int(s.rc[r])
    # One copy list per phase boundary: the unpacks of phase k and the gathers of phase k + 1
    # (they touch different buffers) run as one memcpy loop; the first also copies the own
    # block. A run is then three calls per phase: copies, Startall, Waitall.
    own = [rows(base[0], size[0], [int(sd[r])], [n_self], rb_addr, rb_size, [int(rd[r])])]
    keep = (s.sb, s.rb, out, inc_all)
    lists = []
    for k in range(len(phases) + 1):
        parts = (own if k == 0 else after[k - 1]) + (before[k] if k < len(phases) else [])
        lists.append(_pack.CopyList(np.concatenate(parts) if parts else
                                    np.zeros((0, 3), np.int64), keep))
    first, program = lists[0], list(zip(phase_reqs, lists[1:], strict=True))
    startall, waitall = MPI.Prequest.Startall, MPI.Request.Waitall

    def run_bound() -> None:
        first()
        for reqs, copies in program:
            if reqs:
                startall(reqs)
                waitall(reqs)
            copies()

    def free() -> None:
        for reqs in phase_reqs:  # emptied in place: the run's program holds these lists
            for q in reqs:
                if q:
                    q.Free()
            reqs.clear()

    return Bound(run=run_bound, free=free)
