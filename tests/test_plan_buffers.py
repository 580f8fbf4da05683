"""Plans and one-shot calls on many distinct buffers, against the MPI library's own call.

More buffer pairs than any binding cache holds, a new receive array every run, in place on
new buffers, every algorithm and count pattern; and ranks that run the same plan with
different executors (the C loop on some, mpi4py's persistent requests on others) still
exchange the same messages.
"""

from __future__ import annotations

import numpy as np
import pytest
from mpi4py import MPI

import pya2a
from pya2a import _oneshot
from pya2a.algorithms import _bound

from helpers import SEED, count_matrix, gapped_layout, send_data

ALGORITHMS = pya2a.available_algorithms()


def _layout(comm, pattern):
    p, r = comm.Get_size(), comm.Get_rank()
    c = count_matrix(pattern, p)
    sc, rc = c[r], c[:, r]
    rng = np.random.default_rng([SEED, p, r])
    sd, ns = gapped_layout(sc, rng)
    rd, nr = gapped_layout(rc, rng)
    return sc, sd, ns, rc, rd, nr, rng


@pytest.mark.parametrize("algorithm", ["auto", *ALGORITHMS])
@pytest.mark.parametrize("pattern", ["random", "zeros", "skew"])
def test_more_distinct_pairs_than_the_cache_holds(comm, algorithm, pattern):
    """Five send and five receive buffers paired differently on every pass, with a cache of
    two pairs: most runs are on a pair not remembered, some on one evicted before."""
    sc, sd, ns, rc, rd, nr, rng = _layout(comm, pattern)
    sends = [rng.integers(-1000, 1000, ns).astype("i4") for _ in range(5)]
    recvs = [np.full(nr, -7, "i4") for _ in range(5)]
    with pya2a.plan(comm, sc, rc, "i4", senddispls=sd, recvdispls=rd, algorithm=algorithm,
                    cache_size=2) as pl:
        for shift in (0, 1, 0, 3):
            for k, s in enumerate(sends):
                out = recvs[(k + shift) % 5]
                out[:] = -7
                pl.run(s, out)
                ref = np.full(nr, -7, "i4")
                comm.Alltoallv([s, (sc, sd)], [ref, (rc, rd)])
                np.testing.assert_array_equal(out, ref)
        assert len(pl._by_addr) <= 2


@pytest.mark.parametrize("algorithm", ["auto", *ALGORITHMS])
@pytest.mark.parametrize("dtype", ["int8", "float64", "complex128"])
def test_new_buffers_every_run_in_place_and_not(comm, algorithm, dtype):
    """A new receive array every run (kept alive, so every address is new), in place and
    not, through a plan remembering one pair."""
    p, r = comm.Get_size(), comm.Get_rank()
    c = count_matrix("random", p)
    c = c + c.T  # symmetric: every rank's send counts equal its receive counts (in place)
    with pya2a.plan(comm, c[r], c[:, r], dtype, algorithm=algorithm, cache_size=1) as pl:
        keep = []
        for k in range(4):
            s = send_data(c, r, dtype, seed=SEED + k)
            ref = np.empty(int(c[:, r].sum()), dtype)
            comm.Alltoallv([s, c[r]], [ref, c[:, r]])
            out = np.full_like(ref, 3)
            pl.run(s, out)
            np.testing.assert_array_equal(out, ref)
            buf = s.copy()
            pl.run(MPI.IN_PLACE, buf)
            np.testing.assert_array_equal(buf, ref)
            keep += [out, buf]


@pytest.mark.parametrize("algorithm", ["direct", "pairwise", "ring", "mesh", "hypercube",
                                       "padded", "native"])
def test_executors_mix_across_ranks(comm, monkeypatch, algorithm):
    """Odd ranks bind with mpi4py's persistent requests (the C loop switched off), even
    ranks run the C loop: the same operation table, the same messages. Then ``Plan.bind``
    on both kinds of rank."""
    if algorithm not in ALGORITHMS:
        pytest.skip(f"{algorithm} is not available at p = {comm.Get_size()}")
    if comm.Get_rank() % 2:
        monkeypatch.setattr(_bound, "_EXEC", [None])
    sc, sd, ns, rc, rd, nr, rng = _layout(comm, "random")
    sends = [rng.integers(-1000, 1000, ns).astype("i8") for _ in range(3)]
    with pya2a.plan(comm, sc, rc, "i8", senddispls=sd, recvdispls=rd,
                    algorithm=algorithm) as pl:
        outs = [np.full(nr, -7, "i8") for _ in range(3)]
        for _ in range(3):
            for s, out in zip(sends, outs, strict=True):
                out[:] = -7
                pl.run(s, out)
                ref = np.full(nr, -7, "i8")
                comm.Alltoallv([s, (sc, sd)], [ref, (rc, rd)])
                np.testing.assert_array_equal(out, ref)
        with pl.bind(sends[0], outs[0]) as b:
            for _ in range(2):
                outs[0][:] = -7
                b.run()
                ref = np.full(nr, -7, "i8")
                comm.Alltoallv([sends[0], (sc, sd)], [ref, (rc, rd)])
                np.testing.assert_array_equal(outs[0], ref)


def test_oneshot_cycles_more_buffers_than_its_bindings(comm):
    """The drop-in call on more distinct buffer pairs than a one-shot plan binds, twice
    round: every call matches the library's own."""
    p, r = comm.Get_size(), comm.Get_rank()
    pc = pya2a.Comm(comm)
    n = _oneshot.ONESHOT_BINDINGS + 3
    pairs = [(np.arange(2 * p, dtype="d") + 100 * r + k, np.empty(2 * p)) for k in range(n)]
    for _ in range(2):
        for s, out in pairs:
            out.fill(-1)
            pc.Alltoallv([s, [2] * p], [out, [2] * p])
            ref = np.empty(2 * p)
            comm.Alltoallv([s, [2] * p], [ref, [2] * p])
            np.testing.assert_array_equal(out, ref)


@pytest.mark.parametrize("algorithm", ["direct", "native", "padded"])
def test_bad_buffers_raise_after_good_ones(comm, algorithm):
    """Once buffers of a dtype have run, new ones of that dtype skip the full check only
    when nothing is wrong: a read-only, too small, overlapping, strided or differently typed
    buffer still raises what it raises on a plan's first run."""
    p = comm.Get_size()
    pl = pya2a.plan(comm, 2, 2, "f8", algorithm=algorithm)
    pl.run(np.ones(2 * p), np.zeros(2 * p))
    pl.run(np.ones(2 * p), np.zeros(2 * p))
    ro = np.zeros(2 * p)
    ro.flags.writeable = False
    with pytest.raises((ValueError, TypeError, BufferError)):
        pl.run(np.ones(2 * p), ro)
    with pytest.raises(ValueError):
        pl.run(np.ones(2 * p), np.zeros(p))  # receive buffer too small
    with pytest.raises(ValueError):
        pl.run(np.ones(p), np.zeros(2 * p))  # send buffer too small
    with pytest.raises(ValueError, match="overlap"):
        buf = np.zeros(4 * p)
        pl.run(buf[:2 * p], buf[p:3 * p])
    with pytest.raises(TypeError):
        pl.run(np.ones(2 * p, "i8"), np.zeros(2 * p))
    out = np.zeros(4 * p)
    pl.run(np.arange(2 * p, dtype="f8"), out[:2 * p])  # a contiguous view is fine
    ref = np.zeros(2 * p)
    comm.Alltoall(np.arange(2 * p, dtype="f8"), ref)
    np.testing.assert_array_equal(out[:2 * p], ref)
    pl.free()
