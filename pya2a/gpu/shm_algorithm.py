"""``shm``: device buffers of ranks on one node, staged through a node-shared pinned window.

For MPIs that are not CUDA-aware when ``ipc`` cannot run (no peer access between the GPUs,
several ranks per GPU): each rank copies its send blocks device -> host into its own region
of one host shared-memory window page-locked in every process, and each rank copies its
incoming blocks host -> device straight from the peers' regions, pipelined in pieces and
signalled with flags in the window (no MPI messages, no host barrier per call). Each byte
crosses PCIe once each way and no CPU copies it: the bound is the pinned host<->device
bandwidth, not the host MPI's. Engine and protocol: :mod:`pya2a.gpu.shm`; docs/gpu.md.

Availability (every rank of the communicator in one ``MPI.COMM_TYPE_SHARED`` split) is
checked once per communicator, collectively, by :func:`comm_available`; ``auto`` picks
``shm`` for device buffers when all ranks share a node and ``ipc`` is not available. The
window is sized from the all-gathered largest block (``ctx.options["max_block"]``) and lives
until :func:`free_windows` (collective).
"""

from __future__ import annotations

from ..core.registry import AlgorithmInfo, Context, register
from ..core.spec import VSpec

__all__ = ["run", "cost", "comm_available", "free_windows"]


def comm_available(comm, device: int | None = None) -> tuple[bool, str]:
    """Collective on first use per communicator: can ``shm`` run here (one node)?"""
    from .shm import comm_available as avail

    return avail(comm)


def free_windows() -> None:
    """Collective over every communicator that used ``shm``: free its shared windows."""
    from .shm import free_windows as free

    free()


def run(send: VSpec | None, recv: VSpec, ctx: Context) -> None:
    """One exchange through the node-shared window; returns with ``recv`` complete."""
    from .shm import exchange
    from .staging import DeviceTransport

    ok, why = comm_available(ctx.comm)
    if not ok:
        raise ValueError(f"algorithm 'shm' is not available on this communicator: {why}")
    t = ctx.transport
    if recv.device is None or not isinstance(t, DeviceTransport):
        raise TypeError("algorithm 'shm' takes device buffers only")
    if send is None:  # in place: read from a device copy of the receive buffer
        send = t.clone(recv)
    exchange(send, recv, ctx.comm, t, ctx.options.get("max_block"))


def cost(p: int, m: float, params: dict) -> float:
    """o_shm + (p-1) m / bw_pcie: downloads and uploads overlap, one PCIe crossing each way.

    ``bw_pcie`` is the concurrent pinned bandwidth per GPU in each direction (about 24 GB/s
    on the H200 machine with all four GPUs copying; docs/gpu.md), ``o_shm`` the per-call
    cost (events, a few copy launches, flag polling, a stream synchronisation).
    """
    return params.get("o_shm", 4e-5) + (p - 1) * m / params.get("bw_pcie", 2.4e10)


def _supports(p: int, send: VSpec | None, recv: VSpec | None, device: bool) -> str | None:
    if not device:
        return "takes device buffers only"
    return None


register(AlgorithmInfo(name="shm", run=run, cost=cost, supports=_supports, host=False,
                       device=True, comm_available=comm_available, doc=__doc__ or ""))
