"""``native``: the MPI library's own Alltoall / Alltoallv.

No schedule of ours: MPICH uses throttled Isend/Irecv for Alltoallv (and Bruck / pairwise for
Alltoall by size), Open MPI picks by communicator size. It accepts any datatype, including
non-contiguous derived ones, so it is the fallback for everything the byte-level algorithms
cannot take.
"""

from __future__ import annotations

from mpi4py import MPI

from ..bufspec import VSpec
from . import AlgorithmInfo, Context, register

__all__ = ["run", "cost"]


def run(send: VSpec | None, recv: VSpec, ctx: Context) -> None:
    """Call MPI's Alltoall(v) on the internal communicator with the parsed messages."""
    comm = ctx.comm
    smsg = MPI.IN_PLACE if send is None else None
    if ctx.kind == "alltoall":
        rmsg = [recv.obj, (int(recv.counts[0]), int(recv.displs[0])), recv.datatype]
        if smsg is None:
            smsg = [send.obj, (int(send.counts[0]), int(send.displs[0])), send.datatype]
        comm.Alltoall(smsg, rmsg)
    else:
        comm.Alltoallv(smsg if smsg is not None else send.message(), recv.message())


def cost(p: int, m: float, params: dict) -> float:
    """All p-1 messages posted at once: start-ups overlap poorly, bytes share the links.

    T = o + (p-1) * (ts + m * tw)
    """
    return params["o"] + (p - 1) * (params["ts"] + m * params["tw"])


register(AlgorithmInfo(name="native", run=run, cost=cost, host=True, device=False,
                       needs_contiguous=False, doc=__doc__ or ""))
