"""The one-shot call's agreement folded into its exchange, on small communicators.

A repeated one-shot call must know that every rank repeats a call they all validated
together (:mod:`pya2a._oneshot`): the same cache entry, numbered identically on every rank.
On large communicators one all-reduce of the entry number establishes that before the data
moves. On a communicator of ``p <= STAMP_MAX_P`` ranks that all-reduce would cost as
much as the exchange itself, so the number travels *with* the exchange instead (on one rank
there is nothing to confirm, and a carrying entry is one copy of the own block): every call
starts with one message from each rank to each other rank (tag ``TAG_STAMP``), ending in
the sender's entry number. Small exchanges carry their blocks in those messages (staged,
so nothing reaches the receive buffer before the stamps are checked); other entries send
only the number and then run their decision as usual.

Why every rank sees a disagreement: if some rank's number differs from another's, then on
every rank at least one received stamp differs from its own (were a rank's stamps all equal
to its own number, every number would be equal). A rank without an entry sends -1. A
message of another entry's size is caught too, by its length: every receive slot holds the
longest message any entry stamps (:data:`SLOT_WORDS`), so none is ever truncated (after a
truncated receive Open MPI 4.1 can leave a later one unmatched, a hang), and a rank
without an entry receives by matched probe.
Every rank then takes the full path (the agreement all-gather), which decides again or
raises the same error everywhere; the staged blocks of the failed attempt are dropped.
Each call consumes exactly one ``TAG_STAMP`` message from each peer and MPI does not
overtake, so the messages of consecutive calls never mix.
"""

from __future__ import annotations

import os

import numpy as np
from mpi4py import MPI

from .algorithms._bound import exec_module
from .algorithms.tags import TAG_STAMP
from .core import _pack

__all__ = ["STAMP_MAX_P", "FORWARD_MAX_P", "CARRY_MAX_BLOCK", "CARRY_MAX_TOTAL", "Stamp",
           "Forward", "announce", "announce_rounds", "carry_layout", "forward_layout"]

# Communicators of up to STAMP_MAX_P ranks fold the agreement into the exchange (the mode
# is fixed per communicator at its first one-shot call; the same constant on every rank).
STAMP_MAX_P = 8
# Communicators of STAMP_MAX_P < p <= FORWARD_MAX_P ranks confirm in dissemination rounds
# (:class:`Forward`), which carry small exchanges that the selector gives to ``hypercube``;
# larger communicators all-reduce the entry number. Measured at p = 16 on 16 cores (MPICH and Open
# MPI): the rounds carrying a small exchange took a repeated 8-512 B call from the
# all-reduce's 30-34 us to 20-27 us (MPICH), and confirmed larger ones within about 10 %
# of it; above 16 ranks neither is measured, so the all-reduce stays. The benchmark and
# the tests set it (on every rank, before a communicator's first call).
FORWARD_MAX_P = 16
# Largest block (bytes, any pair) and per-rank total that a stamped message carries; larger
# exchanges stamp the number alone and run their algorithm on the user's buffers.
# (Blocks stay below MPI's eager limits: a 16 KiB block plus its stamp went rendezvous.)
CARRY_MAX_BLOCK = 8 << 10
CARRY_MAX_TOTAL = 64 << 10
_UNSET = -2  # a receive slot's stamp before a message reaches it (never a valid number)
SLOT_WORDS = CARRY_MAX_BLOCK // 8 + 2  # the longest stamped message, in words


def carry_layout(send, recv, inplace: bool) -> tuple:
    """What a carrying stamp copies: per peer, bytes and byte offsets of both sides.

    ``send`` / ``recv`` are the agreed, contiguous VSpecs of the call that made the entry;
    addresses are kept (an entry is used only by calls on the same memory).
    """
    return (send.addr, send.counts * send.tsize, send.displs * send.extent,
            recv.addr, recv.counts * recv.tsize, recv.displs * recv.extent, inplace)


def _slots(nbytes: np.ndarray, rank: int) -> tuple[np.ndarray, np.ndarray]:
    """Word offset and word length of each peer's message (data padded to 8 bytes + stamp)."""
    words = (nbytes + 7) // 8 + 1
    words[rank] = 0
    return np.cumsum(words) - words, words


class Stamp:
    """One cache entry's stamped exchange: persistent requests on its own staging."""

    __slots__ = ("number", "reqs", "carries", "run", "_keep")  # reqs: a free() method

    def __init__(self, comm: MPI.Intracomm, number: int, layout: tuple | None) -> None:
        p, rank = comm.Get_size(), comm.Get_rank()
        self.number = number
        zeros = np.zeros(p, dtype=np.int64)
        if layout is None:
            saddr = raddr = 0
            sbytes = soff = rbytes = roff = zeros
            inplace = False
        else:
            saddr, sbytes, soff, raddr, rbytes, roff, inplace = layout
        self.carries = layout is not None
        s_at, s_len = _slots(sbytes, rank)
        _, r_len = _slots(rbytes, rank)
        # each receive slot holds the longest message any entry stamps, so no message is
        # ever truncated (Open MPI 4.1 can leave later receives unmatched after a truncated
        # one); a message of another length is caught by its length
        r_cap = np.maximum(r_len, SLOT_WORDS)
        r_cap[rank] = 0
        r_at = np.cumsum(r_cap) - r_cap
        sw = np.zeros(int(s_len.sum()), dtype=np.int64)
        rw = np.full(max(int(r_cap.sum()), 1), _UNSET, dtype=np.int64)
        peers = [j for j in range(p) if j != rank]
        sw[(s_at + s_len - 1)[peers]] = number  # written once: the stamp never changes
        trail = np.ascontiguousarray((r_at + r_len - 1)[peers], dtype=np.int64)
        self.reqs = _requests(comm, sw, s_at, s_len, rw, r_at, r_cap, r_len, peers)
        pack = unpack = np.zeros((0, 3), dtype=np.int64)
        if self.carries:
            s_base, r_base = sw.ctypes.data, rw.ctypes.data
            pack = np.stack([saddr + soff[peers], s_base + 8 * s_at[peers], sbytes[peers]], 1)
            unpack = np.stack([r_base + 8 * r_at[peers], raddr + roff[peers], rbytes[peers]],
                              1)
            if not inplace:  # in place the own block is already where it belongs
                own = [[saddr + int(soff[rank]), raddr + int(roff[rank]), int(sbytes[rank])]]
                unpack = np.concatenate([unpack, np.array(own, dtype=np.int64)])
        # run() -> bool, collective: True iff every peer stamped this entry's number; then
        # a carrying stamp has delivered every block into the receive buffer. On False
        # nothing was written there, and every rank returns False. (In C: _pack.StampRun.)
        self.run = _pack.StampRun(_pack.CopyList(pack, sw), _pack.CopyList(unpack, rw), rw,
                                  trail, number, _UNSET, self.reqs.exchange)
        self._keep = (sw, rw)

    def free(self) -> None:
        """Release the persistent requests (the entry leaves the cache)."""
        if not MPI.Is_finalized():
            self.reqs.free()


def _round(comm: MPI.Intracomm, saddr: int, sbytes: int, to: int, raddr: int, rbytes: int,
           frm: int) -> object:
    """One :class:`Forward` round: ``core._exec.ProbedRound`` where that module was built
    for this MPI, else the same messages through mpi4py (:class:`_Mpi4pyRound`)."""
    ex = exec_module()
    if ex is not None:
        return ex.ProbedRound(comm, saddr, sbytes, to, raddr, rbytes, frm, TAG_STAMP)
    return _Mpi4pyRound(comm, saddr, sbytes, to, raddr, rbytes, frm)


def _mprobe(comm: MPI.Intracomm, source: int, tag: int, status: MPI.Status) -> MPI.Message:
    """``comm.Mprobe`` as ``comm.Improbe`` until it matches, yielding the core between
    tries (as ``core._exec``'s rounds do: MPICH's blocking ``MPI_Mprobe`` spins, and with
    more ranks than cores the rank it waits for then runs only when the spinning one's time
    slice ends, milliseconds later)."""
    while (msg := comm.Improbe(source, tag, status)) is None:
        os.sched_yield()
    return msg


class _Mpi4pyRound:
    """``core._exec.ProbedRound`` through mpi4py: a persistent send, a matched-probe
    receive of whatever size comes."""

    __slots__ = ("comm", "send", "frm", "into", "_status")

    def __init__(self, comm: MPI.Intracomm, saddr: int, sbytes: int, to: int, raddr: int,
                 rbytes: int, frm: int) -> None:
        self.comm, self.frm = comm, frm
        self.send = comm.Send_init([MPI.buffer.fromaddress(saddr, sbytes), MPI.BYTE], to,
                                   TAG_STAMP)
        self.into = MPI.buffer.fromaddress(raddr, rbytes)
        self._status = MPI.Status()

    def exchange(self) -> bool:
        """Send, receive; False where the message received was not the expected size."""
        self.send.Start()
        msg = _mprobe(self.comm, self.frm, TAG_STAMP, self._status)
        n = self._status.Get_count(MPI.BYTE)
        ok = n == len(self.into)
        msg.Recv([self.into if ok else bytearray(max(n, 1)), n, MPI.BYTE])
        self.send.Wait()
        return ok

    def free(self) -> None:
        """Release the send request (local)."""
        if self.send:
            self.send.Free()


def forward_layout(send, recv, inplace: bool, cmat: np.ndarray) -> tuple:
    """What a carrying :class:`Forward` needs: both buffers' addresses and byte
    displacements, and ``cmat[i, j]``, the bytes rank i sends rank j (every rank's, from
    the agreement record; dense types, so a block's bytes are its count times its size)."""
    return ("forward", send.addr, send.bdispls.copy(), recv.addr, recv.bdispls.copy(),
            np.ascontiguousarray(cmat, dtype=np.int64), inplace)


class Forward:
    """One cache entry's confirmation on a communicator of more than :data:`STAMP_MAX_P`
    ranks: ceil(log2 p) rounds on ``hypercube``'s partners, each one message to one rank
    and one from another, ending in the (smallest, largest) entry number its sender has
    seen (:class:`pya2a.core._pack.ForwardRun`).

    Those partners disseminate: after round k a rank has folded in the pairs of 2^(k+1)
    ranks, so after the last every rank holds the smallest and largest number of all of
    them, and they are equal to its own only if every rank is on this entry. A message of
    another entry's size fails its round (a message of another length); the
    receiving rank then carries -1 on, and since a failed message joins two ranks on
    different entries, every rank it cannot reach still sees their numbers differ. Each
    round's message is received by matched probe, whatever its size (never truncated). Every
    rank, hit or miss, sends and receives exactly one message per round, the same partners
    for every entry, so the calls never mix.

    With ``layout`` (:func:`forward_layout`) the rounds are the entry's ``hypercube``
    exchange itself: each message carries the blocks that step forwards, staged, and the
    blocks that arrive home stay staged until the last round has confirmed the entry.
    Without, the messages are the two numbers alone and the entry then runs its decision.
    """

    __slots__ = ("number", "reqs", "carries", "run", "_keep")

    def __init__(self, comm: MPI.Intracomm, number: int, layout: tuple | None) -> None:
        from .algorithms.hypercube import nsteps, peers, schedule

        p, rank = comm.Get_size(), comm.Get_rank()
        self.number = number
        self.carries = layout is not None
        nk = nsteps(p)
        steps = schedule(rank, p) if layout is not None else None
        if steps is not None:
            _, saddr, sd, raddr, rd, cmat, inplace = layout
            out_n = [int(cmat[st.send[:, 0], st.send[:, 1]].sum()) for st in steps]
            in_n = [int(cmat[st.recv[:, 0], st.recv[:, 1]].sum()) for st in steps]
        else:
            out_n = in_n = [0] * nk
        out_w = np.array([(n + 7) // 8 + 2 for n in out_n], dtype=np.int64)
        in_w = np.array([(n + 7) // 8 + 2 for n in in_n], dtype=np.int64)
        out_at, in_at = np.cumsum(out_w) - out_w, np.cumsum(in_w) - in_w
        sw = np.zeros(max(int(out_w.sum()), 1), dtype=np.int64)
        rw = np.full(max(int(in_w.sum()), 1), _UNSET, dtype=np.int64)
        packs: list = [[] for _ in range(nk)]
        unpack: list = []
        if steps is not None:  # where each block is: the send buffer, then a receive slot
            sb, rb = sw.ctypes.data, rw.ctypes.data
            loc = {(rank, d): saddr + int(sd[d]) for d in range(p)}
            for k, st in enumerate(steps):
                at = sb + 8 * int(out_at[k])
                for a, b in st.send.tolist():
                    n = int(cmat[a, b])
                    packs[k].append((loc[(a, b)], at, n))
                    at += n
                at = rb + 8 * int(in_at[k])
                for a, b in st.recv.tolist():
                    n = int(cmat[a, b])
                    if b == rank:
                        unpack.append((at, raddr + int(rd[a]), n))
                    else:
                        loc[(a, b)] = at
                    at += n
            if not inplace:  # in place the own block is already where it belongs
                unpack.append((saddr + int(sd[rank]), raddr + int(rd[rank]),
                               int(cmat[rank, rank])))
        rounds = []
        for k in range(nk):
            to, frm = peers(rank, p, k)
            rounds.append(_round(comm, sw.ctypes.data + 8 * int(out_at[k]), 8 * int(out_w[k]),
                                 to, rw.ctypes.data + 8 * int(in_at[k]), 8 * int(in_w[k]),
                                 frm))
        self.reqs = rounds
        rows = [np.array(c, dtype=np.int64).reshape(-1, 3) for c in (*packs, unpack)]
        self.run = _pack.ForwardRun(
            [_pack.CopyList(c, sw) for c in rows[:-1]], [q.exchange for q in rounds], sw, rw,
            np.ascontiguousarray(out_at + out_w - 2), np.ascontiguousarray(in_at + in_w - 2),
            _pack.CopyList(rows[-1], rw), number, _UNSET)
        self._keep = (sw, rw)

    def free(self) -> None:
        """Release the persistent requests (the entry leaves the cache)."""
        if not MPI.Is_finalized():
            for q in self.reqs:
                q.free()
        self.reqs = []


def _requests(comm: MPI.Intracomm, sw: np.ndarray, s_at: np.ndarray, s_len: np.ndarray,
              rw: np.ndarray, r_at: np.ndarray, r_cap: np.ndarray, r_len: np.ndarray,
              peers: list) -> object:
    """The stamped messages (a word slice of ``rw`` / ``sw`` per peer; receives of
    ``r_cap`` words that must bring ``r_len``) as persistent requests: in C
    (``core._exec.Persistent``) where that module was built for this MPI, else through
    mpi4py (the same messages)."""
    sb, rb = sw.view(np.uint8), rw.view(np.uint8)
    msgs = [(True, rb[8 * r_at[j]:8 * (r_at[j] + r_cap[j])], j, 8 * int(r_len[j]))
            for j in peers]
    msgs += [(False, sb[8 * s_at[j]:8 * (s_at[j] + s_len[j])], j, -1) for j in peers]
    ex = exec_module()
    if ex is not None:
        return ex.Persistent(comm, [(ex.RECV if recv else ex.SEND, v.ctypes.data, v.nbytes, j,
                                     TAG_STAMP, want) for recv, v, j, want in msgs])
    return _Mpi4pyRequests(comm, msgs)


class _Mpi4pyRequests:
    """``core._exec.Persistent``'s interface over mpi4py's persistent requests."""

    __slots__ = ("reqs", "want")

    def __init__(self, comm: MPI.Intracomm, msgs: list) -> None:
        self.reqs = [(comm.Recv_init if recv else comm.Send_init)([v, MPI.BYTE], j, TAG_STAMP)
                     for recv, v, j, _ in msgs]
        self.want = [want for *_, want in msgs]

    def exchange(self) -> bool:
        """Start every request, wait for every one; False if a receive brought another
        length than it must (or MPI raised, the rest completed)."""
        reqs = self.reqs
        if not reqs:
            return True
        MPI.Prequest.Startall(reqs)
        statuses = [MPI.Status() for _ in reqs]
        try:
            MPI.Request.Waitall(reqs, statuses)
        except MPI.Exception:
            for q in reqs:
                for _ in range(2):
                    try:
                        q.Wait()
                        break
                    except MPI.Exception:
                        continue
            return False
        return all(w < 0 or st.Get_count(MPI.BYTE) == w
                   for w, st in zip(self.want, statuses, strict=True))

    def free(self) -> None:
        """Release the requests (local)."""
        for q in self.reqs:
            if q:
                q.Free()
        self.reqs = []


def announce_rounds(comm: MPI.Intracomm) -> None:
    """Collective with :class:`Forward`'s rounds: a rank without a usable entry sends -1 in
    every round and receives each round's message whatever its size (matched probes, so
    no receive is ever truncated: Open MPI 4.1 can leave a truncated persistent receive of
    a later round unmatched), so that every rank then takes the full path together."""
    from .algorithms.hypercube import nsteps, peers

    p, rank = comm.Get_size(), comm.Get_rank()
    word = np.array([-1, -1], dtype=np.int64)
    status = MPI.Status()
    for k in range(nsteps(p)):
        to, frm = peers(rank, p, k)
        req = comm.Isend([word, MPI.BYTE], to, TAG_STAMP)
        msg = _mprobe(comm, frm, TAG_STAMP, status)
        msg.Recv([bytearray(max(status.Get_count(MPI.BYTE), 1)), MPI.BYTE])
        req.Wait()


def announce(comm: MPI.Intracomm, number: int = -1) -> None:
    """Collective with :meth:`Stamp.run`: a rank without a usable entry stamps ``number``.

    Receives each peer's message whatever its size (another rank may carry blocks), so that
    every rank then takes the full path together.
    """
    p, rank = comm.Get_size(), comm.Get_rank()
    if p == 1:
        return
    word = np.array([number], dtype=np.int64)
    peers = [j for j in range(p) if j != rank]
    sends = [comm.Isend([word, MPI.BYTE], j, TAG_STAMP) for j in peers]
    status = MPI.Status()
    for j in peers:
        msg = _mprobe(comm, j, TAG_STAMP, status)
        msg.Recv([bytearray(max(status.Get_count(MPI.BYTE), 1)), MPI.BYTE])
    MPI.Request.Waitall(sends)
