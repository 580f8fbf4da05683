"""``pairwise``: p-1 exchange steps, one peer at a time.

When p is a power of two, step k pairs ``rank`` with ``rank ^ k`` (both sides send and receive
with the same partner, a perfect matching each step). Otherwise step k sends to ``rank + k``
and receives from ``rank - k`` (mod p). One message each way per step: no contention at the
receiver, the schedule of choice for large blocks.
"""

from __future__ import annotations

from ..core.registry import AlgorithmInfo, Bound, Context, register
from ..core.spec import VSpec
from ._bound import bind_groups, group_ops
from ._common import exchange_groups
from .tags import TAG_PAIRWISE

__all__ = ["schedule", "run", "cost", "prepare", "program"]


def schedule(rank: int, size: int) -> list[tuple[int, int]]:
    """(dst, src) for steps 1..p-1."""
    if size & (size - 1) == 0:
        return [(rank ^ k, rank ^ k) for k in range(1, size)]
    return [((rank + k) % size, (rank - k) % size) for k in range(1, size)]


def run(send: VSpec, recv: VSpec, ctx: Context) -> None:
    """Walk the schedule; each step is an Irecv + Isend + Waitall (zeros skipped)."""
    exchange_groups(send, recv, ctx, [[step] for step in schedule(ctx.rank, ctx.size)],
                    TAG_PAIRWISE, "pairwise")


def prepare(send: VSpec, recv: VSpec, ctx: Context) -> Bound | None:
    """Bind to these buffers with persistent point-to-point requests (same schedule as run)."""
    return bind_groups(send, recv, ctx, [[step] for step in schedule(ctx.rank, ctx.size)],
                       TAG_PAIRWISE)


def program(send: VSpec, recv: VSpec, ctx: Context) -> tuple[list, list, None]:
    """The exchange as operation rows over the plan's templates (the same messages as run)."""
    groups = [[step] for step in schedule(ctx.rank, ctx.size)]
    return group_ops(send, recv, ctx.rank, groups, TAG_PAIRWISE), [], None


def cost(p: int, m: float, params: dict) -> float:
    """p-1 serialized steps: o + (p-1)(ts + tp + m tw)."""
    return params["o"] + (p - 1) * (params["ts"] + params["tp"] + m * params["tw"])


register(AlgorithmInfo(name="pairwise", device=True, run=run, cost=cost, schedule=schedule,
                       doc=__doc__ or "", prepare=prepare, program=program))
