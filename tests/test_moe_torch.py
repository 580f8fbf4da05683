"""pya2a.moe with torch tensors: bfloat16 rows and autograd, on the host path.

Runs serially and under ``mpiexec -n N``. The oracle is a single-process layer: every rank
rebuilds every rank's tokens and the global model from (SEED, case, rank), runs the whole
layer with all experts local in plain torch, and backpropagates the sum of all ranks'
losses. The distributed layer (gate replicated, experts split across ranks, pya2a's
dispatch and combine between them) must give the same loss, ``x.grad``, router-weight
gradients, expert parameter gradients and (summed over ranks) gate gradients, to float
tolerance, in both transfer modes.
"""

from __future__ import annotations

import numpy as np
import pytest
from mpi4py import MPI

import pya2a.moe as moe

from helpers import SEED, cuda_device_count, skip_unless_fused_moe

torch = pytest.importorskip("torch")


def _gen(*key: int) -> torch.Generator:
    return torch.Generator().manual_seed(int(np.random.SeedSequence([SEED, *key])
                                              .generate_state(1)[0]))


def tokens(case: int, rank: int, max_tokens: int, hidden: int, dtype) -> torch.Tensor:
    """Rank ``rank``'s tokens for ``case`` (a random count in [0, max_tokens])."""
    g = _gen(case, rank)
    n = int(torch.randint(0, max_tokens + 1, (1,), generator=g))
    return torch.randn(n, hidden, generator=g).to(dtype)


# ---------------------------------------------------------------------------------------
# bfloat16 rows: dispatch moves the bits, combine accumulates in float32
def _scale(e: int) -> float:
    return 1 + (e % 7) / 8


def _scale_experts(ep: moe.ExpertParallel, ex: torch.Tensor, counts) -> torch.Tensor:
    parts, off = [], 0
    for le, c in enumerate(counts.tolist()):
        parts.append(ex[off:off + c] * _scale(ep.first_expert + le))
        off += c
    return torch.cat(parts) if parts else ex[:0]


def _bf16_reference(comm, x, idx, w, E: int, mode: str):
    """expert_x per local expert and this rank's y, with the library's summation order."""
    p, me = comm.Get_size(), comm.Get_rank()
    El = E // p
    xs, idxs = comm.allgather(x), comm.allgather(idx)
    expert_x = [torch.cat([xs[s][(idxs[s] == me * El + le).nonzero()[:, 0]]
                           for s in range(p)]) for le in range(El)]
    y = torch.zeros(x.shape, dtype=torch.float32)
    for t in range(x.shape[0]):
        rows = {j: (x[t] * _scale(int(idx[t, j]))).float() * w[t, j] for j in range(idx.shape[1])}
        if mode == "per_expert":
            for j in range(idx.shape[1]):
                y[t] = y[t] + rows[j]
            continue
        for r in range(p):
            part = torch.zeros(x.shape[1])
            for _, j in sorted((int(idx[t, j]), j) for j in rows if int(idx[t, j]) // El == r):
                part = part + rows[j]
            y[t] = y[t] + part.bfloat16().float()
    return expert_x, y.bfloat16()


@pytest.mark.parametrize("mode", ["per_expert", "per_rank"])
def test_bfloat16_rows_on_the_host_path(comm, mode: str) -> None:
    p, me = comm.Get_size(), comm.Get_rank()
    E, H, T, K = 2 * p, 16, 7, 2
    ep = moe.ExpertParallel(comm, E, H, T, K, torch.bfloat16, mode=mode)
    assert ep.dtype_name == "bfloat16" and ep.dtype == np.uint16
    x = tokens(1, me, T, H, torch.bfloat16)
    g = _gen(2, me)
    idx = torch.argsort(torch.rand(x.shape[0], E, generator=g), dim=1)[:, :K]
    w = torch.rand(x.shape[0], K, generator=g)
    with torch.no_grad():
        ex, counts, h = ep.dispatch(x, idx)
        assert ex.dtype == torch.bfloat16 and h.mode == mode
        ref_x, ref_y = _bf16_reference(comm, x, idx, w, E, mode)
        for le, part in enumerate(torch.split(ex, counts.tolist())):
            assert torch.equal(part, ref_x[le]), f"local expert {le}"
        y = ep.combine(_scale_experts(ep, ex, counts), w, h)
    assert y.dtype == torch.bfloat16
    assert torch.equal(y, ref_y)


def test_bfloat16_as_uint16_numpy_bits(comm) -> None:
    """NumPy has no bfloat16: the same rows as uint16 words give the same bits back."""
    p, me = comm.Get_size(), comm.Get_rank()
    E, H, T, K = 2 * p, 8, 5, 2
    ep = moe.ExpertParallel(comm, E, H, T, K, "bfloat16", mode="per_expert")
    x = tokens(3, me, T, H, torch.bfloat16)
    idx = torch.randint(0, E, (x.shape[0], K), generator=_gen(4, me))
    w = torch.rand(x.shape[0], K, generator=_gen(5, me))
    with torch.no_grad():
        ex_t, counts, h = ep.dispatch(x, idx)
        y_t = ep.combine(ex_t, w, h)
    bits = x.view(torch.int16).numpy().view(np.uint16)
    ex_n, _, h = ep.dispatch(bits, idx.numpy())
    assert ex_n.dtype == np.uint16
    assert np.array_equal(ex_n, ex_t.view(torch.int16).numpy().view(np.uint16))
    y_n = ep.combine(ex_n, w.numpy(), h)
    assert np.array_equal(y_n, y_t.view(torch.int16).numpy().view(np.uint16))


def test_bfloat16_rounding_matches_torch() -> None:
    """combine's float32 -> bfloat16 cast rounds like torch (nearest even, NaN, inf)."""
    ep = moe.ExpertParallel(MPI.COMM_SELF, 1, 4, 1, 1, torch.bfloat16)
    vals = torch.tensor([1.0, 1.00390625, 1.01171875, -2.5e-39, 3.4e38, float("inf"),
                         float("-inf"), float("nan"), 0.0, -0.0] + torch.randn(990).tolist())
    got = ep._cast(vals.numpy())
    want = vals.bfloat16().view(torch.int16).numpy().view(np.uint16)
    nan = np.isnan(vals.numpy())  # any NaN pattern will do (torch's varies by code path)
    assert np.array_equal(got[~nan], want[~nan])
    assert ((got[nan] & 0x7F80) == 0x7F80).all() and (got[nan] & 0x7F).all()


# ---------------------------------------------------------------------------------------
# autograd: the distributed layer against the single-process layer
class Model:
    """Gate (H x E) and expert MLPs (relu(x W1) W2), the same on every rank from the seed."""

    def __init__(self, E: int, H: int, F: int, K: int, dtype, case: int) -> None:
        g = _gen(case, 999)
        self.E, self.K = E, K
        self.gate = torch.randn(H, E, generator=g).to(dtype)
        self.w1 = (torch.randn(E, H, F, generator=g) / H ** 0.5).to(dtype)
        self.w2 = (torch.randn(E, F, H, generator=g) / F ** 0.5).to(dtype)
        for t in (self.gate, self.w1, self.w2):
            t.requires_grad_(True)

    def route(self, x: torch.Tensor):
        probs = torch.softmax(x @ self.gate, dim=-1)
        w, idx = probs.topk(self.K, dim=-1)
        w = w / w.sum(dim=-1, keepdim=True)
        w.retain_grad()
        return idx, w

    def expert(self, e: int, rows: torch.Tensor, w1=None, w2=None) -> torch.Tensor:
        w1 = self.w1[e] if w1 is None else w1
        w2 = self.w2[e] if w2 is None else w2
        return torch.relu(rows @ w1) @ w2

    def layer_reference(self, x: torch.Tensor):
        """All experts local: y = sum_e (sum_k w * [idx == e]) * expert_e(x)."""
        idx, w = self.route(x)
        y = torch.zeros_like(x)
        for e in range(self.E):
            coef = (w * (idx == e)).sum(dim=1, keepdim=True)
            y = y + coef * self.expert(e, x)
        return y, w


class Local:
    """This rank's copy of the model's parameters: the gate and its own experts (leaves)."""

    def __init__(self, model: Model, ep: moe.ExpertParallel, device: str = "cpu") -> None:
        lo, hi = ep.first_expert, ep.first_expert + ep.local_experts
        self.model, self.ep = model, ep
        self.gate = model.gate.detach().to(device).requires_grad_(True)
        self.w1 = model.w1[lo:hi].detach().to(device).requires_grad_(True)
        self.w2 = model.w2[lo:hi].detach().to(device).requires_grad_(True)

    def layer(self, x: torch.Tensor):
        probs = torch.softmax(x @ self.gate, dim=-1)
        w, idx = probs.topk(self.model.K, dim=-1)
        w = w / w.sum(dim=-1, keepdim=True)
        w.retain_grad()
        ex, counts, h = self.ep.dispatch(x, idx)
        cnt = [int(c) for c in counts.tolist()]  # fused: a device array, and expert_x is
        outs = [self.model.expert(0, seg, self.w1[le], self.w2[le])  # the whole buffer
                for le, seg in enumerate(torch.split(ex[:sum(cnt)], cnt))]
        ey = torch.cat(outs) if outs else ex
        return self.ep.combine(ey, w, h), w


def _close(a: torch.Tensor, b: torch.Tensor, tol: float, what: str) -> None:
    assert a is not None and b is not None, what
    torch.testing.assert_close(a, b, rtol=tol, atol=tol, msg=lambda m: f"{what}: {m}")


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("mode", ["per_expert", "per_rank", "auto"])
def test_gradients_equal_single_process_layer(comm, mode: str, dtype: str) -> None:
    """Two MoE layers (the same ExpertParallel, so handles outlive a dispatch): loss, x.grad,
    router-weight grads, expert and gate parameter grads against one process."""
    _check_layer_gradients(comm, mode, dtype, None, 1e-4 if dtype == "float32" else 1e-10)


def _check_layer_gradients(comm, mode: str, dtype: str, device: int | None,
                           tol: float, backend: str = "staged") -> None:
    """The two-layer check; with ``device`` the distributed model runs there on
    ``backend``."""
    p, me = comm.Get_size(), comm.Get_rank()
    dt = getattr(torch, dtype)
    E, H, F, T, K = 2 * p if p > 1 else 4, 8, 12, 6, 2
    case = 10 + ["per_expert", "per_rank", "auto"].index(mode)
    model = Model(E, H, F, K, dt, case)
    xs = [tokens(case, s, T, H, dt).requires_grad_(True) for s in range(p)]
    cs = [torch.randn(x.shape, generator=_gen(case, s, 7)).to(dt) for s, x in enumerate(xs)]
    ref_loss, ref_w = 0, []
    for x, c in zip(xs, cs, strict=True):
        y1, w1 = model.layer_reference(x)
        y2, w2 = model.layer_reference(y1 + x)
        ref_loss = ref_loss + (y2 * c).sum()
        ref_w.append((w1, w2))
    ref_loss.backward()

    dev = "cpu" if device is None else f"cuda:{device}"
    ep = moe.ExpertParallel(comm, E, H, T, K, dt, device, mode=mode,
                            backend="auto" if device is None else backend)
    local = Local(model, ep, dev)
    x = xs[me].detach().to(dev).requires_grad_(True)
    y1, w1 = local.layer(x)
    y2, w2 = local.layer(y1 + x)
    loss = (y2 * cs[me].to(dev)).sum()
    loss.backward()

    try:
        _compare_layers(comm, ep, local, loss, x, w1, w2, xs, model, ref_loss, ref_w, dt, tol)
    finally:
        ep.free()


def _compare_layers(comm, ep, local, loss, x, w1, w2, xs, model, ref_loss, ref_w, dt,
                    tol: float) -> None:
    p, me = comm.Get_size(), comm.Get_rank()
    total = comm.allreduce(loss.item())  # the collectives first: a failed check on one
    gate = local.gate.grad.cpu().numpy().copy()  # rank leaves no rank waiting
    comm.Allreduce(MPI.IN_PLACE, gate)
    at = f" (rank {me} of {p}, {ep.backend} backend, mode {ep.mode})"
    _close(torch.tensor(total, dtype=dt), ref_loss.detach(), tol, "loss" + at)
    _close(x.grad.cpu(), xs[me].grad, tol, "x.grad" + at)
    _close(w1.grad.cpu(), ref_w[me][0].grad, tol, "topk_weight.grad, layer 1" + at)
    _close(w2.grad.cpu(), ref_w[me][1].grad, tol, "topk_weight.grad, layer 2" + at)
    lo, hi = ep.first_expert, ep.first_expert + ep.local_experts
    _close(local.w1.grad.cpu(), model.w1.grad[lo:hi], tol, "expert W1 grad" + at)
    _close(local.w2.grad.cpu(), model.w2.grad[lo:hi], tol, "expert W2 grad" + at)
    _close(torch.from_numpy(gate), model.gate.grad, tol, "gate grad (summed over ranks)" + at)
    assert ep.traffic["dispatch_backward"] + ep.traffic["combine_backward"] >= 0


@pytest.mark.parametrize("mode", ["per_expert", "per_rank"])
def test_bfloat16_gradients(comm, mode: str) -> None:
    """bfloat16 rows, float32 router weights: grads agree with a float32 single-process
    computation on the same bfloat16 inputs to bfloat16 precision."""
    p, me = comm.Get_size(), comm.Get_rank()
    E, H, T, K = 2 * p, 16, 6, 2
    xs = [tokens(20, s, T, H, torch.bfloat16) for s in range(p)]
    idxs = [torch.argsort(torch.rand(x.shape[0], E, generator=_gen(21, s)), dim=1)[:, :K]
            for s, x in enumerate(xs)]
    ws = [torch.rand(x.shape[0], K, generator=_gen(22, s)) for s, x in enumerate(xs)]
    cs = [torch.randn(x.shape, generator=_gen(23, s)) for s, x in enumerate(xs)]
    scale = torch.tensor([_scale(e) for e in range(E)])
    ref_x = xs[me].float().requires_grad_(True)
    ref_w = ws[me].clone().requires_grad_(True)
    ref_y = (ref_w[:, :, None] * ref_x[:, None, :] * scale[idxs[me]][:, :, None]).sum(dim=1)
    (ref_y * cs[me]).sum().backward()

    ep = moe.ExpertParallel(comm, E, H, T, K, torch.bfloat16, mode=mode)
    x = xs[me].clone().requires_grad_(True)
    w = ws[me].clone().requires_grad_(True)
    ex, counts, h = ep.dispatch(x, idxs[me])
    y = ep.combine(_scale_experts(ep, ex, counts), w, h)
    assert y.dtype == torch.bfloat16
    (y.float() * cs[me]).sum().backward()
    assert x.grad.dtype == torch.bfloat16 and w.grad.dtype == torch.float32
    _close(x.grad.float(), ref_x.grad, 3e-2, "x.grad")
    _close(w.grad, ref_w.grad, 3e-2, "topk_weight.grad")


def test_requires_grad_on_some_ranks_only_raises_everywhere(comm) -> None:
    p, me = comm.Get_size(), comm.Get_rank()
    if p == 1:
        pytest.skip("needs two ranks")
    ep = moe.ExpertParallel(comm, p, 4, 3, 1, torch.float32)
    x = torch.ones(3, 4, requires_grad=me == p - 1)
    idx = torch.zeros(3, 1, dtype=torch.int64)
    with pytest.raises(ValueError, match="requires grad on some ranks"):
        ep.dispatch(x, idx)
    ex, _, h = ep.dispatch(x.detach(), idx)
    w = torch.ones(3, 1, requires_grad=me == 0)
    with pytest.raises(ValueError, match="require grad on some ranks"):
        ep.combine(ex, w, h)


def test_out_with_gradients_raises_everywhere(comm) -> None:
    p = comm.Get_size()
    ep = moe.ExpertParallel(comm, p, 4, 3, 1, torch.float32)
    x = torch.ones(3, 4, requires_grad=True)
    ex, _, h = ep.dispatch(x, torch.zeros(3, 1, dtype=torch.int64))
    with pytest.raises(ValueError, match="out= cannot be used"):
        ep.combine(ex, torch.ones(3, 1), h, out=torch.empty(3, 4))


def test_grad_mode_returns_a_new_expert_x(comm) -> None:
    """Under grad mode expert_x is not the reused buffer (autograd may keep it); under
    no_grad it is."""
    p = comm.Get_size()
    ep = moe.ExpertParallel(comm, p, 4, 3, 1, torch.float32)
    x, idx = torch.ones(3, 4), torch.zeros(3, 1, dtype=torch.int64)
    a, _, _ = ep.dispatch(x, idx)
    b, _, _ = ep.dispatch(x, idx)
    assert a.numel() == 0 or a.data_ptr() != b.data_ptr()
    with torch.no_grad():
        a, _, _ = ep.dispatch(x, idx)
        b, _, _ = ep.dispatch(x, idx)
    assert a.numel() == 0 or a.data_ptr() == b.data_ptr()


# ---------------------------------------------------------------------------------------
# device tensors (skip without CuPy, torch CUDA and a GPU)
def _gpu(comm) -> int:
    pytest.importorskip("cupy")
    ndev = cuda_device_count() if torch.cuda.is_available() else 0
    if comm.allreduce(ndev == 0, op=MPI.LOR):
        pytest.skip("no GPU")
    local = comm.Split_type(MPI.COMM_TYPE_SHARED)
    dev = local.Get_rank() % ndev
    local.Free()
    torch.cuda.set_device(dev)
    return dev


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["staged", "fused"])
def test_device_bfloat16_rows(comm, backend: str) -> None:
    """torch bfloat16 CUDA tensors through both device backends: expert_x bit for bit,
    y against the summation-order reference (the fused kernel sums with FMAs)."""
    dev = _gpu(comm)
    if backend == "fused":
        from pya2a.gpu.moe_fused import fused_available

        ok, why = fused_available(moe.internal_comm(comm), None)
        if not ok:
            pytest.skip(why)
    p, me = comm.Get_size(), comm.Get_rank()
    E, H, T, K = 2 * p, 64, 7, 2
    ep = moe.ExpertParallel(comm, E, H, T, K, torch.bfloat16, dev, backend=backend,
                            mode="per_expert")
    try:
        x = tokens(30, me, T, H, torch.bfloat16)
        idx = torch.argsort(torch.rand(x.shape[0], E, generator=_gen(31, me)), dim=1)[:, :K]
        w = torch.rand(x.shape[0], K, generator=_gen(32, me))
        with torch.no_grad():
            ex, counts, h = ep.dispatch(x.cuda(dev), idx.cuda(dev))
            counts = torch.as_tensor(np.asarray(counts.get() if hasattr(counts, "get")
                                                else counts))
            rows = int(counts.sum())
            ex = ex[:rows]
            assert ex.dtype == torch.bfloat16
            ref_x, ref_y = _bf16_reference(comm, x, idx, w, E, "per_expert")
            for le, part in enumerate(torch.split(ex.cpu(), counts.tolist())):
                assert torch.equal(part, ref_x[le]), f"local expert {le}"
            ey = _scale_experts(ep, ex, counts)
            if backend == "fused":
                out = torch.as_tensor(ep.expert_output(rows).view(np.int16),
                                      device=f"cuda:{dev}").view(torch.bfloat16)
                out.copy_(ey)
                ey = out
            y = ep.combine(ey, w.cuda(dev), h)
        assert y.dtype == torch.bfloat16
        _close(y.float().cpu(), ref_y.float(), 1e-2, "y")
    finally:
        ep.free()


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["per_expert", "per_rank"])
def test_device_gradients_staged(comm, mode: str) -> None:
    """The two-layer gradient check with the distributed model on the GPU (staged)."""
    _check_layer_gradients(comm, mode, "float32", _gpu(comm), 1e-3)


def _fused_gpu(comm) -> int:
    """The device ordinal, or skip where the fused backend cannot run."""
    dev = _gpu(comm)
    skip_unless_fused_moe(comm)
    return dev


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["per_expert", "per_rank"])
def test_device_gradients_fused(comm, mode: str) -> None:
    """The two-layer gradient check (gate, top-k, expert MLPs, one ExpertParallel for both
    layers: backward runs combine 2, dispatch 2, combine 1, dispatch 1) on the fused
    backend, float32, in both transfer modes."""
    _check_layer_gradients(comm, mode, "float32", _fused_gpu(comm), 1e-3, backend="fused")


@pytest.mark.gpu
def test_device_fused_refuses_float64(comm) -> None:
    dev = _fused_gpu(comm)
    with pytest.raises(ValueError, match="backend 'fused' cannot run here"):
        moe.ExpertParallel(comm, 2 * comm.Get_size(), 8, 4, 2, torch.float64, dev,
                           backend="fused")


def _scaled_case(comm, case: int, dt, H: int = 64, T: int = 7, K: int = 2):
    """Every rank's tokens, distinct top-k experts, float32 router weights and loss
    coefficients, and the expert parameters ``a`` (E, H) (expert e: ``rows * a[e]``), from
    the seed; the same on every rank."""
    p = comm.Get_size()
    E = 2 * p
    xs = [tokens(case, s, T, H, dt) for s in range(p)]
    idxs = [torch.argsort(torch.rand(x.shape[0], E, generator=_gen(case, s, 1)), dim=1)[:, :K]
            for s, x in enumerate(xs)]
    ws = [torch.rand(x.shape[0], K, generator=_gen(case, s, 2)) for s, x in enumerate(xs)]
    cs = [torch.randn(x.shape, generator=_gen(case, s, 3)) for s, x in enumerate(xs)]
    a = 1 + torch.rand(E, H, generator=_gen(case, 999))
    return E, K, xs, idxs, ws, cs, a


def _scaled_reference(xs, idxs, ws, cs, a):
    """float32, one process, all experts local: loss = sum over ranks s of
    <c_s, y_s>, y_s[t] = sum_k w_s[t, k] * x_s[t] * a[idx_s[t, k]]; returns (per rank:
    y, x.grad, w.grad), a.grad."""
    a = a.clone().requires_grad_(True)
    rx = [x.detach().float().clone().requires_grad_(True) for x in xs]  # xs stay leaves
    rw = [w.clone().requires_grad_(True) for w in ws]
    ys = [(w[:, :, None] * x[:, None, :] * a[i]).sum(dim=1)
          for x, i, w in zip(rx, idxs, rw, strict=True)]
    sum((y * c).sum() for y, c in zip(ys, cs, strict=True)).backward()
    return [(y.detach(), x.grad, w.grad) for y, x, w in zip(ys, rx, rw, strict=True)], a.grad


def _scaled_layer(ep, x, idx, w, a_local, dt):
    """dispatch, expert l scales its rows by ``a_local[l]`` (float32 math, cast to the row
    type), combine; also the valid expert rows."""
    ex, counts, h = ep.dispatch(x, idx)
    cnt = [int(c) for c in counts.tolist()]
    ex = ex[:sum(cnt)]
    outs = [(seg.float() * a_local[le]).to(dt) for le, seg in enumerate(torch.split(ex, cnt))]
    return ep.combine(torch.cat(outs), w, h), ex


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["fused", "staged"])
@pytest.mark.parametrize("mode", ["per_expert", "per_rank"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_device_gradients_scaled_experts(comm, backend: str, mode: str, dtype: str) -> None:
    """x.grad, topk_weight.grad and the experts' parameter gradients on a device backend
    against the float32 one-process computation on the same inputs (bfloat16: the rows are
    rounded where the layer stores them, so to bfloat16 precision)."""
    dev = _fused_gpu(comm) if backend == "fused" else _gpu(comm)
    p, me = comm.Get_size(), comm.Get_rank()
    dt = getattr(torch, dtype)
    tol = 1e-4 if dtype == "float32" else 5e-2
    E, K, xs, idxs, ws, cs, a = _scaled_case(comm, 50, dt)
    per_rank, a_grad = _scaled_reference(xs, idxs, ws, cs, a)
    cuda = f"cuda:{dev}"
    ep = moe.ExpertParallel(comm, E, xs[0].shape[1], 7, K, dt, dev, backend=backend,
                            mode=mode)
    try:
        lo, hi = ep.first_expert, ep.first_expert + ep.local_experts
        x = xs[me].to(cuda).requires_grad_(True)
        w = ws[me].to(cuda).requires_grad_(True)
        a_local = a[lo:hi].to(cuda).requires_grad_(True)
        y, _ = _scaled_layer(ep, x, idxs[me].to(cuda), w, a_local, dt)
        assert y.dtype == dt
        (y.float() * cs[me].to(cuda)).sum().backward()
        torch.cuda.synchronize(dev)
        at = f" (rank {me} of {p}, {backend}, {mode}, {dtype})"
        ref_y, ref_xg, ref_wg = per_rank[me]
        _close(y.float().cpu(), ref_y, tol, "y" + at)
        assert x.grad.dtype == dt and w.grad.dtype == torch.float32, at
        _close(x.grad.float().cpu(), ref_xg, tol, "x.grad" + at)
        _close(w.grad.cpu(), ref_wg, tol, "topk_weight.grad" + at)
        _close(a_local.grad.cpu(), a_grad[lo:hi], tol, "expert parameter grad" + at)
    finally:
        ep.free()


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["per_expert", "per_rank"])
def test_device_fused_backward_call_sequences(comm, mode: str) -> None:
    """The fused backward keeps the kernels' flag protocol in each order autograd may call
    it, repeated over steps: a combine's backward without the dispatch's (the input needs
    no gradient), a dispatch's backward without the combine's (combine outside grad mode),
    then both; each result against the float32 one-process computation."""
    dev = _fused_gpu(comm)
    p, me = comm.Get_size(), comm.Get_rank()
    cuda = f"cuda:{dev}"
    dt = torch.float32
    ep = None
    try:
        for step in range(3):
            E, K, xs, idxs, ws, cs, a = _scaled_case(comm, 60 + step, dt, H=32, T=5)
            per_rank, a_grad = _scaled_reference(xs, idxs, ws, cs, a)
            ref_y, ref_xg, ref_wg = per_rank[me]
            if ep is None:
                ep = moe.ExpertParallel(comm, E, 32, 5, K, dt, dev, backend="fused",
                                        mode=mode)
            lo, hi = ep.first_expert, ep.first_expert + ep.local_experts
            x0, idx = xs[me].to(cuda), idxs[me].to(cuda)
            w0, c = ws[me].to(cuda), cs[me].to(cuda)
            at = f" (rank {me} of {p}, {mode}, step {step}"
            # 1. combine's backward only: x and w need no gradient, the experts do
            a1 = a[lo:hi].to(cuda).requires_grad_(True)
            y, _ = _scaled_layer(ep, x0, idx, w0, a1, dt)
            (y * c).sum().backward()
            _close(y.cpu(), ref_y, 1e-4, "y, combine backward only" + at + ")")
            _close(a1.grad.cpu(), a_grad[lo:hi], 1e-4,
                   "expert parameter grad, combine backward only" + at + ")")
            # 2. dispatch's backward only: loss = sum of squares of the expert inputs,
            # so x.grad[t] = 2 * topk * x[t]; combine runs outside grad mode
            x = x0.clone().requires_grad_(True)
            ex, counts, h = ep.dispatch(x, idx)
            rows = int(counts.sum())
            with torch.no_grad():
                y = ep.combine(ex[:rows] * 2, w0, h)
            (ex[:rows] ** 2).sum().backward()
            _close(x.grad.cpu(), 2 * K * xs[me], 1e-5, "x.grad, dispatch backward only" + at
                   + ")")
            _close(y.cpu(), 2 * xs[me] * ws[me].sum(dim=1, keepdim=True), 1e-4,
                   "y of a combine outside grad mode" + at + ")")
            # 3. both, as in training
            x = x0.clone().requires_grad_(True)
            w = w0.clone().requires_grad_(True)
            a3 = a[lo:hi].to(cuda).requires_grad_(True)
            y, _ = _scaled_layer(ep, x, idx, w, a3, dt)
            (y * c).sum().backward()
            _close(x.grad.cpu(), ref_xg, 1e-4, "x.grad, full step" + at + ")")
            _close(w.grad.cpu(), ref_wg, 1e-4, "topk_weight.grad, full step" + at + ")")
            _close(a3.grad.cpu(), a_grad[lo:hi], 1e-4, "expert parameter grad, full step"
                   + at + ")")
    finally:
        if ep is not None:
            ep.free()


@pytest.mark.gpu
def test_device_fused_per_rank_has_no_graph_mode(comm) -> None:
    """Graph capture runs per_expert mode only: graph_mode refuses on every rank, and the
    instance keeps working."""
    dev = _fused_gpu(comm)
    p = comm.Get_size()
    ep = moe.ExpertParallel(comm, p, 64, 3, 1, torch.float16, dev, backend="fused",
                            mode="per_rank")
    try:
        with pytest.raises(ValueError, match="graph capture runs mode 'per_expert' only"):
            with ep.graph_mode():
                pass
        x = torch.ones(3, 64, dtype=torch.float16, device=f"cuda:{dev}")
        idx = torch.zeros(3, 1, dtype=torch.int64, device=f"cuda:{dev}")
        with torch.no_grad():
            ex, counts, h = ep.dispatch(x, idx)
            rows = int(counts.sum())
            y = ep.combine(ex[:rows], torch.ones(3, 1, device=f"cuda:{dev}"), h)
        torch.testing.assert_close(y.float().cpu(), torch.ones(3, 64))
    finally:
        ep.free()
