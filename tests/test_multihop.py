"""The store-and-forward algorithms (ring, mesh, hypercube) under MPI: what is specific to them.

The generic suite (test_alltoallv.py, test_forms.py) already runs every registered algorithm
against the native oracle. Here: data that name their own (source, destination, index), so a
block forwarded to the wrong place or cut at the wrong size is caught and located; count
patterns that stress sizes travelling across hops (every block a different size, one pair
only, one sender, one receiver, a 4 MiB block among empty ones); every mesh grid of this p,
given as an option and through ``PYA2A_MESH_GRID``; every communicator size from 1 to the
world size (primes and non-squares whatever N is); a derived contiguous datatype; and calls
back to back without a barrier.
"""

from __future__ import annotations

import numpy as np
import pytest
from mpi4py import MPI

import pya2a
from pya2a import _stamp
from pya2a.algorithms import Context, mesh
from pya2a.core.spec import parse_vector
from pya2a.core.state import internal_comm, state
from pya2a.core.transport import HostTransport

from helpers import SEED, count_matrix, expected_recv, send_data

# padded is not store-and-forward, but it too moves blocks through scratch slots sized by
# a global value: the same self-describing data and size patterns catch a block cut short
MULTIHOP = ["ring", "mesh", "hypercube", "padded"]


def named_data(c: np.ndarray, src: int) -> np.ndarray:
    """int64 send data of ``src``: element i of block (src, d) is src*1e9 + d*1e6 + i."""
    p = c.shape[0]
    parts = [src * 10**9 + d * 10**6 + np.arange(c[src, d], dtype=np.int64) for d in range(p)]
    return np.concatenate(parts) if parts else np.zeros(0, np.int64)


def named_expected(c: np.ndarray, dst: int) -> np.ndarray:
    """What ``dst`` must hold after the exchange of :func:`named_data`."""
    p = c.shape[0]
    parts = [s * 10**9 + dst * 10**6 + np.arange(c[s, dst], dtype=np.int64) for s in range(p)]
    return np.concatenate(parts) if parts else np.zeros(0, np.int64)


def counts(pattern: str, p: int) -> np.ndarray:
    """p x p element counts, the same on every rank."""
    rng = np.random.default_rng([SEED, p, len(pattern)])
    i, j = np.indices((p, p))
    if pattern == "distinct":  # every block a different size: a mis-sized hop shows
        c = 1 + (7 * i + 3 * j + i * j) % 13
    elif pattern == "one_pair":  # one non-empty block, crossing the most hops of the ring
        c = np.zeros((p, p))
        c[0, p - 1] = 1000
    elif pattern == "one_sender":
        c = np.zeros((p, p))
        c[p // 2] = 1 + j[0] * 5
    elif pattern == "one_receiver":
        c = np.where(j == p // 3, 50 + i, 0)
    elif pattern == "diagonal_only":
        c = np.eye(p) * 17
    elif pattern == "distance":  # grows with ring distance
        c = (j - i) % p * 3
    elif pattern == "sparse_random":
        c = rng.integers(0, 40, (p, p)) * (rng.random((p, p)) < 0.2)
    elif pattern == "huge_skew":  # 4 MiB from the last rank to rank 0, crumbs elsewhere
        c = rng.integers(0, 3, (p, p))
        c[p - 1, 0] = 1 << 19
    else:
        raise ValueError(pattern)
    return np.asarray(c, dtype=np.int64)


PATTERNS = ["distinct", "one_pair", "one_sender", "one_receiver", "diagonal_only", "distance",
            "sparse_random", "huge_skew"]


def exchange(comm: MPI.Intracomm, c: np.ndarray, algorithm: str) -> np.ndarray:
    r = comm.Get_rank()
    out = np.full(int(c[:, r].sum()), -1, dtype=np.int64)
    pya2a.Alltoallv(comm, [named_data(c, r), c[r]], [out, c[:, r]], algorithm=algorithm)
    return out


@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("algorithm", MULTIHOP)
def test_every_block_arrives_whole_and_in_place(comm, algorithm, pattern):
    c = counts(pattern, comm.Get_size())
    np.testing.assert_array_equal(exchange(comm, c, algorithm),
                                  named_expected(c, comm.Get_rank()))


@pytest.mark.parametrize("algorithm", MULTIHOP)
def test_every_communicator_size_up_to_world(comm, algorithm):
    """Sizes 1..N in one job, so primes and non-squares run whatever N is."""
    p, r = comm.Get_size(), comm.Get_rank()
    for q in range(1, p + 1):
        sub = comm.Split(0 if r < q else MPI.UNDEFINED, r)
        if sub == MPI.COMM_NULL:
            continue
        try:
            for pattern in ["distinct", "sparse_random"]:
                c = counts(pattern, q)
                got = exchange(sub, c, algorithm)
                np.testing.assert_array_equal(got, named_expected(c, sub.Get_rank()),
                                              err_msg=f"size {q}, {pattern}")
        finally:
            sub.Free()


def _divisor_grids(p: int) -> list[tuple[int, int]]:
    return [(a, p // a) for a in range(1, p + 1) if p % a == 0]


def _mesh_with_options(comm: MPI.Intracomm, smsg, rmsg, options: dict) -> None:
    """mesh.run with ``ctx.options`` (the path a user's ``grid=`` option takes)."""
    icomm = internal_comm(comm)
    p = icomm.Get_size()
    recv = parse_vector(rmsg, p, readonly=False, what="receive message", name="recv")
    send = parse_vector(smsg, p, readonly=True)
    ctx = Context(comm=icomm, rank=icomm.Get_rank(), size=p, kind="alltoallv",
                  transport=HostTransport(icomm), options=options)
    mesh.run(send, recv, ctx)


@pytest.mark.parametrize("pattern", ["distinct", "hot", "zeros"])
def test_mesh_every_grid_as_option_and_env(comm, monkeypatch, pattern):
    p, r = comm.Get_size(), comm.Get_rank()
    c = counts(pattern, p) if pattern == "distinct" else count_matrix(pattern, p)
    want = named_expected(c, r)
    for grid in _divisor_grids(p):
        out = np.full(want.size, -1, np.int64)
        _mesh_with_options(comm, [named_data(c, r), c[r]], [out, c[:, r]], {"grid": grid})
        np.testing.assert_array_equal(out, want, err_msg=f"grid option {grid}")
        monkeypatch.setenv("PYA2A_MESH_GRID", f"{grid[0]},{grid[1]}")
        np.testing.assert_array_equal(exchange(comm, c, "mesh"), want,
                                      err_msg=f"PYA2A_MESH_GRID {grid}")
    monkeypatch.delenv("PYA2A_MESH_GRID")


def test_mesh_grid_that_does_not_factor_p_raises_on_every_rank(comm, monkeypatch):
    p = comm.Get_size()
    monkeypatch.setenv("PYA2A_MESH_GRID", f"2,{p}")
    pya2a._oneshot.clear()  # the grid applies to signatures not cached yet (documented)
    with pytest.raises(ValueError, match="r \\* c = p"):
        exchange(comm, counts("distinct", p), "mesh")
    assert "mesh" not in pya2a.available_algorithms(comm)
    monkeypatch.delenv("PYA2A_MESH_GRID")
    assert "mesh" in pya2a.available_algorithms(comm)


@pytest.mark.parametrize("algorithm", MULTIHOP)
def test_contiguous_derived_datatype_of_24_bytes(comm, algorithm):
    p, r = comm.Get_size(), comm.Get_rank()
    triple = MPI.DOUBLE.Create_contiguous(3).Commit()
    try:
        c = counts("distinct", p)
        sbuf = send_data(c * 3, r, "float64")
        out = np.zeros(int(c[:, r].sum()) * 3)
        ref = out.copy()
        comm.Alltoallv([sbuf, c[r], triple], [ref, c[:, r], triple])
        pya2a.Alltoallv(comm, [sbuf, c[r], triple], [out, c[:, r], triple],
                        algorithm=algorithm)
        np.testing.assert_array_equal(out, ref)
        np.testing.assert_array_equal(out, expected_recv(c * 3, r, "float64"))
    finally:
        triple.Free()


@pytest.mark.parametrize("algorithm", MULTIHOP)
def test_comm_proxy_with_displacements_and_datatype(comm, algorithm):
    p, r = comm.Get_size(), comm.Get_rank()
    pc = pya2a.Comm(comm, algorithm=algorithm)
    c = counts("distance", p)
    sc, rc = c[r], c[:, r]
    sd = np.concatenate([[0], np.cumsum(sc + 2)[:-1]]).astype(np.int64)  # gaps of 2
    rd = np.cumsum(rc[::-1] + 1)[::-1] - rc - 1  # reversed order, gaps of 1
    sbuf = np.zeros(int((sc + 2).sum()), np.int64)
    data = named_data(c, r)
    for d in range(p):
        sbuf[sd[d]:sd[d] + sc[d]] = data[int(sc[:d].sum()):int(sc[:d + 1].sum())]
    out = np.full(int((rc + 1).sum()), -7, np.int64)
    ref = out.copy()
    comm.Alltoallv([sbuf, (sc, sd), MPI.INT64_T], [ref, (rc, rd), MPI.INT64_T])
    pc.Alltoallv([sbuf, (sc, sd), MPI.INT64_T], [out, (rc, rd), MPI.INT64_T])
    np.testing.assert_array_equal(out, ref)


def test_back_to_back_calls_without_a_barrier(comm):
    """Alternating algorithms, counts and sizes: no message of one call matches another's."""
    p, r = comm.Get_size(), comm.Get_rank()
    for it in range(12):
        alg = MULTIHOP[it % len(MULTIHOP)]
        c = counts(PATTERNS[it % len(PATTERNS)], p) if it % 2 else \
            count_matrix("random", p, scale=it + 1)
        np.testing.assert_array_equal(exchange(comm, c, alg), named_expected(c, r),
                                      err_msg=f"call {it} ({alg})")


@pytest.mark.parametrize("algorithm", MULTIHOP)
def test_alltoall_and_in_place_through_the_multihop_bodies(comm, algorithm):
    p, r = comm.Get_size(), comm.Get_rank()
    c = counts("distinct", p)
    c = c + c.T
    mine = named_data(c, r)
    ref = mine.copy()
    comm.Alltoallv(MPI.IN_PLACE, [ref, c[r]])
    pya2a.Alltoallv(comm, MPI.IN_PLACE, [mine, c[r]], algorithm=algorithm)
    np.testing.assert_array_equal(mine, ref)
    s = np.arange(5 * p, dtype=np.int16) + 100 * r
    out, ref2 = np.empty_like(s), np.empty_like(s)
    comm.Alltoall(s, ref2)
    pya2a.Alltoall(comm, s, out, algorithm=algorithm)
    np.testing.assert_array_equal(out, ref2)


@pytest.mark.parametrize("pattern", PATTERNS)
def test_hypercube_carried_in_confirmation_rounds(comm, monkeypatch, pattern):
    """Repeated one-shot calls confirmed in dissemination rounds (pya2a._stamp.Forward,
    the mode made to hold at every size): the small patterns' blocks travel in the rounds
    themselves; each call on the same buffers with new data arrives whole and in place,
    without taking the full path again."""
    monkeypatch.setattr(_stamp, "STAMP_MAX_P", 0)
    monkeypatch.setattr(_stamp, "FORWARD_MAX_P", 1 << 20)
    dup = comm.Dup()
    try:
        p, r = dup.Get_size(), dup.Get_rank()
        c = counts(pattern, p)
        send = named_data(c, r)
        out = np.full(int(c[:, r].sum()), -1, dtype=np.int64)
        fast = None
        for it in range(3):
            send[:] = named_data(c, r) + it
            out[:] = -1
            pya2a.Alltoallv(dup, [send, c[r]], [out, c[:, r]], algorithm="hypercube")
            np.testing.assert_array_equal(out, named_expected(c, r) + it,
                                          err_msg=f"call {it}")
            seq = state(dup).slot("oneshot.signatures").seq
            if fast is None:
                fast = seq
        assert seq == fast, "a repeated call took the full path"
    finally:
        dup.Free()
