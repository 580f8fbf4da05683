"""Every host algorithm against the MPI library's own Alltoallv and a seed-computed answer.

Runs serially (p = 1) and under mpiexec; the algorithm list comes from the registry, so a
newly registered algorithm is tested here without edits.
"""

from __future__ import annotations

import numpy as np
import pytest
from mpi4py import MPI

import pya2a

from helpers import (
    DTYPES,
    PATTERNS,
    SEED,
    count_matrix,
    expected_recv,
    gapped_layout,
    mpi_moves,
    send_data,
)

ALGORITHMS = pya2a.available_algorithms()


def _exchange(comm, c, dtype, algorithm, rng=None):
    p, r = comm.Get_size(), comm.Get_rank()
    sc, rc = c[r], c[:, r]
    sbuf = send_data(c, r, dtype)
    if rng is None:
        rbuf = np.zeros(int(rc.sum()), dtype)
        rmsg = [rbuf, rc]
        smsg = [sbuf, sc]
    else:  # gapped, permuted layouts on both sides
        sd, sn = gapped_layout(sc, rng)
        spread = np.zeros(sn, dtype)
        for j in range(p):
            spread[sd[j]:sd[j] + sc[j]] = sbuf[int(sc[:j].sum()):int(sc[:j + 1].sum())]
        rd, rn = gapped_layout(rc, rng)
        rbuf = np.zeros(rn, dtype)
        smsg = [spread, (sc, sd)]
        rmsg = [rbuf, (rc, rd)]
    ref = rbuf.copy()
    comm.Alltoallv(*_oracle_msgs(smsg, [ref, *rmsg[1:]]))
    pya2a.Alltoallv(comm, smsg, rmsg, algorithm=algorithm)
    return rbuf, ref, rmsg


def _oracle_msgs(smsg, rmsg):
    """The messages for MPI's own call; as bytes where this mpi4py cannot map the dtype."""
    if mpi_moves(smsg[0].dtype):
        return smsg, rmsg
    out = []
    for buf, layout in (smsg, rmsg):
        n = buf.itemsize
        counts, displs = layout if isinstance(layout, tuple) else (layout, None)
        counts = np.asarray(counts) * n
        displs = None if displs is None else np.asarray(displs) * n
        out.append([buf.view(np.uint8), (counts, displs), MPI.BYTE])
    return out


@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("algorithm", ["auto", *ALGORITHMS])
def test_patterns_match_native_and_seed(comm, algorithm, pattern):
    c = count_matrix(pattern, comm.Get_size())
    rbuf, ref, _ = _exchange(comm, c, "float64", algorithm)
    np.testing.assert_array_equal(rbuf, ref)
    np.testing.assert_array_equal(rbuf, expected_recv(c, comm.Get_rank(), "float64"))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_dtypes_match_native(comm, algorithm, dtype):
    c = count_matrix("random", comm.Get_size(), scale=5)
    if not mpi_moves(dtype):  # this MPI has no datatype for it (float16 on Open MPI 4)
        r = comm.Get_rank()
        smsg, rmsg = [send_data(c, r, dtype), c[r]], [np.zeros(int(c[:, r].sum()), dtype),
                                                      c[:, r]]
        try:
            comm.Alltoallv(smsg, rmsg)
        except KeyError:  # mpi4py has no entry for the format: refused the same way
            with pytest.raises(KeyError):
                pya2a.Alltoallv(comm, smsg, rmsg, algorithm=algorithm)
            return
        except MPI.Exception:  # mpi4py names a type the MPI lacks: pya2a moves the elements
            pass
    rbuf, ref, _ = _exchange(comm, c, dtype, algorithm)
    assert rbuf.tobytes() == ref.tobytes()


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_gapped_permuted_displacements_leave_gaps_untouched(comm, algorithm):
    c = count_matrix("random", comm.Get_size())
    rng = np.random.default_rng([SEED, comm.Get_rank(), 7])
    rbuf, ref, _ = _exchange(comm, c, "int32", algorithm, rng)
    np.testing.assert_array_equal(rbuf, ref)  # gaps stay zero in both


@pytest.mark.parametrize("pattern", ["random", "hot", "zeros"])
@pytest.mark.parametrize("algorithm", ["auto", *ALGORITHMS])
def test_in_place_matches_native(comm, algorithm, pattern):
    p, r = comm.Get_size(), comm.Get_rank()
    c = count_matrix(pattern, p)
    c = c + c.T  # in place needs rank i's block for j the size of j's block for i
    data = send_data(c, r, "float32")
    mine, ref = data.copy(), data.copy()
    comm.Alltoallv(MPI.IN_PLACE, [ref, c[r]])
    marker = MPI.IN_PLACE if algorithm != "auto" else None  # both spellings
    pya2a.Alltoallv(comm, marker, [mine, c[r]], algorithm=algorithm)
    np.testing.assert_array_equal(mine, ref)


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_large_blocks(comm, algorithm):
    p = comm.Get_size()
    c = np.full((p, p), (1 << 20) // 8, dtype=np.int64)  # 1 MiB per peer
    c[0, -1] += 12345  # and one odd-sized block
    c[-1, 0] += 1
    rbuf, ref, _ = _exchange(comm, c, "float64", algorithm)
    np.testing.assert_array_equal(rbuf, ref)


@pytest.mark.parametrize("algorithm", ["auto", *ALGORITHMS])
def test_alltoall_block_variant(comm, algorithm):
    p, r = comm.Get_size(), comm.Get_rank()
    s = np.arange(3 * p, dtype="i8") + 1000 * r
    out, ref = np.empty_like(s), np.empty_like(s)
    comm.Alltoall(s, ref)
    pya2a.Alltoall(comm, s, out, algorithm=algorithm)
    np.testing.assert_array_equal(out, ref)
    inplace, ref2 = s.copy(), s.copy()
    comm.Alltoall(MPI.IN_PLACE, ref2)
    pya2a.Alltoall(comm, MPI.IN_PLACE, inplace, algorithm=algorithm)
    np.testing.assert_array_equal(inplace, ref2)


@pytest.mark.parametrize("algorithm", ["auto", *ALGORITHMS])
def test_comm_proxy_is_a_drop_in(comm, algorithm):
    pc = pya2a.Comm(comm, algorithm=algorithm)
    assert isinstance(pc, MPI.Intracomm)
    assert pc.Get_rank() == comm.Get_rank() and pc.Get_size() == comm.Get_size()
    assert pc.allreduce(1) == comm.Get_size()  # other methods are the wrapped comm's
    c = count_matrix("random", comm.Get_size())
    r = comm.Get_rank()
    out = np.zeros(int(c[:, r].sum()))
    pc.Alltoallv([send_data(c, r), c[r]], [out, c[:, r]])
    np.testing.assert_array_equal(out, expected_recv(c, r))


@pytest.mark.parametrize("algorithm", ["auto", *ALGORITHMS])
def test_array_api_exchanges_rows_and_counts(comm, algorithm):
    p, r = comm.Get_size(), comm.Get_rank()
    c = count_matrix("skew", p, scale=3)
    rows = np.arange(int(c[r].sum()) * 6, dtype=np.float32).reshape(-1, 2, 3) + 1e4 * r
    recv, rcounts = pya2a.alltoallv(comm, rows, c[r], algorithm=algorithm)
    np.testing.assert_array_equal(rcounts, c[:, r])
    assert recv.shape == (int(c[:, r].sum()), 2, 3) and recv.dtype == np.float32
    ref = np.zeros_like(recv)
    comm.Alltoallv([rows, c[r] * 6], [ref, c[:, r] * 6])
    np.testing.assert_array_equal(recv, ref)


def test_repeated_calls_with_changing_data(comm):
    p, r = comm.Get_size(), comm.Get_rank()
    for it in range(20):
        c = count_matrix(PATTERNS[it % len(PATTERNS)], p)
        alg = ALGORITHMS[it % len(ALGORITHMS)]
        out = np.zeros(int(c[:, r].sum()))
        pya2a.Alltoallv(comm, [send_data(c, r), c[r]], [out, c[:, r]], algorithm=alg)
        np.testing.assert_array_equal(out, expected_recv(c, r))


def test_subcommunicators(comm):
    p, r = comm.Get_size(), comm.Get_rank()
    sub = comm.Split(r % 2, r)
    try:
        q = sub.Get_size()
        c = count_matrix("random", q)
        k = sub.Get_rank()
        for alg in ALGORITHMS:
            out = np.zeros(int(c[:, k].sum()))
            pya2a.Alltoallv(sub, [send_data(c, k), c[k]], [out, c[:, k]], algorithm=alg)
            np.testing.assert_array_equal(out, expected_recv(c, k))
    finally:
        sub.Free()
    assert p >= 1


@pytest.mark.parametrize("algorithm", ["auto", *ALGORITHMS])
def test_fresh_comm_wrapped_before_first_call(comm, algorithm):
    # The first pya2a call on a communicator creates its internal duplicate; when that call
    # comes through a pya2a.Comm the duplicate must still be a plain MPI communicator.
    fresh = comm.Dup()
    try:
        pc = pya2a.Comm(fresh, algorithm=algorithm)
        p, r = pc.Get_size(), pc.Get_rank()
        s = np.arange(2 * p, dtype="i8") + 100 * r
        out, ref = np.empty_like(s), np.empty_like(s)
        pc.Alltoall(s, out)
        comm.Alltoall(s, ref)
        np.testing.assert_array_equal(out, ref)
        pc.Alltoallv(s, out)
        np.testing.assert_array_equal(out, ref)
    finally:
        fresh.Free()


def test_mesh_grid_option_through_the_api(comm):
    p, r = comm.Get_size(), comm.Get_rank()
    c = count_matrix("random", p)
    for rows in [d for d in range(1, p + 1) if p % d == 0]:
        out = np.zeros(int(c[:, r].sum()))
        pya2a.Alltoallv(comm, [send_data(c, r), c[r]], [out, c[:, r]], algorithm="mesh",
                        options={"grid": (rows, p // rows)})
        np.testing.assert_array_equal(out, expected_recv(c, r))
    pc = pya2a.Comm(comm, algorithm="mesh", options={"grid": (1, p)})
    out = np.zeros(int(c[:, r].sum()))
    pc.Alltoallv([send_data(c, r), c[r]], [out, c[:, r]])
    np.testing.assert_array_equal(out, expected_recv(c, r))
    out[:] = -1.0
    with pytest.raises(ValueError, match="grid"):
        pya2a.Alltoallv(comm, [send_data(c, r), c[r]], [out, c[:, r]], algorithm="mesh",
                        options={"grid": (p + 1, 1)})
    assert (out == -1.0).all()


@pytest.mark.parametrize("rpn", [1, 2, 3, 4])
def test_hierarchical_on_simulated_nodes(comm, rpn, monkeypatch):
    # PYA2A_RANKS_PER_NODE declares blocks of consecutive ranks nodes, so the two-level
    # path (within nodes, then between them) runs on one machine too.
    p, r = comm.Get_size(), comm.Get_rank()
    monkeypatch.setenv("PYA2A_RANKS_PER_NODE", str(rpn))
    fresh = comm.Dup()  # the layout is cached per communicator
    try:
        for pattern in ("random", "hot", "zeros"):
            c = count_matrix(pattern, p)
            out = np.full(int(c[:, r].sum()), -1.0)
            smsg, rmsg = [send_data(c, r), c[r]], [out, c[:, r]]
            if p % rpn:
                with pytest.raises(ValueError, match="does not divide"):
                    pya2a.Alltoallv(fresh, smsg, rmsg, algorithm="hierarchical")
                assert (out == -1.0).all()
            else:
                pya2a.Alltoallv(fresh, smsg, rmsg, algorithm="hierarchical")
                np.testing.assert_array_equal(out, expected_recv(c, r))
    finally:
        fresh.Free()


def test_hierarchical_detects_one_node(comm):
    from pya2a.algorithms.hierarchical import _layout, node_layout

    assert node_layout(pya2a.core.state.internal_comm(comm)) == (1, comm.Get_size())
    # two nodes of two, numbered node by node / round robin
    assert _layout([(0, 0, 2, ""), (0, 1, 2, ""), (2, 0, 2, ""), (2, 1, 2, "")], 4) == (2, 2)
    assert isinstance(_layout([(0, 0, 2, ""), (1, 0, 2, ""), (0, 1, 2, ""), (1, 1, 2, "")],
                              4), str)


def test_one_shot_cache_does_not_keep_large_buffers_alive(comm):
    import gc
    import weakref

    from pya2a import _oneshot as api

    p, r = comm.Get_size(), comm.Get_rank()
    n = api.ONESHOT_MAX_BYTES // 8 // p + 1  # just over the bound per rank
    c = np.full((p, p), n, dtype=np.int64)
    send = np.ones(n * p)
    recv = np.zeros(n * p)
    pya2a.Alltoallv(comm, [send, c[r]], [recv, c[:, r]], algorithm="pairwise")
    assert (recv == 1).all()
    ref = weakref.ref(recv)
    del recv
    gc.collect()
    assert ref() is None, "a one-shot call kept a large receive buffer alive"
