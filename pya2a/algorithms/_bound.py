"""Exchange programs: an algorithm's whole exchange as a table of operations, per plan.

A program (:mod:`pya2a.core._exec`) holds what does not depend on where the two user
buffers are: per operation the buffer (0 = send, 1 = receive, 2.. = scratch the program
owns), byte offset, length, peer and tag. A plan makes it once; a run on any buffer pair
is one C loop over memcpys and ``MPI_Isend`` / ``MPI_Irecv`` / ``MPI_Waitall`` (or the
library's ``MPI_Alltoall(v)``) at base + offset, so a new buffer costs no more than a
bound one; :meth:`Program.bind` makes persistent requests for pairs seen repeatedly.

- :func:`group_ops`: ``direct`` / ``pairwise``: the own block, then groups of steps, each
  group's receives and sends posted together and waited for.
- :func:`schedule_program`: a store-and-forward schedule (``ring`` / ``mesh`` /
  ``hypercube``) when every rank knows the bytes between every pair of ranks (a plan, or a
  one-shot call whose agreement record carried them): each phase gathers its outgoing
  blocks into scratch, posts its messages of known sizes, waits, and unpacks the blocks
  that arrived home, with no size messages at run time.
- :func:`make_program`: the C program, or None where the extension is missing or was built
  against another MPI library than mpi4py's (:func:`py_binding` then binds the same table
  with mpi4py's persistent requests: the same messages, so ranks may differ in the
  executor they use).
"""

from __future__ import annotations

import warnings

import numpy as np
from mpi4py import MPI

from ..core.registry import AlgorithmInfo, Bound, Context
from ..core.spec import VSpec
from .tags import TAG_BOUND

__all__ = ["SCRATCH_LIMIT", "exec_module", "bind_groups", "bind_schedule", "bind_scratch_ok",
           "group_ops", "in_place_program", "make_program", "pair_reader", "py_binding",
           "schedule_program", "schedule_steps", "COPY", "RECV", "SEND", "WAIT", "ALLTOALL",
           "ALLTOALLV"]

SCRATCH_LIMIT = 256 << 20  # bytes of per-plan scratch above which plans call run()

# operation codes of a program row (op, a, b, c, d, e); the same values as pya2a.core._exec
COPY = 0  # src buffer, src offset, dst buffer, dst offset, bytes
RECV = 1  # buffer, offset, bytes, source, tag
SEND = 2  # buffer, offset, bytes, destination, tag
WAIT = 3  # wait for every request posted since the last wait
ALLTOALL = 4  # send buffer, offset, receive buffer, offset, bytes per peer
ALLTOALLV = 5  # send buffer (-1: in place), receive buffer; counts in the program's tables
_NOP = (WAIT, 0, 0, 0, 0, 0)

_EXEC: list = []  # [module or None], resolved on first use


def exec_module():
    """:mod:`pya2a.core._exec` when built against the MPI library mpi4py loaded, else None.

    Built against another MPI (say Open MPI's ``mpicc`` on PATH while mpi4py loads the
    MPICH wheel), it cannot be used: every path then runs through mpi4py, correct but
    slower (plans bind in Python, one-shot confirmations are Python calls), and a
    ``RuntimeWarning`` says so once; ``python -m pya2a info`` reports it as
    ``c_executor``.
    """
    if not _EXEC:
        _exec, built = _built()
        ok = built is not None and built == MPI.Get_library_version()
        if built is not None and not ok:
            warnings.warn(
                f"pya2a.core._exec was built for {_first_line(built)!r}, but mpi4py loaded "
                f"{_first_line(MPI.Get_library_version())!r}: pya2a runs its slower mpi4py "
                f"paths; rebuild it against this MPI (MPICC=<its mpicc> python setup.py "
                f"build_ext --inplace, or pip install --no-binary pya2a)",
                RuntimeWarning, stacklevel=2)
        _EXEC.append(_exec if ok else None)
    return _EXEC[0]


def executor_status() -> str:
    """What :func:`exec_module` found: ``"built for this MPI"``, ``"not built"``, or the
    library it was built for."""
    built = _built()[1]
    if built is None:
        return "not built"
    if built == MPI.Get_library_version():
        return "built for this MPI"
    return f"built for {_first_line(built)} (mpi4py paths in use)"


def _built():
    """:mod:`pya2a.core._exec` and the MPI library version it was built against, or
    (None, None) where it was not built."""
    try:
        from ..core import _exec

        return _exec, _exec.library_version()
    except Exception:  # not built here
        return None, None


def _first_line(version: str) -> str:
    return version.replace("\x00", "").strip().splitlines()[0] if version.strip() else "?"


def _no_pair(*args: object) -> None:
    return None


def pair_reader():
    """:func:`pya2a.core._exec.pair_key` (a buffer pair's cache key and formats, or None)
    and :func:`pya2a.core._exec.find_pair` (a plan's entry for a pair, or None); without the
    C module, where plans have no programs, two functions that answer None."""
    ex = exec_module()
    return (_no_pair, _no_pair) if ex is None else (ex.pair_key, ex.find_pair)


def make_program(comm: MPI.Intracomm, ops: list | np.ndarray, scratch: list = (),
                 vtables: tuple | None = None):
    """The C :class:`pya2a.core._exec.Program` of an operation table, or None.

    None where the extension is not available, or where the table does not fit it (a
    message longer than a C int): the caller then binds with :func:`py_binding` or runs the
    algorithm's own code, which send the same messages.
    """
    ex = exec_module()
    if ex is None:
        return None
    try:
        return ex.Program(comm, ops, list(scratch), vtables)
    except ValueError:
        return None


def group_ops(send: VSpec, recv: VSpec, rank: int, groups: list[list[tuple[int, int]]],
              tag: int) -> list[tuple]:
    """Rows of ``direct`` / ``pairwise``: the own block, then per group of (dst, src) steps
    the receives and sends, posted together, and a wait. Zero-byte blocks are skipped."""
    sc, sd = send.bcounts.tolist(), send.bdispls.tolist()
    rc, rd = recv.bcounts.tolist(), recv.bdispls.tolist()
    ops = [(COPY, 0, sd[rank], 1, rd[rank], rc[rank])] if rc[rank] else []
    for group in groups:
        n = len(ops)
        for dst, src in group:
            if rc[src]:
                ops.append((RECV, 1, rd[src], rc[src], src, tag))
            if sc[dst]:
                ops.append((SEND, 0, sd[dst], sc[dst], dst, tag))
        if len(ops) > n:
            ops.append(_NOP)
    return ops


def in_place_program(ops: list, scratch: list, nbytes: int) -> tuple[list, list]:
    """An in-place exchange from a program made for two buffers: the receive buffer's first
    ``nbytes`` copied into a new scratch buffer, which the rows then read as the send one."""
    new = 2 + len(scratch)
    out = [(COPY, 1, 0, new, 0, nbytes)] if nbytes else []
    for op, a, b, c, d, e in ops:
        if op == COPY or op == ALLTOALL:
            out.append((op, new if a == 0 else a, b, new if c == 0 else c, d, e))
        elif op in (RECV, SEND):
            out.append((op, new if a == 0 else a, b, c, d, e))
        elif op == WAIT:
            out.append((op, a, b, c, d, e))
        else:
            raise ValueError(f"in_place_program: operation {op} reads the send buffer")
    return out, [*scratch, np.empty(max(nbytes, 1), dtype=np.uint8)]


def py_binding(comm: MPI.Intracomm, ops: list | np.ndarray, scratch: list, send_addr: int,
               recv_addr: int, keep: object = None) -> Bound:
    """An operation table (COPY / RECV / SEND / WAIT rows) bound with mpi4py's persistent
    requests and :class:`pya2a.core._pack.CopyList` copies: the executor where the C one is
    not available. ``keep``: objects the binding must hold (the user buffers' views)."""
    from ..core import _pack

    base = [send_addr, recv_addr] + [int(b.ctypes.data) for b in scratch]
    program: list = []  # (copies or None, requests) per wait
    copies: list = []
    reqs: list = []
    every: list = []
    for op, a, b, c, d, e in np.asarray(ops, dtype=np.int64).reshape(-1, 6).tolist():
        if op == COPY:
            if e:
                copies.append((base[a] + b, base[c] + d, e))
        elif op in (RECV, SEND):
            if copies:  # copies before the requests that follow them
                program.append((_pack.CopyList(np.array(copies, np.int64), keep), []))
                copies = []
            mem = MPI.buffer.fromaddress(base[a] + b, c, False)
            q = (comm.Recv_init if op == RECV else comm.Send_init)([mem, MPI.BYTE], d, e)
            reqs.append(q)
            every.append(q)
        elif op == WAIT:
            if reqs:
                program.append((None, reqs))
                reqs = []
        else:
            raise ValueError(f"py_binding: operation {op} has no persistent form")
    if copies:
        program.append((_pack.CopyList(np.array(copies, np.int64), keep), []))
    startall, waitall = MPI.Prequest.Startall, MPI.Request.Waitall
    hold = (scratch, keep)

    def run_bound() -> None:
        for copy, rq in program:
            if copy is not None:
                copy()
            else:
                startall(rq)
                waitall(rq)

    def free() -> None:
        for q in every:
            if q:
                q.Free()
        every.clear()
        program.clear()

    run_bound.hold = hold  # type: ignore[attr-defined]
    return Bound(run=run_bound, free=free)


def bind_groups(send: VSpec, recv: VSpec, ctx: Context, groups: list[list[tuple[int, int]]],
                tag: int) -> Bound | None:
    """Persistent Send_init/Recv_init per block, started group by group (plans without the
    C executor); None for device buffers and in-place exchanges."""
    if ctx.transport.device is not None or ctx.in_place:
        return None
    from ._common import sides

    s = sides(send, recv, ctx.transport)
    return py_binding(ctx.comm, group_ops(send, recv, ctx.rank, groups, tag), [],
                      int(s.sb.ctypes.data), int(s.rb.ctypes.data), (s.sb, s.rb))


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


def schedule_program(send: VSpec, recv: VSpec, ctx: Context, cmat: np.ndarray,
                     steps: list) -> tuple[list, list]:
    """A store-and-forward schedule (ring, mesh, hypercube) as rows and scratch buffers.

    With the whole byte-count matrix ``cmat[src, dst]`` (all-gathered once when the plan was
    made) every message length, every block's place in every message and every scratch
    buffer is known here, so a run is only: gather the outgoing blocks, post the phase's
    messages and wait for them, unpack the blocks that arrived home. No size messages travel
    at run time (the one-shot ``run`` must exchange them). Steps of one phase are posted
    together (they depend only on earlier phases). Buffers: 0 send, 1 receive, 2 the
    outgoing scratch (shared by the steps of a phase), 3 the incoming one (a place per
    message). The scratch limit is the caller's to check, on the largest need over all
    ranks (:func:`bind_scratch_ok`): with skewed counts one rank's scratch can exceed it
    while another's does not, and a rank that binds exchanges on other tags than one that
    calls ``run``, so the two would wait on each other forever.
    """
    r = ctx.rank
    sd, rd = send.bdispls, recv.bdispls
    # where a block lives: loc[(src, dst)] = (buffer, offset)
    loc: dict[tuple[int, int], tuple[int, int]] = {(r, d): (0, int(sd[d]))
                                                   for d in range(ctx.size)}
    phases = _phases(steps)
    out_need, in_need = _scratch_need(phases, cmat)
    scratch = [np.zeros(max(out_need, 1), dtype=np.uint8),
               np.zeros(max(in_need, 1), dtype=np.uint8)]
    n_self = int(recv.bcounts[r])
    ops: list[tuple] = [(COPY, 0, int(sd[r]), 1, int(rd[r]), n_self)] if n_self else []
    in_pos = 0
    for ph in phases:
        recvs, sends, unpacks, moved = [], [], [], []
        out_pos = 0
        for st in ph:
            blk = np.asarray(st.send, dtype=np.int64).reshape(-1, 2)
            start = out_pos
            for (a, b), n in zip(blk.tolist(), cmat[blk[:, 0], blk[:, 1]].tolist(),
                                 strict=True):
                if n:
                    buf, off = loc[(a, b)]
                    ops.append((COPY, buf, off, 2, out_pos, n))
                    out_pos += n
            rblk = np.asarray(st.recv, dtype=np.int64).reshape(-1, 2)
            rl = cmat[rblk[:, 0], rblk[:, 1]].tolist()
            rtot = sum(rl)
            if rtot:
                recvs.insert(0, (RECV, 3, in_pos, rtot, st.src, TAG_BOUND))
            if out_pos > start:
                sends.append((SEND, 2, start, out_pos - start, st.dst, TAG_BOUND))
            for (a, b), n in zip(rblk.tolist(), rl, strict=True):
                if b == r:
                    if n:
                        unpacks.append((COPY, 3, in_pos, 1, int(rd[a]), n))
                else:
                    moved.append(((a, b), in_pos))
                in_pos += n
        for key, o in moved:  # received blocks are forwardable from the next phase on
            loc[key] = (3, o)
        if recvs or sends:
            ops.extend(recvs + sends)
            ops.append(_NOP)
        ops.extend(unpacks)
    return ops, scratch


def bind_schedule(info: AlgorithmInfo, send: VSpec, recv: VSpec, ctx: Context,
                  cmat: np.ndarray, steps: list | None = None) -> Bound | None:
    """:func:`schedule_program` bound to two host buffers with :func:`py_binding` (plans
    without the C executor). Returns None (plans then call ``run``) for device buffers,
    in-place exchanges and schedules that are not lists of Steps. ``steps``: the schedule
    when the caller has it already (computed here otherwise)."""
    from ._common import sides

    if ctx.transport.device is not None or ctx.in_place or cmat is None:
        return None
    if steps is None:
        steps = schedule_steps(info, ctx)
    if steps is None:
        return None
    s = sides(send, recv, ctx.transport)
    ops, scratch = schedule_program(send, recv, ctx, cmat, steps)
    return py_binding(ctx.comm, ops, scratch, int(s.sb.ctypes.data), int(s.rb.ctypes.data),
                      (s.sb, s.rb))
