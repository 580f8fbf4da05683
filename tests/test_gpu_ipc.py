"""GPU IPC all-to-all backend: correctness on real GPUs (skips without CuPy or a GPU).

Run under ``mpiexec -n {1,2,4} python -m pytest tests/test_gpu_ipc.py``, one GPU per
rank. Every rank derives the whole count matrix and all data from a shared seed, so
it knows exactly what it must receive. No timing here (see pya2a/gpu/bench.py).
"""

from __future__ import annotations

import numpy as np
import pytest

cupy = pytest.importorskip("cupy")
MPI = pytest.importorskip("mpi4py.MPI")

try:
    _NDEV = cupy.cuda.runtime.getDeviceCount()
except Exception:  # no driver / no device
    _NDEV = 0
if _NDEV == 0:
    pytest.skip("no CUDA device", allow_module_level=True)

from pya2a.gpu.ipc_alltoallv import IpcAlltoallv  # noqa: E402

COMM = MPI.COMM_WORLD
RANK = COMM.Get_rank()
P = COMM.Get_size()
cupy.cuda.Device(RANK % _NDEV).use()


@pytest.fixture(scope="module")
def engine():
    ok, why = IpcAlltoallv.available(COMM)
    if not ok:
        pytest.skip(f"ipc backend not available: {why}")
    eng = IpcAlltoallv(COMM, capacity_bytes=1 << 20)
    yield eng
    eng.free()


def _counts(rng: np.random.Generator, kind: str, maxc: int) -> np.ndarray:
    """p x p element counts: C[i, j] = elements rank i sends to rank j."""
    if kind == "random":
        c = rng.integers(0, maxc + 1, size=(P, P))
        c[rng.random((P, P)) < 0.2] = 0
    elif kind == "skew":  # one hot receiver gets much more than the rest
        c = rng.integers(0, maxc // 16 + 1, size=(P, P))
        c[:, rng.integers(P)] = maxc
    elif kind == "zeros":
        c = np.zeros((P, P), dtype=np.int64)
    else:  # uniform
        c = np.full((P, P), maxc)
    return c.astype(np.int64)


def _displs(rng: np.random.Generator, counts: np.ndarray, gaps: bool) -> np.ndarray:
    g = rng.integers(0, 4, size=counts.shape) if gaps else np.zeros_like(counts)
    d = np.zeros_like(counts)
    d[1:] = np.cumsum(counts[:-1] + g[:-1])
    return d


def _value(src, dst, k, it, dtype):
    v = (src * 131 + dst * 17 + k * 3 + it * 7) % 251
    return v.astype(dtype)


def _make(counts, sd_all, rd_all, dtype, it, recv=None, send=None):
    """Send buffer for this rank and the expected receive buffer (sentinel in gaps)."""
    sc, rc = counts[RANK], counts[:, RANK]
    sd, rd = sd_all[RANK], rd_all[RANK]
    slen = int((sd + sc).max()) if P else 0
    rlen = int((rd + rc).max()) if P else 0
    if send is None:
        send = cupy.zeros(max(slen, 1), dtype=dtype)
    exp = cupy.full(max(rlen, 1), 99, dtype=dtype)
    for j in range(P):
        k = cupy.arange(int(sc[j]))
        send[int(sd[j]): int(sd[j]) + int(sc[j])] = _value(RANK, j, k, it, dtype)
        k = cupy.arange(int(rc[j]))
        exp[int(rd[j]): int(rd[j]) + int(rc[j])] = _value(j, RANK, k, it, dtype)
    if recv is None:
        recv = cupy.full(max(rlen, 1), 99, dtype=dtype)
    else:
        recv[...] = 99
    return send, recv, exp, sc, sd, rc, rd


def _bytes(a, dtype):
    return np.asarray(a, dtype=np.int64) * np.dtype(dtype).itemsize


def _run_case(eng, method, dtype, kind, seed, symmetric_recv, symmetric_send, gaps=True,
              plan=False):
    rng = np.random.default_rng(seed)
    counts = _counts(rng, kind, maxc=3000)
    sd_all = np.stack([_displs(rng, counts[i], gaps) for i in range(P)])
    rd_all = np.stack([_displs(rng, counts[:, i], gaps) for i in range(P)])
    isz = np.dtype(dtype).itemsize
    rlen = max(int((rd_all[RANK] + counts[:, RANK]).max()), 1)
    slen = max(int((sd_all[RANK] + counts[RANK]).max()), 1)
    rmax = max(int((rd_all + counts.T).max()), 1)
    smax = max(int((sd_all + counts).max()), 1)
    recv = eng.alloc_symmetric(rmax * isz, dtype)[:rlen] if symmetric_recv else None
    send = eng.alloc_symmetric(smax * isz, dtype)[:slen] if symmetric_send else None
    send, recv, exp, sc, sd, rc, rd = _make(counts, sd_all, rd_all, dtype, 0, recv, send)
    args = (send, _bytes(sc, dtype), _bytes(sd, dtype), recv, _bytes(rc, dtype),
            _bytes(rd, dtype))
    if plan:
        eng.plan(*args, method=method).run()
    else:
        eng.alltoallv(*args, method=method)
    cupy.cuda.get_current_stream().synchronize()
    bad = int(cupy.count_nonzero(recv != exp))
    assert COMM.allreduce(bad) == 0, f"{method} {dtype} {kind}: {bad} wrong elements here"


@pytest.mark.parametrize("dtype", [np.uint8, np.float32, np.int64, np.complex128])
@pytest.mark.parametrize("kind", ["random", "skew", "zeros", "uniform"])
def test_push_staged(engine, dtype, kind):
    _run_case(engine, "push", dtype, kind, 11, False, False)


@pytest.mark.parametrize("dtype", [np.uint8, np.float64])
@pytest.mark.parametrize("kind", ["random", "skew"])
def test_push_symmetric_recv_in_place(engine, dtype, kind):
    _run_case(engine, "push", dtype, kind, 12, True, False)


@pytest.mark.parametrize("kind", ["random", "skew", "zeros"])
def test_pull_symmetric_send(engine, kind):
    _run_case(engine, "pull", np.int32, kind, 13, False, True)


@pytest.mark.parametrize("kind", ["random", "skew"])
def test_copy_engine(engine, kind):
    _run_case(engine, "ce", np.float32, kind, 14, False, False)


@pytest.mark.parametrize("dtype", [np.uint8, np.int16, np.float32, np.complex128])
@pytest.mark.parametrize("kind", ["random", "skew", "zeros", "uniform"])
def test_ll(engine, dtype, kind):
    _run_case(engine, "ll", dtype, kind, 17, False, False)


def test_ll_rejects_large_blocks(engine):
    n = engine.ll_bytes + 4
    x = cupy.zeros(P * n, dtype=np.uint8)
    c = np.full(P, n, dtype=np.int64)
    with pytest.raises(ValueError, match="ll"):
        engine.alltoallv(x, c, c * np.arange(P), x.copy(), c, c * np.arange(P), method="ll")


@pytest.mark.parametrize("symmetric", [True, False])
def test_copy_engine_plan(engine, symmetric):
    # a 'ce' plan exchanges receive addresses: copies land in place when symmetric
    _run_case(engine, "ce", np.float64, "random", 18, symmetric, False, plan=True)


def test_mixed_methods_in_sequence(engine):
    # flags and sequence numbers are shared by all methods: interleave them
    for i, m in enumerate(["ll", "push", "ll", "ll", "pull", "ce", "push", "ll"]):
        _run_case(engine, m, np.int32, "random", 40 + i, i % 2 == 0, m == "pull")


def test_misaligned_displacements(engine):
    # uint8 with gaps: blocks start at arbitrary byte offsets (scalar copy paths)
    _run_case(engine, "push", np.uint8, "random", 15, False, False, gaps=True)
    _run_case(engine, "push", np.uint8, "random", 16, True, False, gaps=True)
    _run_case(engine, "ll", np.uint8, "random", 19, False, False, gaps=True)


def test_pull_needs_symmetric_sendbuf(engine):
    x = cupy.zeros(P, dtype=np.uint8)
    one = np.ones(P, dtype=np.int64)
    with pytest.raises(ValueError, match="symmetric"):
        engine.alltoallv(x, one, np.arange(P), x.copy(), one, np.arange(P), method="pull")


@pytest.mark.parametrize("method,symmetric",
                         [("ll", False), ("push", True), ("push", False), ("pull", False)])
def test_repeated_calls_changing_data(engine, method, symmetric):
    """1000 back-to-back calls, new data each time, no host sync: catches reuse races."""
    rng = np.random.default_rng(21)
    counts = _counts(rng, "random", maxc=2048)
    sd_all = np.stack([_displs(rng, counts[i], False) for i in range(P)])
    rd_all = np.stack([_displs(rng, counts[:, i], False) for i in range(P)])
    dtype = np.int64
    rlen = max(int((rd_all[RANK] + counts[:, RANK]).max()), 1)
    rmax = max(int((rd_all + counts.T).max()), 1)
    smax = max(int((sd_all + counts).max()), 1)
    slen = max(int((sd_all[RANK] + counts[RANK]).max()), 1)
    recv = engine.alloc_symmetric(rmax * 8, dtype)[:rlen] if symmetric else None
    send = engine.alloc_symmetric(smax * 8, dtype)[:slen] if method == "pull" else None
    send, recv, exp, sc, sd, rc, rd = _make(counts, sd_all, rd_all, dtype, 0, recv, send)
    base_send, base_exp = send.copy(), exp.copy()
    mask = exp != 99
    bad = cupy.zeros((), dtype=np.int64)
    args = (_bytes(sc, dtype), _bytes(sd, dtype), _bytes(rc, dtype), _bytes(rd, dtype))
    for it in range(1000):
        cupy.add(base_send, it, out=send)           # sender rewrites its buffer each call
        engine.alltoallv(send, args[0], args[1], recv, args[2], args[3], method=method)
        bad += cupy.count_nonzero((recv != base_exp + it) & mask)
        recv.fill(-1)                               # receiver reuses its buffer at once
    cupy.cuda.get_current_stream().synchronize()
    assert COMM.allreduce(int(bad)) == 0


@pytest.mark.parametrize("method", ["ll", "push"])
def test_cuda_graph_capture(engine, method):
    rng = np.random.default_rng(31)
    counts = _counts(rng, "random", maxc=1000)
    sd_all = np.stack([_displs(rng, counts[i], False) for i in range(P)])
    rd_all = np.stack([_displs(rng, counts[:, i], False) for i in range(P)])
    send, recv, exp, sc, sd, rc, rd = _make(counts, sd_all, rd_all, np.float32, 0)
    stream = cupy.cuda.Stream(non_blocking=True)
    plan = engine.plan(send, _bytes(sc, np.float32), _bytes(sd, np.float32), recv,
                       _bytes(rc, np.float32), _bytes(rd, np.float32), method=method)
    with stream:
        stream.begin_capture()
        for _ in range(3):
            plan.run(stream=stream)
        graph = stream.end_capture()
    for _ in range(5):
        recv.fill(0)
        graph.launch(stream)
    stream.synchronize()
    bad = int(cupy.count_nonzero(recv != exp))
    assert COMM.allreduce(bad) == 0


def test_choose_thresholds():
    assert IpcAlltoallv.choose(0) == "ll"
    assert IpcAlltoallv.choose(IpcAlltoallv.LL_UPTO) == "ll"
    assert IpcAlltoallv.choose(IpcAlltoallv.LL_UPTO + 1) == "push"
    assert IpcAlltoallv.choose(1 << 28) == "push"
    assert IpcAlltoallv.choose(1 << 28, inplace_plan=True) == "ce"


def test_available_is_collective_and_identical():
    ok, why = IpcAlltoallv.available(COMM)
    both = COMM.allgather((ok, why))
    assert all(b == both[0] for b in both)


if __name__ == "__main__":  # mpiexec -n 4 python tests/test_gpu_ipc.py
    import sys

    sys.exit(pytest.main([__file__, "-q", "-x", "-p", "no:cacheprovider", *sys.argv[1:]]))
