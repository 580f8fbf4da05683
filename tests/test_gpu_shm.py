"""The ``shm`` algorithm: device buffers through a node-shared pinned host window.

Emulated half (runs everywhere, serially and under mpiexec; every rank of a local mpiexec
is on one node, and every emulated rank uses "device 0", i.e. several ranks share one GPU):
the backend of tests/test_gpu_device.py queues copies on fake streams and runs them lazily,
so a download published before it landed, an upload read after the sender reused its
region, or a region overwritten before the peers' uploads finished shows up as wrong data.
The oracle is the MPI library's own Alltoallv on host copies of the same data (and the
seed-computed answer). Real-GPU half: skips without CuPy or a device.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import test_gpu_device as _emu
from mpi4py import MPI

import pya2a
from pya2a import select
from pya2a.core import registry
from pya2a.gpu import device as gdev
from pya2a.gpu import shm as gshm
from pya2a.gpu import shm_algorithm as shm_alg

from helpers import PATTERNS, count_matrix, cuda_device_count, expected_recv, send_data

WORLD = MPI.COMM_WORLD
FakeDeviceArray = _emu.FakeDeviceArray
fake = _emu.fake  # the emulated-CUDA fixtures (one backend, several ranks share "device 0")
fake_any = _emu.fake_any
DTYPES = ["int8", "float16", "int32", "float64", "complex128", "bool"]


@pytest.fixture(autouse=True)
def _free_after():
    yield
    shm_alg.free_windows()  # collective: every rank runs the same tests in the same order


def _oracle(comm, c, dtype):
    r = comm.Get_rank()
    send = send_data(c, r, dtype)
    ref = np.zeros(int(c[:, r].sum()), dtype)
    # the MPI library's own Alltoallv on host copies, as bytes (works for every dtype)
    comm.Alltoallv([send.view(np.uint8), c[r] * send.itemsize, MPI.BYTE],
                   [ref.view(np.uint8), c[:, r] * ref.itemsize, MPI.BYTE])
    return ref


def _run(comm, c, dtype, *, chunk=None, kind="alltoallv", data_shift=0):
    r = comm.Get_rank()
    host = send_data(c, r, dtype)
    if data_shift:
        host = (host.view(np.uint8) + np.uint8(data_shift)).view(host.dtype)
    sbuf = FakeDeviceArray(host)
    rbuf = FakeDeviceArray(np.full(int(c[:, r].sum()), 3, dtype))
    if kind == "alltoall":
        pya2a.Alltoall(comm, sbuf, rbuf, algorithm="shm")
    else:
        pya2a.Alltoallv(comm, [sbuf, c[r]], [rbuf, c[:, r]], algorithm="shm")
    return rbuf.arr


@pytest.mark.parametrize("pattern", PATTERNS)
def test_shm_patterns_match_mpi(comm, fake_any, pattern):
    c = count_matrix(pattern, comm.Get_size(), scale=300)
    out = _run(comm, c, "float64")
    np.testing.assert_array_equal(out, _oracle(comm, c, "float64"))
    np.testing.assert_array_equal(out, expected_recv(c, comm.Get_rank(), "float64"))


@pytest.mark.parametrize("dtype", DTYPES)
def test_shm_dtypes(comm, fake, dtype):
    c = count_matrix("random", comm.Get_size(), scale=257)
    out = _run(comm, c, dtype)
    assert out.tobytes() == _oracle(comm, c, dtype).tobytes()


@pytest.mark.parametrize("pattern", ["uniform", "skew", "hot", "zeros"])
def test_shm_small_pieces_pipeline(comm, fake, monkeypatch, pattern):
    """Many download pieces per block: receivers upload while senders still download."""
    monkeypatch.setenv("PYA2A_STAGE_CHUNK", "4096")
    monkeypatch.setattr(gshm, "MAX_PIECES", 1 << 20)
    c = count_matrix(pattern, comm.Get_size(), scale=3000)
    out = _run(comm, c, "int8")
    assert out.tobytes() == _oracle(comm, c, "int8").tobytes()


def test_shm_repeated_calls_changing_data_and_counts(comm, fake, monkeypatch):
    """Regions are reused: a rank must not overwrite one before every peer read it."""
    import time

    monkeypatch.setenv("PYA2A_STAGE_CHUNK", "4096")
    p, r = comm.Get_size(), comm.Get_rank()
    real_sync = fake.sync

    def slow_sync(stream):  # rank 0's uploads land late: a peer that reuses its region
        if r == 0 and stream.ran < len(stream.ops):  # before rank 0 read it sends new data
            time.sleep(0.005)
        real_sync(stream)

    monkeypatch.setattr(fake, "sync", slow_sync)
    for it in range(12):
        pattern = PATTERNS[it % len(PATTERNS)]
        c = count_matrix(pattern, p, scale=100 + 400 * (it % 4))
        out = _run(comm, c, "int16", data_shift=it)
        want = expected_recv(c, r, "int16")
        want = (want.view(np.uint8) + np.uint8(it)).view(np.int16)
        np.testing.assert_array_equal(out, want, err_msg=f"call {it} ({pattern})")
    # a plan runs with no collective of its own: only the window's flags order the calls
    c = count_matrix("random", p, scale=2000)
    pl = pya2a.plan(comm, c[r], c[:, r], "h", device=0, algorithm="shm")
    host = send_data(c, r, "int16")
    rb = FakeDeviceArray(np.zeros(int(c[:, r].sum()), np.int16))
    for it in range(10):
        pl.run(FakeDeviceArray(host + it), rb)
        np.testing.assert_array_equal(rb.arr, expected_recv(c, r, "int16") + it,
                                      err_msg=f"plan run {it}")
    pl.free()


def test_shm_window_grows_collectively_and_is_reused(comm, fake):
    p = comm.Get_size()
    small = np.full((p, p), 10, dtype=np.int64)
    _run(comm, small, "float64")
    st = pya2a.core.state.state(comm)
    win = st.slot("shm.window")
    cap = win.capacity
    if p == 1:
        pytest.skip("one rank: the own block never leaves the device, no region")
    assert cap >= gshm.MIN_REGION
    _run(comm, small, "float64")
    assert st.slot("shm.window") is win and win.capacity == cap  # no regrowth, no allocation
    big = np.full((p, p), 10, dtype=np.int64)
    big[0, p - 1] = cap // 8 + 1000  # only rank 0 needs more: the decision is still global
    out = _run(comm, big, "float64")
    np.testing.assert_array_equal(out, _oracle(comm, big, "float64"))
    assert st.slot("shm.window").capacity > cap
    assert fake.registered  # the window is page-locked ...
    shm_alg.free_windows()
    assert not fake.registered and st.slot("shm.window") is None  # ... unpinned when freed
    out = _run(comm, small, "float64")  # a fresh window after free
    np.testing.assert_array_equal(out, _oracle(comm, small, "float64"))


def test_shm_in_place(comm, fake_any):
    p, r = comm.Get_size(), comm.Get_rank()
    c = count_matrix("random", p, scale=200)
    c = c + c.T  # in place: what i sends j must be what j sends i
    host = send_data(c, r, "int32")
    ref = host.copy()
    comm.Alltoallv(MPI.IN_PLACE, [ref, c[r]])
    dev = FakeDeviceArray(host.copy())
    pya2a.Alltoallv(comm, MPI.IN_PLACE, [dev, c[r]], algorithm="shm")
    np.testing.assert_array_equal(dev.arr, ref)
    np.testing.assert_array_equal(dev.arr, expected_recv(c, r, "int32"))


def test_shm_alltoall_gapped_displacements_and_plan(comm, fake):
    p, r = comm.Get_size(), comm.Get_rank()
    s = FakeDeviceArray(np.arange(p * 5, dtype=np.int64) + 100 * r)
    d = FakeDeviceArray(np.zeros(p * 5, np.int64))
    pya2a.Alltoall(comm, s, d, algorithm="shm")
    want = np.concatenate([np.arange(r * 5, r * 5 + 5) + 100 * j for j in range(p)])
    np.testing.assert_array_equal(d.arr, want)
    # blocks in reverse order with gaps on both sides (runs do not merge)
    c = count_matrix("random", p, scale=50)
    sdis = np.zeros(p, dtype=np.int64)
    pos = 3
    for j in reversed(range(p)):
        sdis[j] = pos
        pos += int(c[r, j]) + 7
    rdis = np.arange(p) * (int(c.max()) + 5)
    host = send_data(c, r, "float32")
    sarr = np.zeros(int(sdis.max()) + int(c.max()) + 8, np.float32)
    for j in range(p):
        sarr[sdis[j]:sdis[j] + c[r, j]] = host[c[r, :j].sum():c[r, :j + 1].sum()]
    rarr = np.full(p * (int(c.max()) + 5), -1, np.float32)
    ref = rarr.copy()
    comm.Alltoallv([sarr, (c[r], sdis)], [ref, (c[:, r], rdis)])
    dev = FakeDeviceArray(rarr)
    pya2a.Alltoallv(comm, [FakeDeviceArray(sarr), (c[r], sdis)], [dev, (c[:, r], rdis)],
                    algorithm="shm")
    np.testing.assert_array_equal(dev.arr, ref)  # gaps of the receive buffer untouched
    pl = pya2a.plan(comm, c[r], c[:, r], "f", device=0, algorithm="shm")
    assert pl.algorithm == "shm"
    for k in range(3):
        sb = FakeDeviceArray(host + k)
        rb = FakeDeviceArray(np.zeros(int(c[:, r].sum()), np.float32))
        pl.run(sb, rb)
        np.testing.assert_array_equal(rb.arr, expected_recv(c, r, "float32") + k)
    pl.free()


def test_shm_errors_raise_on_every_rank(comm, fake, monkeypatch):
    p = comm.Get_size()
    out = np.full(p, 7.0)
    with pytest.raises(ValueError, match="device buffers only"):
        pya2a.Alltoallv(comm, np.zeros(p), out, algorithm="shm")
    assert (out == 7.0).all()
    # a communicator spanning nodes (emulated): explicit shm raises everywhere, untouched
    monkeypatch.setattr(gshm, "comm_available", lambda c: (False, "spans 2 nodes"))
    dev = FakeDeviceArray(np.full(p, 7.0))
    with pytest.raises(ValueError, match="'shm' is not available.*spans 2 nodes"):
        pya2a.Alltoallv(comm, FakeDeviceArray(np.zeros(p)), dev, algorithm="shm")
    assert (dev.arr == 7.0).all()
    assert pya2a.core.state.state(comm).slot("shm.window") is None  # nothing allocated


def test_shm_availability_is_collective_and_true_on_one_node(comm):
    icomm = pya2a.core.state.internal_comm(comm)
    ok, why = shm_alg.comm_available(icomm)
    assert ok, why  # a local mpiexec: every rank on this node
    assert "shm" in pya2a.available_algorithms(device=True)
    assert "shm" not in pya2a.available_algorithms()


def test_auto_picks_shm_on_one_node_without_ipc():
    st = select.Stats(p=4, max_block=1 << 20, mean_block=float(1 << 20), device=True,
                      contiguous=True, max_rank=1 << 22, ranks_per_node=4)
    assert select.choose(st, ["native", "pairwise", "shm"]) == "shm"
    assert select.choose(st, ["native", "pairwise", "ipc", "shm"]) == "ipc"
    small = select.Stats(p=4, max_block=1 << 10, mean_block=1024.0, device=True,
                         contiguous=True, max_rank=4096, ranks_per_node=4)
    assert select.choose(small, ["native", "pairwise", "shm"]) == "native"  # polling cost
    two_nodes = select.Stats(p=4, max_block=1 << 22, mean_block=4e6, device=True,
                             contiguous=True, max_rank=1 << 24, ranks_per_node=2)
    assert select.choose(two_nodes, ["native", "pairwise", "shm"]) == "pairwise"


def test_auto_uses_shm_for_fake_device_buffers(comm, fake, monkeypatch):

    if comm.Get_size() == 1:
        pytest.skip("p = 1 takes native")
    ipc = pya2a.algorithms.get("ipc")
    monkeypatch.setitem(registry._REGISTRY, "ipc", dataclasses.replace(
        ipc, comm_available=lambda c, d=None: (False, "emulated")))
    c = count_matrix("skew", comm.Get_size(), scale=1 << 15)  # blocks past DEVICE_SHM_FROM
    r = comm.Get_rank()
    s = FakeDeviceArray(send_data(c, r, "float64"))
    d = FakeDeviceArray(np.zeros(int(c[:, r].sum())))
    pya2a.Alltoallv(comm, [s, c[r]], [d, c[:, r]])
    np.testing.assert_array_equal(d.arr, _oracle(comm, c, "float64"))
    assert pya2a.core.state.state(comm).slot("shm.window") is not None  # auto took shm


# ---------------------------------------------------------------------------------------
# real GPU
# ---------------------------------------------------------------------------------------
NDEV = cuda_device_count()
gpu = pytest.mark.skipif(NDEV == 0, reason="no CUDA device (or no CuPy)")


@pytest.fixture
def cp():
    import cupy

    local = WORLD.Split_type(MPI.COMM_TYPE_SHARED)
    cupy.cuda.Device(local.Get_rank() % NDEV).use()
    local.Free()
    gdev.set_backend(None)
    return cupy


@gpu
@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("dtype", ["float64", "int8", "float16", "complex128"])
def test_gpu_shm_matches_mpi(comm, cp, pattern, dtype):
    r = comm.Get_rank()
    c = count_matrix(pattern, comm.Get_size(), scale=3000)
    sbuf = cp.asarray(send_data(c, r, dtype))
    rbuf = cp.full(int(c[:, r].sum()), 3, dtype=dtype)
    pya2a.Alltoallv(comm, [sbuf, c[r]], [rbuf, c[:, r]], algorithm="shm")
    assert cp.asnumpy(rbuf).tobytes() == _oracle(comm, c, dtype).tobytes()


@gpu
def test_gpu_shm_large_pipelined_repeated_and_in_place(comm, cp, monkeypatch):
    monkeypatch.setenv("PYA2A_STAGE_CHUNK", "256K")
    p, r = comm.Get_size(), comm.Get_rank()
    c = count_matrix("uniform", p, scale=300_000)  # 2.4 MB blocks, ~10 pieces each
    base = cp.asarray(send_data(c, r, "float64"))
    out = cp.zeros(int(c[:, r].sum()))
    want = cp.asarray(expected_recv(c, r, "float64"))
    for it in range(20):  # regions reused while peers may still be uploading
        pya2a.Alltoallv(comm, [base + it, c[r]], [out, c[:, r]], algorithm="shm")
        assert bool(cp.all(out == want + it)), it
    s = cp.cuda.Stream(non_blocking=True)
    with s:  # data from a kernel still queued on the current stream
        src = cp.zeros(p * (1 << 18), cp.float32)
        for _ in range(20):
            src += 1
        src += r
        dst = cp.zeros_like(src)
        pya2a.Alltoallv(comm, src, dst, algorithm="shm")
        got = cp.asnumpy(dst).reshape(p, -1)
    np.testing.assert_array_equal(got[:, 0], 20 + np.arange(p, dtype=np.float32))
    cc = count_matrix("random", p, scale=1000)
    cc = cc + cc.T
    host = send_data(cc, r, "int32")
    ref = host.copy()
    comm.Alltoallv(MPI.IN_PLACE, [ref, cc[r]])
    dev = cp.asarray(host)
    pya2a.Alltoallv(comm, MPI.IN_PLACE, [dev, cc[r]], algorithm="shm")
    np.testing.assert_array_equal(cp.asnumpy(dev), ref)


@gpu
def test_gpu_shm_torch_bfloat16(comm, cp):
    try:
        import torch
    except ImportError:
        pytest.skip("no torch")
    if not torch.cuda.is_available():
        pytest.skip("no torch with CUDA")
    r, p = comm.Get_rank(), comm.Get_size()
    c = count_matrix("random", p, scale=40)
    rows = torch.as_tensor(send_data(c, r, "float32")).to(torch.bfloat16)
    rows = rows.reshape(-1, 1).repeat(1, 3).to(f"cuda:{cp.cuda.Device().id}")
    out, counts = pya2a.alltoallv(comm, rows, c[r], algorithm="shm")
    want = torch.as_tensor(expected_recv(c, r, "float32")).to(torch.bfloat16)
    assert torch.equal(out[:, 0].cpu(), want)
