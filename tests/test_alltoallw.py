"""Alltoallw through pya2a gives byte for byte what the MPI library's own Alltoallw gives.

Every datatype kind the decoder takes is used as a send and as a receive type, with counts from
a shared seed, blocks at gapped byte displacements in a random order, with every host
algorithm, and in place. Serial cases check the decoder against the MPI's own packing on
COMM_SELF. The oracle is always ``MPI.Comm.Alltoallw`` on the same input.
"""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from mpi4py import MPI

import pya2a
from pya2a import _alltoallw
from pya2a.core import dtypes

from helpers import SEED, count_matrix, mpi_alltoallw

WORLD = MPI.COMM_WORLD
# "auto" on one node is the node-shared path ("shm"); named Alltoallv algorithms move the
# packed blocks through staging buffers
ALGORITHMS = ["auto", "shm", *pya2a.available_algorithms(WORLD)]
D = MPI.DOUBLE
ELEM = 6  # every kind below holds 6 doubles per element, so any kind matches any other


def _kinds() -> dict[str, tuple[MPI.Datatype, int]]:
    """name -> (committed datatype, doubles per element); built once, same on every rank."""
    c6 = D.Create_contiguous(6)
    vec = D.Create_vector(2, 1, 2)
    kinds = {
        "predefined": (D, 1),
        "dup": (c6.Dup(), 6),
        "contiguous": (D.Create_contiguous(6), 6),
        "vector": (D.Create_vector(3, 2, 5), 6),
        "vector negative stride": (D.Create_vector(2, 3, -4), 6),
        "hvector": (D.Create_hvector(2, 3, 40), 6),
        "indexed": (D.Create_indexed([2, 1, 3], [7, 0, 3]), 6),
        "hindexed": (D.Create_hindexed([3, 3], [64, 0]), 6),
        "indexed_block": (D.Create_indexed_block(2, [4, 0, 8]), 6),
        "hindexed_block": (D.Create_hindexed_block(3, [0, 48]), 6),
        "subarray C": (D.Create_subarray([3, 4], [2, 3], [1, 1]), 6),
        "subarray Fortran": (D.Create_subarray([3, 4], [2, 3], [1, 1], order=MPI.ORDER_F), 6),
        "resized": (D.Create_vector(2, 3, 4).Create_resized(0, 72), 6),
        "resized negative lb": (c6.Create_resized(-16, 64), 6),
        "struct of one base": (MPI.Datatype.Create_struct([2, 4], [48, 0], [D, D]), 6),
        "nested subarray of vector": (vec.Create_subarray([2, 3], [1, 3], [1, 0]), 6),
        "nested struct of vectors": (MPI.Datatype.Create_struct(
            [1, 2], [96, 0], [D.Create_vector(2, 1, 3), vec]), 6),
    }
    for t, _ in kinds.values():
        if not t.is_predefined:
            t.Commit()
    c6.Free()
    vec.Free()
    return kinds


KINDS = _kinds()
NAMES = list(KINDS)


def _side(counts6: np.ndarray, names: list[str], rng: np.random.Generator):
    """Byte displacements, datatypes and counts for blocks of ``counts6[j] * 6`` doubles,
    placed in a random order with gaps; returns (counts, displs, types, nbytes)."""
    p = counts6.size
    counts = np.zeros(p, dtype=np.int64)
    displs = np.zeros(p, dtype=np.int64)
    types = []
    pos = 0
    for j in rng.permutation(p):
        t, per = KINDS[names[j]]
        n = int(counts6[j]) * ELEM // per
        counts[j] = n
        types.append((j, t))
        lb, ext = t.Get_extent()
        tlb, text = t.Get_true_extent()
        pos += 8 * int(rng.integers(0, 3))
        displs[j] = pos - tlb
        pos += (n - 1) * ext + text if n else 0
    types = [t for _, t in sorted(types, key=lambda x: x[0])]
    return counts, displs, types, pos + 16


def _case(comm: MPI.Intracomm, shift: int, pattern: str = "random", symmetric: bool = False):
    """This rank's send and receive messages (fresh buffers) for one assignment of kinds."""
    p, r = comm.Get_size(), comm.Get_rank()
    c = count_matrix(pattern, p, scale=3)
    if symmetric:
        c = c + c.T
    rng = np.random.default_rng([SEED, p, r, shift])
    snames = [NAMES[(shift + r + j) % len(NAMES)] for j in range(p)]
    rnames = [NAMES[(shift + 2 * i + r + 1) % len(NAMES)] for i in range(p)]
    sc, sd, st, sn = _side(c[r], snames, rng)
    rc, rd, rt, rn = _side(c[:, r], rnames, rng)
    sbuf = rng.integers(0, 256, sn, dtype=np.uint8)
    rbuf = np.full(rn, 0xAB, dtype=np.uint8)
    return (sbuf, (sc, sd), st), (rbuf, (rc, rd), rt)


def _run_both(comm, smsg, rmsg, algorithm: str, inplace: bool = False) -> tuple:
    rbuf = rmsg[0]
    mine, theirs = rbuf.copy(), rbuf.copy()
    ref_send = MPI.IN_PLACE if inplace else [smsg[0], smsg[1], smsg[2]]
    mpi_alltoallw(comm, ref_send, [theirs, rmsg[1], rmsg[2]])
    send = MPI.IN_PLACE if inplace else [smsg[0], smsg[1], smsg[2]]
    used = pya2a.Alltoallw(comm, send, [mine, rmsg[1], rmsg[2]], algorithm=algorithm)
    return mine, theirs, used


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_every_kind_matches_mpi(comm, algorithm):
    """Each kind as a send and a receive type, with each host algorithm."""
    for shift in range(0, len(NAMES), 3):
        smsg, rmsg = _case(comm, shift)
        mine, theirs, used = _run_both(comm, smsg, rmsg, algorithm)
        assert used != "mpi"
        assert np.array_equal(mine, theirs), (algorithm, shift)


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_in_place_matches_mpi(comm, algorithm):
    """MPI.IN_PLACE: the receive layout describes what is sent too."""
    for shift in (0, 5):
        _, rmsg = _case(comm, shift, symmetric=True)
        rng = np.random.default_rng([SEED, comm.Get_rank(), shift, 7])
        rmsg[0][:] = rng.integers(0, 256, rmsg[0].size, dtype=np.uint8)
        mine, theirs, _ = _run_both(comm, None, rmsg, algorithm, inplace=True)
        assert np.array_equal(mine, theirs), (algorithm, shift)


@pytest.mark.parametrize("pattern", ["uniform", "zeros", "skew", "empty"])
def test_count_patterns(comm, pattern):
    smsg, rmsg = _case(comm, 1, pattern)
    mine, theirs, _ = _run_both(comm, smsg, rmsg, "auto")
    assert np.array_equal(mine, theirs)


def test_message_forms(comm):
    """[buf, datatypes], [buf, counts, displs, datatypes], NumPy counts, tuple of types."""
    p, r = comm.Get_size(), comm.Get_rank()
    send = np.arange(6 * p, dtype="d") + 100 * r
    sub = [D.Create_subarray([6 * p], [6], [6 * j]).Commit() for j in range(p)]
    try:
        for form in range(4):
            ref, out = np.zeros(6 * p), np.zeros(6 * p)
            mpi_alltoallw(comm, [send, sub], [ref, sub])
            if form == 0:
                pya2a.Alltoallw(comm, [send, sub], [out, sub])
            elif form == 1:
                pya2a.Alltoallw(comm, [send, [1] * p, [0] * p, sub],
                                [out, np.ones(p, "i"), np.zeros(p, "l"), tuple(sub)])
            elif form == 2:
                pya2a.Alltoallw(comm, [send, ([6] * p, [48 * j for j in range(p)]), [D] * p],
                                [out, ([6] * p, [48 * j for j in range(p)]), [D] * p])
            else:
                pya2a.Comm(comm).Alltoallw([send, ([1] * p, [0] * p), sub],
                                           [out, ([1] * p, [0] * p), sub])
            assert np.array_equal(out, ref), form
    finally:
        for t in sub:
            t.Free()


def decodes(monkeypatch) -> list:
    """Every datatype dtypes.decode is asked for from now on."""
    calls: list = []
    real = dtypes.decode
    monkeypatch.setattr(dtypes, "decode", lambda dt: calls.append(dt) or real(dt))
    return calls


def test_repeated_calls_do_no_decoding(comm, monkeypatch):
    """The second identical call takes the agreed signature path and decodes nothing."""
    smsg, rmsg = _case(comm, 2)
    pya2a.Alltoallw(comm, list(smsg), list(rmsg))
    calls = decodes(monkeypatch)
    before = dict(_alltoallw.stats)
    for _ in range(3):
        pya2a.Alltoallw(comm, list(smsg), list(rmsg))
    assert _alltoallw.stats["hit"] - before["hit"] == 3
    assert calls == []


def test_new_buffers_reuse_the_plan(comm, monkeypatch):
    """Other buffers of the same size and layout: the same plan, nothing decoded."""
    smsg, rmsg = _case(comm, 4)
    pya2a.Alltoallw(comm, list(smsg), list(rmsg))
    calls = decodes(monkeypatch)
    s2 = (smsg[0][::-1].copy(), smsg[1], smsg[2])
    r2 = (rmsg[0].copy(), rmsg[1], rmsg[2])
    mine, theirs, _ = _run_both(comm, s2, r2, "auto")
    assert np.array_equal(mine, theirs)
    assert calls == []


def test_overlap_refused_after_a_repeated_signature(comm):
    """Buffers of a signature already agreed on, but overlapping this time (only on the last
    rank): ValueError on every rank, nothing written."""
    p, last = comm.Get_size(), comm.Get_rank() == comm.Get_size() - 1
    cd, t = ([2] * p, [16 * j for j in range(p)]), [D] * p
    send, out = np.ones(2 * p), np.zeros(2 * p)
    for _ in range(3):  # the signature is agreed and cached
        pya2a.Alltoallw(comm, [send, cd, t], [out, cd, t])
    big = np.full(3 * p, -1.0)
    s2, r2 = (big[:2 * p], big[p:]) if last else (np.ones(2 * p), big[p:])
    with pytest.raises(ValueError, match="overlap"):
        pya2a.Alltoallw(comm, [s2, cd, t], [r2, cd, t])
    assert (big[p:] == -1.0).all()


def test_freed_datatype_handle_reused(comm):
    """A freed datatype whose handle comes back for another layout is decoded afresh."""
    p = comm.Get_size()
    send = np.arange(4 * p, dtype="d") + 10 * comm.Get_rank()
    for layout in ([1, 0, 3, 2], [3, 2, 1, 0], [0, 1, 2, 3]):
        t = D.Create_indexed([1] * 4, layout).Commit()
        try:
            ref, out = np.zeros(4 * p), np.zeros(4 * p)
            msg = ([1] * p, [32 * j for j in range(p)])
            mpi_alltoallw(comm, [send, msg, [t] * p], [ref, msg, [t] * p])
            pya2a.Alltoallw(comm, [send, msg, [t] * p], [out, msg, [t] * p])
            assert np.array_equal(out, ref), layout
        finally:
            t.Free()


def test_undecodable_goes_to_mpi(comm):
    """A darray type is not decoded: host buffers take the MPI's own Alltoallw."""
    p, r = comm.Get_size(), comm.Get_rank()
    t = D.Create_darray(1, 0, [4], [MPI.DISTRIBUTE_CYCLIC], [2], [1]).Commit()
    assert not dtypes.layout(t)
    try:
        send = np.arange(4 * p, dtype="d") + 10 * r
        ref, out = np.zeros(4 * p), np.zeros(4 * p)
        msg = ([1] * p, [32 * j for j in range(p)])
        comm.Alltoallw([send, msg, [t] * p], [ref, msg, [t] * p])
        assert pya2a.Alltoallw(comm, [send, msg, [t] * p], [out, msg, [t] * p]) == "mpi"
        assert np.array_equal(out, ref)
    finally:
        t.Free()


def test_errors_raise_on_every_rank(comm):
    """A bad argument on the last rank raises on every rank, before data moves."""
    p, r = comm.Get_size(), comm.Get_rank()
    last = r == p - 1
    send, out = np.arange(2.0 * p), np.full(2 * p, -1.0)
    cd = ([2] * p, [16 * j for j in range(p)])
    with pytest.raises(ValueError, match="entries"):
        pya2a.Alltoallw(comm, [send, cd, [D] * (p + last)], [out, cd, [D] * p])
    with pytest.raises(TypeError, match="MPI.Datatype"):
        pya2a.Alltoallw(comm, [send, cd, ["d" if last else D] * p], [out, cd, [D] * p])
    big = ([2] * p, [16 * j + (64 if last else 0) for j in range(p)])
    with pytest.raises(ValueError, match="outside"):
        pya2a.Alltoallw(comm, [send, big, [D] * p], [out, cd, [D] * p])
    with pytest.raises(BufferError):
        pya2a.Alltoallw(comm, [send, cd, [D] * p], [np.arange(2.0 * p) if not last else
                                                     bytes(16 * p), cd, [D] * p])
    if p > 1:
        with pytest.raises(ValueError, match="algorithm"):
            pya2a.Alltoallw(comm, [send, cd, [D] * p], [out, cd, [D] * p],
                            algorithm="pairwise" if last else "direct")
    with pytest.raises(ValueError, match="unknown algorithm"):
        pya2a.Alltoallw(comm, [send, cd, [D] * p], [out, cd, [D] * p], algorithm="nope")
    assert (out == -1.0).all()


@pytest.mark.parametrize("algorithm", ["auto", "pairwise"])
def test_check_catches_byte_mismatch(comm, algorithm):
    """check=True (and the shm path always) catch sizes the receiver does not expect."""
    p, r = comm.Get_size(), comm.Get_rank()
    if p < 2:
        pytest.skip("needs two ranks")
    send, out = np.arange(2.0 * p), np.zeros(3 * p)
    sc = [2] * p
    rc = [3 if (j == (r + 1) % p) else 2 for j in range(p)]
    rc[r] = 2
    with pytest.raises(ValueError, match="bytes to rank"):
        pya2a.Alltoallw(comm, [send, (sc, [16 * j for j in range(p)]), [D] * p],
                        [out, (rc, [24 * j for j in range(p)]), [D] * p], check=True,
                        algorithm=algorithm)


def test_derived_communicators_stay_pya2a(comm):
    """Create_cart(...).Sub(...) of a pya2a.Comm: its Alltoallw goes through pya2a."""
    c = pya2a.Comm(comm, algorithm="pairwise")
    cart = c.Create_cart([comm.Get_size(), 1])
    sub = cart.Sub([True, False])
    dup = c.Dup()
    try:
        for x in (cart, sub, dup, c.Split(0, comm.Get_rank())):
            assert isinstance(x, pya2a.Comm) and x.algorithm == "pairwise"
        assert isinstance(sub, MPI.Cartcomm)
        p = sub.Get_size()
        send = np.arange(p, dtype="d") + sub.Get_rank()
        ref, out = np.zeros(p), np.zeros(p)
        comm_types = [D] * p
        cd = ([1] * p, [8 * j for j in range(p)])
        mpi_alltoallw(MPI.Intracomm(sub), [send, cd, comm_types], [ref, cd, comm_types])
        before = _alltoallw.stats["hit"] + _alltoallw.stats["full"]
        sub.Alltoallw([send, cd, comm_types], [out, cd, comm_types])
        assert _alltoallw.stats["hit"] + _alltoallw.stats["full"] == before + 1
        assert np.array_equal(out, ref)
    finally:
        for x in (sub, cart, dup):
            x.Free()


# ---- the decoder alone (no communication) ---------------------------------------------------
def _mpi_packed(t: MPI.Datatype, count: int, buf: np.ndarray, origin: int) -> np.ndarray:
    size = t.Get_size() * count
    out = np.zeros(max(size, 1), np.uint8)
    mpi_alltoallw(MPI.COMM_SELF, [buf, ([count], [origin]), [t]],
                  [out, ([size], [0]), [MPI.BYTE]])
    return out[:size]


@pytest.mark.serial
@pytest.mark.parametrize("name", NAMES)
def test_decoder_matches_mpi_pack(name):
    """Runs in type-map order: gathering them gives what the MPI packs."""
    t, _ = KINDS[name]
    lay = dtypes.decode(t)
    assert lay, getattr(lay, "reason", "")
    rng = np.random.default_rng([SEED, NAMES.index(name)])
    for count in (1, 3):
        lo, hi = lay.span(count)
        origin = max(0, -lo)
        buf = rng.integers(0, 256, origin + hi + 8, dtype=np.uint8)
        parts = [buf[origin + k * lay.extent + o: origin + k * lay.extent + o + n]
                 for k in range(count) for o, n in zip(lay.offs.tolist(), lay.lens.tolist(),
                                                       strict=True)]
        mine = np.concatenate(parts) if parts else np.zeros(0, np.uint8)
        assert np.array_equal(mine, _mpi_packed(t, count, buf, origin))


@pytest.mark.serial
def test_decoder_refuses_what_it_does_not_know():
    dar = D.Create_darray(2, 0, [4], [MPI.DISTRIBUTE_BLOCK], [MPI.DISTRIBUTE_DFLT_DARG], [2])
    try:
        assert "DARRAY" in dtypes.decode(dar).reason
        assert "holes" in dtypes.decode(MPI.SHORT_INT).reason
        assert not dtypes.decode(MPI.DATATYPE_NULL)
    finally:
        dar.Free()


@pytest.mark.serial
def test_decoder_frees_what_decode_returns():
    """Decoding a nested type many times leaves no datatype behind (handles stay bounded)."""
    base = D.Create_vector(2, 1, 3)
    t = MPI.Datatype.Create_struct([1, 1], [0, 64], [base, base.Dup()]).Commit()
    base.Free()
    try:
        first = [dtypes.decode(t) for _ in range(3)]
        probe = D.Dup()
        h0 = probe.handle
        probe.Free()
        for _ in range(200):
            dtypes.decode(t)
        probe = D.Dup()
        assert probe.handle == h0 or probe.handle - h0 < 64  # nothing leaked in between
        probe.Free()
        assert all(x.size == 32 for x in first)
    finally:
        t.Free()


@pytest.mark.serial
def test_layout_forgotten_when_freed():
    t = D.Create_vector(2, 1, 2).Commit()
    lay = dtypes.layout(t)
    assert dtypes.layout(t) is lay
    gen = dtypes.generation()
    t.Free()
    assert dtypes.generation() != gen and not lay.alive[0]


@pytest.mark.serial
def test_copy_plan_pack_unpack_round_trip():
    """TypeCopy packs in type-map order and unpacks back to the same bytes."""
    from pya2a._alltoallw import _copy_plan, _parse

    names = NAMES[:5]
    rng = np.random.default_rng(SEED)
    counts6 = np.array([2, 0, 3, 1, 4])
    sc, sd, st, sn = _side(counts6, names, rng)
    buf = rng.integers(0, 256, sn, dtype=np.uint8)
    side = _parse("t", "send message", "send", [buf, (sc, sd), st], 5, readonly=True)
    plan = _copy_plan(side)
    stage = np.zeros(plan.nbytes, np.uint8)
    plan.pack(buf.ctypes.data, stage.ctypes.data)
    want = np.concatenate([_mpi_packed(st[j], int(sc[j]), buf, int(sd[j])) for j in range(5)])
    assert np.array_equal(stage, want)
    back = np.zeros_like(buf)
    plan.unpack(stage.ctypes.data, back.ctypes.data)
    again = np.zeros(plan.nbytes, np.uint8)
    plan.pack(back.ctypes.data, again.ctypes.data)
    assert np.array_equal(again, stage)


@pytest.mark.serial
@pytest.mark.parametrize("shift", [0, 1, 16, 255, 256, 4095])
def test_long_runs_copied_right_at_every_offset_modulo_4k(shift):
    """Runs of thousands of bytes (not a multiple of the 256-byte pieces) packed to and
    unpacked from a staging buffer placed ``shift`` bytes past the source modulo 4 KiB,
    where long copies go piecewise from the end back: the same bytes as NumPy slicing."""
    from pya2a.core._typepack import TypeCopy

    rng = np.random.default_rng(SEED)
    lens = np.array([4096, 5000, 12345, 70001], np.int64)
    offs = np.array([0, 4100, 9200, 21600], np.int64)  # one layout, four runs
    ext = int(offs[-1] + lens[-1])
    plan = TypeCopy(offs, lens, [0, 4], [ext], [0, 0], [0, ext + 40], [1, 1], [lens.sum()])
    buf = rng.integers(0, 256, 2 * ext + 40, dtype=np.uint8)
    raw = np.zeros(plan.nbytes + 8192, np.uint8)
    at = (-raw.ctypes.data + buf.ctypes.data + shift) % 4096
    stage = raw[at:at + plan.nbytes]
    plan.pack(buf.ctypes.data, stage.ctypes.data)
    want = np.concatenate([buf[d + o:d + o + n] for d in (0, ext + 40)
                           for o, n in zip(offs, lens, strict=True)])
    assert np.array_equal(stage, want)
    back = np.zeros_like(buf)
    plan.unpack(stage.ctypes.data, back.ctypes.data)
    for d in (0, ext + 40):
        for o, n in zip(offs, lens, strict=True):
            assert np.array_equal(back[d + o:d + o + n], buf[d + o:d + o + n])


@pytest.mark.serial
def test_signature_of_a_message():
    """_msg.wside signs the messages a repeated call can skip parsing for (the three forms,
    dense host buffers, exact-int or 1-d integer-array counts, datatypes) and nothing else."""
    from pya2a.core._msg import wside

    t, buf = [D] * 2, np.zeros(8)
    sig, addr, keep = wside([buf, ([1, 1], [0, 32]), t], False)
    assert sig[:4] == (3, 64, False, (1, 1)) and addr == buf.ctypes.data and keep is buf
    assert wside([buf, [1, 1], [0, 32], t], False)[0][0] == 4
    assert wside([buf, t], False)[0][3] is None
    assert wside([b"x" * 16, t], True)[0][2] is True  # read-only, as mpi4py reads it
    counts = np.array([1, 1], np.int32)
    assert wside([buf, (counts, counts * 32), t], False)[0][3] == ("i", counts.tobytes())
    for bad in ([buf[::2], t],  # not one run of memory
                [buf, ([np.int64(1), 1], [0, 32]), t],  # not exact ints
                [buf, ([True, 1], [0, 32]), t],
                [buf, ([1, 1], None), t],
                [buf, ([1, 1], [0, 32]), ["d", D]],
                [buf, ([1, 1], [0, 32]), D],
                [memoryview(buf), t],  # other objects take the full path
                (buf,), "x"):
        assert wside(bad, False) is None, bad


def _pairs_of_kinds():
    """For every send kind against every receive kind, one block of three elements each
    way on one rank: (kinds, send buffer, receive buffer, MPI's own result, send side,
    receive side), the sides as ``_alltoallw._parse`` reads them."""
    from pya2a._alltoallw import _parse

    rng = np.random.default_rng(SEED)
    for a in NAMES:
        for b in NAMES:
            sc, sd, st, sn = _side(np.array([3]), [a], rng)
            rc, rd, rt, rn = _side(np.array([3]), [b], rng)
            sbuf = rng.integers(0, 256, sn, dtype=np.uint8)
            ref, out = np.full(rn, 0xAB, np.uint8), np.full(rn, 0xAB, np.uint8)
            mpi_alltoallw(MPI.COMM_SELF, [sbuf, (sc, sd), st], [ref, (rc, rd), rt])
            send = _parse("t", "send message", "send", [sbuf, (sc, sd), st], 1, readonly=True)
            recv = _parse("t", "receive message", "recv", [out, (rc, rd), rt], 1,
                          readonly=False)
            yield (a, b), sbuf, out, ref, send, recv


@pytest.mark.serial
def test_copy_block_matches_mpi_for_every_pair_of_kinds():
    """A block copied straight across (a rank's block to itself) lands as the MPI's own
    Alltoallw puts it, for every send kind against every receive kind."""
    from pya2a._alltoallw import _copy_plan

    for kinds, sbuf, out, ref, send, recv in _pairs_of_kinds():
        _copy_plan(send).copy_block(0, sbuf.ctypes.data, _copy_plan(recv), 0, out.ctypes.data)
        assert np.array_equal(out, ref), kinds


@pytest.mark.serial
def test_composed_table_matches_mpi_for_every_pair_of_kinds():
    """One rank's device Alltoallw is one kernel launch over a table composed from the send
    and receive layouts (no staging): walked here on host memory, it puts every byte where
    the MPI's own Alltoallw does, for every send kind against every receive kind."""
    from pya2a._alltoallw import _composed, _copy_plan, _run_table

    for kinds, sbuf, out, ref, send, recv in _pairs_of_kinds():
        src, dst, lens = _composed(_run_table(send, _copy_plan(send)),
                                   _run_table(recv, _copy_plan(recv)))
        for i, j, n in zip(src.tolist(), dst.tolist(), lens.tolist(), strict=True):
            out[j:j + n] = sbuf[i:i + n]
        assert np.array_equal(out, ref), kinds


def test_bottom_goes_to_mpi(comm):
    """MPI.BOTTOM with absolute-address datatypes: the MPI's own Alltoallw, same result."""
    p, r = comm.Get_size(), comm.Get_rank()
    send = np.arange(2.0 * p) + 10 * r
    ref, out = np.zeros(2 * p), np.zeros(2 * p)

    def types(arr):
        base = MPI.Get_address(arr)
        return [D.Create_hindexed([2], [base + 16 * j]).Commit() for j in range(p)]

    st, rt_ref, rt = types(send), types(ref), types(out)
    cd = ([1] * p, [0] * p)
    try:
        comm.Alltoallw([MPI.BOTTOM, cd, st], [MPI.BOTTOM, cd, rt_ref])
        assert pya2a.Alltoallw(comm, [MPI.BOTTOM, cd, st], [MPI.BOTTOM, cd, rt]) == "mpi"
        assert np.array_equal(out, ref) and ref.any()
    finally:
        for t in (*st, *rt_ref, *rt):
            t.Free()


def _cupy_like_fft(fn):
    """``fn`` (numpy.fft.fft / ifft) laid out as CuPy's FFT lays out its results: along any
    axis but the last, a ``swapaxes`` view of a C-ordered array (strided; Fortran-ordered
    when the axis is the first of a 3D array), what ``examples/pfft.py`` gets on a GPU."""

    def run(a, axis=-1):
        return np.ascontiguousarray(fn(np.swapaxes(a, axis, -1), axis=-1)).swapaxes(axis, -1)
    return run


@pytest.mark.parametrize("grid", ["slab", "pencil"])
def test_pencil_fft_example_with_cupy_fft_layout(comm, grid):
    """examples/pfft.py forward + backward when its FFTs return CuPy's strided views: every
    exchange gets C-ordered data (the subarray types' layout), the answer is numpy.fft's."""
    examples = str(Path(__file__).resolve().parent.parent / "examples")
    if examples not in sys.path:
        sys.path.insert(0, examples)
    import pfft

    p = comm.Get_size()
    shape = (2 * p + 1, 3 * p + 2, 7)
    whole = np.random.default_rng([SEED, *shape]).standard_normal(shape) * (1 + 1j)
    xp = SimpleNamespace(empty=np.empty, asarray=np.asarray, ascontiguousarray=np.ascontiguousarray,
                         fft=SimpleNamespace(fft=_cupy_like_fft(np.fft.fft),
                                             ifft=_cupy_like_fft(np.fft.ifft)))
    fft = pfft.PencilFFT(comm, shape, xp, (p, 1) if grid == "slab" else None)
    try:
        u = np.ascontiguousarray(whole[fft.z_slice])
        before = _alltoallw.stats["hit"] + _alltoallw.stats["full"]
        uh = fft.forward(u)
        back = fft.backward(uh)
        assert _alltoallw.stats["hit"] + _alltoallw.stats["full"] == before + 4
        np.testing.assert_allclose(uh, np.fft.fftn(whole)[fft.x_slice], rtol=1e-9, atol=1e-9)
        np.testing.assert_allclose(back, u, rtol=1e-12, atol=1e-12)
    finally:
        fft.free()
