"""One-shot calls repeated with the same signature skip parsing and agreement (pya2a._fast).

Each test checks results against the MPI library's own Alltoallv, and that the fast path
was (or was not) taken, through the per-communicator count of full-path calls.
"""

from __future__ import annotations

import weakref

import numpy as np
import pytest
from mpi4py import MPI

import pya2a
from pya2a import _oneshot as _fast
from pya2a import _stamp
from pya2a.core.state import state

SEED = 20261121
SENTINEL = -7.0


@pytest.fixture(params=["world", "forward", "allreduce"])
def comm(request, monkeypatch):
    """COMM_WORLD as it is, and duplicates whose repeated calls are confirmed in
    dissemination rounds (:class:`pya2a._stamp.Forward`) or by the all-reduce, each made
    the mode at every size but one rank: every test here runs all three ways."""
    if request.param == "world":
        yield MPI.COMM_WORLD
        return
    monkeypatch.setattr(_stamp, "STAMP_MAX_P", 0)
    monkeypatch.setattr(_stamp, "FORWARD_MAX_P", 1 << 20 if request.param == "forward" else 0)
    c = MPI.COMM_WORLD.Dup()
    try:
        yield c
    finally:
        c.Free()


def _full_calls(comm) -> int:
    return state(comm).slot("oneshot.signatures", _fast.FastCache).seq


def _exchange_data(comm, counts_row, it):
    """Send buffer of this rank for iteration ``it`` (values name source, block, item)."""
    rank = comm.Get_rank()
    n = int(np.sum(counts_row))
    return (rank * 1e6 + it * 1e3 + np.arange(n)).astype("d")


def _counts(comm, seed=SEED):
    p = comm.Get_size()
    rng = np.random.default_rng(seed)
    c = rng.integers(0, 5, size=(p, p))
    return c


def _oracle(comm, send, sc, rc):
    out = np.empty(int(rc.sum()), dtype="d")
    comm.Alltoallv([send, sc], [out, rc])
    return out


@pytest.mark.parametrize("algorithm", ["auto", "native", "pairwise", "hypercube", "ring"])
def test_repeated_calls_take_the_fast_path_and_stay_correct(comm, algorithm):
    c = _counts(comm)
    rank = comm.Get_rank()
    sc, rc = c[rank].copy(), c[:, rank].copy()
    recv = np.empty(int(rc.sum()), dtype="d")
    send = _exchange_data(comm, sc, 0)
    pya2a.Alltoallv(comm, [send, sc], [recv, rc], algorithm=algorithm)
    before = _full_calls(comm)
    for it in range(1, 6):
        send[:] = _exchange_data(comm, sc, it)  # same buffer, new data
        pya2a.Alltoallv(comm, [send, sc], [recv, rc], algorithm=algorithm)
        np.testing.assert_array_equal(recv, _oracle(comm, send, sc, rc))
    assert _full_calls(comm) == before, "a repeated call took the full path"


def test_counts_changed_in_place_take_the_full_path(comm):
    p, rank = comm.Get_size(), comm.Get_rank()
    sc = np.full(p, 2, dtype=np.int64)
    rc = np.full(p, 2, dtype=np.int64)
    send = np.arange(4 * p, dtype="d") + 100 * rank
    recv = np.full(4 * p, SENTINEL)
    pya2a.Alltoallv(comm, [send, sc], [recv, rc])
    before = _full_calls(comm)
    sc[:] = 3  # the same arrays, mutated: a new signature on every rank
    rc[:] = 3
    recv[:] = SENTINEL
    pya2a.Alltoallv(comm, [send, sc], [recv, rc])
    assert _full_calls(comm) == before + 1
    want = np.full(4 * p, SENTINEL)
    comm.Alltoallv([send, sc], [want, rc])
    np.testing.assert_array_equal(recv, want)


def test_bad_input_after_a_cached_call_raises_everywhere(comm):
    p, rank = comm.Get_size(), comm.Get_rank()
    send = np.arange(2 * p, dtype="d")
    recv = np.full(2 * p, SENTINEL)
    counts = [2] * p
    pya2a.Alltoallv(comm, [send, counts], [recv, counts])
    pya2a.Alltoallv(comm, [send, counts], [recv, counts])
    recv[:] = SENTINEL
    bad = [-1] + counts[1:] if rank == p - 1 else counts
    with pytest.raises(ValueError, match="negative"):
        pya2a.Alltoallv(comm, [send, bad], [recv, counts])
    assert (recv == SENTINEL).all(), "receive buffer was written"
    # and the good call still works (and is still cached)
    pya2a.Alltoallv(comm, [send, counts], [recv, counts])
    want = np.empty_like(recv)
    comm.Alltoallv([send, counts], [want, counts])
    np.testing.assert_array_equal(recv, want)
    comm.Barrier()


def test_one_rank_with_a_new_buffer_makes_every_rank_take_the_full_path(comm):
    p, rank = comm.Get_size(), comm.Get_rank()
    send = np.arange(3 * p, dtype="d") + 10 * rank
    recv = np.empty(3 * p)
    pya2a.Alltoallv(comm, send, recv)
    before = _full_calls(comm)
    if rank == 0:
        recv = np.empty(3 * p)  # a different buffer on rank 0 only
    pya2a.Alltoallv(comm, send, recv)
    assert _full_calls(comm) == before + 1
    want = np.empty(3 * p)
    comm.Alltoallv(send, want)
    np.testing.assert_array_equal(recv, want)


def test_in_place_repeated(comm):
    p, rank = comm.Get_size(), comm.Get_rank()
    for algorithm in ("native", "pairwise", "auto"):
        for it in range(3):
            buf = np.arange(2 * p, dtype="d") + 1000 * rank + it
            orig = buf.copy()
            pya2a.Alltoallv(comm, MPI.IN_PLACE, [buf, [2] * p], algorithm=algorithm)
            want = np.empty_like(orig)
            comm.Alltoallv(orig, want)
            np.testing.assert_array_equal(buf, want)


def test_more_signatures_than_the_caches_hold(comm):
    """Cycling through many signatures evicts entries and one-shot plans; still correct."""
    p, rank = comm.Get_size(), comm.Get_rank()
    n = _fast.CAPACITY + 6
    bufs = [(np.arange(p, dtype="d") * (k + 1) + rank, np.empty(p)) for k in range(n)]
    for _ in range(2):
        for s, r in bufs:
            pya2a.Alltoallv(comm, s, r, algorithm="pairwise")
            want = np.empty(p)
            comm.Alltoallv(s, want)
            np.testing.assert_array_equal(r, want)


def test_alltoall_block_form_repeated(comm):
    p, rank = comm.Get_size(), comm.Get_rank()
    send = np.arange(4 * p, dtype="i4") + 100 * rank
    recv = np.empty(4 * p, dtype="i4")
    for _ in range(3):
        pya2a.Alltoall(comm, [send, 4, MPI.INT], [recv, 4, MPI.INT])
    want = np.empty_like(recv)
    comm.Alltoall(send, want)
    np.testing.assert_array_equal(recv, want)


def test_cached_signatures_keep_no_buffer_alive(comm):
    p = comm.Get_size()
    send = np.ones(p * 1024, dtype="d")
    recv = np.empty(p * 1024)
    pya2a.Alltoallv(comm, send, recv, algorithm="native")
    ref = weakref.ref(recv)
    del recv
    assert ref() is None


@pytest.mark.serial
def test_signature_covers_only_forms_it_can_describe():
    def sig(smsg, rmsg, options=None):
        return _fast.signature("alltoallv", smsg, rmsg, False, "auto", False, options, 4)

    a = np.zeros(8)
    assert sig(a, np.zeros(8)) is not None
    assert sig([a, [2] * 4], np.zeros(8)) is not None
    assert sig([a, np.full(4, 2)], np.zeros(8)) is not None  # any integer array: expanded
    vec = MPI.DOUBLE.Create_contiguous(2).Commit()
    try:  # a derived datatype's handle may name another layout after Free
        assert sig([a, [1] * 4, vec], np.zeros(8)) is None
    finally:
        vec.Free()
    assert sig([None, 0, "d"], np.zeros(8)) is None  # None / BOTTOM buffers
    assert sig(a, np.zeros(8), {"grid": [1]}) is None  # unhashable options
    with pytest.raises(BufferError):  # what the parser refuses, the signature refuses
        sig(a[::2], np.zeros(8))
    with pytest.raises(TypeError):
        sig([a, [1.0] * 4], np.zeros(8))


@pytest.mark.serial
def test_signature_distinguishes_what_parsing_depends_on():
    a, r = np.zeros(8), np.zeros(8)

    def key(*args):
        return _fast.signature("alltoallv", *args, False, "auto", False, None, 4)

    base = key([a, [2, 2, 2, 2]], r)
    assert key([a, [2, 2, 2, 2]], r) == base
    assert key([a, (2, None)], r) == base  # the same counts and displacements
    assert key([a, np.array([2, 2, 2, 2], "i4")], r) == base
    assert key([a, [2, 2, 2, 1]], r) != base
    assert key([a, ([2, 2, 2, 2], 2)], r) == base  # stride 2 is the packed layout
    assert key([a, ([2, 2, 2, 2], 3)], r) != base
    assert key([a.view("i8"), [2, 2, 2, 2]], r) != base  # format decides the datatype
    assert key([a[:4], [1, 1, 1, 1]], r) != key([a, [1, 1, 1, 1]], r)  # size
    assert _fast.signature("alltoall", [a, 2], r, False, "auto", False, None, 4) != \
        _fast.signature("alltoallv", [a, 2], r, False, "auto", False, None, 4)


def _two_cached_entries_disagree(comm):
    """Two cached signatures, one rank repeating the other: a disagreement on every rank.

    Both calls (blocks of 1 and of 2) are cached and checked against MPI's own call; then
    rank 0 repeats the call with blocks of 2 while the others repeat the call with blocks
    of 1: each rank finds a cached entry, but not the same one (and the messages differ in
    size). Every rank raises, no receive buffer is written, and both entries still work.
    """
    p, rank = comm.Get_size(), comm.Get_rank()
    send = np.arange(2 * p, dtype="d") + 100 * rank
    recv = np.full(2 * p, SENTINEL)
    one, two = [1] * p, [2] * p

    def both(rounds):
        for _ in range(rounds):
            for counts in (one, two):
                recv[:] = SENTINEL
                pya2a.Alltoallv(comm, [send, counts], [recv, counts])
                want = np.full(2 * p, SENTINEL)
                comm.Alltoallv([send, counts], [want, counts])
                np.testing.assert_array_equal(recv, want)

    both(2)
    recv[:] = SENTINEL
    mine = two if rank == 0 else one
    if p == 1:
        pya2a.Alltoallv(comm, [send, mine], [recv, mine])
        return
    with pytest.raises(ValueError):
        pya2a.Alltoallv(comm, [send, mine], [recv, mine])
    assert (recv == SENTINEL).all(), "receive buffer was written"
    both(1)


def test_ranks_on_different_cached_entries_raise_everywhere(comm):
    _two_cached_entries_disagree(comm)


@pytest.mark.parametrize("nbytes", [8, 4096, 1 << 16])
def test_in_place_same_buffer_repeated(comm, nbytes):
    """In place on the same buffer, repeated: the cached (stamped) path, every size."""
    p, rank = comm.Get_size(), comm.Get_rank()
    n = nbytes // 8
    buf = np.empty(n * p)
    pya2a.Alltoallv(comm, MPI.IN_PLACE, [buf, [n] * p])
    before = _full_calls(comm)
    for it in range(4):
        buf[:] = np.arange(n * p) + 1e6 * rank + 1e3 * it
        orig = buf.copy()
        pya2a.Alltoallv(comm, MPI.IN_PLACE, [buf, [n] * p])
        want = np.empty_like(orig)
        comm.Alltoallv(orig, want)
        np.testing.assert_array_equal(buf, want)
    assert _full_calls(comm) == before


def test_small_communicators_fold_agreement_into_the_exchange(comm):
    """Up to STAMP_MAX_P ranks (and on one) the one-shot agreement travels with the
    messages, up to FORWARD_MAX_P in dissemination rounds, beyond in an all-reduce."""
    p = comm.Get_size()
    send = np.arange(p, dtype="d")
    recv = np.empty(p)
    pya2a.Alltoallv(comm, send, recv)
    st = state(comm)
    want = _fast.STAMP if p == 1 or p <= _stamp.STAMP_MAX_P else \
        _fast.FORWARD if p <= _stamp.FORWARD_MAX_P else _fast.ALLREDUCE
    assert st.slot("oneshot.signatures").mode(st.comm) == want


@pytest.mark.parametrize("nbytes", [8, 1024, 32 << 10])
def test_small_hypercube_exchanges_travel_in_the_confirmation_rounds(comm, nbytes):
    """With dissemination rounds, a small dense hypercube exchange is carried by them
    (larger ones confirm first and then run): repeated calls, in place or not, on skewed
    counts with empty blocks, match MPI's own call and never take the full path."""
    p, rank = comm.Get_size(), comm.Get_rank()
    n = max(nbytes // 8, 1)
    c = np.random.default_rng(SEED).integers(0, 3, size=(p, p)) * n
    sc, rc = c[rank].copy(), c[:, rank].copy()
    send = np.empty(int(sc.sum()))
    recv = np.full(int(rc.sum()), SENTINEL)
    sym = np.full(p, n)
    buf = np.empty(n * p)
    before = None
    for it in range(4):
        send[:] = _exchange_data(comm, sc, it)
        pya2a.Alltoallv(comm, [send, sc], [recv, rc], algorithm="hypercube")
        np.testing.assert_array_equal(recv, _oracle(comm, send, sc, rc))
        buf[:] = orig = _exchange_data(comm, sym, it)
        pya2a.Alltoallv(comm, MPI.IN_PLACE, [buf, sym], algorithm="hypercube")
        np.testing.assert_array_equal(buf, _oracle(comm, orig, sym, sym))
        if before is None:
            before = _full_calls(comm)
    assert _full_calls(comm) == before
    fast = state(comm).slot("oneshot.signatures")
    if p > 1 and fast.mode(state(comm).comm) == _fast.FORWARD:
        def small(m):  # bytes per rank and per block within what a round carries
            return max(m.sum(0).max(), m.sum(1).max()) * 8 <= _stamp.CARRY_MAX_TOTAL and \
                m.max() * 8 <= _stamp.CARRY_MAX_BLOCK

        carried = [e[1].stamp.carries for k, e in fast.entries.items() if k[1] == "hypercube"]
        assert carried == [small(c), small(np.full((p, p), n))]


def test_stamps_mix_c_and_mpi4py_requests(comm, monkeypatch):
    """Odd ranks make their stamped requests through mpi4py (the C module switched off),
    even ranks in C: the same messages, repeated calls correct, and a disagreement between
    two cached entries (a message longer than its slot included) still raises everywhere."""
    from pya2a.algorithms import _bound

    if comm.Get_rank() % 2:
        monkeypatch.setattr(_bound, "_EXEC", [None])
    comm = comm.Dup()  # fresh entries, made under this rank's executor
    try:
        _two_cached_entries_disagree(comm)
    finally:
        comm.Free()
