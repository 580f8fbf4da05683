"""GPU IPC all-to-all backend: correctness on real GPUs (skips without CuPy or a GPU).

Run under ``mpiexec -n {1,2,4} python -m pytest tests/test_gpu_ipc.py``, one GPU per
rank. Every rank derives the whole count matrix and all data from a shared seed, so
it knows exactly what it must receive. No timing here (see pya2a/tools/gpu_bench.py).
"""

from __future__ import annotations

import os

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
    # a non-blocking stream does not wait for the legacy default stream, where _make wrote
    # the send data: without this the replays may read it half written (seen under
    # compute-sanitizer racecheck, whose slow kernels let the replays win the race)
    cupy.cuda.get_current_stream().synchronize()
    stream = cupy.cuda.Stream(non_blocking=True)
    plan = engine.plan(send, _bytes(sc, np.float32), _bytes(sd, np.float32), recv,
                       _bytes(rc, np.float32), _bytes(rd, np.float32), method=method)
    with stream:
        stream.begin_capture()
        for _ in range(3):
            plan.run(stream=stream)
        graph = stream.end_capture()
    for _ in range(5):
        with stream:  # ordered before the replay; 99 is what exp holds where nothing lands
            recv.fill(99)  # (at p = 1 with an empty own block, that is the whole buffer)
        graph.launch(stream)
    stream.synchronize()
    bad = int(cupy.count_nonzero(recv != exp))
    assert COMM.allreduce(bad) == 0


def _pdl_supported() -> bool:
    from pya2a.gpu.ipc_alltoallv import pdl_supported

    ok = pdl_supported(cupy, cupy.cuda.Device().id)
    return COMM.allreduce(int(ok), op=MPI.MIN) == 1


@pytest.mark.parametrize("case", ["repeated-ll", "repeated-push", "graph-ll", "graph-push"])
def test_programmatic_dependent_launch(engine, case):
    """The same races and graph replays with launches through cuLaunchKernelEx + PDL, where
    the next call's grid is scheduled while the previous one drains (sm_90+)."""
    if not _pdl_supported():
        pytest.skip("programmatic dependent launch needs sm_90+ and cuLaunchKernelEx")
    kind, method = case.split("-")
    eng = engine
    if engine.share.ranks_per_device > 1:  # grids sized for PDL's second resident grid
        os.environ["PYA2A_IPC_PDL"] = "1"
        try:
            eng = IpcAlltoallv(COMM, capacity_bytes=1 << 20)
        finally:
            del os.environ["PYA2A_IPC_PDL"]
        assert eng.pdl
    old, eng.pdl = eng.pdl, True
    try:
        if kind == "repeated":
            test_repeated_calls_changing_data(eng, method, method == "push")
        else:
            test_cuda_graph_capture(eng, method)
    finally:
        eng.pdl = old
        if eng is not engine:
            eng.free()


def test_grid_fits_beside_the_other_ranks_on_the_gpu(engine):
    """Ranks sharing a GPU: every rank's waiting grids (two with PDL) and the copy-engine
    flag kernel fit on the client's multiprocessors together, one block per SM."""
    from pya2a.gpu.ipc import client_sms

    r = engine.share.ranks_per_device
    sms = client_sms(engine.device)
    grids = 2 if engine.pdl else 1
    if r == 1:
        assert engine.grid_max <= sms
    else:
        assert r * (grids * engine.grid_max + 1) <= sms
    assert engine.share.ranks_per_device == COMM.allreduce(engine.share.ranks_per_device,
                                                           op=MPI.MAX)


@pytest.mark.parametrize("method", ["ll", "push", "pull", "ce"])
@pytest.mark.parametrize("grid", [1, 3])
def test_small_grids_walk_every_role(engine, method, grid):
    """Grids smaller than the number of (peer, chunk) roles, as ranks sharing a GPU get
    them: each block walks several roles phase by phase; results stay exact."""
    old = engine.grid_max
    engine.grid_max = grid
    engine._cache.clear()
    try:
        rng = np.random.default_rng(4242)
        c = _counts(rng, "random", 3000 if method != "ll" else 700)
        c = c * 16  # bytes
        sd = np.concatenate([[0], np.cumsum(c[RANK])[:-1]])
        rd = np.concatenate([[0], np.cumsum(c[:, RANK])[:-1]])
        if method == "pull":  # one symmetric buffer for both grid sizes
            if getattr(engine, "_walk_send", None) is None:
                engine._walk_send = engine.alloc_symmetric(1 << 20)
            send = engine._walk_send
        else:
            send = cupy.empty(max(int(c[RANK].sum()), 1), dtype=cupy.uint8)
        for it in range(3):
            host = np.concatenate([
                ((np.arange(int(c[RANK, j])) * 7 + RANK * 31 + j * 5 + it) % 251)
                .astype(np.uint8) for j in range(P)]) if P else np.zeros(0, np.uint8)
            if host.size:
                send[:host.size] = cupy.asarray(host)
            recv = cupy.full(max(int(c[:, RANK].sum()), 1), 255, dtype=cupy.uint8)
            engine.alltoallv(send, c[RANK], sd, recv, c[:, RANK], rd, method=method)
            want = np.concatenate([
                ((np.arange(int(c[i, RANK])) * 7 + i * 31 + RANK * 5 + it) % 251)
                .astype(np.uint8) for i in range(P)])
            got = cupy.asnumpy(recv[:want.size])
            assert COMM.allreduce(int((got != want).sum())) == 0, it
    finally:
        engine.grid_max = old
        engine._cache.clear()


# ---------------------------------------------------------------- registered buffers
def _layout(seed, kind, maxc):
    rng = np.random.default_rng(seed)
    counts = _counts(rng, kind, maxc=maxc)
    sd_all = np.stack([_displs(rng, counts[i], True) for i in range(P)])
    rd_all = np.stack([_displs(rng, counts[:, i], True) for i in range(P)])
    return counts, sd_all, rd_all


def _rlen(counts, rd_all):
    return max(int((rd_all[RANK] + counts[:, RANK]).max()), 1)


def _check_eager(eng, method, counts, sd_all, rd_all, dtype, recv, it=0, direct=None):
    send, recv, exp, sc, sd, rc, rd = _make(counts, sd_all, rd_all, dtype, it, recv)
    eng.alltoallv(send, _bytes(sc, dtype), _bytes(sd, dtype), recv, _bytes(rc, dtype),
                  _bytes(rd, dtype), method=method, direct=direct)
    cupy.cuda.get_current_stream().synchronize()
    bad = int(cupy.count_nonzero(recv != exp))
    assert COMM.allreduce(bad) == 0, f"{method} it={it}: {bad} wrong elements here"


@pytest.mark.parametrize("method,direct", [("ce", None), ("push", True)])
@pytest.mark.parametrize("kind", ["random", "skew", "zeros", "uniform"])
def test_registered_pool_buffer_larger_than_staging(engine, method, direct, kind):
    """Blocks of up to 2 MiB with 1 MiB staging slots: only the direct path can take them."""
    dtype = np.float64
    counts, sd_all, rd_all = _layout(50, kind, maxc=(2 << 20) // 8)
    recv = cupy.empty(_rlen(counts, rd_all), dtype=dtype)  # CuPy memory pool
    _check_eager(engine, method, counts, sd_all, rd_all, dtype, recv, direct=direct)
    reg = engine.register_recv(recv, _bytes(rd_all[RANK], dtype))
    assert reg is engine._reg  # unchanged buffer: no new exchange
    assert reg.direct_here and reg.everyone


@pytest.mark.parametrize("method", ["ce", "push"])
def test_unregistered_pool_buffer_is_staged(engine, method):
    dtype = np.int16
    counts, sd_all, rd_all = _layout(57, "random", maxc=1 << 18)
    recv = cupy.empty(_rlen(counts, rd_all), dtype=dtype)
    _check_eager(engine, method, counts, sd_all, rd_all, dtype, recv, direct=False)


def test_registration_cached_while_buffer_unchanged(engine):
    dtype = np.int32
    counts, sd_all, rd_all = _layout(51, "random", maxc=1 << 16)
    recv = cupy.empty(_rlen(counts, rd_all), dtype=dtype)
    rd = _bytes(rd_all[RANK], dtype)
    r1 = engine.register_recv(recv, rd)
    r2 = engine.register_recv(recv, rd)
    assert r1 is r2  # one Allgather of digests, no exchange
    r3 = engine.register_recv(recv, rd + 4 if P > 1 else rd + 0)  # rdispls changed
    assert (r3 is not r1) == (P > 1)
    assert engine.register_recv(recv, rd) is r1  # alternating: both stay cached


def test_buffers_change_between_calls(engine):
    """Different pool buffers, freed and re-made (same address, new allocation), views."""
    dtype = np.int64
    pool = cupy.get_default_memory_pool()
    counts, sd_all, rd_all = _layout(52, "skew", maxc=(3 << 20) // 8)
    n = _rlen(counts, rd_all)
    for it in range(12):
        if it % 4 == 3:
            pool.free_all_blocks()  # the next array is a new cudaMalloc, maybe at the same VA
        bufs = [cupy.empty(n + 8 + 64 * k, dtype=dtype) for k in range(1 + it % 3)]
        recv = bufs[-1][it % 5: it % 5 + n]  # an offset into the allocation
        _check_eager(engine, "ce" if it % 2 else "push", counts, sd_all, rd_all, dtype,
                     recv, it=it, direct=True)
        del bufs, recv


def test_many_distinct_buffers_evict_old_mappings(engine):
    dtype = np.float32
    counts, sd_all, rd_all = _layout(53, "random", maxc=(1 << 20) // 4)
    n = _rlen(counts, rd_all)
    keep = [cupy.empty(n + 1024 * k, dtype=dtype) for k in range(engine.KEEP_MAPS + 6)]
    for it, buf in enumerate(keep + keep[:3]):
        _check_eager(engine, "ce", counts, sd_all, rd_all, dtype, buf[:n], it=it)
    assert len(engine._maps) <= (engine.KEEP_MAPS + 1) * max(P - 1, 1)


def test_stream_ordered_pool_buffer_falls_back_to_staging(engine):
    """cudaMallocAsync memory cannot be exported: that rank receives staged, others direct."""
    dtype = np.uint8
    counts, sd_all, rd_all = _layout(54, "random", maxc=1 << 19)
    n = _rlen(counts, rd_all)
    if RANK == 0:
        try:
            mem = cupy.cuda.MemoryAsyncPool().malloc(n)
        except Exception as exc:  # no stream-ordered allocator here
            mem = exc
    else:
        mem = None
    ok = COMM.allreduce(0 if isinstance(mem, Exception) else 1, op=MPI.MIN)
    if not ok:
        pytest.skip("cudaMallocAsync not available")
    recv = (cupy.ndarray((n,), dtype=dtype, memptr=mem) if RANK == 0
            else cupy.empty(n, dtype=dtype))
    for method in ("ce", "push"):
        _check_eager(engine, method, counts, sd_all, rd_all, dtype, recv, direct=True)
    reg = engine.register_recv(recv, _bytes(rd_all[RANK], dtype))
    assert reg.direct_here == (RANK != 0)
    assert not reg.everyone or P == 1
    del recv, mem


@pytest.mark.parametrize("method", ["ce", "push"])
def test_registered_repeated_calls_changing_data(engine, method):
    """1000 back-to-back direct calls into a pool buffer, new data each call, no host sync."""
    rng = np.random.default_rng(55)
    counts = _counts(rng, "random", maxc=4096)
    sd_all = np.stack([_displs(rng, counts[i], False) for i in range(P)])
    rd_all = np.stack([_displs(rng, counts[:, i], False) for i in range(P)])
    dtype = np.int64
    send, recv, exp, sc, sd, rc, rd = _make(counts, sd_all, rd_all, dtype, 0)
    base_send, base_exp = send.copy(), exp.copy()
    mask = exp != 99
    bad = cupy.zeros((), dtype=np.int64)
    args = (_bytes(sc, dtype), _bytes(sd, dtype), _bytes(rc, dtype), _bytes(rd, dtype))
    for it in range(1000):
        cupy.add(base_send, it, out=send)
        engine.alltoallv(send, args[0], args[1], recv, args[2], args[3], method=method,
                         direct=True)
        bad += cupy.count_nonzero((recv != base_exp + it) & mask)
        recv.fill(-1)
    cupy.cuda.get_current_stream().synchronize()
    assert COMM.allreduce(int(bad)) == 0


def test_ce_plan_into_pool_buffer_survives_later_registrations(engine):
    dtype = np.float64
    counts, sd_all, rd_all = _layout(56, "random", maxc=1 << 17)
    send, recv, exp, sc, sd, rc, rd = _make(counts, sd_all, rd_all, dtype, 0)
    plan = engine.plan(send, _bytes(sc, dtype), _bytes(sd, dtype), recv, _bytes(rc, dtype),
                       _bytes(rd, dtype), method="ce")
    others = [cupy.empty(recv.size + 512 * k, dtype=dtype) for k in range(engine.KEEP_MAPS + 3)]
    for it, other in enumerate(others):  # evicts unpinned mappings, never the plan's
        _check_eager(engine, "ce", counts, sd_all, rd_all, dtype, other[: recv.size], it=it)
    recv.fill(99)  # the sentinel _make expects in the gaps
    plan.run()
    cupy.cuda.get_current_stream().synchronize()
    bad = int(cupy.count_nonzero(recv != exp))
    assert COMM.allreduce(bad) == 0


def test_choose_direct():
    big = IpcAlltoallv.CE_FROM
    assert IpcAlltoallv.choose(big, direct=True) == "ce"
    assert IpcAlltoallv.choose(big - 1, direct=True) == "push"
    assert IpcAlltoallv.choose(IpcAlltoallv.LL_UPTO, direct=True) == "ll"


@pytest.mark.parametrize("inplace", [False, True])
def test_public_api_large_blocks_direct(engine, inplace):
    """pya2a.Alltoallv(algorithm='ipc') at >= CE_FROM per pair: ce into the user's buffer."""
    import pya2a

    if P < 2:
        pytest.skip("needs peers")
    n = IpcAlltoallv.CE_FROM // 4 + 16  # float32 elements: just over CE_FROM bytes
    c = np.zeros((P, P), dtype=np.int64)  # symmetric, so in place works with it too
    c[0, P - 1] = c[P - 1, 0] = n  # one big block each way, the rest small or empty
    c[P - 1, P - 1] = 7
    if P > 2:
        c[1, 0] = c[0, 1] = 1000
    sc, rc = c[RANK], c[:, RANK]
    rd = np.concatenate([[0], np.cumsum(rc)[:-1]])
    sd = np.concatenate([[0], np.cumsum(sc)[:-1]])
    total = max(int(rc.sum()), int(sc.sum()), 1)
    buf = cupy.full(total, -1, dtype=np.float32)
    exp = cupy.full(total, -1, dtype=np.float32)
    for j in range(P):
        k = cupy.arange(int(sc[j]))
        buf[int(sd[j]): int(sd[j]) + int(sc[j])] = _value(RANK, j, k, 3, np.float32)
        k = cupy.arange(int(rc[j]))
        exp[int(rd[j]): int(rd[j]) + int(rc[j])] = _value(j, RANK, k, 3, np.float32)
    if inplace:
        pya2a.Alltoallv(COMM, MPI.IN_PLACE, [buf, rc], algorithm="ipc")
        out = buf
    else:
        out = cupy.full(total, -1, dtype=np.float32)
        pya2a.Alltoallv(COMM, [buf, sc], [out, rc], algorithm="ipc")
    cupy.cuda.get_current_stream().synchronize()
    bad = int(cupy.count_nonzero(out[: int(rc.sum())] != exp[: int(rc.sum())]))
    assert COMM.allreduce(bad) == 0
    eng = next(iter(pya2a.core.state.state(COMM).slot("ipc.engine").values()))
    assert eng._reg is not None and eng._reg.everyone
    assert eng.slot_bytes < n * 4  # no staging slots grown for the big block


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
