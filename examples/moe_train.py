"""Train a mixture-of-experts layer across ranks with torch autograd through pya2a.

    mpiexec -n 4 python -m mpi4py examples/moe_train.py             # 8 experts, top-2, 300 steps
    mpiexec -n 4 python -m mpi4py examples/moe_train.py --small     # 20 steps, for tests
    mpiexec -n 4 python -m mpi4py examples/moe_train.py --device cuda  # staged backend
    mpiexec -n 4 python -m mpi4py examples/moe_train.py --device cuda --backend fused

The model: an input projection ``h = tanh(x P)`` and one MoE layer on it: a softmax gate
(hidden x experts) picks the top-k experts per token and their renormalised weights;
each expert is an MLP ``relu(h W1) W2``; the output is ``h + sum_k w_k expert_k(h)``.
P and the gate are replicated on every rank; the experts are split contiguously across
the ranks (pya2a.moe.ExpertParallel): dispatch sends the tokens to their experts, combine
brings the outputs back, and ``loss.backward()`` runs both exchanges' backward passes
(pya2a.moe_autograd): through combine to the experts and the router weights, through
dispatch back to ``h`` and so to P. The replicated gradients are summed over the ranks
with an Allreduce; the experts' gradients are complete on their own rank.

The task: every step, each rank draws a batch of tokens; the target is a fixed random
MoE-like map of them ("teacher"); the loss is the mean squared error over all ranks'
tokens. SGD with momentum 0.9.

The check: every rank also holds the whole model in one process (all experts local, same
initial weights, same optimizer) and runs it on every rank's batch. Each step the expert
inputs that dispatch delivered must equal the reference's exactly, and the loss and every
gradient (this rank's experts, the summed P and gate) must agree to float tolerance; the two
models train side by side for all steps. Prints the loss as it goes and OK, or WRONG and
exits 1 on every rank.

Options: --experts (default 8, rounded up to a multiple of the ranks), --topk, --hidden,
--ffn, --tokens (per rank per step), --steps, --lr, --dtype {float32,float64},
--mode {auto,per_expert,per_rank}, --seed, --small, --device {cpu,cuda}, --backend
{staged,fused,auto} (with --device cuda; fused: float32, one node, per_expert mode).
"""

from __future__ import annotations

import argparse
import sys

import numpy as np
import torch
from mpi4py import MPI

import pya2a.moe

TOL = {torch.float32: 2e-4, torch.float64: 1e-9}


def gen(device: str, *key: int) -> torch.Generator:
    seed = int(np.random.SeedSequence(list(key)).generate_state(1)[0])
    return torch.Generator(device=device).manual_seed(seed)


class Experts:
    """The model's weights: projection P (H, H), gate (H, E), expert MLPs W1 (E, H, F) and
    W2 (E, F, H) (experts ``lo:hi`` only)."""

    def __init__(self, E: int, H: int, F: int, dtype, device: str, seed: int,
                 lo: int = 0, hi: int | None = None) -> None:
        g = gen("cpu", seed, 1)
        proj = torch.randn(H, H, generator=g) / H ** 0.5
        gate = torch.randn(H, E, generator=g) / H ** 0.5
        w1 = torch.randn(E, H, F, generator=g) / H ** 0.5
        w2 = torch.randn(E, F, H, generator=g) / F ** 0.5
        hi = E if hi is None else hi
        self.params = [t.to(device=device, dtype=dtype).requires_grad_(True)
                       for t in (proj, gate, w1[lo:hi], w2[lo:hi])]
        self.proj, self.gate, self.w1, self.w2 = self.params

    def route(self, x: torch.Tensor, k: int):
        probs = torch.softmax(x @ self.gate, dim=-1)
        w, idx = probs.topk(k, dim=-1)
        return idx, w / w.sum(dim=-1, keepdim=True)


class SGD:
    """SGD with momentum (torch.optim's update, without importing its compiler stack)."""

    def __init__(self, params: list[torch.Tensor], lr: float, momentum: float = 0.9) -> None:
        self.params, self.lr, self.momentum = params, lr, momentum
        self.buf = [torch.zeros_like(t) for t in params]

    def zero_grad(self) -> None:
        for t in self.params:
            t.grad = None

    @torch.no_grad()
    def step(self) -> None:
        for t, b in zip(self.params, self.buf, strict=True):
            b.mul_(self.momentum).add_(t.grad)
            t.sub_(self.lr * b)


def distributed_layer(m: Experts, ep: pya2a.moe.ExpertParallel, x: torch.Tensor, k: int):
    """h + MoE(h), h = tanh(x P), with this rank's experts; also h, the routing and the
    expert inputs that dispatch delivered."""
    x = torch.tanh(x @ m.proj)
    idx, w = m.route(x, k)
    ex, counts, h = ep.dispatch(x, idx)
    cnt = [int(c) for c in counts.tolist()]  # a device array on the fused backend
    segs = torch.split(ex[:sum(cnt)], cnt)  # fused: expert_x is the whole receive buffer
    outs = [torch.relu(s @ m.w1[le]) @ m.w2[le] for le, s in enumerate(segs)]
    y = x + ep.combine(torch.cat(outs) if outs else ex, w, h)
    return y, x.detach(), idx, segs


def reference_layer(m: Experts, x: torch.Tensor, k: int):
    """The same model with all experts in this process; also h and the routing."""
    x = torch.tanh(x @ m.proj)
    idx, w = m.route(x, k)
    y = x
    for e in range(m.w1.shape[0]):
        coef = (w * (idx == e)).sum(dim=1, keepdim=True)
        y = y + coef * (torch.relu(x @ m.w1[e]) @ m.w2[e])
    return y, x, idx


def batch(a, step: int, rank: int, teacher: Experts, device: str, dtype):
    """Rank ``rank``'s tokens and targets for ``step`` (the same on every rank)."""
    g = gen("cpu", a.seed, 2, step, rank)
    x = torch.randn(a.tokens, a.hidden, generator=g).to(device=device, dtype=dtype)
    with torch.no_grad():
        target = reference_layer(teacher, x, a.topk)[0]
    return x, target


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--topk", type=int, default=2)
    ap.add_argument("--hidden", type=int, default=16)
    ap.add_argument("--ffn", type=int, default=32)
    ap.add_argument("--tokens", type=int, default=32, help="tokens per rank per step")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    ap.add_argument("--mode", default="auto", choices=list(pya2a.moe.MODES))
    ap.add_argument("--seed", type=int, default=11)
    ap.add_argument("--small", action="store_true", help="20 steps")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--backend", default="staged", choices=["staged", "fused", "auto"],
                    help="device backend (with --device cuda)")
    a = ap.parse_args()
    comm = MPI.COMM_WORLD
    p, me = comm.Get_size(), comm.Get_rank()
    if a.small:
        a.steps = 20
    E = -(-a.experts // p) * p
    dtype = getattr(torch, a.dtype)
    torch.set_num_threads(1)
    dev, ordinal = "cpu", None
    if a.device == "cuda":
        local = comm.Split_type(MPI.COMM_TYPE_SHARED)
        ordinal = local.Get_rank() % torch.cuda.device_count()
        local.Free()
        dev = f"cuda:{ordinal}"
        torch.cuda.set_device(ordinal)

    ep = pya2a.moe.ExpertParallel(comm, E, a.hidden, a.tokens, a.topk, dtype, ordinal,
                                  backend="auto" if ordinal is None else a.backend,
                                  mode=a.mode)
    lo, hi = ep.first_expert, ep.first_expert + ep.local_experts
    model = Experts(E, a.hidden, a.ffn, dtype, dev, a.seed, lo, hi)  # this rank's shard
    ref = Experts(E, a.hidden, a.ffn, dtype, dev, a.seed)  # all of it, in one process
    teacher = Experts(E, a.hidden, a.ffn, dtype, dev, a.seed + 1)
    opt, ref_opt = SGD(model.params, a.lr), SGD(ref.params, a.lr)
    scale = 1.0 / (p * a.tokens * a.hidden)
    worst, first_loss, ok = 0.0, None, True

    for step in range(a.steps):
        # the distributed model: this rank's batch, loss summed over ranks
        batches = [batch(a, step, s, teacher, dev, dtype) for s in range(p)]
        x, target = batches[me]
        y, h, idx, segs = distributed_layer(model, ep, x, a.topk)
        loss = ((y - target) ** 2).sum() * scale
        opt.zero_grad()
        loss.backward()
        for t in (model.proj, model.gate):  # replicated: sum the ranks' gradients
            g = t.grad.cpu().numpy()
            comm.Allreduce(MPI.IN_PLACE, g)
            t.grad.copy_(torch.from_numpy(g))
        total = comm.allreduce(loss.item())

        # the reference: every rank's batch through the whole model in this process
        ref_opt.zero_grad()
        ref_loss = 0.0
        for xs, ts in batches:
            part = ((reference_layer(ref, xs, a.topk)[0] - ts) ** 2).sum() * scale
            part.backward()
            ref_loss += part.item()
        # dispatch moves bytes: the expert inputs are exactly every rank's tokens routed here
        hs, idxs = zip(*comm.allgather((h.cpu(), idx.cpu())), strict=True)
        for le, seg in enumerate(segs):
            want = torch.cat([hs[s][(idxs[s] == lo + le).nonzero()[:, 0]] for s in range(p)])
            ok = ok and torch.equal(seg.cpu(), want)
        # loss and gradients to float tolerance
        diffs = [abs(total - ref_loss) / max(abs(ref_loss), 1e-30)]
        for mine_g, ref_g in ((model.proj.grad, ref.proj.grad), (model.gate.grad, ref.gate.grad),
                              (model.w1.grad, ref.w1.grad[lo:hi]),
                              (model.w2.grad, ref.w2.grad[lo:hi])):
            diffs.append(float((mine_g - ref_g).abs().max() / ref_g.abs().max().clamp_min(1e-30)))
        worst = max(worst, *diffs)
        ok = ok and max(diffs) <= TOL[dtype]
        if not comm.allreduce(ok, op=MPI.LAND):
            if me == 0:
                print(f"WRONG at step {step}: loss {total:.6g} vs {ref_loss:.6g}, relative "
                      f"differences (loss, P, gate, W1, W2) {diffs} on rank 0", flush=True)
            return 1
        opt.step()
        ref_opt.step()
        first_loss = total if first_loss is None else first_loss
        if me == 0 and (step % 50 == 0 or step == a.steps - 1):
            print(f"step {step:4d}  loss {total:.6f}  (single process {ref_loss:.6f})",
                  flush=True)

    worst = comm.allreduce(worst, op=MPI.MAX)
    if me == 0:
        print(f"OK  p={p} experts={E} topk={a.topk} hidden={a.hidden} dtype={a.dtype} "
              f"mode={a.mode} backend={ep.backend} steps={a.steps}: "
              f"loss {first_loss:.4f} -> {total:.4f}, "
              f"largest relative difference to one process {worst:.1e} "
              f"(bytes sent by rank 0: "
              f"{'not counted on the fused backend' if ep.backend == 'fused' else ep.traffic})",
              flush=True)
    ep.free()
    return 0


if __name__ == "__main__":
    sys.exit(main())
