"""``native``: the MPI library's own Alltoall / Alltoallv.

No schedule of ours: MPICH uses throttled Isend/Irecv for Alltoallv (and Bruck / pairwise for
Alltoall by size), Open MPI picks by communicator size. It accepts any datatype, including
non-contiguous derived ones, so it is the fallback for everything the byte-level algorithms
cannot take.
"""

from __future__ import annotations

from mpi4py import MPI

from ..core.registry import AlgorithmInfo, Bound, Context, register
from ..core.spec import VSpec

__all__ = ["run", "cost", "prepare", "program"]


def run(send: VSpec | None, recv: VSpec, ctx: Context) -> None:
    """MPI's Alltoall(v) on the internal communicator, through the transport.

    Host buffers go straight to MPI; device buffers are staged through pinned host memory,
    or handed to MPI as they are when it is CUDA-aware (:mod:`pya2a.gpu.staging`).
    """
    ctx.transport.native(send, recv, ctx.kind)


def _messages(send: VSpec | None, recv: VSpec, kind: str) -> tuple[object, object]:
    if kind == "alltoall":
        rmsg = [recv.obj, (int(recv.counts[0]), int(recv.displs[0])), recv.datatype]
        smsg = MPI.IN_PLACE if send is None else \
            [send.obj, (int(send.counts[0]), int(send.displs[0])), send.datatype]
    else:
        rmsg = recv.message()
        smsg = MPI.IN_PLACE if send is None else send.message()
    return smsg, rmsg


def prepare(send: VSpec | None, recv: VSpec, ctx: Context) -> Bound | None:
    """Bind to these buffers: ``Alltoall(v)_init`` when allowed and available, else the call.

    The persistent collective is only made when ``ctx.options["persistent_collective"]`` is
    set (``Plan.bind``): its initialisation is collective, so every rank must bind at the
    same point, which an address-keyed cache cannot promise.
    """
    if recv.device is not None:
        return None
    comm = ctx.comm
    smsg, rmsg = _messages(send, recv, ctx.kind)
    if ctx.options.get("persistent_collective"):
        init = getattr(comm, "Alltoall_init" if ctx.kind == "alltoall" else "Alltoallv_init",
                       None)
        if init is not None and MPI.Get_version() >= (4, 0):
            req = init(smsg, rmsg)
            start, wait = req.Start, req.Wait

            def run_persistent() -> None:
                start()
                wait()

            return Bound(run=run_persistent, free=req.Free, persistent_collective=True)
    call = comm.Alltoall if ctx.kind == "alltoall" else comm.Alltoallv
    return Bound(run=lambda: call(smsg, rmsg))


def program(send: VSpec | None, recv: VSpec, ctx: Context) -> tuple | None:
    """One ``MPI_Alltoallv`` row with the counts and displacements as C int tables (any
    datatype; ``send`` None: ``MPI_IN_PLACE``). None for device buffers."""
    from ._bound import ALLTOALLV

    if recv.device is not None or ctx.kind != "alltoallv":
        return None
    src = recv if send is None else send
    tables = ((src.counts, src.mpi_displs(), recv.counts, recv.mpi_displs()),
              (src.datatype, recv.datatype))
    return [(ALLTOALLV, -1 if send is None else 0, 1, 0, 0, 0)], [], tables


def cost(p: int, m: float, params: dict) -> float:
    """All p-1 messages posted at once: start-ups overlap poorly, bytes share the links.

    T = o + (p-1) * (ts + m * tw)
    """
    return params["o"] + (p - 1) * (params["ts"] + m * params["tw"])


register(AlgorithmInfo(name="native", run=run, cost=cost, host=True, device=True,
                       needs_contiguous=False, takes_in_place=True, oneshot_plan=True,
                       doc=__doc__ or "", prepare=prepare, program=program))
