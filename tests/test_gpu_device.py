"""Device buffers through every algorithm: staged (pinned host) and CUDA-aware transports.

Two halves:

* Emulated device (always runs, serially and under mpiexec): a host backend that queues
  every copy and kernel on fake streams and runs them lazily, in stream order, when an event
  is polled or a stream synchronised. Device arrays are host arrays behind
  ``__cuda_array_interface__``. Ordering bugs in the staging pipeline (reading a mirror
  before its download landed, overwriting one under an upload) show up as wrong data.
* Real GPU (skips cleanly without CuPy or a device): describe() on CuPy/torch arrays, the
  pack kernel against NumPy, and every device algorithm against the seed-computed answer
  and MPI's own Alltoallv on host copies, with CuPy and torch (incl. bfloat16) buffers.
"""

from __future__ import annotations

import contextlib
import ctypes
import os

import numpy as np
import pytest
from mpi4py import MPI

import pya2a
from pya2a.core.spec import parse_vector
from pya2a.gpu import device as gdev
from pya2a.gpu import staging

from helpers import PATTERNS, SEED, count_matrix, cuda_device_count, expected_recv, send_data

WORLD = MPI.COMM_WORLD
DEVICE_ALGORITHMS = ["auto", *(n for n in pya2a.algorithms.names()
                               if pya2a.algorithms.get(n).device and pya2a.algorithms.get(n).host)]


# ---------------------------------------------------------------------------------------
# emulated CUDA
# ---------------------------------------------------------------------------------------
class FakeStream:
    def __init__(self, name: str) -> None:
        self.name = name
        self.ops: list = []
        self.ran = 0
        self.ptr = id(self)

    def run_to(self, target: int) -> None:
        while self.ran < target:
            op = self.ops[self.ran]
            self.ran += 1
            op()


class FakeEvent:
    def __init__(self, stream: FakeStream) -> None:
        self.stream = stream
        self.target = len(stream.ops)


class FakeDeviceArray:
    """A host array that claims to live on device 0."""

    def __init__(self, arr: np.ndarray) -> None:
        self.arr = arr

    @property
    def __cuda_array_interface__(self) -> dict:
        return {"version": 3, "data": (self.arr.ctypes.data, False), "shape": self.arr.shape,
                "typestr": self.arr.dtype.str, "strides": self.arr.strides
                if not self.arr.flags.c_contiguous else None, "stream": None}

    shape = property(lambda self: self.arr.shape)
    dtype = property(lambda self: self.arr.dtype)
    nbytes = property(lambda self: self.arr.nbytes)

    def get(self) -> np.ndarray:
        return self.arr.copy()


class FakeBackend:
    """CUDA semantics on the host: queued, lazily executed, stream-ordered operations."""

    name = "fake"

    def __init__(self, seed: int = 0) -> None:
        self.main = FakeStream("main")
        self.side = FakeStream("side")
        self.rng = np.random.default_rng(seed)
        self.pinned_calls = 0
        self.registered: dict[int, int] = {}
        self.kernel_launches = 0

    use_device = staticmethod(lambda device: contextlib.nullcontext())
    current_device = staticmethod(lambda: 0)

    def current_stream(self):
        return self.main

    def side_stream(self, device):
        return self.side

    def stream_handle(self, s):
        return s.ptr

    def external_stream(self, h):
        return self.main

    def record(self, stream):
        return FakeEvent(stream)

    def done(self, ev) -> bool:
        if ev.stream.ran < ev.target and self.rng.random() < 0.5:
            ev.stream.run_to(ev.stream.ran + 1)
        return ev.stream.ran >= ev.target

    @staticmethod
    def event_sync(ev) -> None:
        ev.stream.run_to(ev.target)

    @staticmethod
    def wait(stream, ev) -> None:
        stream.ops.append(lambda: ev.stream.run_to(ev.target))

    @staticmethod
    def sync(stream) -> None:
        stream.run_to(len(stream.ops))

    def memcpy(self, dst, src, n, stream) -> None:
        stream.ops.append(lambda: ctypes.memmove(dst, src, n))

    def pinned(self, nbytes):
        self.pinned_calls += 1
        return np.full(nbytes, 0xCD, dtype=np.uint8)  # garbage: unread bytes show up

    def host_register(self, ptr, nbytes):
        """Page-locking is bookkeeping here; overlapping registrations fail as in CUDA."""
        if nbytes <= 0:
            return
        for a, n in self.registered.items():
            assert ptr + nbytes <= a or a + n <= ptr, "memory registered twice"
        self.registered[ptr] = nbytes

    def host_unregister(self, ptr):
        del self.registered[ptr]

    def alloc(self, nbytes):
        a = np.full(max(nbytes, 1), 0xEE, dtype=np.uint8)
        return a, a.ctypes.data

    @staticmethod
    def pointer(ptr):
        return 0, False

    def pack(self, src, src_off, lens, dst, dst_off, stream):
        self.kernel_launches += 1
        blocks = [(int(a), int(b), int(n)) for a, b, n in zip(src_off, dst_off, lens,
                                                               strict=True)]

        def run():
            for a, b, n in blocks:
                if n:
                    ctypes.memmove(dst + b, src + a, n)
        stream.ops.append(run)

    @staticmethod
    def empty_rows(like, nrows):
        if isinstance(like, FakeDeviceArray):
            return FakeDeviceArray(np.zeros((nrows, *like.shape[1:]), like.dtype))
        return None

    @staticmethod
    def byte_view(arr):
        if isinstance(arr, FakeDeviceArray):
            return FakeDeviceArray(arr.arr.reshape(-1).view(np.uint8))
        return None


@pytest.fixture
def fake(monkeypatch):
    be = FakeBackend(seed=WORLD.Get_rank())
    old = gdev.set_backend(be)
    monkeypatch.setattr(gdev, "comm_cuda_aware", lambda comm: False)
    try:
        yield be
    finally:
        gdev.set_backend(old)


@pytest.fixture(params=["staged", "aware"])
def fake_any(request, fake, monkeypatch):
    """Both transports; 'aware' hands the (host-backed) fake device memory to MPI."""
    if request.param == "aware":
        monkeypatch.setattr(gdev, "comm_cuda_aware", lambda comm: True)
    return fake


def _fake_exchange(comm, c, dtype, algorithm, inplace=False):
    r = comm.Get_rank()
    sc, rc = c[r], c[:, r]
    sbuf = FakeDeviceArray(send_data(c, r, dtype))
    rbuf = FakeDeviceArray(np.zeros(int(rc.sum()), dtype))
    if inplace:
        # in place needs one layout for both directions: block j at the same displacement
        n = max(int(sc.max()), int(rc.max()), 1) if sc.size else 1
        buf = np.zeros(n * comm.Get_size(), dtype)
        for j in range(comm.Get_size()):
            off = int(sc[:j].sum())
            buf[j * n:j * n + sc[j]] = sbuf.arr[off:off + sc[j]]
        dev = FakeDeviceArray(buf)
        disp = np.arange(comm.Get_size()) * n
        pya2a.Alltoallv(comm, MPI.IN_PLACE, [dev, (rc, disp)], algorithm=algorithm)
        return np.concatenate([buf[j * n:j * n + rc[j]] for j in range(comm.Get_size())])
    pya2a.Alltoallv(comm, [sbuf, sc], [rbuf, rc], algorithm=algorithm)
    return rbuf.arr


# ---------------------------------------------------------------------------------------
# emulated-device tests
# ---------------------------------------------------------------------------------------
def test_interval_set_add_remove_gaps():
    s = staging.IntervalSet()
    s.add(10, 20)
    s.add(30, 40)
    s.add(20, 25)
    assert s.iv == [(10, 25), (30, 40)]
    assert s.gaps(0, 50) == [(0, 10), (25, 30), (40, 50)]
    s.remove(12, 35)
    assert s.iv == [(10, 12), (35, 40)]
    assert s.overlaps(11, 13) and not s.overlaps(12, 35)
    s.add(0, 100)
    assert s.iv == [(0, 100)] and s.gaps(5, 50) == []


def test_merge_ranges_sorts_and_joins():
    assert staging.merge_ranges([30, 0, 10, 50], [10, 10, 5, 0]) == [(0, 15), (30, 40)]


def test_stage_chunk_env(monkeypatch):
    monkeypatch.setenv("PYA2A_STAGE_CHUNK", "1M")
    assert staging.default_chunk() == 1 << 20
    monkeypatch.setenv("PYA2A_STAGE_CHUNK", "12")
    with pytest.raises(ValueError):
        staging.default_chunk()


def test_cuda_aware_env_override(monkeypatch):
    for val, want in (("1", True), ("0", False)):
        monkeypatch.setenv("PYA2A_CUDA_AWARE", val)
        gdev._detect.cache_clear()
        assert gdev.cuda_aware() is want
        assert "PYA2A_CUDA_AWARE" in gdev.cuda_aware_reason()
    monkeypatch.delenv("PYA2A_CUDA_AWARE")
    gdev._detect.cache_clear()
    assert isinstance(gdev.cuda_aware(), bool)  # library query; never raises


def test_device_algorithms_registered():
    names = pya2a.available_algorithms(device=True)
    for name in ("native", "direct", "pairwise"):
        assert name in names


def test_describe_fake_array_formats(fake):
    d = gdev.describe(FakeDeviceArray(np.zeros(6, np.float32)))
    assert (d.nbytes, d.fmt, d.device, d.readonly) == (24, "f4", 0, False)
    with pytest.raises(BufferError, match="not contiguous"):
        gdev.describe(FakeDeviceArray(np.zeros((4, 4))[:, ::2]), call="Alltoallv",
                      what="send message")
    spec = parse_vector(FakeDeviceArray(np.zeros(8, np.int64)), 2, readonly=True)
    assert spec.device == 0 and list(spec.counts) == [4, 4]


class StridedCAI(FakeDeviceArray):
    """A fake device array that always reports strides, its own or the ones it is given
    (CuPy reports strides for most arrays, contiguous ones included, and any stride for
    dimensions of length 1)."""

    def __init__(self, arr: np.ndarray, shape: tuple | None = None,
                 strides: tuple | None = None) -> None:
        super().__init__(arr)
        self.cai_shape = arr.shape if shape is None else shape
        self.cai_strides = arr.strides if strides is None else strides

    @property
    def __cuda_array_interface__(self) -> dict:
        return {**super().__cuda_array_interface__, "shape": self.cai_shape,
                "strides": self.cai_strides}


@pytest.mark.parametrize(("shape", "strides", "ok"), [
    ((4, 3, 2), (48, 16, 8), True),          # C order, strides spelled out
    ((4, 3, 2), (8, 32, 96), True),          # Fortran order (mpi4py takes it too)
    ((1, 6, 1), (0, 8, 999), True),          # length-1 dimensions: any stride
    ((6, 1), (8, -5), True),
    ((0, 5), (7, 3), True),                  # no elements: any strides
    ((4, 3, 2), (48, 8, 24), False),         # CuPy's FFT along axis 1: swapaxes view
    ((4, 6), (8, 40), False),                # neither order
    ((3, 4), (0, 8), False),                 # broadcast along a real dimension
    ((4,), (16,), False),                    # every other element
])
def test_describe_contiguity_rule(fake, shape, strides, ok):
    """describe() takes what mpi4py takes from __cuda_array_interface__: one dense run."""
    mem = np.zeros(64)
    arr = StridedCAI(mem, shape, strides)
    if ok:
        d = gdev.describe(arr, call="Alltoallw", what="send message")
        assert (d.addr, d.nbytes) == (mem.ctypes.data, 8 * int(np.prod(shape)))
    else:
        with pytest.raises(BufferError, match="send message device buffer is not contiguous"):
            gdev.describe(arr, call="Alltoallw", what="send message")


def test_fake_device_alltoallw_takes_explicit_contiguous_strides(comm, fake):
    """Alltoallw with subarray types on C-contiguous device arrays whose interface spells
    out the strides (as CuPy's does) equals the MPI's own call on the host."""
    p, r = comm.Get_size(), comm.Get_rank()
    a_shape, b_shape = (3, 2 * p, 5), (3 * p, 2, 5)
    host = np.random.default_rng([SEED, r]).standard_normal(a_shape)
    st, rt = _subarray_types(a_shape, 1, p), _subarray_types(b_shape, 0, p)
    cd = ([1] * p, [0] * p)
    try:
        ref = np.zeros(b_shape)
        comm.Alltoallw([host, cd, st], [ref, cd, rt])
        src, out = host.copy(), np.zeros(b_shape)
        pya2a.Alltoallw(comm, [StridedCAI(src), cd, st], [StridedCAI(out), cd, rt])
        fake.sync(fake.main)
        np.testing.assert_array_equal(out, ref)
    finally:
        for t in (*st, *rt):
            t.Free()


def test_format_falls_back_when_mpi_lacks_the_type(monkeypatch):
    # Open MPI 4: mpi4py's table has 'f2' but the library has no float16 (DATATYPE_NULL)
    monkeypatch.setitem(MPI._typedict, "f2", MPI.DATATYPE_NULL)
    assert gdev._mpi_fmt("f2", 2) == "u2"
    assert gdev._mpi_fmt("f8", 8) == "f8"
    assert gdev._mpi_fmt("", 3) == ""


@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("algorithm", DEVICE_ALGORITHMS)
def test_fake_device_every_algorithm(comm, fake_any, algorithm, pattern):
    c = count_matrix(pattern, comm.Get_size(), scale=300)
    out = _fake_exchange(comm, c, "float64", algorithm)
    np.testing.assert_array_equal(out, expected_recv(c, comm.Get_rank(), "float64"))


@pytest.mark.parametrize("algorithm", DEVICE_ALGORITHMS)
def test_fake_device_small_chunks_pipeline(comm, fake, monkeypatch, algorithm):
    monkeypatch.setenv("PYA2A_STAGE_CHUNK", "4096")  # many chunks per message
    c = count_matrix("skew", comm.Get_size(), scale=700)
    for dtype in ("int8", "complex128"):
        out = _fake_exchange(comm, c, dtype, algorithm)
        assert out.tobytes() == expected_recv(c, comm.Get_rank(), dtype).tobytes()


@pytest.mark.parametrize("algorithm", DEVICE_ALGORITHMS)
def test_fake_device_in_place(comm, fake_any, algorithm):
    c = count_matrix("random", comm.Get_size(), scale=200)
    c = c + c.T  # in place: what i sends j must be what j sends i
    out = _fake_exchange(comm, c, "int32", algorithm, inplace=True)
    np.testing.assert_array_equal(out, expected_recv(c, comm.Get_rank(), "int32"))


def test_fake_device_alltoall_and_array_api(comm, fake):
    p, r = comm.Get_size(), comm.Get_rank()
    s = FakeDeviceArray(np.arange(p * 5, dtype=np.int16) + 100 * r)
    d = FakeDeviceArray(np.zeros(p * 5, np.int16))
    pya2a.Alltoall(comm, s, d, algorithm="pairwise")
    want = np.concatenate([np.arange(r * 5, r * 5 + 5, dtype=np.int16) + 100 * j
                           for j in range(p)])
    np.testing.assert_array_equal(d.arr, want)
    c = count_matrix("random", p, scale=3)
    rows = FakeDeviceArray(send_data(c, r, "float32").repeat(3).reshape(-1, 3))
    out, counts = pya2a.alltoallv(comm, rows, c[r])
    assert isinstance(out, FakeDeviceArray) and list(counts) == list(c[:, r])
    np.testing.assert_array_equal(out.arr[:, 0], expected_recv(c, r, "float32"))


def test_fake_pinned_pool_is_reused(comm, fake):
    c = count_matrix("uniform", comm.Get_size(), scale=2000)
    _fake_exchange(comm, c, "float64", "pairwise")
    n = fake.pinned_calls
    for _ in range(3):
        out = _fake_exchange(comm, c, "float64", "pairwise")
    assert fake.pinned_calls == n
    np.testing.assert_array_equal(out, expected_recv(c, comm.Get_rank(), "float64"))


@pytest.mark.serial
def test_fake_staged_host_to_device_scatter_many_runs(fake):
    t = staging.StagedTransport(MPI.COMM_SELF, 0, fake, chunk=4096)
    dev = FakeDeviceArray(np.arange(4000, dtype=np.uint8))
    spec = parse_vector([dev, MPI.BYTE], 1, readonly=False)
    t.begin()
    sb = t.buffer(spec)
    src = t.empty(400)
    src[:] = np.arange(400) % 251
    offs = np.arange(20, dtype=np.int64) * 150 + 7
    lens = np.full(20, 20, dtype=np.int64)
    kernels = fake.kernel_launches
    t.scatter(src, sb, offs, lens, 0)  # 20 separate runs: one upload + one kernel
    assert fake.kernel_launches == kernels + 1
    back = t.empty(400)
    t.gather(sb, offs, lens, back, 0)  # host read of what the device now holds
    np.testing.assert_array_equal(back, src)
    t.finish()
    want = np.arange(4000, dtype=np.uint8)
    for k in range(20):
        want[offs[k]:offs[k] + 20] = src[20 * k:20 * k + 20]
    np.testing.assert_array_equal(dev.arr, want)


# ---------------------------------------------------------------------------------------
# real GPU
# ---------------------------------------------------------------------------------------
NDEV = cuda_device_count()
gpu = pytest.mark.skipif(NDEV == 0, reason="no CUDA device (or no CuPy)")


@pytest.fixture
def cp():
    import cupy

    cupy.cuda.Device(WORLD.Get_rank() % NDEV).use()
    gdev.set_backend(None)
    return cupy


def _torch():
    try:
        import torch

        return torch if torch.cuda.is_available() else None
    except Exception:
        return None


@gpu
def test_gpu_mpi_is_not_handed_device_pointers(cp):
    info = gdev.info()
    assert info["devices"] >= 1
    if os.environ.get("PYA2A_EXPECT_CUDA_AWARE") == "0":
        assert not gdev.cuda_aware(), gdev.cuda_aware_reason()


@gpu
def test_gpu_describe_cupy_and_torch(cp):
    a = cp.arange(12, dtype=cp.float32)
    d = gdev.describe(a)
    assert (d.addr, d.nbytes, d.fmt) == (a.data.ptr, 48, "f4")
    with pytest.raises(BufferError):
        gdev.describe(cp.zeros((4, 4))[:, ::2])
    z = gdev.describe(cp.zeros(0, cp.float64))
    assert z.nbytes == 0
    torch = _torch()
    if torch is None:
        return
    t = torch.zeros(5, 3, dtype=torch.bfloat16, device=f"cuda:{cp.cuda.Device().id}")
    d = gdev.describe(t)
    assert (d.addr, d.nbytes, d.fmt) == (t.data_ptr(), 30, "u2")
    g = torch.zeros(4, device=t.device, requires_grad=True)
    with pytest.raises(TypeError, match="detach"):
        gdev.describe(g, call="Alltoallv", what="send message")


@gpu
@pytest.mark.serial
@pytest.mark.parametrize("longest", [200000, 2048, 256])
def test_gpu_pack_kernel_matches_numpy(cp, longest):
    """Runs of every alignment; a long run (a block of threads per run) or only short ones
    (a warp per run)."""
    be = gdev.backend()
    rng = np.random.default_rng(5)
    src = cp.asarray(rng.integers(0, 256, 1 << 20, dtype=np.uint8))
    dst = cp.zeros(1 << 20, cp.uint8)
    n = 300
    lens = rng.integers(0, min(3000, longest), n).astype(np.int64)
    lens[:5] = [0, 1, 15, 16, longest]
    src_off = rng.integers(0, (1 << 20) - 200001, n).astype(np.int64)
    src_off[::3] &= ~15  # some co-aligned, some 4-aligned, some not at all
    dst_off = np.cumsum(np.concatenate([[16], lens[:-1] + 16])).astype(np.int64)
    dst_off[1::2] += 4
    src_off[4] = 16 * 1000 + dst_off[4] % 16  # the long block takes the 16-byte path
    be.pack(src.data.ptr, src_off, lens, dst.data.ptr, dst_off, cp.cuda.get_current_stream())
    h_src, h_dst = cp.asnumpy(src), np.zeros(1 << 20, np.uint8)
    for a, b, m in zip(src_off, dst_off, lens, strict=True):
        h_dst[b:b + m] = h_src[a:a + m]
    np.testing.assert_array_equal(cp.asnumpy(dst), h_dst)


def _gpu_exchange(cp, comm, c, dtype, algorithm, inplace=False):
    r, p = comm.Get_rank(), comm.Get_size()
    sc, rc = c[r], c[:, r]
    host = send_data(c, r, dtype)
    if inplace:
        n = max(int(c.max()), 1)
        buf = np.zeros(n * p, dtype)
        for j in range(p):
            off = int(sc[:j].sum())
            buf[j * n:j * n + sc[j]] = host[off:off + sc[j]]
        dev = cp.asarray(buf)
        disp = np.arange(p) * n
        pya2a.Alltoallv(comm, MPI.IN_PLACE, [dev, (rc, disp)], algorithm=algorithm)
        got = cp.asnumpy(dev)
        return np.concatenate([got[j * n:j * n + rc[j]] for j in range(p)])
    sbuf = cp.asarray(host)
    rbuf = cp.full(int(rc.sum()), 7, dtype=dtype)
    pya2a.Alltoallv(comm, [sbuf, sc], [rbuf, rc], algorithm=algorithm)
    return cp.asnumpy(rbuf)


@gpu
@pytest.mark.parametrize("pattern", ["random", "zeros", "hot", "skew", "empty"])
@pytest.mark.parametrize("algorithm", DEVICE_ALGORITHMS)
def test_gpu_every_algorithm_matches_seed_and_native(comm, cp, algorithm, pattern):
    c = count_matrix(pattern, comm.Get_size(), scale=3000)
    out = _gpu_exchange(cp, comm, c, "float64", algorithm)
    want = expected_recv(c, comm.Get_rank(), "float64")
    np.testing.assert_array_equal(out, want)
    # the MPI library's own Alltoallv on host copies
    r = comm.Get_rank()
    ref = np.zeros(int(c[:, r].sum()))
    comm.Alltoallv([send_data(c, r, "float64"), c[r]], [ref, c[:, r]])
    np.testing.assert_array_equal(out, ref)


@gpu
@pytest.mark.parametrize("dtype", ["int8", "float16", "int64", "complex128", "bool"])
@pytest.mark.parametrize("algorithm", DEVICE_ALGORITHMS)
def test_gpu_dtypes(comm, cp, algorithm, dtype):
    c = count_matrix("random", comm.Get_size(), scale=500)
    out = _gpu_exchange(cp, comm, c, dtype, algorithm)
    assert out.tobytes() == expected_recv(c, comm.Get_rank(), dtype).tobytes()


@gpu
@pytest.mark.parametrize("algorithm", DEVICE_ALGORITHMS)
def test_gpu_in_place(comm, cp, algorithm):
    c = count_matrix("random", comm.Get_size(), scale=1000)
    c = c + c.T  # in place: what i sends j must be what j sends i
    out = _gpu_exchange(cp, comm, c, "int32", algorithm, inplace=True)
    np.testing.assert_array_equal(out, expected_recv(c, comm.Get_rank(), "int32"))


@gpu
@pytest.mark.parametrize("algorithm", ["pairwise", "direct", "ring"])
def test_gpu_large_multichunk(comm, cp, monkeypatch, algorithm):
    monkeypatch.setenv("PYA2A_STAGE_CHUNK", "256K")
    c = count_matrix("uniform", comm.Get_size(), scale=300_000)  # 2.4 MB per block
    out = _gpu_exchange(cp, comm, c, "float64", algorithm)
    np.testing.assert_array_equal(out, expected_recv(c, comm.Get_rank(), "float64"))


@gpu
@pytest.mark.parametrize("algorithm", DEVICE_ALGORITHMS)
def test_gpu_torch_bfloat16_and_array_api(comm, cp, algorithm):
    torch = _torch()
    if torch is None:
        pytest.skip("no torch with CUDA")
    r, p = comm.Get_rank(), comm.Get_size()
    dev = f"cuda:{r % NDEV}"
    c = count_matrix("random", p, scale=40)
    rows = torch.as_tensor(send_data(c, r, "float32")).to(torch.bfloat16)
    rows = rows.reshape(-1, 1).repeat(1, 3).to(dev)
    out, counts = pya2a.alltoallv(comm, rows, c[r], algorithm=algorithm)
    assert isinstance(out, torch.Tensor) and out.device == rows.device
    assert out.dtype == torch.bfloat16 and list(counts) == list(c[:, r])
    want = torch.as_tensor(expected_recv(c, r, "float32")).to(torch.bfloat16)
    assert torch.equal(out[:, 0].cpu(), want)
    # Alltoallv with bfloat16 tensors directly (fmt 'u2': 2-byte elements)
    recv = torch.zeros(int(c[:, r].sum()), 3, dtype=torch.bfloat16, device=dev)
    pya2a.Alltoallv(comm, [rows, c[r] * 3], [recv, c[:, r] * 3], algorithm=algorithm)
    assert torch.equal(recv, out)


@gpu
def test_gpu_cupy_array_api_and_alltoall(comm, cp):
    r, p = comm.Get_rank(), comm.Get_size()
    c = count_matrix("hot", p, scale=50)
    rows = cp.asarray(send_data(c, r, "float64")).reshape(-1, 1) * cp.ones((1, 4))
    out, counts = pya2a.alltoallv(comm, rows, c[r])
    assert isinstance(out, cp.ndarray) and out.shape == (int(c[:, r].sum()), 4)
    np.testing.assert_array_equal(cp.asnumpy(out[:, 3]), expected_recv(c, r, "float64"))
    s = cp.arange(p * 6, dtype=cp.int32) + 1000 * r
    d = cp.zeros(p * 6, cp.int32)
    pya2a.Alltoall(comm, s, d)
    want = np.concatenate([np.arange(r * 6, r * 6 + 6) + 1000 * j for j in range(p)])
    np.testing.assert_array_equal(cp.asnumpy(d), want)


@gpu
def test_gpu_errors_mixed_and_noncontiguous(comm, cp):
    p = comm.Get_size()
    with pytest.raises(TypeError, match="host"):
        pya2a.Alltoallv(comm, cp.zeros(p, cp.float64), np.zeros(p))
    with pytest.raises(BufferError, match="contiguous"):  # 2p elements: strided even at p = 1
        pya2a.Alltoallv(comm, cp.zeros((2 * p, 2))[:, 0], cp.zeros(2 * p))


@gpu
def test_gpu_stream_ordering_with_pending_work(comm, cp):
    """Data written by a kernel still queued on the current stream is what gets sent."""
    r, p = comm.Get_rank(), comm.Get_size()
    n = 1 << 18
    s = cp.cuda.Stream(non_blocking=True)
    with s:
        src = cp.zeros(n * p, cp.float32)
        for _ in range(20):  # enough queued work that a racing download would see zeros
            src += 1
        src += r
        dst = cp.zeros(n * p, cp.float32)
        pya2a.Alltoallv(comm, src, dst, algorithm="pairwise")
        got = cp.asnumpy(dst).reshape(p, n)
    np.testing.assert_array_equal(got, np.repeat(20 + np.arange(p, dtype=np.float32),
                                                 n).reshape(p, n))


@gpu
def test_gpu_plan_runs_repeatedly(comm, cp):
    if not hasattr(pya2a, "plan"):
        pytest.skip("no plan API")
    r, p = comm.Get_rank(), comm.Get_size()
    c = count_matrix("random", p, scale=2000)
    pl = pya2a.plan(comm, c[r], c[:, r], "d", device=cp.cuda.Device().id,
                    algorithm="pairwise")
    rbuf = cp.zeros(int(c[:, r].sum()))
    for k in range(3):
        sbuf = cp.asarray(send_data(c, r, "float64")) + k
        pl.run(sbuf, rbuf)
        np.testing.assert_array_equal(cp.asnumpy(rbuf), expected_recv(c, r, "float64") + k)
    pl.free()


def test_ipc_is_unavailable_under_another_device_backend(comm, fake):
    """The IPC engine runs on CuPy streams: under the emulated backend ``auto`` must not pick
    it even on a machine whose real GPUs could (it read results before the engine wrote)."""
    from pya2a.gpu import ipc_algorithm as ipc

    ok, why = ipc.comm_available(pya2a.core.state.internal_comm(comm))
    assert not ok and "fake" in why
    c = count_matrix("uniform", comm.Get_size(), scale=300)
    out = _fake_exchange(comm, c, "float64", "auto")
    np.testing.assert_array_equal(out, expected_recv(c, comm.Get_rank(), "float64"))


@pytest.mark.parametrize("algorithm", ["auto", "native"])
def test_one_rank_is_a_device_copy(fake, algorithm):
    """p = 1: the own block moves device to device in stream order; nothing is staged."""
    comm = MPI.COMM_SELF
    src = np.arange(10, dtype=np.float32)
    sbuf, rbuf = FakeDeviceArray(src), FakeDeviceArray(np.zeros(12, np.float32))
    pya2a.Alltoallv(comm, [sbuf, ([7], [2])], [rbuf, ([7], [4])], algorithm=algorithm)
    fake.sync(fake.main)
    want = np.zeros(12, np.float32)
    want[4:11] = src[2:9]
    np.testing.assert_array_equal(rbuf.arr, want)
    assert fake.pinned_calls == 0 and not fake.registered
    pya2a.Alltoallv(comm, MPI.IN_PLACE, [rbuf, ([7], [4])], algorithm=algorithm)
    fake.sync(fake.main)
    np.testing.assert_array_equal(rbuf.arr, want)


def test_launch_config_matches_cuda_h_layout():
    """The launcher's CUlaunchConfig / CUlaunchAttribute (cuda.h, CUDA 12-13, 64-bit)."""
    from pya2a.gpu import _launch

    assert _launch.layout() == (56, 72, 32, 40, 48, 8)


def test_launcher_without_a_driver_says_so():
    """Where libcuda is missing the launcher reports it (the engine then uses CuPy)."""
    from pya2a.gpu import _launch

    if _launch.available():
        pytest.skip("a CUDA driver is present")
    assert not _launch.has_launch_ex()
    with pytest.raises(RuntimeError, match="libcuda"):
        _launch.Launcher(0, 1, 32, 0)


@pytest.mark.parametrize("name", ["Ialltoallv", "Ialltoall", "Ialltoallw", "Alltoallv_init"])
def test_comm_refuses_device_buffers_for_the_library_calls_without_cuda_aware_mpi(
        comm, fake, monkeypatch, name):
    """pya2a.Comm keeps the library's own non-blocking / w / persistent all-to-alls, but a
    device buffer with an MPI that is not CUDA-aware raises instead of crashing in MPI."""
    if not hasattr(MPI.Intracomm, name):
        pytest.skip(f"this mpi4py has no {name}")
    monkeypatch.setattr(gdev, "cuda_aware", lambda: False)
    p = comm.Get_size()
    c = pya2a.Comm(comm)
    dev = FakeDeviceArray(np.zeros(p, np.float64))
    host = np.zeros(p, np.float64)
    if name == "Ialltoallw":
        msg = [dev, [1] * p, [8 * j for j in range(p)], [MPI.DOUBLE] * p]
        hmsg = [host, [1] * p, [8 * j for j in range(p)], [MPI.DOUBLE] * p]
        args, hargs = (msg, hmsg), (hmsg, msg)
    else:
        args, hargs = (dev, host), (host, dev)
    for a in (args, hargs):  # device send, then device receive
        with pytest.raises(TypeError, match="not CUDA-aware"):
            getattr(c, name)(*a)
    # host buffers still reach the library's own call
    src = np.arange(p, dtype=np.float64) + 10 * comm.Get_rank()
    out = np.zeros(p, np.float64)
    if name == "Ialltoallw":
        disp = [8 * j for j in range(p)]
        c.Ialltoallw([src, [1] * p, disp, [MPI.DOUBLE] * p],
                     [out, [1] * p, disp, [MPI.DOUBLE] * p]).Wait()
    elif name == "Alltoallv_init":
        if MPI.Get_version() < (4, 0):  # MPI-3 libraries have no persistent collectives
            return
        req = c.Alltoallv_init(src, out)
        req.Start()
        req.Wait()
        req.Free()
    else:
        getattr(c, name)(src, out).Wait()
    np.testing.assert_array_equal(out, np.arange(p) * 10.0 + comm.Get_rank())


# ---------------------------------------------------------------------------------------
# Alltoallw on (emulated) device buffers: the pack kernel's table, staged exchange, unpack
# ---------------------------------------------------------------------------------------
def _subarray_types(shape, axis, p):
    out = []
    for i in range(p):
        n, s = divmod(shape[axis], p)[0] + (i < shape[axis] % p), \
            i * (shape[axis] // p) + min(i, shape[axis] % p)
        sub, st = list(shape), [0] * len(shape)
        sub[axis], st[axis] = n, s
        out.append(MPI.DOUBLE.Create_subarray(list(shape), sub, st).Commit())
    return out


@pytest.mark.parametrize("algorithm", DEVICE_ALGORITHMS)
def test_fake_device_alltoallw_matches_mpi(comm, fake_any, algorithm):
    """A pencil transpose with subarray types on device buffers equals MPI's own on host."""
    p, r = comm.Get_size(), comm.Get_rank()
    a_shape, b_shape = (5, 3 * p + 1, 4), (5 * p, 3, 4)  # split axis 1 -> gather axis 0
    rng = np.random.default_rng([SEED, r])
    host = rng.standard_normal((5, 3 * p + 1, 4))
    counts = [int(3 * p + 1) // p + (j < (3 * p + 1) % p) for j in range(p)]
    b_shape = (5 * p, counts[r], 4)
    st = _subarray_types(a_shape, 1, p)
    rt = _subarray_types(b_shape, 0, p)
    cd = ([1] * p, [0] * p)
    try:
        ref = np.zeros(b_shape)
        comm.Alltoallw([host, cd, st], [ref, cd, rt])
        for _ in range(2):  # the second call runs the cached plan
            dev_in, dev_out = FakeDeviceArray(host.copy()), FakeDeviceArray(np.zeros(b_shape))
            used = pya2a.Alltoallw(comm, [dev_in, cd, st], [dev_out, cd, rt],
                                   algorithm=algorithm)
            fake_any.sync(fake_any.main)
            assert used != "mpi"
            np.testing.assert_array_equal(dev_out.arr, ref)
    finally:
        for t in (*st, *rt):
            t.Free()


def test_fake_device_alltoallw_in_place(comm, fake):
    p, r = comm.Get_size(), comm.Get_rank()
    t = MPI.DOUBLE.Create_vector(2, 1, 2).Commit()  # 2 doubles of every other slot
    try:
        host = np.arange(4.0 * p) + 100 * r
        ref = host.copy()
        cd = ([1] * p, [32 * j for j in range(p)])
        comm.Alltoallw(MPI.IN_PLACE, [ref, cd, [t] * p])
        dev = FakeDeviceArray(host.copy())
        pya2a.Alltoallw(comm, MPI.IN_PLACE, [dev, cd, [t] * p])
        fake.sync(fake.main)
        np.testing.assert_array_equal(dev.arr, ref)
    finally:
        t.Free()


def test_fake_device_alltoallw_refuses_undecodable(comm, fake):
    p = comm.Get_size()
    t = MPI.DOUBLE.Create_darray(1, 0, [4], [MPI.DISTRIBUTE_CYCLIC], [2], [1]).Commit()
    try:
        dev = FakeDeviceArray(np.zeros(4 * p))
        cd = ([1] * p, [32 * j for j in range(p)])
        with pytest.raises(TypeError, match="cannot decode"):
            pya2a.Alltoallw(comm, [FakeDeviceArray(np.ones(4 * p)), cd, [t] * p],
                            [dev, cd, [t] * p])
    finally:
        t.Free()


@pytest.mark.parametrize("same", [False, True])
def test_self_copy_is_one_copy_in_stream_order(fake, same):
    """gpu.device.SelfCopy (a repeated one-rank device call): copy, then wait; in place
    (the same address) nothing is copied."""
    src = FakeDeviceArray(np.arange(8, dtype=np.float64))
    dst = src if same else FakeDeviceArray(np.zeros(8))
    a, b = src.arr.ctypes.data + 8, (dst.arr.ctypes.data + 16) if not same else None
    copy = gdev.SelfCopy(0, a if same else b, a, 24)
    queued = len(fake.main.ops)
    assert copy.run()
    assert fake.main.ran == len(fake.main.ops), "the copy was not waited for"
    assert len(fake.main.ops) == queued + (0 if same else 1)
    want = np.arange(8, dtype=np.float64)
    if not same:
        want = np.zeros(8)
        want[2:5] = [1, 2, 3]
    np.testing.assert_array_equal(dst.arr, want)


@gpu
def test_gpu_one_rank_repeated_call_is_one_copy(cp):
    """p = 1, the same CuPy buffers each call: the cached path copies the own block in
    stream order (after work still queued on the current stream) and stays correct."""
    from pya2a import _oneshot
    from pya2a.core.state import state

    comm = MPI.COMM_SELF
    src = cp.zeros(1 << 16, cp.float32)
    dst = cp.zeros(1 << 16, cp.float32)
    pya2a.Alltoallv(comm, src, dst)
    before = state(comm).slot("oneshot.signatures", _oneshot.FastCache).seq
    for it in range(5):
        for _ in range(10):  # queued work the copy must wait for
            src += 1
        pya2a.Alltoallv(comm, src, dst)
        np.testing.assert_array_equal(cp.asnumpy(dst), np.full(1 << 16, 10 * (it + 1),
                                                              np.float32))
    assert state(comm).slot("oneshot.signatures", _oneshot.FastCache).seq == before
    pya2a.Alltoallv(comm, MPI.IN_PLACE, dst)
    np.testing.assert_array_equal(cp.asnumpy(dst), np.full(1 << 16, 50, np.float32))
