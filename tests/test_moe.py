"""pya2a.moe: expert-parallel dispatch / combine against an all-gather reference.

Runs serially and under ``mpiexec -n N``. Every rank draws its tokens and routing from
(SEED, case, rank), so the reference (all-gather everything, compute locally with plain
loops) needs no other input. Dispatch moves data only, so ``expert_x`` must match exactly;
combine is compared bit for bit too, since the reference accumulates in the same order
with the same float32 operations: k = 0, 1, ... (per_expert mode), or per owner rank in
expert order, rounded to the dtype, then over ranks in rank order (per_rank mode).
"""

from __future__ import annotations

import numpy as np
import pytest
from mpi4py import MPI

import pya2a.moe as moe

from helpers import SEED, skip_unless_fused_moe


def scale(e: int, dtype: np.dtype) -> np.generic:
    """Expert ``e``'s trivial op is a multiplication by this (distinct per expert)."""
    return np.dtype(dtype).type(1 + (e % 7) / 8)


def run_experts(ep: moe.ExpertParallel, expert_x, counts):
    """The test's expert op on the dispatched rows, one contiguous segment per expert."""
    out = expert_x.copy()
    off = np.concatenate([[0], np.cumsum(counts)])
    for le in range(ep.local_experts):
        seg = slice(int(off[le]), int(off[le + 1]))
        out[seg] = expert_x[seg] * scale(ep.first_expert + le, expert_x.dtype)
    return out


def reference(comm: MPI.Intracomm, x, idx, w, num_experts: int, mode: str = "per_expert"):
    """All-gather every rank's tokens and routing; compute this rank's answers with loops."""
    p, me = comm.Get_size(), comm.Get_rank()
    El = num_experts // p
    xs, idxs = comm.allgather(x), comm.allgather(idx)
    expert_x = []
    for le in range(El):
        rows = [xs[s][t] for s in range(p) for t in range(idxs[s].shape[0])
                for j in range(idxs[s].shape[1]) if idxs[s][t, j] == me * El + le]
        expert_x.append(np.array(rows, dtype=x.dtype).reshape(len(rows), x.shape[1]))
    acc_t = np.promote_types(x.dtype, np.float32)
    y = np.zeros(x.shape, dtype=acc_t)
    for t in range(x.shape[0]):
        if mode == "per_rank":  # one partial per owner rank, its experts in expert order
            for r in range(p):
                js = sorted((int(idx[t, j]), j) for j in range(idx.shape[1])
                            if int(idx[t, j]) // El == r)
                if not js:
                    continue
                part = np.zeros(x.shape[1], dtype=acc_t)
                for e, j in js:
                    part = part + (x[t] * scale(e, x.dtype)).astype(acc_t) * acc_t.type(w[t, j])
                y[t] = y[t] + part.astype(x.dtype).astype(acc_t)
            continue
        for j in range(idx.shape[1]):
            row = x[t] * scale(int(idx[t, j]), x.dtype)
            prod = row.astype(acc_t) * acc_t.type(w[t, j])
            y[t] = prod if j == 0 else y[t] + prod
    return expert_x, y.astype(x.dtype)


def make_inputs(comm, case: int, num_experts: int, hidden: int, max_tokens: int, topk: int,
                dtype: str, tokens: str = "random", route: str = "random"):
    """This rank's (x, topk_idx, topk_weight) from the shared seed."""
    me, p = comm.Get_rank(), comm.Get_size()
    rng = np.random.default_rng([SEED, case, me])
    if tokens == "random":
        n = int(rng.integers(0, max_tokens + 1))
    elif tokens == "some_zero":  # every other rank (and rank 0) has no tokens
        n = 0 if me % 2 == 0 else max_tokens
    elif tokens == "none":
        n = 0
    else:
        n = max_tokens
    x = rng.standard_normal((n, hidden)).astype(dtype)
    if route == "random":  # distinct experts per token, like a real top-k
        idx = np.argsort(rng.random((n, num_experts)), axis=1)[:, :topk]
    elif route == "skip":  # expert 0 and the last rank's experts receive nothing
        El = num_experts // p
        allowed = np.array([e for e in range(1, num_experts) if e < num_experts - El or p == 1])
        idx = allowed[rng.integers(0, allowed.size, (n, topk))]
    elif route == "dup":  # repeats inside one token's row
        idx = rng.integers(0, min(2, num_experts), (n, topk))
    elif route == "hot":  # everything to the last expert
        idx = np.full((n, topk), num_experts - 1)
    else:
        raise ValueError(route)
    w = rng.random((n, topk)).astype(np.float32)
    return x, idx.astype(np.int64), w


def check(comm, ep: moe.ExpertParallel, x, idx, w) -> None:
    expert_x, counts, handle = ep.dispatch(x, idx)
    assert ep.mode in ("auto", handle.mode)
    ref_x, ref_y = reference(comm, x, idx, w, ep.num_experts, handle.mode)
    assert counts.dtype == np.int64 and counts.shape == (ep.local_experts,)
    assert [len(r) for r in ref_x] == counts.tolist()
    assert expert_x.shape == (int(counts.sum()), ep.hidden) and expert_x.dtype == x.dtype
    got = np.split(expert_x, np.cumsum(counts)[:-1])
    for le in range(ep.local_experts):
        np.testing.assert_array_equal(got[le], ref_x[le], err_msg=f"local expert {le}")
    y = ep.combine(run_experts(ep, expert_x, counts), w, handle)
    assert y.shape == x.shape and y.dtype == x.dtype
    np.testing.assert_array_equal(y, ref_y)


@pytest.mark.parametrize("mode", ["per_expert", "per_rank"])
@pytest.mark.parametrize("dtype", ["float16", "float32", "float64"])
@pytest.mark.parametrize("topk", [1, 2, 4])
def test_dispatch_combine_match_reference(comm, dtype: str, topk: int, mode: str) -> None:
    p = comm.Get_size()
    E, H, T = 4 * p, 12, 9
    ep = moe.ExpertParallel(comm, E, H, T, topk, dtype, mode=mode)
    check(comm, ep, *make_inputs(comm, 1 + topk, E, H, T, topk, dtype))


@pytest.mark.parametrize("mode", ["per_expert", "per_rank", "auto"])
@pytest.mark.parametrize(("tokens", "route"), [
    ("some_zero", "random"), ("none", "random"), ("full", "skip"), ("random", "dup"),
    ("full", "hot"),
])
def test_uneven_routing(comm, tokens: str, route: str, mode: str) -> None:
    """Zero-token ranks, experts (and whole ranks) receiving nothing, duplicates, one hot
    expert."""
    p = comm.Get_size()
    E, H, T, K = 2 * p, 8, 6, 2
    ep = moe.ExpertParallel(comm, E, H, T, K, np.float32, mode=mode)
    check(comm, ep, *make_inputs(comm, 11, E, H, T, K, "float32", tokens, route))


def _expected_traffic(comm, idx, num_experts: int, row_bytes: int) -> dict[str, int]:
    """Bytes this rank sends to other ranks in one step, per mode, from its routing."""
    p, me = comm.Get_size(), comm.Get_rank()
    dest = idx // (num_experts // p)
    entries = int((dest != me).sum())
    copies = sum(len({int(d) for d in row} - {me}) for row in dest)
    return {"per_expert": 2 * entries * row_bytes,
            "per_rank": 2 * copies * row_bytes + 2 * 4 * entries}


@pytest.mark.parametrize("mode", ["per_expert", "per_rank", "auto"])
def test_traffic_per_mode_and_auto_picks_the_smaller(comm, mode: str) -> None:
    """Bytes sent to other ranks: one row per (token, expert) pair, or one row per (token,
    rank) plus a 4-byte index and a 4-byte weight per pair; auto takes the smaller total."""
    p = comm.Get_size()
    E, H, T, K = 4 * p, 16, 10, 4
    ep = moe.ExpertParallel(comm, E, H, T, K, np.float32, mode=mode)
    x, idx, w = make_inputs(comm, 13, E, H, T, K, "float32", "full")
    expert_x, counts, h = ep.dispatch(x, idx)
    ep.combine(run_experts(ep, expert_x, counts), w, h)
    want = _expected_traffic(comm, idx, E, ep.row_bytes)
    totals = {m: comm.allreduce(v) for m, v in want.items()}
    picked = mode if mode != "auto" else (
        "per_rank" if totals["per_rank"] < totals["per_expert"] else "per_expert")
    assert h.mode == picked
    assert ep.traffic["dispatch"] == want[picked] // 2  # what this rank sends out
    sent = ep.traffic["dispatch"] + ep.traffic["combine"]  # combine sends what others sent
    assert comm.allreduce(sent) == totals[picked]
    assert ep.traffic["dispatch_backward"] == ep.traffic["combine_backward"] == 0


def test_one_expert_per_rank_and_topk_equal_experts(comm) -> None:
    p = comm.Get_size()
    ep = moe.ExpertParallel(comm, p, 5, 7, p, np.float32)
    x, _, w = make_inputs(comm, 12, p, 5, 7, p, "float32")
    idx = np.tile(np.arange(p)[::-1], (x.shape[0], 1))
    check(comm, ep, x, idx, np.ascontiguousarray(w))


def test_steady_state_reuses_buffers(comm) -> None:
    """Repeated calls with changing routing give right answers and reuse one buffer."""
    p = comm.Get_size()
    E, H, T, K = 2 * p, 6, 8, 2
    ep = moe.ExpertParallel(comm, E, H, T, K, np.float32)
    bases = set()
    for it in range(3):
        x, idx, w = make_inputs(comm, 20 + it, E, H, T, K, "float32")
        check(comm, ep, x, idx, w)
        ex, _, _ = ep.dispatch(x, idx)
        bases.add(ex.base.__array_interface__["data"][0] if ex.base is not None else None)
    assert len(bases) == 1


def test_combine_into_out_and_expert_x_in_place(comm) -> None:
    p = comm.Get_size()
    E, H, T, K = 2 * p, 4, 5, 2
    ep = moe.ExpertParallel(comm, E, H, T, K, np.float32)
    x, idx, w = make_inputs(comm, 30, E, H, T, K, "float32", "full")
    ex, counts, h = ep.dispatch(x, idx)
    ex[...] = run_experts(ep, ex, counts)  # the expert op writes over its input
    out = np.full_like(x, np.nan)
    y = ep.combine(ex, w, h, out=out)
    assert y is out
    np.testing.assert_array_equal(out, reference(comm, x, idx, w, E)[1])


@pytest.mark.parametrize("mode", ["per_expert", "per_rank"])
def test_library_reference_agrees(comm, mode: str) -> None:
    """pya2a.moe.reference (used by examples/moe.py) against the loop reference here."""
    p = comm.Get_size()
    E, H, T, K = 2 * p, 4, 5, 3
    x, idx, w = make_inputs(comm, 31, E, H, T, K, "float16", route="dup" if p == 1 else "random")
    ex, y = moe.reference(comm, x, idx, w, E, lambda e, r: r * scale(e, r.dtype), mode)
    rx, ry = reference(comm, x, idx, w, E, mode)
    for a, b in zip(ex, rx, strict=True):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(y, ry)


# ---------------------------------------------------------------------------------------
# errors: a bad argument on one rank raises on every rank, nothing hangs
def _bad_on_last(comm, good, bad):
    return bad if comm.Get_rank() == comm.Get_size() - 1 else good


def test_num_experts_not_multiple_of_size(comm) -> None:
    p = comm.Get_size()
    E = 2 * p + 1 if p > 1 else 0
    with pytest.raises(ValueError, match="num_experts"):
        moe.ExpertParallel(comm, E, 4, 4, 1, np.float32)


def test_config_differs_across_ranks(comm) -> None:
    p = comm.Get_size()
    hidden = _bad_on_last(comm, 4, 4 if p == 1 else 5)
    if p == 1:
        pytest.skip("needs two ranks")
    with pytest.raises(ValueError, match="different hidden"):
        moe.ExpertParallel(comm, p, hidden, 4, 1, np.float32)


@pytest.mark.parametrize(("kw", "exc", "match"), [
    ({"topk": 0}, ValueError, "topk"),
    ({"hidden": 2.5}, TypeError, "hidden"),
    ({"dtype": "not-a-dtype"}, TypeError, "dtype"),
    ({"backend": "nope"}, ValueError, "unknown backend"),
    ({"backend": "fused"}, ValueError, "device"),
    ({"mode": "per_token"}, ValueError, "unknown mode"),
    ({"device": -1}, TypeError, "device"),
])
def test_bad_constructor_argument_on_one_rank(comm, kw, exc, match) -> None:
    args = {"num_experts": comm.Get_size(), "hidden": 4, "max_tokens": 4, "topk": 1,
            "dtype": np.float32}
    if comm.Get_rank() == comm.Get_size() - 1:
        args.update(kw)
    with pytest.raises(exc, match=match):
        moe.ExpertParallel(comm, **args)


@pytest.mark.parametrize("what", ["x_shape", "x_dtype", "x_list", "too_many", "idx_range",
                                  "idx_float", "idx_shape"])
def test_bad_dispatch_argument_on_one_rank(comm, what: str) -> None:
    p = comm.Get_size()
    E, H, T, K = 2 * p, 4, 5, 2
    ep = moe.ExpertParallel(comm, E, H, T, K, np.float32)
    x, idx, _ = make_inputs(comm, 40, E, H, T, K, "float32", "full")
    bad_x, bad_idx, exc = x, idx, ValueError
    if what == "x_shape":
        bad_x = np.zeros((T, H + 1), np.float32)
    elif what == "x_dtype":
        bad_x, exc = x.astype(np.float64), TypeError
    elif what == "x_list":
        bad_x, exc = x.tolist(), TypeError
    elif what == "too_many":
        bad_x, bad_idx = np.zeros((T + 1, H), np.float32), np.zeros((T + 1, K), np.int64)
    elif what == "idx_range":
        bad_idx = idx.copy()
        bad_idx[-1, -1] = E
    elif what == "idx_float":
        bad_idx, exc = idx.astype(np.float32), TypeError
    elif what == "idx_shape":
        bad_idx = idx[:, :1]
    with pytest.raises(exc, match="dispatch"):
        ep.dispatch(_bad_on_last(comm, x, bad_x), _bad_on_last(comm, idx, bad_idx))
    check(comm, ep, x, idx, np.ones((T, K), np.float32))  # still usable afterwards


@pytest.mark.parametrize("what", ["y_shape", "y_dtype", "w_shape", "w_int", "handle",
                                  "foreign_handle", "out_shape"])
def test_bad_combine_argument_on_one_rank(comm, what: str) -> None:
    p = comm.Get_size()
    E, H, T, K = 2 * p, 4, 5, 2
    ep = moe.ExpertParallel(comm, E, H, T, K, np.float32)
    other = moe.ExpertParallel(comm, E, H, T, K, np.float32)
    x, idx, w = make_inputs(comm, 41, E, H, T, K, "float32", "full")
    ex, counts, h = ep.dispatch(x, idx)
    _, _, h_other = other.dispatch(x, idx)
    args = {"expert_y": ex, "topk_weight": w, "handle": h, "out": None}
    exc = ValueError
    if what == "y_shape":
        args["expert_y"] = np.zeros((ex.shape[0] + 1, H), np.float32)
    elif what == "y_dtype":
        args["expert_y"], exc = ex.astype(np.float16), TypeError
    elif what == "w_shape":
        args["topk_weight"] = w[:, :1]
    elif what == "w_int":
        args["topk_weight"], exc = w.astype(np.int32), TypeError
    elif what == "handle":
        args["handle"], exc = object(), TypeError
    elif what == "foreign_handle":
        args["handle"] = h_other
    elif what == "out_shape":
        args["out"] = np.zeros((T, H + 1), np.float32)
    good = {"expert_y": ex, "topk_weight": w, "handle": h, "out": None}
    use = args if comm.Get_rank() == p - 1 else good
    with pytest.raises(exc, match="combine"):
        ep.combine(use["expert_y"], use["topk_weight"], use["handle"], out=use["out"])
    y = ep.combine(run_experts(ep, ex, counts), w, h)
    np.testing.assert_array_equal(y, reference(comm, x, idx, w, E)[1])


def test_receive_capacity_exceeded_raises_everywhere(comm) -> None:
    p = comm.Get_size()
    T = 4
    cap = T - 1 if p == 1 else T  # every rank sends all T tokens to rank 0
    ep = moe.ExpertParallel(comm, p, 4, T, 1, np.float32, max_recv_tokens=cap)
    with pytest.raises(ValueError, match="max_recv_tokens"):
        ep.dispatch(np.ones((T, 4), np.float32), np.zeros((T, 1), np.int64))


# ---------------------------------------------------------------------------------------
# device arrays (skip without CuPy and a GPU)
def _gpu_device(comm) -> int:
    cupy = pytest.importorskip("cupy")
    try:
        ndev = cupy.cuda.runtime.getDeviceCount()
    except Exception:
        ndev = 0
    if comm.allreduce(ndev == 0, op=MPI.LOR):
        pytest.skip("no GPU")
    local = comm.Split_type(MPI.COMM_TYPE_SHARED)
    dev = local.Get_rank() % ndev
    local.Free()
    cupy.cuda.Device(dev).use()
    return dev


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["staged", "fused"])
@pytest.mark.parametrize("route", ["random", "skip", "dup"])
def test_device_backends_match_reference(comm, backend: str, route: str) -> None:
    dev = _gpu_device(comm)
    import cupy

    if backend == "fused":
        from pya2a.gpu.moe_fused import fused_available

        ok, why = fused_available(moe.internal_comm(comm), None)
        if not ok:
            pytest.skip(why)
    try:
        import torch
    except ImportError:
        torch = None
    p = comm.Get_size()
    E, H, T, K = 4 * p, 64, 24, 3
    ep = moe.ExpertParallel(comm, E, H, T, K, np.float16, device=dev, backend=backend)
    try:
        # expert outputs: 0 in expert_output(), 1 a separate array (some ranks without
        # tokens), 2 written over expert_x, 3 torch tensors in and out
        for it in range(4 if torch is not None else 3):
            tokens = "some_zero" if it == 1 else "random"
            x, idx, w = make_inputs(comm, 50 + it, E, H, T, K, "float16", tokens, route)
            conv = cupy.asarray
            if it == 3:
                def conv(a):
                    return torch.as_tensor(a, device=f"cuda:{dev}")
            ex, counts, h = ep.dispatch(conv(x), conv(idx))
            counts = cupy.asnumpy(counts)
            rows = int(counts.sum())
            ref_x, ref_y = reference(comm, x, idx, w, E)
            assert [len(r) for r in ref_x] == counts.tolist()
            got = cupy.asnumpy(cupy.asarray(ex)[:rows])
            for le, part in enumerate(np.split(got, np.cumsum(counts)[:-1])):
                np.testing.assert_array_equal(part, ref_x[le])
            ey = run_experts(ep, got, counts)
            if it == 0:
                ep.expert_output(rows)[...] = cupy.asarray(ey)
                ey = ep.expert_output(rows)
            elif it == 2:
                cupy.asarray(ex)[:rows] = cupy.asarray(ey)
                ey = ex
            else:
                ey = conv(ey)
            y = ep.combine(ey, conv(w), h)
            y = cupy.asnumpy(cupy.asarray(y))
            np.testing.assert_allclose(y.astype(np.float32), ref_y.astype(np.float32),
                                       rtol=2e-3, atol=2e-3)
    finally:
        ep.free()


def _fused_device(comm) -> int:
    """The device ordinal, or skip where the fused backend cannot run."""
    dev = _gpu_device(comm)
    skip_unless_fused_moe(comm)
    return dev


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["float16", "float32"])
@pytest.mark.parametrize("route", ["random", "skip", "dup", "hot"])
def test_device_fused_per_rank_matches_reference(comm, dtype: str, route: str) -> None:
    """mode="per_rank" on the fused backend: expert_x exactly the reference's (so the
    copies are expanded to the right rows), y against the per_rank summation order
    (partials per owner rank, rounded, summed in rank order; the kernels use FMAs); ranks
    without tokens, expert outputs in expert_output(), in a separate array and in place
    in expert_x, repeated calls."""
    dev = _fused_device(comm)
    import cupy

    p, me = comm.Get_size(), comm.Get_rank()
    E, H, T, K = 4 * p, 64, 24, 3
    ep = moe.ExpertParallel(comm, E, H, T, K, dtype, device=dev, backend="fused",
                            mode="per_rank")
    try:
        for it in range(4):
            tokens = "some_zero" if it == 1 else "random"
            x, idx, w = make_inputs(comm, 110 + it, E, H, T, K, dtype, tokens, route)
            ex, counts, h = ep.dispatch(cupy.asarray(x), cupy.asarray(idx))
            assert h.mode == "per_rank"
            counts = cupy.asnumpy(counts)
            rows = int(counts.sum())
            ref_x, ref_y = reference(comm, x, idx, w, E, "per_rank")
            at = f"rank {me} of {p}, call {it}, route {route}, {dtype}"
            assert [len(r) for r in ref_x] == counts.tolist(), at
            got = cupy.asnumpy(ex[:rows])
            for le, part in enumerate(np.split(got, np.cumsum(counts)[:-1])):
                np.testing.assert_array_equal(part, ref_x[le], err_msg=f"{at}, expert {le}")
            ey = run_experts(ep, got, counts)
            if it == 0:
                ep.expert_output(rows)[...] = cupy.asarray(ey)
                ey = ep.expert_output(rows)
            elif it == 2:
                ex[:rows] = cupy.asarray(ey)
                ey = ex
            else:
                ey = cupy.asarray(ey)
            y = cupy.asnumpy(ep.combine(ey, cupy.asarray(w), h))
            np.testing.assert_allclose(y.astype(np.float32), ref_y.astype(np.float32),
                                       rtol=2e-3, atol=2e-3, err_msg=at)
    finally:
        ep.free()


def test_graph_capture_needs_the_fused_backend(comm) -> None:
    p = comm.Get_size()
    ep = moe.ExpertParallel(comm, p, 8, 3, 1, np.float32)
    for call in (ep.graph_mode, ep.graph_buffers):
        with pytest.raises(ValueError, match="graph capture needs the fused backend"):
            call()


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
def test_device_graph_capture_replays(comm, dtype: str) -> None:
    """dispatch + expert op (scale_experts, reading the device counts) + combine captured
    once in a CUDA graph with the worst-case row count, replayed 1000 times with new tokens,
    routing, weights and token counts (0 and max_tokens included) written into the static
    buffers: y exact every replay. The values are multiples of 1/4 so that every product
    and sum is exact in float32 and the reference rounds once, like the kernel."""
    dev = _fused_device(comm)
    import cupy

    from pya2a.gpu.moe_fused import scale_experts

    p, me = comm.Get_size(), comm.Get_rank()
    E, H, T, K = 4 * p, 64, 12, 3
    ep = moe.ExpertParallel(comm, E, H, T, K, dtype, device=dev, backend="fused")
    bad: list[str] = []
    try:
        with cupy.cuda.Device(dev):
            stream = cupy.cuda.Stream(non_blocking=True)
            out = ep.expert_output(ep.max_recv_tokens)
            err = None
            with ep.graph_mode() as io:  # collective
                try:
                    with stream:
                        stream.begin_capture()
                        ex, _, h = ep.dispatch(io.x, io.topk_idx)
                        scale_experts(ep, ex, out)
                        ep.combine(out, io.topk_weight, h, out=io.y)
                        graph = stream.end_capture()
                except Exception as e:  # replaying on some ranks only would hang the others
                    err = e
            if comm.allreduce(err is not None, op=MPI.LOR):
                raise err or RuntimeError("the capture failed on another rank")
            rng = np.random.default_rng([SEED, 80, me])
            fac = np.array([1 + (e % 5) / 4 for e in range(E)], dtype=np.float32)
            for step in range(1000):
                n = T if step == 0 else 0 if step == 1 else int(rng.integers(0, T + 1))
                x = (rng.integers(-8, 9, (n, H)) / 4).astype(np.float32)
                idx = np.argsort(rng.random((n, E)), axis=1)[:, :K].astype(np.int64)
                w = (rng.integers(0, 5, (n, K)) / 4).astype(np.float32)
                y32 = (w[:, :, None] * x[:, None, :] * fac[idx][:, :, None]).sum(axis=1)
                if n:
                    io.x[:n].set(_rows_of(x, dtype), stream=stream)
                    io.topk_idx[:n].set(idx, stream=stream)
                    io.topk_weight[:n].set(w, stream=stream)
                io.num_tokens.set(np.array([n], dtype=np.int32), stream=stream)
                graph.launch(stream=stream)
                y = io.y[:n].get(stream=stream) if n else _rows_of(y32, dtype)
                stream.synchronize()
                if not np.array_equal(y, _rows_of(y32, dtype)) and len(bad) < 3:
                    diff = np.flatnonzero((y != _rows_of(y32, dtype)).any(axis=1))
                    bad.append(f"replay {step}: n={n}, rows {diff[:8].tolist()} differ")
        assert not bad, f"rank {me} of {p}, {dtype}: " + "; ".join(bad)
    finally:
        ep.free()


def _rows_of(a: np.ndarray, dtype: str) -> np.ndarray:
    """float32 rows in the stored row type, rounded to nearest even (bfloat16: the bits as
    uint16)."""
    if dtype != "bfloat16":
        return a.astype(dtype)
    u = np.ascontiguousarray(a, dtype=np.float32).view(np.uint32)
    return ((u + np.uint32(0x7FFF) + ((u >> 16) & np.uint32(1))) >> 16).astype(np.uint16)
