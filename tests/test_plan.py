"""Persistent plans: same result as the MPI library, binding cache, errors on every rank."""

from __future__ import annotations

import weakref

import numpy as np
import pytest
from mpi4py import MPI

import pya2a
from pya2a import _oneshot
from pya2a.algorithms import _bound
from pya2a.core.registry import Context
from pya2a.core.state import state

from helpers import count_matrix, expected_recv, send_data

ALGORITHMS = pya2a.available_algorithms()


def _case(comm, pattern, dtype="float64"):
    p, r = comm.Get_size(), comm.Get_rank()
    c = count_matrix(pattern, p)
    sbuf = send_data(c, r, dtype)
    return c[r], c[:, r], sbuf, expected_recv(c, r, dtype)


@pytest.mark.parametrize("algorithm", ["auto", *ALGORITHMS])
@pytest.mark.parametrize("pattern", ["uniform", "zeros", "hot"])
def test_plan_matches_oracle_on_repeated_runs(comm, algorithm, pattern):
    sc, rc, sbuf, want = _case(comm, pattern)
    with pya2a.plan(comm, sc, rc, sbuf.dtype, algorithm=algorithm) as pl:
        rbuf = np.empty(int(rc.sum()), sbuf.dtype)
        for _ in range(3):
            rbuf.fill(-1)
            pl.run(sbuf, rbuf)
            np.testing.assert_array_equal(rbuf, want)
        other = np.zeros_like(rbuf)  # a second buffer pair, then back to the first
        pl.run(sbuf, other)
        np.testing.assert_array_equal(other, want)
        rbuf.fill(-1)
        pl.run(sbuf[:], rbuf[:])  # new view objects on the same memory: cache hit
        np.testing.assert_array_equal(rbuf, want)


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_plan_in_place(comm, algorithm):
    p, r = comm.Get_size(), comm.Get_rank()
    n = 3
    c = np.full((p, p), n, dtype=np.int64)
    want = expected_recv(c, r, "int32")
    with pya2a.plan(comm, n, n, np.int32, algorithm=algorithm) as pl:
        for _ in range(2):
            buf = send_data(c, r, "int32").copy()
            pl.run(MPI.IN_PLACE, buf)
            np.testing.assert_array_equal(buf, want)


def test_repeated_runs_reuse_one_binding(comm):
    sc, rc, sbuf, want = _case(comm, "random")
    pl = pya2a.plan(comm, sc, rc, sbuf.dtype, algorithm="direct")
    rbuf = np.empty(int(rc.sum()), sbuf.dtype)
    pl.run(sbuf, rbuf)  # first sight: the plan's program runs there, the pair is remembered
    assert len(pl._by_addr) == 1
    np.testing.assert_array_equal(rbuf, want)
    pl.run(sbuf, rbuf)  # seen again: bound
    first = pl._last
    for _ in range(5):
        pl.run(sbuf, rbuf)
    assert pl._last is first and len(pl._by_addr) == 1
    np.testing.assert_array_equal(rbuf, want)
    pl.free()
    pl.free()  # idempotent
    with pytest.raises(ValueError, match="freed"):
        pl.run(sbuf, rbuf)


def test_binding_cache_is_bounded(comm):
    p = comm.Get_size()
    pl = pya2a.plan(comm, 1, 1, "i8", algorithm="pairwise", cache_size=4)
    pairs = [(np.arange(p, dtype="i8"), np.empty(p, "i8")) for _ in range(7)]
    for s, r in pairs:
        pl.run(s, r)
    assert len(pl._by_addr) <= 4
    pl.free()


@pytest.mark.parametrize("algorithm", ["native", "pairwise", "ring", "auto"])
def test_many_distinct_buffers_stay_bound_and_keep_no_memory_alive(comm, algorithm):
    """Cycling through more buffers than the old 4 bindings: every pair stays bound (no
    re-binding on the second pass), results match MPI's own call, and a binding holds no
    reference to the arrays it was made for."""
    p, rank = comm.Get_size(), comm.Get_rank()
    pl = pya2a.plan(comm, 2, 2, "d", algorithm=algorithm)
    pairs = [(np.arange(2 * p, dtype="d") + 100 * rank + k, np.empty(2 * p)) for k in range(12)]
    for _ in range(2):
        for s, r in pairs:
            pl.run(s, r)
            want = np.empty_like(r)
            comm.Alltoallv(s, want)
            np.testing.assert_array_equal(r, want)
    assert len(pl._by_addr) == len(pairs)
    ref = weakref.ref(pairs[0][1])
    del pairs
    pl._last = None
    assert ref() is None
    pl.free()


@pytest.mark.parametrize("algorithm", ["auto", "direct", "ring", "hypercube"])
def test_new_receive_array_each_run(comm, algorithm):
    """Buffers seen once run the plan's program on their addresses; only the receive blocks
    are written (the gaps between them keep their values)."""
    p, rank = comm.Get_size(), comm.Get_rank()
    pl = pya2a.plan(comm, 3, 3, "i4", recvdispls=[4 * j for j in range(p)],
                    algorithm=algorithm)
    send = np.arange(3 * p, dtype="i4") + 1000 * rank
    want = np.full(4 * p, -5, "i4")
    comm.Alltoallv(send, [want, (3, 4), MPI.INT])
    keep = []
    for _ in range(5):
        recv = np.full(4 * p, -5, "i4")
        keep.append(recv)  # alive: every run has a new address
        pl.run(send, recv)
        np.testing.assert_array_equal(recv, want)
    pl.free()


def test_plan_takes_torch_dtypes(comm):
    torch = pytest.importorskip("torch")
    p, rank = comm.Get_size(), comm.Get_rank()
    for dt, ref in ((torch.float32, "f4"), (torch.bfloat16, "u2"), (torch.int64, "i8")):
        pl = pya2a.plan(comm, 2, 2, dt)
        assert pl.datatype.Get_size() == np.dtype(ref).itemsize
        send = (torch.arange(2 * p) + 10 * rank).to(dt)
        recv = torch.zeros(2 * p, dtype=dt)
        pl.run(send, recv)
        want = torch.zeros(2 * p, dtype=dt)
        comm.Alltoallv([send, MPI.BYTE], [want, MPI.BYTE])
        assert torch.equal(recv, want), dt
        pl.free()


@pytest.mark.parametrize("algorithm", ["native", "direct"])
def test_bind_gives_argument_free_runs(comm, algorithm):
    sc, rc, sbuf, want = _case(comm, "random")
    pl = pya2a.plan(comm, sc, rc, sbuf.dtype, algorithm=algorithm)
    rbuf = np.empty(int(rc.sum()), sbuf.dtype)
    with pl.bind(sbuf, rbuf) as b:
        for _ in range(3):
            rbuf.fill(-1)
            b.run()
            np.testing.assert_array_equal(rbuf, want)
    pl.free()


@pytest.mark.parametrize("pattern", ["hot", "zeros"])
def test_oneshot_cache_gives_same_results(comm, pattern):
    """Cached one-shot plans (bound requests; bound schedules from the agreement record)."""
    sc, rc, sbuf, want = _case(comm, pattern)
    for _ in range(3):
        for alg in [a for a in ALGORITHMS if a != "native"]:
            rbuf = np.zeros(int(rc.sum()), sbuf.dtype)
            pya2a.Alltoallv(comm, [sbuf, sc], [rbuf, rc], algorithm=alg)
            np.testing.assert_array_equal(rbuf, want)
    if 1 < comm.Get_size() <= _oneshot.ROWS_IN_RECORD:
        assert any(pl._cmat is not None for pl in state(comm).slot("oneshot.plans").values())


def test_plan_errors_raise_on_every_rank(comm):
    p, r = comm.Get_size(), comm.Get_rank()
    bad = [1] * (p + 1 if r == p - 1 else p)  # only the last rank is wrong
    with pytest.raises(ValueError, match="entries"):
        pya2a.plan(comm, bad, [1] * p, "i4")
    with pytest.raises(TypeError):
        pya2a.plan(comm, [1] * p, [1] * p, object if r == 0 else "i4")
    with pytest.raises(ValueError, match="unknown algorithm"):
        pya2a.plan(comm, [1] * p, [1] * p, "i4", algorithm="nope")


def test_plan_counts_must_match_peers(comm):
    p, r = comm.Get_size(), comm.Get_rank()
    if p < 2:
        pytest.skip("needs two ranks")
    sc = [2] * p
    rc = [2] * p
    if r == 0:
        rc = [2] * (p - 1) + [3]  # rank 0 expects 3 from the last rank, which sends 2
    with pytest.raises(ValueError):
        pya2a.plan(comm, sc, rc, "f8")


def test_run_checks_buffers_locally(comm):
    p = comm.Get_size()
    pl = pya2a.plan(comm, 2, 2, "f8", algorithm="direct")
    with pytest.raises(ValueError):
        pl.run(np.zeros(2 * p), np.zeros(p))  # receive buffer too small
    with pytest.raises(ValueError, match="overlap"):
        buf = np.zeros(4 * p)
        pl.run(buf[:2 * p], buf[p:3 * p])
    pl.run(np.ones(2 * p), np.zeros(2 * p), check=True)
    pl.free()


def test_explain_ranks_every_usable_algorithm(comm):
    p = comm.Get_size()
    e = pya2a.explain(comm, [16] * p)
    names = [row["algorithm"] for row in e.ranking]
    assert set(names) | set(e.excluded) >= {"native"}
    assert e.choice in names
    assert all(row["predicted_s"] > 0 for row in e.ranking)
    assert "predicted us" in str(e)


@pytest.mark.parametrize("algorithm", ["ring", "mesh", "hypercube"])
def test_bound_schedule_is_chosen_alike_on_every_rank(comm, monkeypatch, algorithm):
    """Skewed counts put one rank's bound-schedule scratch over the limit and not another's:
    every rank must still take the same path (binding exchanges on other tags than ``run``,
    so a split decision waits forever). Regression: the p = 16, 4 MiB skew bench hung."""
    p, r = comm.Get_size(), comm.Get_rank()
    sc, rc, sbuf, want = _case(comm, "hot")
    info = pya2a.algorithms.get(algorithm)
    ctx = Context(comm=comm, rank=r, size=p, kind="alltoallv", transport=None,
                  in_place=False, options={})
    cmat = np.asarray(count_matrix("hot", p), dtype=np.int64) * sbuf.itemsize
    steps = _bound.schedule_steps(info, ctx)
    need = sum(_bound._scratch_need(_bound._phases(steps), cmat)) if steps else 0
    needs = comm.allgather(need)
    limit = min(needs) if min(needs) < max(needs) else max(needs)
    monkeypatch.setattr(_bound, "SCRATCH_LIMIT", limit)
    with pya2a.plan(comm, sc, rc, sbuf.dtype, algorithm=algorithm) as pl:
        bound = pl._cmat is not None
        assert comm.allgather(bound) == [bound] * p
        assert bound == (max(needs) <= limit)
        rbuf = np.empty(int(rc.sum()), sbuf.dtype)
        for _ in range(2):
            rbuf.fill(-1)
            pl.run(sbuf, rbuf)
            np.testing.assert_array_equal(rbuf, want)


@pytest.mark.parametrize("algorithm", ["ring", "mesh", "hypercube"])
@pytest.mark.parametrize("pattern", ["random", "skew", "zeros"])
def test_bound_schedule_with_gaps_and_reversed_blocks(comm, algorithm, pattern):
    """Bound store-and-forward plans (precomputed copy lists) with gapped, reversed layouts,
    two buffer pairs and repeated runs, against the MPI library's own Alltoallv."""
    from helpers import SEED

    p, r = comm.Get_size(), comm.Get_rank()
    c = count_matrix(pattern, p)
    sc, rc = c[r], c[:, r]
    sd = np.cumsum(sc + 3) - (sc + 3)  # gaps of 3 elements
    rd = np.cumsum((rc + 2)[::-1])[::-1] - (rc + 2)  # blocks in reverse order, gaps of 2
    rng = np.random.default_rng([SEED, p, r])
    sbuf = rng.integers(-1000, 1000, int((sd + sc).max(initial=0)) + 1).astype(np.int32)
    n = int((rd + rc).max(initial=0)) + 1
    ref = np.full(n, -7, np.int32)
    comm.Alltoallv([sbuf, (sc, sd)], [ref, (rc, rd)])
    with pya2a.plan(comm, sc, rc, np.int32, senddispls=sd, recvdispls=rd,
                    algorithm=algorithm) as pl:
        outs = [np.full(n, -7, np.int32), np.full(n, -7, np.int32)]
        for k in range(4):
            out = outs[k % 2]
            out[:] = -7
            pl.run(sbuf, out)
            np.testing.assert_array_equal(out, ref)
