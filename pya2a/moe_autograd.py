"""Autograd for :mod:`pya2a.moe`: dispatch and combine as ``torch.autograd.Function``s.

:meth:`pya2a.moe.ExpertParallel.dispatch` and :meth:`~pya2a.moe.ExpertParallel.combine`
come here by themselves when an input is a torch tensor that requires grad (and grad mode
is on); :func:`dispatch` and :func:`combine` are the same calls by name.

Gradients (``N = n * topk`` entries per rank, ``g`` the incoming gradient):

* dispatch: ``expert_x[row of (t, k)] = x[t]``, so ``dx[t] = sum_k g[row of (t, k)]``:
  the mirrored exchange, the copies of a token summed in float32 (float64 for float64
  rows) and cast to the dtype. In per_rank mode the owner first sums the rows of a token's
  local experts, so one row per (token, rank) travels back.
* combine: ``y[t] = sum_k w[t, k] * expert_y[row of (t, k)]``, so
  ``d expert_y[row of (t, k)] = w[t, k] * g[t]`` (sent to the experts along the dispatch
  route: per_expert mode sends the scaled rows, per_rank mode one ``g[t]`` per rank and
  the owner scales it) and ``d w[t, k] = <g[t], expert_y[row of (t, k)]>`` in float32 (on
  the token's rank from the rows combine received, per_expert; on the owner, sent back as
  one word per entry, per_rank).

The backward passes are collective: every rank must backpropagate through every dispatch
and combine, in the same order (the usual case: every rank runs the same layers and calls
``backward`` on its loss). ``requires_grad`` must agree across ranks (checked, raised
everywhere). A differentiable dispatch returns a new ``expert_x`` (not the reused buffer),
since the expert op may keep it for its own backward pass.

On the fused GPU backend the backward passes reuse its two kernels
(:mod:`pya2a.gpu.moe_fused`): the gradient of combine is a dispatch launch of the scaled
rows, the gradient of dispatch a combine launch with unit weights; everything stays on the
device. There, the calls run on torch's current stream (the one autograd runs each
backward node on), so CuPy's launches and torch's kernels are ordered.
"""

from __future__ import annotations

import contextlib
from typing import Any

import numpy as np
import torch

__all__ = ["MoEDispatch", "MoECombine", "dispatch", "combine"]


class MoEDispatch(torch.autograd.Function):
    """``expert_x = dispatch(x)``; backward sums each token's copies (collective)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, ep: Any, topk_idx: Any, box: list) -> torch.Tensor:
        with _torch_stream(ep):
            expert_x, counts, handle = ep._dispatch(x, topk_idx, grad=True)
        ctx.ep, ctx.handle = ep, handle
        box.extend((counts, handle))
        return expert_x

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple:
        with _torch_stream(ctx.ep):
            dx = ctx.ep._dispatch_backward(grad.contiguous(), ctx.handle)
        return dx, None, None, None


class MoECombine(torch.autograd.Function):
    """``y = combine(expert_y, topk_weight)``; backward gives both gradients (collective)."""

    @staticmethod
    def forward(ctx: Any, expert_y: torch.Tensor, topk_weight: torch.Tensor, ep: Any,
                handle: Any, out: Any) -> torch.Tensor:
        with _torch_stream(ep):
            y, saved = ep._combine(expert_y, topk_weight, handle, out=out, grad=True)
        ctx.ep, ctx.handle, ctx.saved = ep, handle, saved
        ctx.save_for_backward(expert_y, topk_weight)
        return y

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple:
        expert_y, topk_weight = ctx.saved_tensors
        with _torch_stream(ctx.ep):
            gey, gw = ctx.ep._combine_backward(grad.contiguous(), expert_y, topk_weight,
                                               ctx.handle, ctx.saved)
        gw = torch.as_tensor(gw, device=topk_weight.device).to(topk_weight.dtype)
        return gey, gw, None, None, None


def dispatch(ep: Any, x: torch.Tensor, topk_idx: Any) -> tuple[torch.Tensor, Any, Any]:
    """Differentiable :meth:`pya2a.moe.ExpertParallel.dispatch` (same arguments, results)."""
    box: list = []
    expert_x = MoEDispatch.apply(x, ep, topk_idx, box)
    counts, handle = box
    return expert_x, counts, handle


def combine(ep: Any, expert_y: Any, topk_weight: Any, handle: Any, *,
            out: Any = None) -> torch.Tensor:
    """Differentiable :meth:`pya2a.moe.ExpertParallel.combine` (same arguments, result)."""
    expert_y, topk_weight = _tensor(expert_y), _tensor(topk_weight)
    return MoECombine.apply(expert_y, topk_weight, ep, handle, out)


def _tensor(a: Any) -> torch.Tensor:
    """A torch view of a NumPy / CuPy array (tensors pass through)."""
    if isinstance(a, torch.Tensor):
        return a
    return torch.from_numpy(a) if isinstance(a, np.ndarray) else torch.as_tensor(a)


def _torch_stream(ep: Any) -> Any:
    """On the fused backend: make torch's current stream CuPy's current stream (a context
    manager; a no-op elsewhere or when they are the same)."""
    if getattr(ep, "_fused", None) is None:
        return contextlib.nullcontext()
    import cupy

    ptr = torch.cuda.current_stream(ep.device).cuda_stream
    stack = contextlib.ExitStack()
    stack.enter_context(cupy.cuda.Device(ep.device))  # CuPy's streams are per device
    if ptr != cupy.cuda.get_current_stream().ptr:
        stack.enter_context(cupy.cuda.ExternalStream(ptr, ep.device))
    return stack
