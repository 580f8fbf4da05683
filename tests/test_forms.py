"""Every message form mpi4py's Alltoallv / Alltoall accept means the same through pya2a.

Each case builds a (send, recv) pair in some form, runs mpi4py's own call and pya2a with
every algorithm on identical inputs, and compares the receive buffers byte for byte.
"""

from __future__ import annotations

import array

import numpy as np
import pytest
from mpi4py import MPI

import pya2a

ALGORITHMS = ["auto", *pya2a.available_algorithms()]


def _vector_cases(p: int, r: int):
    n = 3 * p
    counts = [(r + j) % 3 + 1 for j in range(p)]
    rcounts = [(j + r) % 3 + 1 for j in range(p)]
    cnt = np.array(counts)
    sd = np.concatenate([[0], np.cumsum(cnt)[:-1]])
    ints = np.arange(sum(counts), dtype="i") + 100 * r
    yield "bare buffers (even split)", \
        lambda: np.arange(n, dtype="d") + r, lambda: np.zeros(n, "d")
    yield "[buf, counts] list", lambda: [ints, counts], lambda: [np.zeros(sum(rcounts), "i"),
                                                                 rcounts]
    yield "[buf, (counts, displs)] tuple", lambda: [ints, (counts, sd)], \
        lambda: [np.zeros(sum(rcounts) + p, "i"), (rcounts, [2 * j for j in range(p)]
                                                   if max(rcounts) <= 2 else None)]
    yield "[buf, counts, displs, MPI.INT]", lambda: [ints, counts, sd.tolist(), MPI.INT], \
        lambda: [np.zeros(sum(rcounts), "i"), rcounts, None, MPI.INT]
    yield "[buf, 'i'] typecode", lambda: [np.arange(2 * p, dtype="i"), "i"], \
        lambda: [np.zeros(2 * p, "i"), "i"]
    yield "[buf, MPI.Datatype]", lambda: [np.arange(2 * p, dtype="i"), MPI.INT], \
        lambda: [np.zeros(2 * p, "i"), MPI.INT]
    yield "[buf, counts, dtype]", lambda: [ints, counts, MPI.INT], \
        lambda: [np.zeros(sum(rcounts), "i"), rcounts, MPI.INT]
    yield "[buf, (counts, displs), dtype]", lambda: [ints, (counts, sd), MPI.INT], \
        lambda: [np.zeros(sum(rcounts), "i"), (rcounts, None), MPI.INT]
    yield "int counts, int stride displs", lambda: [np.arange(4 * p, dtype="d") + r, (2, 4)], \
        lambda: [np.zeros(3 * p, "d"), (2, 3), MPI.DOUBLE]
    yield "int counts, None displs", lambda: [np.arange(2 * p, dtype="d"), (2, None)], \
        lambda: [np.zeros(2 * p, "d"), 2]
    yield "bytes and bytearray", lambda: [bytes(range(p * 4)), 4, None, MPI.BYTE], \
        lambda: [bytearray(p * 4), 4, None, MPI.BYTE]
    yield "array.array", lambda: [array.array("l", range(p * 2)), 2], \
        lambda: [array.array("l", [0] * (p * 2)), 2]
    yield "MPI.buffer", lambda: [MPI.buffer(bytearray(range(p * 3))), 3, None, MPI.BYTE], \
        lambda: [MPI.buffer.allocate(p * 3), 3, None, MPI.BYTE]
    yield "numpy as bytes via MPI.BYTE", \
        lambda: [np.arange(p * 2, dtype="f8"), [16] * p, None, MPI.BYTE], \
        lambda: [np.zeros(p * 2, "f8"), [16] * p, None, MPI.BYTE]
    yield "complex128", lambda: np.arange(p, dtype="c16") * (1 + 1j) + r, \
        lambda: np.zeros(p, "c16")
    if "e" in MPI._typedict:  # mpi4py maps float16 only where the MPI has it
        yield "float16", lambda: np.arange(2 * p, dtype="e") + r, \
            lambda: np.zeros(2 * p, "e")
    yield "fortran-ordered 2-D", \
        lambda: np.asfortranarray(np.arange(2 * p, dtype="d").reshape(2, p)), \
        lambda: np.zeros((2, p), "d", order="F")


def _block_cases(p: int, r: int):
    yield "bare buffers", lambda: np.arange(2 * p, dtype="i") + r, \
        lambda: np.zeros(2 * p, "i")
    yield "[buf, count]", lambda: [np.arange(3 * p, dtype="d"), 2], \
        lambda: [np.zeros(2 * p, "d"), 2]
    yield "[buf, (count, displ)]", lambda: [np.arange(3 * p + 1, dtype="d"), (3, 1)], \
        lambda: [np.zeros(3 * p + 2, "d"), (3, 2)]
    yield "[buf, [count, displ]] list", lambda: [np.arange(3 * p + 1, dtype="d"), [3, 1]], \
        lambda: [np.zeros(3 * p, "d"), [3, 0]]
    yield "[buf, count, dtype]", lambda: [np.arange(2 * p, dtype="i"), 2, MPI.INT], \
        lambda: [np.zeros(2 * p, "i"), 2, "i"]
    yield "[buf, count, displ, dtype]", lambda: [np.arange(2 * p + 3, dtype="i"), 2, 3,
                                                 MPI.INT], \
        lambda: [np.zeros(2 * p, "i"), 2, 0, MPI.INT]
    yield "[buf, dtype]", lambda: [np.arange(2 * p, dtype="i"), MPI.INT], \
        lambda: [np.zeros(2 * p, "i"), "i"]


def _recv_obj(msg):
    return msg[0] if isinstance(msg, list) else msg


def _run(comm, vector: bool):
    p, r = comm.Get_size(), comm.Get_rank()
    cases = _vector_cases(p, r) if vector else _block_cases(p, r)
    mpi_call = comm.Alltoallv if vector else comm.Alltoall
    ours = pya2a.Alltoallv if vector else pya2a.Alltoall
    for name, smake, rmake in cases:
        ref = rmake()
        mpi_call(smake(), ref)
        want = MPI.buffer(_recv_obj(ref)).tobytes()
        for alg in ALGORITHMS:
            got = rmake()
            ours(comm, smake(), got, algorithm=alg)
            assert MPI.buffer(_recv_obj(got)).tobytes() == want, (name, alg)


def test_vector_forms_match_mpi4py(comm):
    _run(comm, vector=True)


def test_block_forms_match_mpi4py(comm):
    _run(comm, vector=False)


@pytest.mark.parametrize("marker", [None, MPI.IN_PLACE], ids=["None", "IN_PLACE"])
@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_in_place_markers(comm, marker, algorithm):
    p, r = comm.Get_size(), comm.Get_rank()
    mine = np.arange(2 * p, dtype="d") + 10 * r
    ref = mine.copy()
    comm.Alltoallv(MPI.IN_PLACE, ref)
    pya2a.Alltoallv(comm, marker, mine, algorithm=algorithm)
    np.testing.assert_array_equal(mine, ref)
