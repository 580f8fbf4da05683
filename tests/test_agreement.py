"""Disagreements between ranks that pya2a can see raise the same exception on every rank.

Each case is legal on every rank taken alone (local checks pass) but wrong across ranks:
what one rank sends another does not expect, in-place counts that are not symmetric,
Alltoall blocks of different sizes, ``alltoallv`` rows of different sizes. Every algorithm
must raise ``ValueError`` on every rank, before any data moves (the receive buffers keep
their sentinel), naming the pair of ranks; nobody is left waiting (the barrier after).
"""

from __future__ import annotations

from functools import partial

import numpy as np
import pytest
from mpi4py import MPI

import pya2a

SENTINEL = -7.0


def _algorithms(comm):
    return ["auto", *pya2a.available_algorithms(comm)]


def _raises_everywhere(comm, fn, recv, match):
    with pytest.raises(ValueError, match=match):
        fn()
    assert (np.asarray(recv) == SENTINEL).all(), "receive buffer was written"
    comm.Barrier()


def _need_two(comm):
    if comm.Get_size() < 2:
        pytest.skip("needs two ranks")


@pytest.mark.parametrize("check", [False, True], ids=["check=False", "check=True"])
def test_send_and_receive_counts_disagree(comm, check):
    _need_two(comm)
    p, r = comm.Get_size(), comm.Get_rank()
    for alg in _algorithms(comm):
        send = np.arange(3 * p, dtype="d")
        recv = np.full(3 * p, SENTINEL)
        sc = [2] * p
        if r == 0:
            sc[-1] = 3  # rank 0 sends 3 to the last rank, which expects 2
        _raises_everywhere(comm, partial(pya2a.Alltoallv, comm, [send, sc], [recv, [2] * p],
                                         algorithm=alg, check=check), recv,
            f"rank 0 sends 24 bytes to rank {p - 1}, which expects 16")


def test_in_place_counts_not_symmetric(comm):
    _need_two(comm)
    p, r = comm.Get_size(), comm.Get_rank()
    for alg in _algorithms(comm):
        rc = [1 + (j > r) for j in range(p)]  # rank i sends rc_i[j], j expects rc_j[i]
        buf = np.full(2 * p, SENTINEL)
        _raises_everywhere(comm, partial(pya2a.Alltoallv, comm, MPI.IN_PLACE, [buf, rc],
                                         algorithm=alg), buf, "symmetric")


def test_alltoall_block_sizes_disagree(comm):
    _need_two(comm)
    p, r = comm.Get_size(), comm.Get_rank()
    n = 2 if r == 0 else 3
    for alg in _algorithms(comm):
        send = np.arange(n * p, dtype="d")
        recv = np.full(n * p, SENTINEL)
        _raises_everywhere(comm, partial(pya2a.Alltoall, comm, send, recv, algorithm=alg),
                           recv, "rank 0 sends 16 bytes to rank 1, which expects 24")


def test_alltoallv_rows_differ(comm):
    _need_two(comm)
    p, r = comm.Get_size(), comm.Get_rank()
    width = 3 if r == p - 1 else 2
    for alg in _algorithms(comm):
        rows = np.arange(p * width, dtype="d").reshape(p, width)
        with pytest.raises(ValueError, match=f"rank 0 has rows of 16 bytes .* rank {p - 1}"):
            pya2a.alltoallv(comm, rows, [1] * p, algorithm=alg)
        comm.Barrier()


def test_agreed_calls_still_run_after_a_refused_one(comm):
    """A refused call leaves every cache consistent: the next good call matches MPI."""
    p, r = comm.Get_size(), comm.Get_rank()
    for alg in _algorithms(comm):
        send = np.arange(2 * p, dtype="d") + 100 * r
        recv = np.empty(2 * p)
        if p > 1:
            bad = [2] * p
            if r == 0:
                bad[-1] = 1
            with pytest.raises(ValueError):
                pya2a.Alltoallv(comm, [send, bad], [recv, [2] * p], algorithm=alg)
        pya2a.Alltoallv(comm, send, recv, algorithm=alg)
        want = np.empty_like(recv)
        comm.Alltoallv(send, want)
        np.testing.assert_array_equal(recv, want)
