"""``padded``: what is specific to it (the generic suites run it against the oracle already).

Every block in a slot of the global largest block, one MPI_Alltoall: an exchange with no
bytes at all, the uniform packed case that hands the user's buffers to MPI untouched, the
persistent ``MPI_Alltoall_init`` of ``Plan.bind``, exchanges moved in several rounds when
the scratch would be too large, one huge block among small ones, and the selector pricing
the padding (a skewed exchange must not pick it).
"""

from __future__ import annotations

import numpy as np
import pytest
from mpi4py import MPI

import pya2a
from pya2a import algorithms, select
from pya2a.algorithms import _bound, padded

from helpers import SEED, count_matrix, expected_recv, send_data


def _oracle(comm, sbuf, sc, sd, rc, rd, n, dtype):
    ref = np.zeros(n, dtype)
    comm.Alltoallv([sbuf, (sc, sd)], [ref, (rc, rd)])
    return ref


def test_all_blocks_empty_everywhere(comm):
    p, r = comm.Get_size(), comm.Get_rank()
    z = np.zeros(p, dtype=np.int64)
    sbuf, rbuf = np.arange(4.0), np.full(4, -1.0)
    pya2a.Alltoallv(comm, [sbuf, z], [rbuf, z], algorithm="padded")
    assert (rbuf == -1.0).all()
    with pya2a.plan(comm, z, z, np.float64, algorithm="padded") as pl:
        pl.run(sbuf, rbuf)
        with pl.bind(sbuf, rbuf) as b:
            b.run()
    assert (rbuf == -1.0).all() and r < p


@pytest.mark.parametrize("pattern", ["uniform", "random", "hot", "skew", "zeros"])
def test_plan_and_bind_match_oracle(comm, pattern):
    p, r = comm.Get_size(), comm.Get_rank()
    c = count_matrix(pattern, p)
    sbuf, want = send_data(c, r), expected_recv(c, r)
    with pya2a.plan(comm, c[r], c[:, r], np.float64, algorithm="padded") as pl:
        rbuf = np.full(int(c[:, r].sum()), -1.0)
        for _ in range(2):
            pl.run(sbuf, rbuf)
            np.testing.assert_array_equal(rbuf, want)
            rbuf.fill(-1.0)
        with pl.bind(sbuf, rbuf) as b:
            for _ in range(2):
                b.run()
                np.testing.assert_array_equal(rbuf, want)
                rbuf.fill(-1.0)


def test_uniform_packed_exchange_uses_the_user_buffers(comm):
    """Every block the largest, both layouts packed: no scratch, no copy."""
    p, r = comm.Get_size(), comm.Get_rank()
    c = np.full((p, p), 5, dtype=np.int64)
    sbuf, want = send_data(c, r, "int32"), expected_recv(c, r, "int32")
    rbuf = np.zeros_like(want)
    with pya2a.plan(comm, 5, 5, np.int32, algorithm="padded") as pl:
        pl.run(sbuf, rbuf)  # first sight: the plan's program on these buffers
        np.testing.assert_array_equal(rbuf, want)
        rbuf[:] = 0
        pl.run(sbuf, rbuf)  # seen again: bound to these buffers
        np.testing.assert_array_equal(rbuf, want)
        if p > 1:  # one Alltoall from the send buffer (0) to the receive buffer (1)
            rows, scratch, _ = padded.program(pl._send_t, pl._recv_t, pl._ctx())
            assert rows == [(_bound.ALLTOALL, 0, 0, 1, 0, 20)] and scratch == []
    # the choice is local: rank 0 sends and receives only largest blocks, the last rank's
    # own block is smaller, so it packs while rank 0 hands MPI its buffers
    c2 = c.copy()
    c2[p - 1, p - 1] = 2
    out = np.zeros(int(c2[:, r].sum()), np.float64)
    pya2a.Alltoallv(comm, [send_data(c2, r), c2[r]], [out, c2[:, r]], algorithm="padded")
    np.testing.assert_array_equal(out, expected_recv(c2, r))
    with pya2a.plan(comm, c2[r], c2[:, r], np.float64, algorithm="padded") as pl:
        sdata = send_data(c2, r)
        for _ in range(2):  # the second run binds these buffers
            out.fill(-1)
            pl.run(sdata, out)
            np.testing.assert_array_equal(out, expected_recv(c2, r))
        if p > 1:
            rows = padded.program(pl._send_t, pl._recv_t, pl._ctx())[0]
            assert (rows[0][0] == _bound.ALLTOALL) == (r != p - 1)


def test_alltoall_call_needs_no_max_block(comm):
    p, r = comm.Get_size(), comm.Get_rank()
    s = np.arange(7 * p, dtype="i2") + 100 * r
    out, ref = np.empty_like(s), np.empty_like(s)
    comm.Alltoall(s, ref)
    pya2a.Alltoall(comm, s, out, algorithm="padded")
    np.testing.assert_array_equal(out, ref)


@pytest.mark.skipif(MPI.Get_version() < (4, 0), reason="MPI_Alltoall_init is MPI 4")
def test_bind_makes_a_persistent_alltoall(comm):
    p, r = comm.Get_size(), comm.Get_rank()
    c = count_matrix("random", p)
    sbuf, want = send_data(c, r), expected_recv(c, r)
    rbuf = np.zeros_like(want)
    with pya2a.plan(comm, c[r], c[:, r], np.float64, algorithm="padded") as pl:
        with pl.bind(sbuf, rbuf) as b:
            if p > 1 and c.max() > 0 and hasattr(comm, "Alltoall_init"):
                assert b._entry.bound.persistent_collective
            for _ in range(3):
                rbuf.fill(0)
                b.run()
                np.testing.assert_array_equal(rbuf, want)


@pytest.mark.parametrize("limit", [1, 24, 4096])
def test_exchange_in_rounds_with_gaps_and_in_place(comm, monkeypatch, limit):
    """Scratch above SCRATCH_LIMIT: several Alltoall rounds, gapped layouts, in place."""
    monkeypatch.setattr(padded, "SCRATCH_LIMIT", limit)
    p, r = comm.Get_size(), comm.Get_rank()
    rng = np.random.default_rng([SEED, p, limit])
    c = rng.integers(0, 9, (p, p))
    c[rng.integers(0, p), rng.integers(0, p)] = 700  # one block far above the rest
    sc, rc = c[r], c[:, r]
    sd = np.cumsum(sc + 3) - (sc + 3)  # gaps of 3 elements
    rd = np.cumsum((rc + 2)[::-1])[::-1] - (rc + 2)  # blocks in reverse order, gaps of 2
    sbuf = np.arange(int((sd + sc).max(initial=0)) + 1, dtype=np.int16) + 7 * r
    n = int((rd + rc).max(initial=0)) + 1
    ref = _oracle(comm, sbuf, sc, sd, rc, rd, n, np.int16)
    out = np.zeros(n, np.int16)
    pya2a.Alltoallv(comm, [sbuf, (sc, sd)], [out, (rc, rd)], algorithm="padded")
    np.testing.assert_array_equal(out, ref)
    with pya2a.plan(comm, sc, rc, np.int16, senddispls=sd, recvdispls=rd,
                    algorithm="padded") as pl:
        out[:] = 0
        pl.run(sbuf, out)
        np.testing.assert_array_equal(out, ref)
    sym = c + c.T  # in place: what i sends to j is what j receives from i
    data = send_data(sym, r, "float32")
    mine, ref2 = data.copy(), data.copy()
    comm.Alltoallv(MPI.IN_PLACE, [ref2, sym[r]])
    pya2a.Alltoallv(comm, MPI.IN_PLACE, [mine, sym[r]], algorithm="padded")
    np.testing.assert_array_equal(mine, ref2)


def test_one_huge_block_among_small_ones(comm):
    p, r = comm.Get_size(), comm.Get_rank()
    c = np.ones((p, p), dtype=np.int64)
    c[p - 1, 0] = (1 << 20) // 8  # 1 MiB from the last rank to rank 0
    out = np.full(int(c[:, r].sum()), -1.0)
    pya2a.Alltoallv(comm, [send_data(c, r), c[r]], [out, c[:, r]], algorithm="padded")
    np.testing.assert_array_equal(out, expected_recv(c, r))


@pytest.mark.serial
def test_selector_prices_the_padding():
    """One 1 MiB block among 8-byte ones: priced at 1 MiB per peer, never picked."""
    table = select._builtin()  # not a tuning file this machine may have
    cands = algorithms.available(32)
    uniform = select.Stats(p=32, max_block=128, mean_block=128.0, device=False,
                           contiguous=True, max_rank=128 * 32, ranks_per_node=32)
    skew = select.Stats(p=32, max_block=1 << 20, mean_block=8.0 + (1 << 20) / 1024,
                        device=False, contiguous=True, max_rank=(1 << 20) + 8 * 31,
                        ranks_per_node=32)
    t_uni = select.predict("padded", uniform, table)
    t_skew = select.predict("padded", skew, table)
    assert t_skew > 100 * t_uni
    assert select.choose(skew, cands, table) != "padded"
    rows = {x["algorithm"]: x for x in select.ranking(skew, cands, table)}
    assert rows["padded"]["predicted_s"] > rows["native"]["predicted_s"]
    # the models of the other algorithms are still read at the busiest rank's size
    assert select.predict("native", skew, table) == pytest.approx(
        select.predict("native", select.Stats(32, 1 << 20, skew.mean_block, False, True,
                                              skew.max_rank, 32), table))


@pytest.mark.serial
def test_padded_cost_model_regimes():
    prm = select.DEFAULT_PARAMS
    for p in [1, 2, 7, 8, 32, 64, 1024]:
        assert 0 < padded.cost(p, 8, prm) <= padded.cost(p, 1 << 20, prm)
    # Bruck regime: log p rounds, cheaper than p-1 start-ups at large p
    assert padded.cost(64, 128, prm) < 64 * prm["ts"]
    # above BRUCK_MAX the library posts p-1 messages: never cheaper than native's model
    from pya2a.algorithms import native

    assert padded.cost(64, 4096, prm) > native.cost(64, 4096, prm)
    assert padded.chunking(4, 0) == (0, 0)
    assert padded.chunking(4, 100) == (100, 1)
    assert padded.chunking(1024, 1 << 20)[1] == -(-(1 << 20) // (padded.SCRATCH_LIMIT // 1024))
