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

from helpers import mpi_moves

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
    if mpi_moves("e"):  # mpi4py maps float16 only where the MPI has it
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


# ---- the forms mpi4py 4 takes beyond NumPy and bytes -------------------------------------

class _CAIHost:
    """A CUDA-array-interface producer over host memory (read as host memory, as mpi4py
    does, when no CUDA stack is present)."""

    def __init__(self, a: np.ndarray) -> None:
        self.a = a
        self.__cuda_array_interface__ = {"shape": a.shape, "typestr": a.dtype.str,
                                         "data": (a.ctypes.data, False), "version": 3,
                                         "strides": None}


class _DLHost:
    """A bare DLPack producer over host memory (no buffer protocol, no dtype attribute)."""

    def __init__(self, a: np.ndarray) -> None:
        self.a = a

    def __dlpack__(self, **kw):
        return self.a.__dlpack__(**kw)

    def __dlpack_device__(self):
        return self.a.__dlpack_device__()


def _cuda_stack() -> bool:
    try:
        import cupy  # noqa: F401

        return True
    except Exception:
        return False


def _extra_vector_cases(p: int, r: int):
    counts = [(r + j) % 3 + 1 for j in range(p)]
    rcounts = [(j + r) % 3 + 1 for j in range(p)]
    n, rn = sum(counts), sum(rcounts)
    yield "0-d integer array counts", \
        lambda: [np.arange(2 * p, dtype="d") + r, np.array(2)], \
        lambda: [np.zeros(2 * p), np.array(2)]
    yield "bool and numpy-int counts", \
        lambda: [np.arange(p, dtype="d") + r, [True] * p], \
        lambda: [np.zeros(p), tuple(np.int32(1) for _ in range(p)), None, "d"]
    yield "counts from any sequence with a length", \
        lambda: [np.arange(2 * p, dtype="i") + r, range(2, 2 + p) if p == 1 else [2] * p], \
        lambda: [np.zeros(2 * p, "i"), {j: 2 for j in range(p)}]
    yield "None buffer, zero counts", lambda: [None, 0, "B"], lambda: [None, 0, "B"]
    yield "None send buffer, zero counts, explicit displs", \
        lambda: [None, [0] * p, [0] * p, MPI.INT], lambda: [np.zeros(1, "i"), [0] * p, "i"]
    if not _cuda_stack():
        yield "__cuda_array_interface__ over host memory", \
            lambda: _CAIHost(np.arange(2 * p, dtype="f8") + r), \
            lambda: _CAIHost(np.zeros(2 * p))
        yield "__cuda_array_interface__ with counts", \
            lambda: [_CAIHost(np.arange(n, dtype="i4") + r), counts], \
            lambda: [_CAIHost(np.zeros(rn, "i4")), rcounts]
    yield "bare DLPack producer", lambda: [_DLHost(np.arange(n, dtype="i8") + r), counts], \
        lambda: [_DLHost(np.zeros(rn, "i8")), rcounts]


def _bottom_case(p: int, r: int):
    """MPI.BOTTOM with absolute displacements (in elements of the datatype)."""
    send = np.arange(2 * p, dtype="d") + 10 * r
    recv = np.zeros(2 * p)
    base_s, base_r = MPI.Get_address(send), MPI.Get_address(recv)
    assert base_s % 8 == 0 and base_r % 8 == 0
    sd = [base_s // 8 + 2 * j for j in range(p)]
    rd = [base_r // 8 + 2 * j for j in range(p)]
    return send, recv, [MPI.BOTTOM, ([2] * p, sd), MPI.DOUBLE], \
        [MPI.BOTTOM, ([2] * p, rd), MPI.DOUBLE]


def _recv_bytes(msg):
    obj = _recv_obj(msg)
    if obj is None:
        return b""
    if isinstance(obj, (_CAIHost, _DLHost)):
        return obj.a.tobytes()
    return MPI.buffer(obj).tobytes()


def test_more_vector_forms_match_mpi4py(comm):
    p, r = comm.Get_size(), comm.Get_rank()
    for name, smake, rmake in _extra_vector_cases(p, r):
        ref = rmake()
        comm.Alltoallv(smake(), ref)
        want = _recv_bytes(ref)
        for alg in ALGORITHMS:
            got = rmake()
            pya2a.Alltoallv(comm, smake(), got, algorithm=alg)
            assert _recv_bytes(got) == want, (name, alg)


def test_bottom_with_absolute_displacements(comm):
    p, r = comm.Get_size(), comm.Get_rank()
    send, recv, smsg, rmsg = _bottom_case(p, r)
    # the oracle: the same exchange relative to the arrays (absolute addresses as
    # displacements overflow the C ints of an MPI without large-count calls, Open MPI 4)
    want = np.zeros_like(recv)
    rel = ([2] * p, [2 * j for j in range(p)])
    comm.Alltoallv([send, rel, MPI.DOUBLE], [want, rel, MPI.DOUBLE])
    for alg in ALGORITHMS:
        recv[:] = 0
        pya2a.Alltoallv(comm, smsg, rmsg, algorithm=alg)
        np.testing.assert_array_equal(recv, want, err_msg=alg)


def test_alltoall_none_buffer_zero_count(comm):
    for alg in ALGORITHMS:
        pya2a.Alltoall(comm, [None, 0, "B"], [None, 0, "B"], algorithm=alg)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "int64", "bool"])
def test_torch_cpu_tensors_match_mpi4py(comm, dtype):
    """torch CPU tensors are DLPack producers over host memory; bfloat16 (no mpi4py format)
    moves as bytes, exactly as mpi4py moves it."""
    torch = pytest.importorskip("torch")
    p, r = comm.Get_size(), comm.Get_rank()
    dt = getattr(torch, dtype)
    counts = [(r + j) % 3 + 1 for j in range(p)]
    rcounts = [(j + r) % 3 + 1 for j in range(p)]
    cases = [
        ("bare", lambda: (torch.arange(4 * p) + 7 * r).to(dt), lambda: torch.zeros(4 * p,
                                                                                   dtype=dt)),
        ("counts", lambda: [(torch.arange(sum(counts)) + r).to(dt), counts],
         lambda: [torch.zeros(sum(rcounts), dtype=dt), rcounts]),
    ]
    if dtype == "bfloat16":  # bytes: counts in bytes, two per element
        cases[1] = ("counts in bytes",
                    lambda: [(torch.arange(sum(counts)) + r).to(dt), [2 * c for c in counts]],
                    lambda: [torch.zeros(sum(rcounts), dtype=dt), [2 * c for c in rcounts]])
    for name, smake, rmake in cases:
        ref = rmake()
        comm.Alltoallv(smake(), ref)
        want = _recv_obj(ref).view(torch.uint8).numpy().tobytes()
        for alg in ALGORITHMS:
            got = rmake()
            pya2a.Alltoallv(comm, smake(), got, algorithm=alg)
            assert _recv_obj(got).view(torch.uint8).numpy().tobytes() == want, (name, alg)


def _rejected_forms(p: int):
    """Messages mpi4py's Alltoallv refuses in its own parser (no communication)."""
    a = np.arange(2 * p, dtype="d")
    r = np.zeros(2 * p)
    ro = np.zeros(2 * p)
    ro.flags.writeable = False
    yield "int as message", 42, r
    yield "five items", [a, 1, 2, 3, 4], r
    yield "one item", [a], r
    yield "non-contiguous", np.arange(4 * p, dtype="d")[::2], r
    yield "read-only receive", a, ro
    yield "structured dtype", np.zeros(p, "i4,f4"), np.zeros(p, "i4,f4")
    yield "big-endian", np.zeros(p, ">f8"), np.zeros(p, ">f8")
    yield "counts wrong length", [a, [2] * (p + 1)], r
    yield "float counts", [a, [2.0] * p], r
    yield "numpy bool counts", [a, np.ones(p, bool)], r
    yield "2-D counts", [a, np.full((p, 1), 2)], r
    yield "generator counts", [a, (2 for _ in range(p))], r
    yield "list as (counts, displs)", [a, [[2] * p, [0] * p]], r
    yield "three-item counts tuple", [a, ([2] * p, [0] * p, [0] * p)], r
    yield "unknown typecode", [a, [2] * p, "nope"], r
    yield "float as datatype", [a, [2] * p, 3.0], r
    yield "list as datatype", [a, [2] * p, [1]], r
    yield "None buffer without datatype", [None, 0], [None, 0]


def _raised(fn, *args, **kwargs):
    try:
        fn(*args, **kwargs)
    except Exception as e:  # the type is what is compared
        return type(e)
    return None


def _same_refusals(comm, forms, mpi_call, ours):
    for name, smsg, rmsg in forms:
        want = _raised(mpi_call, smsg, rmsg)
        assert want is not None, name
        for alg in ALGORITHMS:
            got = _raised(ours, comm, smsg, rmsg, algorithm=alg)
            assert got is not None and issubclass(got, want), (name, alg, got, want)
        comm.Barrier()


def test_rejected_forms_raise_what_mpi4py_raises(comm):
    """Every form mpi4py's parser refuses is refused with the same exception type, on every
    rank (each rank passes the same bad form here, so mpi4py raises locally too)."""
    _same_refusals(comm, _rejected_forms(comm.Get_size()), comm.Alltoallv, pya2a.Alltoallv)


def _rejected_block_forms(p: int):
    a = np.arange(2 * p, dtype="d")
    r = np.zeros(2 * p)
    yield "list count", [a, [2]], r
    yield "float count", [a, 2.0], r
    yield "negative count", [a, -1], r
    yield "negative displacement", [a, (1, -1)], r
    yield "displacement out of bounds", [a, (1, 4 * p)], r
    yield "None buffer with a count", [None, 1, "B"], [None, 1, "B"]
    if p > 1:
        yield "count not inferable", np.arange(2 * p + 1, dtype="d"), r


def test_rejected_block_forms_raise_what_mpi4py_raises(comm):
    _same_refusals(comm, _rejected_block_forms(comm.Get_size()), comm.Alltoall, pya2a.Alltoall)
