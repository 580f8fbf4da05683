"""Bad input raises the right error on every rank, promptly, and writes nothing.

Each case breaks the arguments on one rank only (the last one, so that rank 0 is a healthy
rank in the multi-rank runs); every rank must raise the same exception type, and every
rank's receive buffer must still hold its sentinel.
"""

from __future__ import annotations

import array

import numpy as np
import pytest
from mpi4py import MPI

import pya2a

SENTINEL = -7.0


def _good(comm):
    p = comm.Get_size()
    send = np.arange(2 * p, dtype="d")
    recv = np.full(2 * p, SENTINEL)
    return send, recv, [2] * p


def _bad_on_last(comm, good, bad):
    return bad if comm.Get_rank() == comm.Get_size() - 1 else good


def _raises_everywhere(comm, kind, fn, recv, match=None):
    with pytest.raises(kind, match=match):
        fn()
    assert (recv == SENTINEL).all(), "receive buffer was written"
    comm.Barrier()  # every rank got here: nobody is stuck in the failed call


CASES = {
    "counts_wrong_length": (ValueError, "entries, expected",
                            lambda s, r, c: ([s, c[:-1] if c[:-1] else [1, 1]], [r, c])),
    "negative_count": (ValueError, "negative",
                       lambda s, r, c: ([s, [-1] + c[1:]], [r, c])),
    "negative_displ": (ValueError, "negative",
                       lambda s, r, c: ([s, (c, [-2] * len(c))], [r, c])),
    "block_outside_buffer": (ValueError, "outside",
                             lambda s, r, c: ([s, (c, [0] * (len(c) - 1) + [10 ** 6])],
                                              [r, c])),
    "float_counts": (TypeError, "integers",
                     lambda s, r, c: ([s, [1.5] * len(c)], [r, c])),
    "message_not_a_buffer": (TypeError, "buffer protocol", lambda s, r, c: (42, [r, c])),
    "five_item_message": (ValueError, "2 to 4 items",
                          lambda s, r, c: ([s, c, None, MPI.DOUBLE, 0], [r, c])),
    "datatype_size_mismatch": (ValueError, "datatype size",
                               lambda s, r, c: ([s.astype("f"), c], [r, c])),
    # mpi4py looks datatypes up in MPI._typedict: KeyError for what is not there
    "bad_typecode": (KeyError, "cannot map", lambda s, r, c: ([s, c, "nope"], [r, c])),
    "bad_datatype_kind": (KeyError, "cannot map", lambda s, r, c: ([s, c, 3.0], [r, c])),
    "noncontiguous_send": (BufferError, "contiguous",
                           lambda s, r, c: (np.repeat(s, 2)[::2], [r, c])),
    "self_count_mismatch": (ValueError, "itself",
                            lambda s, r, c: ([s, (c, None)], [r, [0] * len(c)])),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_argument_on_one_rank_raises_everywhere(comm, case):
    kind, match, make = CASES[case]
    send, recv, counts = _good(comm)
    smsg, rmsg = _bad_on_last(comm, ([send, counts], [recv, counts]),
                              make(send, recv, counts))
    if case == "self_count_mismatch" and comm.Get_rank() == comm.Get_size() - 1:
        rmsg = [recv, [2] * (len(counts) - 1) + [0]] if len(counts) > 1 else [recv, [0]]
    _raises_everywhere(comm, kind, lambda: pya2a.Alltoallv(comm, smsg, rmsg), recv)


def test_readonly_receive_buffer(comm):
    send, recv, counts = _good(comm)
    ro = recv.copy()
    ro.flags.writeable = False
    target = _bad_on_last(comm, recv, ro)
    _raises_everywhere(comm, BufferError, lambda: pya2a.Alltoallv(comm, [send, counts],
                                                                  [target, counts]), recv,
                       "writable")
    with pytest.raises(BufferError):
        pya2a.Alltoallv(comm, [send, counts], [bytes(recv.nbytes), counts, MPI.DOUBLE])


def test_unknown_algorithm_lists_known(comm):
    send, recv, counts = _good(comm)
    with pytest.raises(ValueError, match="known: auto, .*native") as info:
        pya2a.Alltoallv(comm, [send, counts], [recv, counts], algorithm="warp-drive")
    for name in pya2a.available_algorithms():
        assert name in str(info.value)
    assert (recv == SENTINEL).all()


def test_algorithm_differs_between_ranks(comm):
    if comm.Get_size() < 2:
        pytest.skip("needs two ranks")
    send, recv, counts = _good(comm)
    alg = "pairwise" if comm.Get_rank() == 0 else "direct"
    _raises_everywhere(comm, ValueError, lambda: pya2a.Alltoallv(
        comm, [send, counts], [recv, counts], algorithm=alg), recv, "different algorithms")


def test_check_catches_cross_rank_count_mismatch(comm):
    p, r = comm.Get_size(), comm.Get_rank()
    if p < 2:
        pytest.skip("needs two ranks")
    send = np.arange(3 * p, dtype="d")
    recv = np.full(3 * p, SENTINEL)
    sc = [2] * p
    rc = [2] * p
    if r == 0:
        sc = [2] * (p - 1) + [3]  # rank 0 sends 3 to the last rank, which expects 2
    _raises_everywhere(comm, ValueError, lambda: pya2a.Alltoallv(
        comm, [send, sc], [recv, rc], check=True), recv, "rank 0 sends 24 bytes to rank")


def test_overlapping_receive_blocks(comm):
    p = comm.Get_size()
    send, recv, counts = _good(comm)
    rd = [0] * p if p > 1 else [0]
    rmsg = _bad_on_last(comm, [recv, counts], [recv, (counts, rd)])
    if p == 1:
        pytest.skip("one block cannot overlap another")
    _raises_everywhere(comm, ValueError, lambda: pya2a.Alltoallv(comm, [send, counts], rmsg),
                       recv, "overlap")


def test_send_and_receive_buffers_overlap(comm):
    p = comm.Get_size()
    buf = np.full(4 * p, SENTINEL)
    _, recv, counts = _good(comm)
    smsg = _bad_on_last(comm, [np.arange(2 * p, dtype="d"), counts], [buf[: 2 * p], counts])
    rmsg = _bad_on_last(comm, [recv, counts], [buf[p: 3 * p], counts])
    target = recv if comm.Get_rank() != comm.Get_size() - 1 else buf[2 * p:]
    _raises_everywhere(comm, ValueError, lambda: pya2a.Alltoallv(comm, smsg, rmsg), target,
                       "overlap")


def test_not_a_communicator():
    with pytest.raises(TypeError, match="Intracomm"):
        pya2a.Alltoallv("COMM_WORLD", np.zeros(1), np.zeros(1))
    with pytest.raises(ValueError, match="COMM_NULL"):
        pya2a.Alltoallv(MPI.COMM_NULL, np.zeros(1), np.zeros(1))


def test_intercommunicator_is_refused(comm):
    p, r = comm.Get_size(), comm.Get_rank()
    if p < 2:
        pytest.skip("needs two ranks")
    local = comm.Split(r % 2, r)
    inter = local.Create_intercomm(0, comm, 1 - (r % 2), tag=11)
    try:
        with pytest.raises(TypeError, match="intercommunicator"):
            pya2a.Alltoallv(inter, np.zeros(4), np.zeros(4))
        with pytest.raises(TypeError, match="intercommunicator"):
            pya2a.Comm(inter)
    finally:
        inter.Free()
        local.Free()


def test_alltoall_block_size_mismatch(comm):
    p = comm.Get_size()
    send = np.arange(2 * p, dtype="d")
    recv = np.full(3 * p, SENTINEL)
    rmsg = _bad_on_last(comm, [recv, 2], [recv, 3])
    _raises_everywhere(comm, ValueError, lambda: pya2a.Alltoall(comm, [send, 2], rmsg), recv,
                       "bytes")


def test_alltoall_cannot_infer_count(comm):
    p = comm.Get_size()
    send = np.arange(2 * p + (1 if p > 1 else 0), dtype="d")
    recv = np.full(2 * p, SENTINEL)
    if p == 1:
        pytest.skip("any length divides into one block")
    _raises_everywhere(comm, ValueError, lambda: pya2a.Alltoall(comm, send, recv), recv,
                       "multiple")


def test_array_api_counts_must_sum_to_rows(comm):
    p = comm.Get_size()
    rows = np.zeros((3 * p, 2))
    counts = _bad_on_last(comm, [3] * p, [3] * (p - 1) + [4])
    with pytest.raises(ValueError, match="sum to"):
        pya2a.alltoallv(comm, rows, counts)
    with pytest.raises(TypeError, match="shape"):
        pya2a.alltoallv(comm, array.array("d", [0.0] * p), [1] * p)


def test_comm_proxy_rejects_unknown_algorithm(comm):
    with pytest.raises(ValueError, match="known"):
        pya2a.Comm(comm, algorithm="bogus")


def test_non_contiguous_datatype_needs_native(comm):
    p = comm.Get_size()
    vec = MPI.DOUBLE.Create_vector(2, 1, 2).Commit()
    try:
        send = np.arange(4 * p, dtype="d")
        recv = np.full(4 * p, SENTINEL)
        with pytest.raises(ValueError, match="contiguous"):
            pya2a.Alltoallv(comm, [send, [1] * p, vec], [recv, [1] * p, vec],
                            algorithm="pairwise")
        assert (recv == SENTINEL).all()
        ref = recv.copy()
        comm.Alltoallv([send, [1] * p, vec], [ref, [1] * p, vec])
        pya2a.Alltoallv(comm, [send, [1] * p, vec], [recv, [1] * p, vec])  # auto -> native
        np.testing.assert_array_equal(recv, ref)
    finally:
        vec.Free()
