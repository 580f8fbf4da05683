"""``direct``: nonblocking Isend/Irecv to every peer, throttled, peers staggered by rank.

Step k (k = 1..p-1) pairs this rank with ``dst = rank + k`` and ``src = rank - k`` (mod p), so
at any moment every rank sends to a different peer instead of all hitting rank 0 first. At
most ``window`` steps are in flight (option ``window``, env ``PYA2A_DIRECT_WINDOW``, default
32 as MPICH's throttle): a window of p-1 posts everything at once, a window of 1 is pairwise.
The window must be a positive integer; it may differ between ranks.
Zero-byte blocks are skipped on both sides (their counts agree when the call is correct).
"""

from __future__ import annotations

from ..core.registry import AlgorithmInfo, Bound, Context, register
from ..core.spec import VSpec
from ..core.validate import window_setting
from ._bound import bind_groups, group_ops
from ._common import exchange_groups
from .tags import TAG_DIRECT

__all__ = ["schedule", "run", "cost", "prepare", "program"]

DEFAULT_WINDOW = 32


def schedule(rank: int, size: int) -> list[tuple[int, int]]:
    """(dst, src) of steps 1..p-1, in posting order."""
    return [((rank + k) % size, (rank - k) % size) for k in range(1, size)]


def _window(ctx: Context) -> int:
    """The window in force on this rank (it may differ between ranks: each rank throttles
    only its own posts, and every step k is matched by the peer's step k)."""
    return window_setting(ctx.options, DEFAULT_WINDOW)


def run(send: VSpec, recv: VSpec, ctx: Context) -> None:
    """Exchange all blocks with throttled Isend/Irecv."""
    exchange_groups(send, recv, ctx, _windows(ctx), TAG_DIRECT, "direct")


def _windows(ctx: Context) -> list[list[tuple[int, int]]]:
    steps = schedule(ctx.rank, ctx.size)
    w = _window(ctx)
    return [steps[lo:lo + w] for lo in range(0, len(steps), w)]


def prepare(send: VSpec, recv: VSpec, ctx: Context) -> Bound | None:
    """Bind to these buffers with persistent point-to-point requests (same schedule as run)."""
    return bind_groups(send, recv, ctx, _windows(ctx), TAG_DIRECT)


def program(send: VSpec, recv: VSpec, ctx: Context) -> tuple[list, list, None]:
    """The exchange as operation rows over the plan's templates (the same messages as run)."""
    return group_ops(send, recv, ctx.rank, _windows(ctx), TAG_DIRECT), [], None


def cost(p: int, m: float, params: dict) -> float:
    """Like native plus our per-message software overhead: o + (p-1)(ts + tp + m tw)."""
    return params["o"] + (p - 1) * (params["ts"] + params["tp"] + m * params["tw"])


register(AlgorithmInfo(name="direct", device=True, run=run, cost=cost, schedule=schedule,
                       doc=__doc__ or "", prepare=prepare, program=program))
