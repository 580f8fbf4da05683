"""mpi4py-fft's parallel FFTs on a pya2a.Comm: every redistribution goes through pya2a.

``PFFT(pya2a.Comm(world), N, ...)`` builds Cartesian sub-communicators of the pya2a
communicator and calls ``Alltoallw`` with subarray datatypes on them. Forward transforms
must match a serial ``numpy.fft`` transform of the whole array (built from a shared seed on
every rank), backward must give the input back, and the count of pya2a Alltoallw calls must be
the number of redistributions the transform made.
"""

from __future__ import annotations

import numpy as np
import pytest
from mpi4py import MPI

import pya2a
from pya2a import _alltoallw

from helpers import SEED

mpifft = pytest.importorskip("mpi4py_fft", reason="mpi4py-fft is not installed (make test "
                             "installs it)")

# (name, global shape, grid); grid None: mpi4py-fft's default (pencils for >= 3D). Every
# distributed axis (the halved one of real transforms too) has at least 8 points: mpi4py-fft
# needs as many as there are ranks along it, and make test runs up to 8 ranks.
CASES = [
    ("slab 2D", (16, 18), (-1,)),
    ("slab 3D", (16, 9, 18), (-1,)),
    ("pencil 3D", (10, 9, 18), None),
    ("pencil 4D", (6, 5, 4, 6), None),
    ("slab 4D", (8, 8, 3, 16), (-1,)),
]


def _global(shape: tuple, dtype: type) -> np.ndarray:
    rng = np.random.default_rng([SEED, *shape])
    a = rng.standard_normal(shape)
    if np.dtype(dtype).kind == "c":
        a = a + 1j * rng.standard_normal(shape)
    return a.astype(dtype)


def _transfers(fft) -> int:
    return len(fft.forward._transfer) + len(fft.backward._transfer)


def _calls() -> int:
    return _alltoallw.stats["hit"] + _alltoallw.stats["full"]


@pytest.mark.parametrize("dtype", [np.float64, np.complex128])
@pytest.mark.parametrize("name,shape,grid", CASES, ids=[c[0] for c in CASES])
def test_pfft_matches_serial_numpy(comm, name, shape, grid, dtype):
    if comm.Get_size() > 8:
        pytest.skip("shapes sized for up to 8 ranks")
    kw = {} if grid is None else {"grid": grid}
    fft = mpifft.PFFT(pya2a.Comm(comm), shape, axes=tuple(range(len(shape))), dtype=dtype,
                      backend="numpy", **kw)
    try:
        assert all(isinstance(c, pya2a.Comm) for c in fft.subcomm)
        whole = _global(shape, dtype)
        want = np.fft.fftn(whole) if np.dtype(dtype).kind == "c" else np.fft.rfftn(whole)
        u = mpifft.newDistArray(fft, False)
        u[...] = whole[fft.local_slice(False)]
        mpi_before, calls_before = _alltoallw.stats["mpi"], _calls()
        for _ in range(2):  # the second transform runs the cached plans
            uh = fft.forward(u, normalize=False)
            np.testing.assert_allclose(np.asarray(uh), want[fft.local_slice(True)], rtol=1e-10,
                                       atol=1e-9 * np.abs(want).max())
            back = fft.backward(uh.copy(), normalize=True)
            np.testing.assert_allclose(np.asarray(back), np.asarray(u), rtol=1e-10,
                                       atol=1e-12)
        assert _calls() - calls_before == 2 * _transfers(fft)
        assert _alltoallw.stats["mpi"] == mpi_before
    finally:
        fft.destroy()


@pytest.mark.parametrize("algorithm", pya2a.available_algorithms(MPI.COMM_WORLD))
def test_pfft_every_host_algorithm(comm, algorithm):
    shape = (8, 9, 16)
    if comm.Get_size() > 8:
        pytest.skip("shape sized for up to 8 ranks")
    fft = mpifft.PFFT(pya2a.Comm(comm, algorithm=algorithm), shape, axes=(0, 1, 2),
                      dtype=np.complex128, backend="numpy")
    try:
        whole = _global(shape, np.complex128)
        u = mpifft.newDistArray(fft, False)
        u[...] = whole[fft.local_slice(False)]
        uh = fft.forward(u, normalize=False)
        want = np.fft.fftn(whole)[fft.local_slice(True)]
        np.testing.assert_allclose(np.asarray(uh), want, rtol=1e-10, atol=1e-9)
        np.testing.assert_allclose(np.asarray(fft.backward(uh, normalize=True)), np.asarray(u),
                                   atol=1e-12)
    finally:
        fft.destroy()
