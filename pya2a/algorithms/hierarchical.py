"""``hierarchical``: node-aware two-phase exchange (within each node, then between nodes).

It is the ``mesh`` body on the grid (nodes x ranks per node), which requires ranks numbered
node by node with the same number on every node (the usual ``mpiexec`` block placement).
Phase 1 runs inside each node: local rank j hands every local peer j' the blocks it has for
local index j' on every node. Phase 2 crosses nodes between ranks of equal local index, one
message per remote node carrying the blocks of all the node's ranks: (nodes - 1) inter-node
messages per rank instead of (p - ranks per node), each ranks-per-node times larger.

The layout is found once per communicator, collectively (``MPI_Comm_split_type`` with
``COMM_TYPE_SHARED``, then an all-gather of every rank's node leader and local index), and
is the same on every rank. ``PYA2A_RANKS_PER_NODE=k`` declares k consecutive ranks a node
instead (for launchers whose shared-memory detection is wrong, and to test the two-level
path on one machine); it must be the same on every rank. ``auto`` does not pick this
algorithm yet: the selector has no measured inter-node parameters (no multi-node machine
has been available to tune on), so it is explicit only.
"""

from __future__ import annotations

import os

from mpi4py import MPI

from ..core.registry import AlgorithmInfo, Context, register
from ..core.spec import VSpec
from ..core.state import state
from ..core.validate import same_everywhere
from . import mesh

__all__ = ["node_layout", "run", "cost"]


def node_layout(comm: MPI.Intracomm) -> tuple[int, int] | str:
    """(nodes, ranks per node) for ``comm``, or the reason it is not node-contiguous.

    Collective on first use per communicator (kept in its state); the answer is the
    same on every rank.
    """
    st = state(comm)
    hit = st.slot("hierarchical.layout")
    if hit is not None:
        return hit
    p = comm.Get_size()
    env = os.environ.get("PYA2A_RANKS_PER_NODE", "").strip()
    node = st.node()
    if not same_everywhere(comm, env):
        hit = "PYA2A_RANKS_PER_NODE differs between ranks"
    else:
        table = [(int(node.leaders[r]), int(node.local_ranks[r]), int(node.local_sizes[r]),
                  env) for r in range(p)]
        hit = _layout(table, p)
    st.set_slot("hierarchical.layout", hit)
    return hit


def _layout(table: list[tuple[int, int, int, str]], p: int) -> tuple[int, int] | str:
    envs = {t[3] for t in table}
    if len(envs) > 1:
        return "PYA2A_RANKS_PER_NODE differs between ranks"
    env = envs.pop()
    if env:
        try:
            rpn = int(env)
        except ValueError:
            return f"PYA2A_RANKS_PER_NODE={env!r} is not an integer"
        if rpn < 1 or p % rpn:
            return f"PYA2A_RANKS_PER_NODE={rpn} does not divide {p} ranks"
        return (p // rpn, rpn)
    rpn = table[0][2]
    for i, (leader, lrank, lsize, _) in enumerate(table):
        if lsize != rpn or leader != i - i % rpn or lrank != i % rpn:
            return ("needs ranks numbered node by node with the same number on every node "
                    f"(rank {i}: node leader {leader}, local rank {lrank} of {lsize})")
    return (p // rpn, rpn)


def run(send: VSpec, recv: VSpec, ctx: Context) -> None:
    """The mesh body on the (nodes, ranks per node) grid."""
    layout = node_layout(ctx.comm)
    if isinstance(layout, str):
        raise ValueError(f"algorithm 'hierarchical': {layout}")
    opts = dict(ctx.options)
    opts["grid"] = layout
    mesh.run(send, recv, Context(comm=ctx.comm, rank=ctx.rank, size=ctx.size, kind=ctx.kind,
                                 transport=ctx.transport, in_place=ctx.in_place,
                                 options=opts))


def cost(p: int, m: float, params: dict) -> float:
    """Not priced: without inter-node parameters auto must not pick it (explicit only)."""
    return float("inf")


register(AlgorithmInfo(name="hierarchical", run=run, cost=cost, doc=__doc__ or ""))
