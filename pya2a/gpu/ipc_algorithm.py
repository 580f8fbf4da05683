"""``ipc``: GPU buffers of ranks on one node, moved by kernels over CUDA/HIP IPC (NVLink).

The engine is :class:`pya2a.gpu.ipc_alltoallv.IpcAlltoallv` (design and measurements in
docs/gpu-ipc.md): symmetric staging memory opened by every peer once, one kernel launch per
call, completion signalled by flags in peer memory, no host barrier, stream-ordered on the
current CuPy stream (the call returns before the data has landed; work queued after it on
that stream sees the result).

This module adapts it to the registry: one engine per internal communicator and device,
made on first use (collective) and made again, larger, when a call's largest block exceeds
its staging capacity. Both decisions use the all-gathered agreement record (the largest
block over all ranks, ``ctx.options["max_block"]``), so every rank makes them together.
Availability (one node, peer access between every pair of GPUs; ranks may share a GPU) is
checked once per communicator, collectively, by :func:`comm_available`; ``auto`` only picks
``ipc`` when it holds and, for ranks sharing a GPU, only under MPS (:func:`comm_auto`).
Engines live until :func:`free_engines` or process exit.

From ``IpcAlltoallv.DIRECT_FROM`` bytes per pair (global largest block) the receive buffer
is registered with the peers (``IpcAlltoallv.register_recv``: a one-int64 ``Allgather`` per
call, handles and displacements all-gathered only for a combination of buffers not seen
recently), so
``ce`` (from ``CE_FROM``) and ``push`` write straight into the user's buffer, pool arrays
included. The engine then grows its staging slots only if some rank's buffer could not be
registered (every rank learns that from the same exchange).
"""

from __future__ import annotations

from mpi4py import MPI

from ..core.registry import AlgorithmInfo, Context, register
from ..core.spec import VSpec
from ..core.state import live_states, state
from ..core.validate import allreduce_max
from .device import RawArray

__all__ = ["run", "cost", "comm_available", "comm_auto", "free_engines"]

MIN_CAPACITY = 1 << 20  # staging bytes per peer pair in a fresh engine
_ENGINE = "ipc.engine"  # CommState slot: {device: engine}


def comm_available(comm: MPI.Intracomm, device: int | None = None) -> tuple[bool, str]:
    """Collective on first use per communicator: can ``ipc`` run here? Same on every rank.

    Only with the CUDA (CuPy) device backend: the engine launches its kernels on CuPy
    streams, so under another backend (an emulated device, a future HIP one) it would run
    outside that backend's stream order. The backend is process-wide and the same on
    every rank of a job, so this verdict needs no communication.
    """
    from . import device as gdev

    be = gdev.backend()
    if getattr(be, "name", None) != "cupy":
        return False, f"the device backend in use ({getattr(be, 'name', be)!r}) has no IPC"
    st = state(comm)
    hit = st.slot("ipc.available")
    if hit is None:
        try:
            from .ipc_alltoallv import IpcAlltoallv
        except ImportError as exc:  # pragma: no cover - packaging problem
            hit = (False, f"IPC backend unavailable: {exc}")
        else:
            hit = IpcAlltoallv.available(comm, device=device)
        st.set_slot("ipc.available", hit)
    return hit


def comm_auto(comm: MPI.Intracomm, device: int | None = None) -> tuple[bool, str]:
    """Collective on first use per communicator: may ``auto`` pick ``ipc`` here?

    Yes with a GPU per rank, or with ranks sharing a GPU under MPS (their kernels run at
    once); no when ranks time-slice a GPU (each wait on a peer costs a time slice), where
    an explicit ``algorithm="ipc"`` still runs. Same answer on every rank.
    """
    st = state(comm)
    hit = st.slot("ipc.auto")
    if hit is None:
        from .ipc import device_share

        share = device_share(comm, device)
        hit = (True, "ok") if share.fast else (
            False, f"{share.ranks_per_device} ranks share a GPU without MPS (time-sliced)")
        st.set_slot("ipc.auto", hit)
    return hit


def _engine(comm: MPI.Intracomm, device: int, need: int):
    """The engine for (comm, device) with staging slots of at least ``need`` bytes (global)."""
    from .ipc_alltoallv import IpcAlltoallv

    engines = state(comm).slot(_ENGINE, _Engines)
    eng = engines.get(device)
    if eng is not None and eng.slot_bytes >= need:
        return eng
    cap = max(MIN_CAPACITY, 1 << max(0, int(need) - 1).bit_length())
    if eng is not None:
        cap = max(cap, 2 * eng.slot_bytes)
        eng.free()
    eng = engines[device] = IpcAlltoallv(comm, cap, device=device)
    return eng


class _Engines(dict):
    """A communicator's engines by device; released with its state (or :func:`free_engines`)."""

    def free(self) -> None:
        while self:
            _, eng = self.popitem()
            eng.free()


def free_engines() -> None:
    """Collective over every communicator that used ``ipc``: release their GPU memory.

    Engines are also released with their communicator (``Comm.Free`` of the user's one).
    """
    for st in live_states():
        engines = st.slot(_ENGINE)
        if engines is not None:
            engines.free()


def run(send: VSpec | None, recv: VSpec, ctx: Context) -> None:
    """One engine call: method by the global largest block (``ll`` small, ``push`` large,
    ``ce`` straight into registered receive buffers when every rank's could be registered)."""
    opts = ctx.options
    memo = opts.get("_ipc_last")
    if memo is not None and send is not None:  # a repeated one-shot call (see below)
        eng = memo[0]
        if not eng._freed and memo[1] == send.addr and memo[2] == recv.addr:
            eng.launch(memo[3])
            return
    from . import cupy as _cupy
    from .ipc_alltoallv import IpcAlltoallv

    ok, why = comm_available(ctx.comm, recv.device)
    if not ok:
        raise ValueError(f"algorithm 'ipc' is not available on this communicator: {why}")
    need = opts.get("max_block")
    if need is None:  # engine size and method must agree on every rank: never a local value
        need = allreduce_max(ctx.comm, int(recv.bcounts.max(initial=0)))
    need = max(int(need), 1)
    direct = need >= IpcAlltoallv.DIRECT_FROM  # global: every rank registers, or none
    eng = _engine(ctx.comm, int(recv.device), 1 if direct else need)
    rbuf = RawArray.flat(recv.addr, recv.nbytes)
    reg = None
    if direct:
        reg = eng.register_recv(rbuf, recv.bdispls)
        if not reg.everyone and need > eng.slot_bytes:  # same verdict on every rank
            eng = _engine(ctx.comm, int(recv.device), need)
            reg = eng.register_recv(rbuf, recv.bdispls)
    method = IpcAlltoallv.choose(need, direct=reg is not None and reg.everyone)
    keep = None
    if send is None:  # in place: the engine needs a separate source
        cp = _cupy()
        keep = cp.empty(recv.nbytes, dtype=cp.uint8)
        cp.cuda.runtime.memcpyAsync(keep.data.ptr, recv.addr, recv.nbytes,
                                    cp.cuda.runtime.memcpyDeviceToDevice,
                                    cp.cuda.get_current_stream().ptr)
        sbuf, scounts, sdispls = keep, recv.bcounts, recv.bdispls
    else:
        sbuf, scounts, sdispls = RawArray.flat(send.addr, send.nbytes), send.bcounts, send.bdispls
    call = eng.alltoallv(sbuf, scounts, sdispls, rbuf, recv.bcounts, recv.bdispls,
                         method=method, registration=reg if method in ("push", "ce") else None)
    if not direct and send is not None:  # registration (direct) is collective every call
        # A one-shot call's context lives as long as its agreed decision (api._Decision),
        # whose specs are fixed: the same engine and buffers repeat the packed call (small
        # sizes, where the host time is the call's time).
        opts["_ipc_last"] = (eng, send.addr, recv.addr, call)
    del keep  # stream-ordered: CuPy's pool reuses it only after work queued before now


def cost(p: int, m: float, params: dict) -> float:
    """One launch, flags instead of messages: o_gpu + (p-1) m / bw_peer (see docs/gpu-ipc.md)."""
    return params.get("o_ipc", 6e-6) + (p - 1) * m / params.get("bw_ipc", 3.3e11)


def _supports(p: int, send: VSpec | None, recv: VSpec | None, device: bool) -> str | None:
    if not device:
        return "takes device buffers only"
    if p > 8:
        return "needs at most 8 ranks (one node)"
    return None


register(AlgorithmInfo(name="ipc", run=run, cost=cost, supports=_supports, host=False,
                       device=True, takes_in_place=True, uses_transport=False,
                       oneshot_plan=False, comm_available=comm_available, comm_auto=comm_auto,
                       doc=__doc__ or ""))
