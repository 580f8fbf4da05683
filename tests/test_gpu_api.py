"""The public API on device buffers: every device algorithm, ``ipc`` included, and ``auto``.

Skips cleanly without CuPy or a GPU. ``ipc`` runs with one GPU per rank and with ranks
sharing a GPU; there ``auto`` takes it only under MPS. Where it cannot run (no peer access)
an explicit ``algorithm="ipc"`` must raise on every rank. The oracle is the MPI library's
own Alltoallv on host copies of the same data.
"""

from __future__ import annotations

import numpy as np
import pytest
from mpi4py import MPI

import pya2a
from pya2a.gpu import ipc_algorithm as ipc_alg

from helpers import count_matrix, cuda_device_count, expected_recv, send_data

WORLD = MPI.COMM_WORLD


NDEV = cuda_device_count()
pytestmark = pytest.mark.skipif(NDEV == 0, reason="no CUDA device (or no CuPy)")


@pytest.fixture(scope="module")
def cp():
    import cupy

    local = WORLD.Split_type(MPI.COMM_TYPE_SHARED)
    cupy.cuda.Device(local.Get_rank() % NDEV).use()
    local.Free()
    return cupy


@pytest.fixture(scope="module")
def ipc_ok(cp):
    comm = pya2a.core.state.internal_comm(WORLD)
    return ipc_alg.comm_available(comm, cp.cuda.Device().id)[0]


def _algorithms():
    return ["auto", *pya2a.available_algorithms(device=True)]


def test_device_algorithms_are_listed():
    names = pya2a.available_algorithms(device=True)
    assert "ipc" in names and "pairwise" in names
    assert "ipc" not in pya2a.available_algorithms()


@pytest.mark.parametrize("pattern", ["random", "zeros", "hot", "skew", "empty"])
@pytest.mark.parametrize("dtype", ["float32", "int64", "float16", "int8"])
def test_every_device_algorithm_matches_host_oracle(cp, ipc_ok, pattern, dtype):
    comm = WORLD
    p, r = comm.Get_size(), comm.Get_rank()
    c = count_matrix(pattern, p, scale=40)
    want = expected_recv(c, r, dtype)
    for alg in _algorithms():
        if alg == "ipc" and not ipc_ok:
            continue
        sbuf = cp.asarray(send_data(c, r, dtype))
        rbuf = cp.full(int(c[:, r].sum()), 3, dtype=dtype)
        pya2a.Alltoallv(comm, [sbuf, c[r]], [rbuf, c[:, r]], algorithm=alg)
        got = cp.asnumpy(rbuf)  # ordered after the exchange on the current stream
        assert got.tobytes() == want.tobytes(), alg


@pytest.mark.parametrize("algorithm", ["auto", "ipc", "pairwise", "native"])
def test_in_place_on_device(cp, ipc_ok, algorithm):
    if algorithm == "ipc" and not ipc_ok:
        pytest.skip("ipc unavailable here")
    p, r = WORLD.Get_size(), WORLD.Get_rank()
    c = count_matrix("random", p, scale=30)
    c = c + c.T
    host = send_data(c, r, "float64")
    ref = host.copy()
    WORLD.Alltoallv(MPI.IN_PLACE, [ref, c[r]])
    dev = cp.asarray(host)
    pya2a.Alltoallv(WORLD, MPI.IN_PLACE, [dev, c[r]], algorithm=algorithm)
    np.testing.assert_array_equal(cp.asnumpy(dev), ref)


def test_ipc_large_blocks_grow_the_engine(cp, ipc_ok):
    if not ipc_ok:
        pytest.skip("ipc unavailable here")
    p, r = WORLD.Get_size(), WORLD.Get_rank()
    for per_peer in (1 << 10, 3 << 20, 9 << 20):  # past the first engine's capacity
        c = np.full((p, p), per_peer // 4, dtype=np.int64)
        c[0, p - 1] += 5
        s = cp.asarray(send_data(c, r, "float32"))
        out = cp.zeros(int(c[:, r].sum()), dtype=cp.float32)
        pya2a.Alltoallv(WORLD, [s, c[r]], [out, c[:, r]], algorithm="ipc")
        np.testing.assert_array_equal(cp.asnumpy(out), expected_recv(c, r, "float32"))


def test_ipc_repeated_calls_with_changing_data(cp, ipc_ok):
    if not ipc_ok:
        pytest.skip("ipc unavailable here")
    p, r = WORLD.Get_size(), WORLD.Get_rank()
    c = count_matrix("random", p, scale=64)
    base = cp.asarray(send_data(c, r, "int64"))
    out = cp.zeros(int(c[:, r].sum()), dtype=cp.int64)
    want = cp.asarray(expected_recv(c, r, "int64"))
    for it in range(300):
        pya2a.Alltoallv(WORLD, [base + it, c[r]], [out, c[:, r]], algorithm="ipc")
        if it % 50 == 49:
            assert bool(cp.all(out == want + it)), it


def test_explicit_ipc_without_peer_access_raises_everywhere(cp, ipc_ok):
    if ipc_ok:
        pytest.skip("ipc is available here")
    p = WORLD.Get_size()
    s = cp.zeros(2 * p)
    out = cp.full(2 * p, 7.0)
    with pytest.raises(ValueError, match="ipc"):
        pya2a.Alltoallv(WORLD, s, out, algorithm="ipc")
    assert bool(cp.all(out == 7.0))


def test_array_api_keeps_the_array_type(cp):
    p, r = WORLD.Get_size(), WORLD.Get_rank()
    c = count_matrix("skew", p, scale=4)
    rows = cp.arange(int(c[r].sum()) * 3, dtype=cp.float32).reshape(-1, 3) + 1000 * r
    recv, rcounts = pya2a.alltoallv(WORLD, rows, c[r])
    assert isinstance(recv, cp.ndarray) and recv.shape == (int(c[:, r].sum()), 3)
    ref = np.zeros((int(c[:, r].sum()), 3), np.float32)
    WORLD.Alltoallv([cp.asnumpy(rows), c[r] * 3], [ref, c[:, r] * 3])
    np.testing.assert_array_equal(cp.asnumpy(recv), ref)
    np.testing.assert_array_equal(rcounts, c[:, r])


@pytest.fixture
def torch():
    """torch with CUDA, or the test is skipped."""
    mod = pytest.importorskip("torch")
    if not mod.cuda.is_available():
        pytest.skip("torch without CUDA")
    return mod


def test_torch_bfloat16_through_auto(cp, torch):
    p, r = WORLD.Get_size(), WORLD.Get_rank()
    dev = f"cuda:{cp.cuda.Device().id}"
    c = count_matrix("random", p, scale=16)
    host = send_data(c, r, "float32")
    x = torch.from_numpy(host).to(dev, dtype=torch.bfloat16)
    out = torch.zeros(int(c[:, r].sum()), dtype=torch.bfloat16, device=dev)
    pya2a.Alltoallv(WORLD, [x, c[r]], [out, c[:, r]])
    torch.cuda.synchronize()
    want = torch.from_numpy(expected_recv(c, r, "float32")).to(torch.bfloat16)
    assert torch.equal(out.cpu(), want)


def test_mixed_host_and_device_raises_everywhere(cp):
    p = WORLD.Get_size()
    out = np.full(2 * p, 5.0)
    s = cp.zeros(2 * p) if WORLD.Get_rank() == p - 1 else np.zeros(2 * p)
    with pytest.raises(TypeError):
        pya2a.Alltoallv(WORLD, s, out)
    assert (out == 5.0).all()


def test_ipc_plan_with_uneven_counts(cp, ipc_ok):
    # Ranks' largest blocks differ: the engine size and method must still agree (the plan
    # carries the global largest block), or the collective engine set-up would hang.
    if not ipc_ok:
        pytest.skip("ipc unavailable here")
    p, r = WORLD.Get_size(), WORLD.Get_rank()
    c = count_matrix("skew", p, scale=1 << 16)
    s = cp.asarray(send_data(c, r, "float32"))
    out = cp.zeros(int(c[:, r].sum()), dtype=cp.float32)
    with pya2a.plan(WORLD, c[r], c[:, r], "f", device=cp.cuda.Device().id,
                    algorithm="ipc") as pl:
        for _ in range(3):
            pl.run(s, out)
    np.testing.assert_array_equal(cp.asnumpy(out), expected_recv(c, r, "float32"))


def _full_calls() -> int:
    return pya2a.core.state.state(WORLD).slot("oneshot.signatures").seq


def test_repeated_cupy_calls_take_the_fast_path(cp):
    p, r = WORLD.Get_size(), WORLD.Get_rank()
    c = count_matrix("random", p, scale=32)
    s = cp.asarray(send_data(c, r, "int64"))  # integers: s += 1 twenty times is exact
    out = cp.zeros(int(c[:, r].sum()), dtype=cp.int64)
    want = cp.asarray(expected_recv(c, r, "int64"))
    pya2a.Alltoallv(WORLD, [s, c[r]], [out, c[:, r]])
    before = _full_calls()
    for it in range(20):
        s += 1
        pya2a.Alltoallv(WORLD, [s, c[r]], [out, c[:, r]])
        assert bool(cp.all(out == want + it + 1)), it
    assert _full_calls() == before


def test_repeated_torch_calls_take_the_fast_path_on_one_stream(cp, torch):
    p, r = WORLD.Get_size(), WORLD.Get_rank()
    dev = f"cuda:{cp.cuda.Device().id}"
    c = count_matrix("random", p, scale=16)
    x = torch.from_numpy(send_data(c, r, "int64")).to(dev)
    out = torch.zeros(int(c[:, r].sum()), dtype=torch.int64, device=dev)
    want = torch.from_numpy(expected_recv(c, r, "int64")).to(dev)
    with cp.cuda.ExternalStream(torch.cuda.current_stream().cuda_stream):
        pya2a.Alltoallv(WORLD, [x, c[r]], [out, c[:, r]])
        before = _full_calls()
        for _ in range(10):
            x += 1
            pya2a.Alltoallv(WORLD, [x, c[r]], [out, c[:, r]])
        torch.cuda.synchronize()
        assert torch.equal(out, want + 10)
        assert _full_calls() == before
    # torch on a side stream, CuPy on its own: no signature, the full path orders them
    side = torch.cuda.Stream()
    torch.cuda.synchronize()
    with torch.cuda.stream(side):
        x += 1
        before = _full_calls()
        pya2a.Alltoallv(WORLD, [x, c[r]], [out, c[:, r]])
        assert _full_calls() == before + 1
    torch.cuda.synchronize()
    assert torch.equal(out, want + 11)


def _managed(cp, host):
    """A CuPy array in managed (unified) memory holding ``host``."""
    mem = cp.cuda.malloc_managed(max(host.nbytes, 1))
    arr = cp.ndarray(host.shape, dtype=host.dtype, memptr=mem)
    arr[...] = cp.asarray(host)
    return arr


@pytest.mark.parametrize("side", ["both", "send", "recv"])
def test_managed_memory_through_every_device_algorithm(cp, ipc_ok, side):
    """Managed (unified) memory is staged like device memory; ``ipc`` cannot export it and
    stages it through its own slots (small blocks) or refuses registration (large ones)."""
    comm = WORLD
    p, r = comm.Get_size(), comm.Get_rank()
    for scale in (40, 600000):  # small blocks, then blocks past ipc's 4 MiB direct threshold
        c = count_matrix("random", p, scale=scale)
        want = expected_recv(c, r, "float32")
        for alg in _algorithms():
            if alg == "ipc" and not ipc_ok:
                continue
            host = send_data(c, r, "float32")
            sbuf = _managed(cp, host) if side in ("both", "send") else cp.asarray(host)
            rh = np.full(int(c[:, r].sum()), 3, dtype="float32")
            rbuf = _managed(cp, rh) if side in ("both", "recv") else cp.asarray(rh)
            pya2a.Alltoallv(comm, [sbuf, c[r]], [rbuf, c[:, r]], algorithm=alg)
            got = cp.asnumpy(rbuf)
            assert got.tobytes() == want.tobytes(), (alg, scale, side)


def test_auto_takes_ipc_only_where_the_ranks_kernels_run_together(cp, ipc_ok):
    """Ranks sharing a GPU: ``ipc`` runs when asked for, but ``auto`` takes it only under
    MPS (time-sliced, each wait on a peer costs a slice); a GPU each: as before."""
    from pya2a.gpu.ipc import device_share

    comm = pya2a.core.state.internal_comm(WORLD)
    dev = cp.cuda.Device().id
    share = device_share(comm, dev)
    ok, why = ipc_alg.comm_auto(comm, dev)
    assert ok == share.fast, why
    p = WORLD.Get_size()
    ex = pya2a.explain(WORLD, np.full(p, 64), np.full(p, 64), "B", device=dev)
    if ipc_ok and not share.fast:
        assert ex.choice != "ipc" and "ipc" in ex.excluded
    if not share.fast:
        pya2a.Alltoallv(WORLD, [cp.zeros(p), np.ones(p, int)],
                        [cp.full(p, 7.0), np.ones(p, int)], algorithm="auto")


# ---- Alltoallw on device arrays ------------------------------------------------------------
def _pencil_types(shape: tuple, axis: int, p: int) -> list:
    """Subarray datatypes cutting ``shape`` into p blocks along ``axis`` (mpi4py-fft's)."""
    out = []
    for i in range(p):
        q, m = divmod(shape[axis], p)
        sub, start = list(shape), [0] * len(shape)
        sub[axis], start[axis] = q + (i < m), i * q + min(i, m)
        out.append(MPI.C_DOUBLE_COMPLEX.Create_subarray(list(shape), sub, start).Commit())
    return out


def test_alltoallw_subarrays_on_device_match_host(cp, ipc_ok):
    """A pencil transpose with subarray types on CuPy arrays, every device algorithm, equals
    the MPI's own Alltoallw on the same data in host memory."""
    p, r = WORLD.Get_size(), WORLD.Get_rank()
    n1 = 3 * p + 1
    a_shape, b_shape = (5, n1, 6), (5 * p, n1 // p + (r < n1 % p), 6)
    rng = np.random.default_rng([20261121, r])
    host = rng.standard_normal(a_shape) + 1j * rng.standard_normal(a_shape)
    st, rt = _pencil_types(a_shape, 1, p), _pencil_types(b_shape, 0, p)
    cd = ([1] * p, [0] * p)
    try:
        ref = np.zeros(b_shape, complex)
        WORLD.Alltoallw([host, cd, st], [ref, cd, rt])
        for alg in _algorithms():
            if alg == "ipc" and not ipc_ok:
                continue
            for _ in range(2):  # the second call runs the cached plan
                out = cp.zeros(b_shape, complex)
                used = pya2a.Alltoallw(WORLD, [cp.asarray(host), cd, st], [out, cd, rt],
                                       algorithm=alg)
                assert used != "mpi"
                np.testing.assert_array_equal(cp.asnumpy(out), ref, err_msg=alg)
    finally:
        for t in (*st, *rt):
            t.Free()


def test_alltoallw_repeated_on_device_takes_the_signature(cp):
    """The same CuPy arrays again (the exchange mpi4py-fft repeats every transform): agreed by
    signature, no parsing or decoding; new data each time, then other arrays of the same
    shape, every result equal to the MPI's own Alltoallw on host copies; overlapping
    arrays are refused on every rank."""
    p, r = WORLD.Get_size(), WORLD.Get_rank()
    a_shape, b_shape = (4, 2 * p, 3), (4 * p, 2, 3)
    st, rt = _pencil_types(a_shape, 1, p), _pencil_types(b_shape, 0, p)
    cd = ([1] * p, [0] * p)
    rng = np.random.default_rng([20261203, r])
    src, out = cp.zeros(a_shape, complex), cp.zeros(b_shape, complex)
    try:
        for i in range(6):
            if i == 4:  # other arrays, same shapes: the plan is reused
                src, out = cp.zeros(a_shape, complex), cp.zeros(b_shape, complex)
            host = rng.standard_normal(a_shape) + 1j * rng.standard_normal(a_shape)
            src.set(host)
            ref = np.zeros(b_shape, complex)
            WORLD.Alltoallw([host, cd, st], [ref, cd, rt])
            before = dict(pya2a._alltoallw.stats)
            pya2a.Alltoallw(WORLD, [src, cd, st], [out, cd, rt])
            np.testing.assert_array_equal(cp.asnumpy(out), ref, err_msg=str(i))
            if i in (2, 3, 5):  # described, signed and agreed on before
                assert pya2a._alltoallw.stats["hit"] == before["hit"] + 1, i
        big = cp.zeros(out.size, complex)  # the send and receive arrays share memory
        for _ in range(2):  # the second time both arrays are described (signature path)
            with pytest.raises(ValueError, match="overlap"):
                pya2a.Alltoallw(WORLD, [big.reshape(a_shape), cd, st],
                                [big.reshape(b_shape), cd, rt])
    finally:
        for t in (*st, *rt):
            t.Free()


def test_alltoallw_in_place_on_device(cp):
    p, r = WORLD.Get_size(), WORLD.Get_rank()
    t = MPI.DOUBLE.Create_vector(2, 1, 2).Commit()
    try:
        host = np.arange(4.0 * p) + 100 * r
        ref = host.copy()
        cd = ([1] * p, [32 * j for j in range(p)])
        WORLD.Alltoallw(MPI.IN_PLACE, [ref, cd, [t] * p])
        dev = cp.asarray(host)
        pya2a.Alltoallw(WORLD, MPI.IN_PLACE, [dev, cd, [t] * p])
        np.testing.assert_array_equal(cp.asnumpy(dev), ref)
    finally:
        t.Free()


def test_alltoallw_torch_tensors(cp, torch):
    p, r = WORLD.Get_size(), WORLD.Get_rank()
    dev = f"cuda:{cp.cuda.Device().id}"
    t = MPI.FLOAT.Create_indexed([1, 2], [3, 0]).Commit()
    try:
        host = (np.arange(4 * p, dtype=np.float32) + 10 * r)
        ref = np.zeros(4 * p, np.float32)
        cd = ([1] * p, [16 * j for j in range(p)])
        WORLD.Alltoallw([host, cd, [t] * p], [ref, cd, [t] * p])
        out = torch.zeros(4 * p, dtype=torch.float32, device=dev)
        pya2a.Alltoallw(WORLD, [torch.from_numpy(host).to(dev), cd, [t] * p], [out, cd, [t] * p])
        torch.cuda.synchronize()
        mask = np.zeros(4 * p, bool)
        for j in range(p):
            mask[4 * j: 4 * j + 4] = [True, True, False, True]
        np.testing.assert_array_equal(out.cpu().numpy()[mask], ref[mask])
    finally:
        t.Free()


def _pfft_module():
    """examples/pfft.py, imported with the examples' directory on sys.path (as a script)."""
    import sys
    from pathlib import Path

    examples = str(Path(__file__).resolve().parent.parent / "examples")
    if examples not in sys.path:
        sys.path.insert(0, examples)
    import pfft

    return pfft


@pytest.mark.parametrize("shape", [(64, 64, 64), (19, 22, 13)])
@pytest.mark.parametrize("grid", ["slab", "pencil"])
def test_pencil_fft_example_on_cupy_arrays(cp, grid, shape):
    """examples/pfft.py (what bench/pfft_bench.py --device cuda times) on CuPy arrays:
    CuPy's FFT along axes 0 and 1 returns strided views, which the example makes contiguous
    before each Alltoallw; forward equals numpy.fft.fftn, backward gives the input back."""
    pfft = _pfft_module()
    p = WORLD.Get_size()
    whole = np.random.default_rng([20261203, *shape]).standard_normal(shape) * (1 - 2j)
    fft = pfft.PencilFFT(WORLD, shape, cp, (p, 1) if grid == "slab" else None)
    try:
        u = cp.asarray(whole[fft.z_slice])
        for _ in range(2):  # the second pass runs the cached plans
            uh = fft.forward(u)
            back = fft.backward(uh)
            np.testing.assert_allclose(cp.asnumpy(uh), np.fft.fftn(whole)[fft.x_slice],
                                       rtol=1e-9, atol=1e-8 * np.sqrt(whole.size))
            np.testing.assert_allclose(cp.asnumpy(back), whole[fft.z_slice], rtol=1e-10,
                                       atol=1e-12)
    finally:
        fft.free()


def test_alltoallw_takes_fortran_order_and_refuses_strided_cupy(cp):
    """As mpi4py: a Fortran-ordered CuPy array is one dense run (read in memory order); a
    strided view (CuPy's FFT along a middle axis) is refused on every rank."""
    p = WORLD.Get_size()
    t = MPI.DOUBLE.Create_contiguous(2).Commit()
    cd = ([1] * p, [16 * j for j in range(p)])
    try:
        host = np.asfortranarray(np.arange(4.0 * p).reshape(2, 2 * p) + 100 * WORLD.Get_rank())
        ref = np.zeros(4 * p)
        WORLD.Alltoallw([host, cd, [t] * p], [ref, cd, [t] * p])
        out = cp.zeros(4 * p)
        pya2a.Alltoallw(WORLD, [cp.asfortranarray(cp.asarray(host)), cd, [t] * p],
                        [out, cd, [t] * p])
        np.testing.assert_array_equal(cp.asnumpy(out), ref)
        strided = cp.fft.fft(cp.zeros((2, 2 * p, 3), complex), axis=1)
        assert not strided.flags.c_contiguous and not strided.flags.f_contiguous
        with pytest.raises(BufferError, match="not contiguous"):
            pya2a.Alltoallw(WORLD, [strided, cd, [t] * p], [cp.zeros(12 * p), cd, [t] * p])
    finally:
        t.Free()
