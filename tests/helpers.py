"""Test data from a shared seed: every rank can rebuild every other rank's input.

``count_matrix(pattern, p)[i, j]`` is how many elements rank i sends to rank j. Send data are
drawn from a generator seeded by (SEED, source rank), so the expected receive buffer can be
computed on any rank without communication, and the MPI library's own Alltoallv on the same
input is the oracle.
"""

from __future__ import annotations

import numpy as np
from mpi4py import MPI

SEED = 20261121
PATTERNS = ["uniform", "random", "zeros", "hot", "skew", "empty"]
DTYPES = ["int8", "uint16", "int32", "int64", "float16", "float32", "float64", "complex128",
          "bool"]


def count_matrix(pattern: str, p: int, scale: int = 8, seed: int = SEED) -> np.ndarray:
    """p x p int64 counts for a named pattern (same on every rank)."""
    rng = np.random.default_rng([seed, p, PATTERNS.index(pattern) if pattern in PATTERNS
                                 else 99])
    if pattern == "uniform":
        c = np.full((p, p), scale)
    elif pattern == "random":
        c = rng.integers(0, 2 * scale + 1, (p, p))
    elif pattern == "zeros":  # about half the blocks empty, including some diagonal ones
        c = rng.integers(0, 2 * scale + 1, (p, p)) * rng.integers(0, 2, (p, p))
    elif pattern == "hot":  # everyone sends a lot to one rank, little elsewhere
        c = rng.integers(0, 2, (p, p))
        c[:, (p - 1) // 2] = 40 * scale
    elif pattern == "skew":  # heavy tail: a few huge blocks
        c = (rng.pareto(1.2, (p, p)) * scale).astype(np.int64)
        c[rng.integers(0, p), rng.integers(0, p)] = 200 * scale
    elif pattern == "empty":
        c = np.zeros((p, p))
    else:
        raise ValueError(pattern)
    return np.asarray(c, dtype=np.int64)


def random_data(n: int, dtype: str, seed: tuple) -> np.ndarray:
    """n deterministic pseudo-random values of ``dtype``."""
    rng = np.random.default_rng(list(seed))
    dt = np.dtype(dtype)
    if dt.kind == "b":
        return rng.integers(0, 2, n).astype(bool)
    if dt.kind in "iu":
        info = np.iinfo(dt)
        return rng.integers(info.min, info.max, n, endpoint=True, dtype=dt)
    if dt.kind == "c":
        return (rng.standard_normal(n) + 1j * rng.standard_normal(n)).astype(dt)
    return rng.standard_normal(n).astype(dt)


def send_data(c: np.ndarray, src: int, dtype: str = "float64", seed: int = SEED) -> np.ndarray:
    """What rank ``src`` sends, packed in destination order."""
    return random_data(int(c[src].sum()), dtype, (seed, src))


def expected_recv(c: np.ndarray, dst: int, dtype: str = "float64",
                  seed: int = SEED) -> np.ndarray:
    """What rank ``dst`` must receive, packed in source order (computed without MPI)."""
    parts = []
    for src in range(c.shape[0]):
        data = send_data(c, src, dtype, seed)
        off = int(c[src, :dst].sum())
        parts.append(data[off:off + int(c[src, dst])])
    return np.concatenate(parts) if parts else np.zeros(0, dtype)


def gapped_layout(counts: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, int]:
    """Displacements that put blocks in a random order with random gaps; returns (displs, n)."""
    order = rng.permutation(counts.size)
    displs = np.zeros(counts.size, dtype=np.int64)
    pos = 0
    for j in order:
        pos += int(rng.integers(0, 3))
        displs[j] = pos
        pos += int(counts[j])
    return displs, pos + 1


def native_oracle(comm: MPI.Intracomm, smsg, rmsg_like: np.ndarray, rspec) -> np.ndarray:
    """The MPI library's own Alltoallv on the same input, into a copy of ``rmsg_like``."""
    out = rmsg_like.copy()
    comm.Alltoallv(smsg, [out, *rspec])
    return out


def cuda_device_count() -> int:
    """CUDA devices CuPy sees; 0 without CuPy or a driver (GPU tests then skip)."""
    try:
        import cupy

        return int(cupy.cuda.runtime.getDeviceCount())
    except Exception:
        return 0


def skip_unless_fused_moe(comm: MPI.Intracomm) -> None:
    """Collective: skip the test where pya2a's fused MoE backend cannot run on ``comm``."""
    import pytest

    from pya2a.core.state import internal_comm
    from pya2a.gpu.moe_fused import fused_available

    ok, why = fused_available(internal_comm(comm), None)
    if not ok:
        pytest.skip(why)


def _self_alltoallw_works() -> bool:
    """Does this MPI's own Alltoallw on one rank honour a derived datatype at a byte
    displacement? (Open MPI 4.1.4's does not write the block where it belongs.)"""
    t = MPI.DOUBLE.Create_vector(2, 1, 2).Commit()
    try:
        # room for a displacement taken as extents instead of bytes (24 x 16 bytes): the
        # broken call must not write outside the arrays
        src, out = np.arange(64.0), np.zeros(64)
        MPI.COMM_SELF.Alltoallw([src, ([1], [8]), [t]], [out, ([1], [16]), [t]])
        want = np.zeros(64)
        want[[2, 4]] = [1.0, 3.0]
        return bool((out == want).all())
    finally:
        t.Free()


_SELF_OK: list[bool] = []


def mpi_alltoallw(comm: MPI.Intracomm, smsg, rmsg) -> None:
    """The oracle for Alltoallw tests: the MPI's own ``comm.Alltoallw(smsg, rmsg)``, except
    on one rank where that call is broken (:func:`_self_alltoallw_works`): there MPI's own
    ``Sendrecv`` to itself moves the one block, each side's datatype placed at its absolute
    address. Messages are ``[buf, (counts, byte displs), types]`` or ``[buf, types]``
    (``smsg`` may be ``MPI.IN_PLACE``, on one rank a no-op)."""
    if comm.Get_size() != 1:
        comm.Alltoallw(smsg, rmsg)
        return
    if not _SELF_OK:
        _SELF_OK.append(_self_alltoallw_works())
    if _SELF_OK[0]:
        comm.Alltoallw(smsg, rmsg)
        return
    if smsg is MPI.IN_PLACE:
        return

    def placed(msg):
        buf, (counts, displs), types = msg if len(msg) == 3 else (msg[0], ([1], [0]), msg[1])
        return MPI.Datatype.Create_struct([int(counts[0])],
                                          [MPI.Get_address(buf) + int(displs[0])],
                                          [types[0]]).Commit()

    st, rt = placed(smsg), placed(rmsg)
    try:
        comm.Sendrecv([MPI.BOTTOM, 1, st], 0, 7, [MPI.BOTTOM, 1, rt], 0, 7)
    finally:
        st.Free()
        rt.Free()


def mpi_moves(dtype) -> bool:
    """Does mpi4py map this NumPy dtype to a datatype this MPI has? (float16: MPICH does;
    Open MPI 4 does not, and mpi4py then has no entry, or one the MPI refuses.)"""
    t = MPI._typedict.get(np.dtype(dtype).char)
    if t is None:
        return False
    try:
        t.Get_size()
    except MPI.Exception:
        return False
    return True
