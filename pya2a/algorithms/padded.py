"""``padded``: every block in a slot of the largest block, one ``MPI_Alltoall``.

MPI libraries give ``MPI_Alltoall`` (one size for every block) algorithms in C that they do
not use for ``MPI_Alltoallv``: MPICH runs Bruck's ceil(log2 p) rounds below 256 B per block
(from 8 ranks on), Open MPI's tuned component does the same for small blocks, while both
post p-1 point-to-point messages for ``Alltoallv``. ``padded`` turns any Alltoallv into an
Alltoall: S = the largest block of the whole exchange (the same on every rank: it comes from
the agreement record, ``ctx.options["max_block"]``, or a plan's all-gathered counts), every
send block is copied into slot j of a p*S scratch buffer (one ``_pack.pack`` call), one
``MPI_Alltoall`` of S bytes per peer moves all slots, and the received slots are copied to
their places in the receive buffer (one more ``_pack.pack``). Padding bytes cross the wire
but are never read.

When every block of this rank is exactly S bytes and both layouts are packed (the uniform
Alltoall case) the user's buffers go to ``MPI_Alltoall`` directly, with no copy. That choice
is local: every rank still makes the same call (an Alltoall of S bytes per peer), only with
different buffers. Exchanges whose scratch would exceed :data:`SCRATCH_LIMIT` per side move
in rounds of ``C = SCRATCH_LIMIT // p`` bytes per slot (round k carries bytes
``[k C, (k+1) C)`` of every block): p*S can be large when one block is (the cost model keeps
``auto`` away from those exchanges; an explicit request must still work).

When the counts were not verified between ranks (a one-shot Alltoallv above
``ROWS_IN_RECORD`` ranks without ``check=True``), every slot starts with an 8-byte header
holding the sender's block length: a block whose length is not the receive count is not
unpacked and raises on the receiving rank after the exchange, and the copy-free path is not
taken (it has no room for the header).

Plans bind the scratch buffers and offset arrays once per buffer pair; ``Plan.bind`` (every
rank binds at the same point) makes the persistent ``MPI_Alltoall_init`` where the library
has it (MPI 4). Host buffers only: the device transports have no collective primitive.
"""

from __future__ import annotations

import math

import numpy as np
from mpi4py import MPI

from ..core import _pack
from ..core.registry import AlgorithmInfo, Bound, Context, register
from ..core.spec import VSpec
from ..core.validate import allreduce_max
from ._common import guarded, sides
from ._forward import size_mismatch

__all__ = ["run", "cost", "prepare", "program", "model_m", "chunking", "SCRATCH_LIMIT", "BRUCK_MAX",
           "BRUCK_MIN_P"]

# Per-destination bytes up to which MPICH's MPI_Alltoall runs Bruck's algorithm
# (MPIR_CVAR_ALLTOALL_SHORT_MSG_SIZE), and the smallest communicator it does so for.
BRUCK_MAX = 256
BRUCK_MIN_P = 8
# Bytes of scratch per side (send slots, receive slots) above which the exchange moves in
# rounds of SCRATCH_LIMIT // p bytes per slot.
SCRATCH_LIMIT = 32 << 20
# Bytes of the length header that starts every slot when the counts were not verified.
HEADER = 8


def chunking(p: int, slot: int) -> tuple[int, int]:
    """(bytes per slot and round, rounds) for p ranks and a largest block of ``slot`` bytes.

    The same on every rank (a function of global values only). No rounds when ``slot`` is 0.
    """
    if slot <= 0 or p <= 0:
        return 0, 0
    chunk = slot if p * slot <= SCRATCH_LIMIT else max(1, SCRATCH_LIMIT // p)
    return chunk, -(-slot // chunk)


def _dense(counts: np.ndarray, displs: np.ndarray, slot: int) -> bool:
    """Every block is ``slot`` bytes and block j starts ``j * slot`` after block 0."""
    if not counts.size:
        return True
    d0 = int(displs[0])
    return bool((counts == slot).all() and
                (displs == d0 + slot * np.arange(counts.size, dtype=np.int64)).all())


class _Exchange:
    """One padded exchange bound to two byte buffers: offsets, scratch, MPI arguments."""

    def __init__(self, comm: MPI.Intracomm, p: int, slot: int, sb: np.ndarray | None,
                 sc: np.ndarray, sd: np.ndarray, rb: np.ndarray, rc: np.ndarray,
                 rd: np.ndarray, persistent: bool = False, check: bool = False,
                 rank: int = 0) -> None:
        self.comm = comm
        self.rb = rb
        self.rc = rc
        self.rank = rank  # for the error of a checked run
        self.req: MPI.Prequest | None = None
        self.check = check  # counts not verified: each slot starts with its block's length
        chunk, rounds = chunking(p, slot)
        self.rounds = rounds
        if rounds and int(rc.max()) > slot and not check:
            j = int(np.argmax(rc > slot))
            raise ValueError(f"padded: receive block from rank {j} is {int(rc[j])} bytes, "
                             f"larger than any block sent ({slot}); send and receive counts "
                             f"do not match")
        in_place = sb is None
        self.direct = rounds == 1 and not in_place and not check and _dense(sc, sd, slot) \
            and _dense(rc, rd, slot)
        if not rounds:
            self.steps: list = []
            return
        if self.direct:  # the user's buffers as they are
            s0, r0 = int(sd[0]), int(rd[0])
            smsg = [sb[s0:s0 + p * slot], MPI.BYTE]
            rmsg = [rb[r0:r0 + p * slot], MPI.BYTE]
            self.steps = []
            self.msgs = (smsg, rmsg)
        else:
            src = rb if in_place else sb
            head = HEADER if check else 0
            stride = chunk + head
            self.sbuf = np.zeros(p * stride, dtype=np.uint8)
            self.rbuf = np.zeros(p * stride, dtype=np.uint8)
            slots = np.arange(p, dtype=np.int64) * stride + head
            if check:  # the headers never change: written once, sent every round
                self._heads(self.sbuf, p, stride)[...] = sc
                self.rheads = self._heads(self.rbuf, p, stride)
            steps = []
            for k in range(rounds):  # a few rounds at most; vector work inside each
                a = k * chunk
                sl = np.clip(sc - a, 0, chunk).astype(np.int64)
                rl = np.clip(rc - a, 0, chunk).astype(np.int64)
                so = np.where(sl > 0, sd + a, 0).astype(np.int64)  # empty: any offset in
                ro = np.where(rl > 0, rd + a, 0).astype(np.int64)  # bounds will do
                steps.append(((src, so, sl) if sl.any() else None,
                              (ro, rl) if rl.any() else None))
            self.steps = steps
            self.slots = slots
            self.msgs = ([self.sbuf, MPI.BYTE], [self.rbuf, MPI.BYTE])
        if persistent:
            init = getattr(comm, "Alltoall_init", None)
            if init is not None and MPI.Get_version() >= (4, 0):
                self.req = init(*self.msgs)

    @staticmethod
    def _heads(buf: np.ndarray, p: int, stride: int) -> np.ndarray:
        """The int64 length header at the start of each of the p slots of ``buf`` (a view)."""
        return np.ndarray((p,), dtype="<i8", buffer=buf, strides=(stride,))

    def _alltoall(self) -> None:
        """One round's Alltoall of the slots (the persistent request where there is one)."""
        if self.req is not None:
            self.req.Start()
            self.req.Wait()
        else:
            self.comm.Alltoall(*self.msgs)

    def run(self) -> None:
        """One exchange: pack the slots, Alltoall per round, unpack the slots."""
        if self.check:
            self._run_checked()
            return
        if not self.rounds:
            return
        if self.direct:
            self._alltoall()
            return
        pack, slots, sbuf, rbuf = _pack.pack, self.slots, self.sbuf, self.rbuf
        for out, back in self.steps:
            if out is not None:
                pack(out[0], out[1], out[2], sbuf, slots)
            self._alltoall()
            if back is not None:
                pack(rbuf, slots, back[1], self.rb, back[0])

    def _run_checked(self) -> None:
        """:meth:`run` when the counts were not verified: the first round's headers say how
        long each peer's block is; blocks whose length is not the receive count are not
        unpacked, and reported (on this rank) once every round is done."""
        rc = self.rc
        if not self.rounds:  # nothing is sent anywhere: any receive count above 0 is wrong
            bad = np.flatnonzero(rc > 0)
            if bad.size:
                raise size_mismatch("padded", self.rank, bad, np.zeros(bad.size), rc[bad])
            return
        pack, slots, sbuf, rbuf = _pack.pack, self.slots, self.sbuf, self.rbuf
        ok = None
        for out, back in self.steps:
            if out is not None:
                pack(out[0], out[1], out[2], sbuf, slots)
            self._alltoall()
            if ok is None:
                ok = self.rheads == rc
            if back is not None:
                if ok.all():
                    pack(rbuf, slots, back[1], self.rb, back[0])
                else:
                    pack(rbuf, np.ascontiguousarray(slots[ok]),
                         np.ascontiguousarray(back[1][ok]), self.rb,
                         np.ascontiguousarray(back[0][ok]))
        if ok is not None and not ok.all():
            bad = np.flatnonzero(~ok)
            raise size_mismatch("padded", self.rank, bad, self.rheads[bad], rc[bad])

    def free(self) -> None:
        """Release the persistent request, if any (local)."""
        if self.req is not None:
            if self.req:
                self.req.Free()
            self.req = None


def _slot(send: VSpec | None, recv: VSpec, ctx: Context) -> int | None:
    """The global largest block in bytes, when it is known without communication."""
    if ctx.kind == "alltoall":  # one size for every block of every rank (matching signatures)
        return int(recv.bcounts[0]) if recv.counts.size else 0
    mb = ctx.options.get("max_block")
    return None if mb is None else int(mb)


def _build(send: VSpec | None, recv: VSpec, ctx: Context, slot: int,
           persistent: bool = False) -> _Exchange:
    """The exchange bound to these buffers; with length headers when the counts were not
    verified (:func:`pya2a.algorithms._common.guarded`)."""
    t = ctx.transport
    rb = t.buffer(recv)
    rc, rd = recv.bcounts, recv.bdispls
    if send is None or ctx.in_place:
        sb, sc, sd = None, rc, rd
    else:
        sb, sc, sd = t.buffer(send), send.bcounts, send.bdispls
    return _Exchange(ctx.comm, ctx.size, slot, sb, sc, sd, rb, rc, rd, persistent,
                     guarded(ctx) and ctx.kind != "alltoall", ctx.rank)


def run(send: VSpec | None, recv: VSpec, ctx: Context) -> None:
    """Pad every block to the global largest one and call ``MPI_Alltoall`` (see module doc).

    Without ``ctx.options["max_block"]`` (an Alltoallv whose caller did not pass it) the
    largest block is found with one ``Allreduce``: every rank runs this same code for the
    call, so every rank makes that extra collective.
    """
    if ctx.transport.device is not None:
        raise TypeError("padded: host buffers only")
    slot = _slot(send, recv, ctx)
    if slot is None:
        mine = max(int(recv.bcounts.max()) if recv.counts.size else 0,
                   int(send.bcounts.max()) if send is not None and send.counts.size else 0)
        slot = allreduce_max(ctx.comm, mine)
    if ctx.size == 1:
        t = ctx.transport
        if send is not None and not ctx.in_place:
            _common_self_copy(t, send, recv)
        return
    _build(send, recv, ctx, slot).run()


def _common_self_copy(t, send: VSpec, recv: VSpec) -> None:
    s = sides(send, recv, t)
    t.copy(s.rb, int(s.rd[0]), s.sb, int(s.sd[0]), int(s.rc[0]))


def prepare(send: VSpec | None, recv: VSpec, ctx: Context) -> Bound | None:
    """Bind scratch, offsets and MPI arguments to these buffers once (plans).

    With ``ctx.options["persistent_collective"]`` (``Plan.bind``: every rank binds at the
    same point) the Alltoall is a persistent ``MPI_Alltoall_init`` request on MPI 4. Returns
    None (plans then call :func:`run`) for device buffers, or when the global largest block
    is not known here.
    """
    if ctx.transport.device is not None:
        return None
    slot = _slot(send, recv, ctx)
    if slot is None:
        return None
    if ctx.size == 1:
        if send is None or ctx.in_place:
            return Bound(run=lambda: None)
        t = ctx.transport
        return Bound(run=lambda: _common_self_copy(t, send, recv))
    persistent = bool(ctx.options.get("persistent_collective"))
    ex = _build(send, recv, ctx, slot, persistent)
    return Bound(run=ex.run, free=ex.free, persistent_collective=ex.req is not None)


def program(send: VSpec | None, recv: VSpec, ctx: Context) -> tuple | None:
    """The exchange as operation rows (the same Alltoall calls as :func:`prepare`'s
    binding): per round, the slots packed from the send blocks, one ``MPI_Alltoall`` of the
    slots, the received slots unpacked; or the user's buffers straight to ``MPI_Alltoall``
    when every block is a packed slot. None for device buffers or an unknown largest block.
    """
    from ._bound import ALLTOALL, COPY

    if recv.device is not None or ctx.kind != "alltoallv":
        return None
    slot = _slot(send, recv, ctx)
    if slot is None:
        return None
    p = ctx.size
    rc, rd = recv.bcounts, recv.bdispls
    in_place = send is None or ctx.in_place
    sbuf, sc, sd = (1, rc, rd) if in_place else (0, send.bcounts, send.bdispls)
    if p == 1:
        n = int(rc[0])
        return ([(COPY, 0, int(sd[0]), 1, int(rd[0]), n)] if n and not in_place else []), [], \
            None
    chunk, rounds = chunking(p, slot)
    if rounds and int(rc.max()) > slot:
        return None  # counts that do not match: the binding raises it
    if not rounds:
        return [], [], None
    if rounds == 1 and not in_place and _dense(sc, sd, slot) and _dense(rc, rd, slot):
        return [(ALLTOALL, 0, int(sd[0]), 1, int(rd[0]), slot)], [], None
    ops: list[tuple] = []
    for k in range(rounds):
        a = k * chunk
        sl = np.clip(sc - a, 0, chunk).tolist()
        rl = np.clip(rc - a, 0, chunk).tolist()
        sdl, rdl = sd.tolist(), rd.tolist()
        ops.extend((COPY, sbuf, sdl[j] + a, 2, j * chunk, n) for j, n in enumerate(sl) if n)
        ops.append((ALLTOALL, 2, 0, 3, 0, chunk))
        ops.extend((COPY, 3, j * chunk, 1, rdl[j] + a, n) for j, n in enumerate(rl) if n)
    return ops, [np.zeros(p * chunk, np.uint8), np.zeros(p * chunk, np.uint8)], None


def model_m(stats) -> float:
    """Bytes per peer that ``padded`` moves: the largest block, whatever the mean is.

    Above the Bruck range the slots travel as bandwidth, on every rank at once: a skewed
    exchange (largest block more than twice the mean) is then priced at S times the waste
    factor S / mean. The other algorithms are priced at the busiest rank's bytes, and on a
    shared-memory node the other ranks' lighter traffic makes them cheaper than that; without
    this, ``padded`` was picked at p = 32 for Zipf-skewed counts at 128 B per peer (S ~ 1 KiB)
    and ran 0.9x native (nvidia-h200-x4, MPICH 5.0.2).
    """
    s = float(max(stats.max_block, stats.m_eff))
    mean = max(float(stats.mean_block), 1.0)
    waste = float(stats.max_block) / mean
    if s > BRUCK_MAX and waste > 2.0:
        s *= waste
    return s


# Python work per call besides the MPI call: two _pack calls and the mpi4py call, in tp.
CALL_PY = 3


def cost(p: int, m: float, params: dict) -> float:
    """One ``MPI_Alltoall`` of ``m`` = S bytes per slot (the selector passes the largest
    block, :func:`model_m`, so padding waste is priced), plus our two copies.

    Small slots (S <= BRUCK_MAX, p >= BRUCK_MIN_P), the library's Bruck rounds::

        T = o + CALL_PY tp + L (ts + tp + (p/2) S tw) + (L + 5) p S tr

    (L = ceil(log2 p) rounds of p/2 slots; tp per round stands for the library's datatype
    set-up; Bruck's rotations and per-round packing plus our pack/unpack copy p S bytes
    about L + 5 times). Otherwise the library posts p-1 messages like Alltoallv::

        T = o + CALL_PY tp + rounds (p-1) ts + (p-1) S tw + 2 p S tr
    """
    o, ts, tw, tp, tr = (params[k] for k in ("o", "ts", "tw", "tp", "tr"))
    if p <= 1:
        return o + tr * m
    base = o + CALL_PY * tp
    if m <= BRUCK_MAX and p >= BRUCK_MIN_P:
        nk = (p - 1).bit_length()
        return base + nk * (ts + tp + (p / 2) * m * tw) + (nk + 5) * p * m * tr
    rounds = max(1, math.ceil(p * m / SCRATCH_LIMIT))
    return base + rounds * (p - 1) * ts + (p - 1) * m * tw + 2 * p * m * tr


register(AlgorithmInfo(name="padded", run=run, cost=cost, host=True, device=False,
                       doc=__doc__ or "", prepare=prepare, program=program,
                       model_m=model_m))
