"""Expert-parallel MoE token dispatch and combine on top of pya2a.

Each rank holds ``num_experts // p`` experts, partitioned contiguously: rank ``r`` owns
global experts ``[r * E_local, (r + 1) * E_local)``. A router has picked ``topk`` experts per
token. :meth:`ExpertParallel.dispatch` sends the tokens to the ranks owning their experts
and returns them grouped by local expert, one row per (token, expert) pair, contiguous per
expert; :meth:`ExpertParallel.combine` sends the expert outputs back and sums them per
token, weighted by the router's scores (in float32, cast back)::

    import pya2a.moe
    ep = pya2a.moe.ExpertParallel(comm, num_experts=64, hidden=2048, max_tokens=512,
                                  topk=6, dtype=np.float16)
    expert_x, expert_counts, handle = ep.dispatch(x, topk_idx)
    # rows [sum(expert_counts[:l]), sum(expert_counts[:l+1])) belong to local expert l
    expert_y = run_experts(expert_x, expert_counts)
    y = ep.combine(expert_y, topk_weight, handle)

With torch tensors that require grad, both calls are differentiable
(:mod:`pya2a.moe_autograd`).

Two ways to move the rows (``mode``), same ``expert_x`` either way:

* ``per_expert``: one copy per (token, expert) pair. The flat (token, k) entries are
  ordered by global expert with one stable argsort (experts are contiguous per rank, so
  this groups them by destination too); one ``Alltoallv`` moves the rows; the receiver
  reorders them from (source, expert) to (expert, source) order with one gather whose
  permutation comes from the count matrix alone. Combine gathers ``expert_y`` back into
  (source, expert) order, runs the mirrored ``Alltoallv`` and accumulates the ``topk``
  slots per token in k order.
* ``per_rank``: one copy per (token, destination rank). A small ``Alltoallv`` first sends
  each entry's copy index (4 bytes per entry), then the copies travel; the receiver
  expands each copy to its local experts. Combine sends the weights to the owners (4 or 8
  bytes per entry), each owner sums a token's local expert outputs weighted into one
  partial row (float32, cast to ``dtype``), and one row per (token, rank) travels back;
  the token's rank sums its partials in rank order.
* ``auto`` (default) picks per dispatch whichever moves fewer bytes between ranks over a
  whole step (dispatch + combine), from the count matrix every rank already has.

Every rank's per-expert counts (and, for ``per_rank`` / ``auto``, its copies per
destination rank) travel in the ``Allgather`` that agrees on errors
(:func:`pya2a.core.validate.agree`), so the counts are exchanged once per dispatch.

Rows are float16, bfloat16, float32 or float64 (any dtype for dispatch alone). bfloat16
rows are moved as 2-byte words and converted to float32 to accumulate: torch tensors of
dtype ``torch.bfloat16`` are accepted as they are; NumPy / CuPy arrays pass the bits as
uint16 (or an ``ml_dtypes.bfloat16`` NumPy array).

Memory and allocation: every token-sized buffer is allocated once in the constructor from
``max_tokens`` (and ``max_recv_tokens``); what remains per call is O(tokens * topk) integer
index arrays, the count record, the returned ``y`` unless ``out=`` is given, and whatever
the chosen all-to-all algorithm allocates (``per_rank`` also allocates its float32 partial
sums). The fused GPU path (:mod:`pya2a.gpu.moe_fused`) allocates nothing per call.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from mpi4py import MPI

import pya2a  # the exchange is looked up at call time (pya2a.Alltoallv), so wrappers apply

from .core import watchdog
from .core.devices import array_family
from .core.spec import is_device_buffer
from .core.state import check_comm as _check_comm
from .core.state import internal_comm, watch
from .core.validate import agree, allgather_object

__all__ = ["ExpertParallel", "DispatchHandle", "reference", "BACKENDS", "MODES", "PHASES"]

BACKENDS = ("auto", "host", "staged", "fused")
MODES = ("auto", "per_expert", "per_rank")
PHASES = ("dispatch", "combine", "dispatch_backward", "combine_backward")
_META = 4  # bytes of an entry's copy index in per_rank mode


def _excl_cumsum(a: np.ndarray) -> np.ndarray:
    out = np.zeros(a.size, dtype=np.int64)
    np.cumsum(a[:-1], out=out[1:])
    return out


@dataclass(eq=False)
class DispatchHandle:
    """What :meth:`ExpertParallel.combine` (and the backward passes) need from one dispatch.

    Host index arrays; "entries" are the flat (token, k) pairs, ``N = n * topk``.

    Attributes:
        owner: id of the :class:`ExpertParallel` that made it.
        mode: "per_expert" or "per_rank" (what this dispatch used).
        num_tokens: tokens this rank dispatched (n).
        num_rows: rows of ``expert_x`` on this rank (sum of ``expert_counts``).
        order: int64 (N,): flat entries in send order (stable by expert).
        inv: int64 (N,): position of flat entry ``t * topk + k`` in ``order``.
        rperm: int64 (num_rows,): ``expert_x`` row -> received entry (source, expert order).
        rinv: int64 (num_rows,): received entry -> its ``expert_x`` row.
        sendcounts, recvcounts: int64 (p,): entries sent to / received from each rank.
        counts: int64 (p, num_experts): every rank's per-expert counts for this dispatch.
        expert_counts: int64 (E_local,): rows per local expert.
        copy_tok: int64 (S,): per_rank: token of each sent copy (by rank, then token).
        copy_send, copy_recv: int64 (p,): per_rank: copies sent to / received from each rank.
        xsrc: int64 (num_rows,): per_rank: received copy of each ``expert_x`` row.
        owner_plan, token_plan: per_rank: ``[(segments, rows)]`` per slot j: the j-th row of
            each received copy's ``expert_x`` rows / of each token's partial rows.
    """

    owner: int
    mode: str
    num_tokens: int
    num_rows: int
    order: np.ndarray
    inv: np.ndarray
    rperm: np.ndarray
    rinv: np.ndarray
    sendcounts: np.ndarray
    recvcounts: np.ndarray
    counts: np.ndarray
    expert_counts: np.ndarray
    copy_tok: Any = None
    copy_send: Any = None
    copy_recv: Any = None
    xsrc: Any = None
    owner_plan: Any = None
    token_plan: Any = None
    dev: dict = field(default_factory=dict)  # device copies of index arrays (staged path)




def _wants_grad(*arrays: Any) -> bool:
    """True if any argument is a torch tensor that requires grad, with grad mode on."""
    torch = sys.modules.get("torch")
    if torch is None or not torch.is_grad_enabled():
        return False
    return any(array_family(a) == "torch" and a.requires_grad for a in arrays)


class ExpertParallel:
    """Expert-parallel dispatch and combine for one MoE layer configuration. Collective.

    Args:
        comm: mpi4py intracommunicator; every rank holds ``num_experts // p`` experts.
        num_experts: total experts E; must be a multiple of the communicator size.
        hidden: hidden size H (elements per token row).
        max_tokens: most tokens any rank passes to one :meth:`dispatch` (sizes the buffers).
        topk: experts per token (k >= 1); duplicate experts in one token's row are allowed
            and count twice.
        dtype: dtype of token rows: float16, bfloat16, float32, float64 (NumPy dtype, name
            or torch dtype), or any NumPy dtype for dispatch alone.
        device: None for host arrays (NumPy, torch CPU tensors), else the CUDA device
            ordinal that this rank's device arrays (CuPy or torch) live on.
        backend: "auto" (host for ``device=None``; on a device, "fused" when the ranks can
            map each other's GPU memory (one node, IPC; ranks sharing a GPU only under
            MPS), else "staged"), "host", "staged"
            (device arrays through :func:`pya2a.Alltoallv`, staged through host memory when
            MPI is not CUDA-aware) or "fused" (:mod:`pya2a.gpu.moe_fused`).
        mode: "auto" (default: per dispatch, the mode that moves fewer bytes between ranks),
            "per_expert" (one copy per (token, expert) pair) or "per_rank" (one copy per
            (token, destination rank)). On the fused backend "auto" is "per_expert", and
            "per_rank" has no graph capture. ``backend="auto"`` with
            ``mode="per_rank"`` takes the staged backend.
        max_recv_tokens: most rows one rank may receive in one dispatch; default
            ``p * max_tokens * topk`` (the worst case). A dispatch exceeding it raises
            ValueError on every rank.
        algorithm: all-to-all algorithm for the host / staged paths (as for
            :func:`pya2a.Alltoallv`).

    Attributes:
        dtype: NumPy dtype of the stored rows (uint16 for bfloat16: the bits).
        dtype_name: the row type's name ("bfloat16", "float16", ...).
        traffic: bytes this rank sent to other ranks, per phase (:data:`PHASES`), summed
            over calls since construction (host and staged paths; rows and index/weight
            words, not the count agreement).

    Raises:
        TypeError, ValueError: bad or rank-inconsistent arguments, on every rank.
    """

    def __init__(self, comm: MPI.Intracomm, num_experts: int, hidden: int, max_tokens: int,
                 topk: int, dtype: Any, device: int | None = None, *,
                 backend: str = "auto", mode: str = "auto", max_recv_tokens: int | None = None,
                 algorithm: str = "auto") -> None:
        call = "ExpertParallel"
        _check_comm(call, comm)
        self.comm = comm
        self._icomm = internal_comm(comm, call)
        guard = watch(self._icomm, call) if watchdog.timeout() is not None else None
        try:
            self._setup(call, num_experts, hidden, max_tokens, topk, dtype, device, backend,
                        mode, max_recv_tokens, algorithm)
        finally:
            watchdog.leave(guard)

    def _setup(self, call: str, num_experts: int, hidden: int, max_tokens: int, topk: int,
               dtype: Any, device: int | None, backend: str, mode: str,
               max_recv_tokens: int | None, algorithm: str) -> None:
        """The collective part of construction: agree on the arguments, make the buffers."""
        p, rank = self._icomm.Get_size(), self._icomm.Get_rank()
        self.size, self.rank = p, rank
        exc: BaseException | None = None
        conf = np.zeros(8, dtype=np.int64)
        try:
            for name, v, lo in (("num_experts", num_experts, 1), ("hidden", hidden, 1),
                                ("max_tokens", max_tokens, 0), ("topk", topk, 1)):
                if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
                    raise TypeError(f"{call}: {name} must be an int, got {type(v).__name__}")
                if v < lo:
                    raise ValueError(f"{call}: {name} must be >= {lo}, got {v}")
            if num_experts % p:
                raise ValueError(f"{call}: num_experts={num_experts} is not a multiple of the "
                                 f"communicator size {p} (experts are split evenly, "
                                 f"contiguously across ranks)")
            if topk > num_experts:
                raise ValueError(f"{call}: topk={topk} exceeds num_experts={num_experts}")
            self.dtype_name, self.dtype = _row_type(call, dtype)
            if device is not None and (isinstance(device, bool)
                                       or not isinstance(device, (int, np.integer))
                                       or device < 0):
                raise TypeError(f"{call}: device must be None or a CUDA device ordinal, "
                                f"got {device!r}")
            if backend not in BACKENDS:
                raise ValueError(f"{call}: unknown backend {backend!r}, known: {BACKENDS}")
            if mode not in MODES:
                raise ValueError(f"{call}: unknown mode {mode!r}, known: {MODES}")
            if device is None and backend in ("staged", "fused"):
                raise ValueError(f"{call}: backend {backend!r} needs device=<ordinal>")
            if device is not None and backend == "host":
                raise ValueError(f"{call}: backend 'host' takes device=None")
            cap = p * max_tokens * topk if max_recv_tokens is None else max_recv_tokens
            if isinstance(cap, bool) or not isinstance(cap, (int, np.integer)) or cap < 0:
                raise ValueError(f"{call}: max_recv_tokens must be an int >= 0, got {cap!r}")
            conf[:] = (num_experts, hidden, max_tokens, topk, _type_code(self.dtype_name),
                       -1 if device is None else 1 + BACKENDS.index(backend), cap,
                       MODES.index(mode))
        except Exception as e:
            exc = e
        table = agree(self._icomm, exc, conf)
        for col, name in enumerate(("num_experts", "hidden", "max_tokens", "topk", "dtype",
                                    "device/backend", "max_recv_tokens", "mode")):
            if (table[:, 1 + col] != table[0, 1 + col]).any():
                raise ValueError(f"{call}: ranks pass different {name} (it must be the same "
                                 f"on every rank)")
        self.num_experts, self.hidden = int(num_experts), int(hidden)
        self.max_tokens, self.topk = int(max_tokens), int(topk)
        self.local_experts = self.num_experts // p
        self.first_expert = rank * self.local_experts
        self.max_recv_tokens = int(conf[6])
        self.device = None if device is None else int(device)
        self.algorithm = algorithm
        self.row_bytes = self.hidden * self.dtype.itemsize
        self._bf16 = self.dtype_name == "bfloat16"
        if self._bf16:
            self._acc_dtype = np.dtype(np.float32)
        elif self.dtype.kind in "fc":
            self._acc_dtype = np.promote_types(self.dtype, np.float32)
        else:
            self._acc_dtype = np.dtype(np.float32)
        self._wdt = np.dtype(np.float64 if self._acc_dtype.itemsize == 16
                             or self._acc_dtype == np.float64 else np.float32)
        self.traffic = dict.fromkeys(PHASES, 0)
        self._fused = None
        self._xp = np
        if device is not None:
            from .gpu import cupy

            self._xp = cupy()
        if self.device is None:
            self.backend = "host"
        elif backend == "auto":
            from .gpu.moe_fused import fused_available

            ok, _why = fused_available(self._icomm, self, auto=True)
            self.backend = "fused" if ok and mode != "per_rank" else "staged"
        else:
            self.backend = backend
        # the fused backend's "auto" is per_expert (its per_rank launches are not timed)
        self.mode = "per_expert" if self.backend == "fused" and mode == "auto" else mode
        if self.backend == "fused":
            from .gpu.moe_fused import FusedExpertParallel, fused_available

            if backend == "fused":
                ok, why = fused_available(self._icomm, self)  # collective, same everywhere
                if not ok:
                    raise ValueError(f"{call}: backend 'fused' cannot run here: {why}")
            self._fused = FusedExpertParallel(self._icomm, self)
            return
        xp, n, r, h = self._xp, self.max_tokens * self.topk, self.max_recv_tokens, self.hidden
        with _on_device(self.device):
            self._sbuf = xp.empty((n, h), dtype=self.dtype)  # sent rows, expert order
            self._rbuf = xp.empty((r, h), dtype=self.dtype)  # received, (source, expert)
            self._xbuf = xp.empty((r, h), dtype=self.dtype)  # expert_x, (expert, source)
            self._tmp = xp.empty((self.max_tokens, h), dtype=self.dtype)
            self._acc = xp.empty((self.max_tokens, h), dtype=self._acc_dtype)
            self._prod = xp.empty((self.max_tokens, h), dtype=self._acc_dtype)
            self._esend = xp.empty(n * 8, dtype=np.uint8)  # per-entry words (index, weight)
            self._erecv = xp.empty(r * 8, dtype=np.uint8)
            if self.device is not None:
                self._dw = xp.empty((self.max_tokens, self.topk), dtype=np.float32)
        self._sb, self._rb = _bytes(self._sbuf), _bytes(self._rbuf)

    # ------------------------------------------------------------------ dispatch
    def dispatch(self, x: Any, topk_idx: Any) -> tuple[Any, Any, DispatchHandle]:
        """Send each token to the ranks of its experts. Collective.

        Args:
            x: (n, hidden) array of ``dtype``, n <= max_tokens (n may be 0); NumPy or a
                torch CPU tensor for a host instance, CuPy / torch on ``device`` otherwise.
                A torch tensor that requires grad makes the call differentiable
                (:mod:`pya2a.moe_autograd`); ``requires_grad`` must then agree on every rank.
            topk_idx: (n, topk) integer array (any integer dtype, host or device) of global
                expert ids in ``[0, num_experts)``.

        Returns:
            (expert_x, expert_counts, handle): ``expert_x`` is (num_rows, hidden) of
            ``dtype``, same array type as ``x``, tokens grouped by local expert, contiguous
            per expert (within an expert by source rank, then token, then k); it is a view
            of a buffer reused by the next dispatch, except for torch tensors in grad mode
            (then a new tensor, since autograd may keep it; on the fused path a copy of
            the whole receive buffer, ``max_recv_tokens`` rows). ``expert_counts`` is int64
            (E_local,) (NumPy; a device array on the fused path, this dispatch's own in
            torch grad mode). ``handle`` goes to :meth:`combine`.

        Raises:
            TypeError, ValueError: bad arguments on any rank (raised on every rank).
        """
        if _wants_grad(x):
            from .moe_autograd import dispatch as grad_dispatch

            return grad_dispatch(self, x, topk_idx)
        torch = sys.modules.get("torch")
        fresh = array_family(x) == "torch" and torch is not None and torch.is_grad_enabled()
        return self._dispatch(x, topk_idx, grad=False, fresh=fresh)

    def _dispatch(self, x: Any, topk_idx: Any, grad: bool,
                  fresh: bool = True) -> tuple[Any, Any, DispatchHandle]:
        guard = watch(self._icomm, "ExpertParallel.dispatch") \
            if watchdog.timeout() is not None else None
        try:
            return self._dispatch_watched(x, topk_idx, grad, fresh)
        finally:
            watchdog.leave(guard)

    def _dispatch_watched(self, x: Any, topk_idx: Any, grad: bool,
                          fresh: bool) -> tuple[Any, Any, DispatchHandle]:
        if self._fused is not None:
            return self._fused.dispatch(x, topk_idx, grad=grad, fresh=fresh)
        call = "ExpertParallel.dispatch"
        p, k, E = self.size, self.topk, self.num_experts
        exc: BaseException | None = None
        stats = np.zeros(2 + E + p, dtype=np.int64)
        e = np.zeros(0, dtype=np.int64)
        try:
            n = self._check_x(call, x)
            e = self._check_idx(call, topk_idx, n)
            stats[0], stats[1] = n, grad
            stats[2:2 + E] = np.bincount(e, minlength=E)
            if self.mode != "per_expert" and e.size:
                dest = np.unique(np.arange(e.size) // k * p + e // self.local_experts)
                stats[2 + E:] = np.bincount(dest % p, minlength=p)
        except Exception as err:
            exc = err
        table = agree(self._icomm, exc, stats)
        if (table[:, 2] != table[0, 2]).any():
            raise ValueError(f"{call}: x requires grad on some ranks only (the backward "
                             f"pass is collective: requires_grad must agree on every rank)")
        h, meta = self._route(call, e, table)
        N, R = e.size, h.num_rows
        with _on_device(self.device):
            xs = self._storage(x)
            if h.mode == "per_expert":
                self._gather(xs, h.order // k, self._sbuf[:N], h, "rows")
                self._exchange(h.sendcounts, h.recvcounts, self.row_bytes, self._sb,
                               self._rb, "dispatch")
                out = self._xbuf[:R]
                self._gather(self._rbuf[:R], h.rperm, out, h, "rperm")
            else:
                self._exchange_meta(h, meta)
                S = h.copy_tok.size
                self._gather(xs, h.copy_tok, self._sbuf[:S], h, "copy_tok")
                self._exchange(h.copy_send, h.copy_recv, self.row_bytes, self._sb, self._rb,
                               "dispatch")
                out = self._xbuf[:R]
                self._gather(self._rbuf[:int(h.copy_recv.sum())], h.xsrc, out, h, "xsrc")
            if fresh:
                out = out.copy()
        return self._wrap(out, x), h.expert_counts, h

    def _route(self, call: str, e: np.ndarray,
               table: np.ndarray) -> tuple[DispatchHandle, np.ndarray | None]:
        """Everything about one dispatch that follows from the agreed table and the routing,
        and (per_rank) each entry's copy index within its rank's block, in send order."""
        p, me, El, k, E = self.size, self.rank, self.local_experts, self.topk, self.num_experts
        counts = table[:, 3:3 + E]  # (p, E): rank s sends counts[s, e] rows to expert e
        copies = table[:, 3 + E:]  # (p, p): per_rank copies from s to d
        ent = counts.reshape(p, p, El).sum(axis=2)  # entries from s to d
        recv_all = ent.sum(axis=0)
        if int(recv_all.max()) > self.max_recv_tokens:
            r = int(recv_all.argmax())
            raise ValueError(f"{call}: rank {r} would receive {int(recv_all[r])} rows, more "
                             f"than max_recv_tokens={self.max_recv_tokens}")
        mode = self.mode
        if mode == "auto":
            off = ~np.eye(p, dtype=bool)
            per_expert = 2 * self.row_bytes * int(ent[off].sum())
            per_rank = 2 * self.row_bytes * int(copies[off].sum()) \
                + (_META + self._wdt.itemsize) * int(ent[off].sum())
            mode = "per_rank" if per_rank < per_expert else "per_expert"
        n, N = int(table[me, 1]), e.size
        order = np.argsort(e, kind="stable")
        inv = np.empty(N, dtype=np.int64)
        inv[order] = np.arange(N, dtype=np.int64)
        mine = counts[:, me * El:(me + 1) * El]  # (p, El): what each source sends me
        R = int(mine.sum())
        # received entries come in (source, expert) blocks; expert_x wants (expert, source)
        so = _excl_cumsum(mine.ravel()).reshape(p, El)
        cT, soT = mine.T.ravel(), so.T.ravel()
        rperm = np.repeat(soT - _excl_cumsum(cT), cT) + np.arange(R, dtype=np.int64)
        rinv = np.empty(R, dtype=np.int64)
        rinv[rperm] = np.arange(R, dtype=np.int64)
        h = DispatchHandle(id(self), mode, n, R, order, inv, rperm, rinv, ent[me].copy(),
                           ent[:, me].copy(), counts.copy(), mine.sum(axis=0))
        if mode == "per_rank":
            key = e // El * max(n, 1) + np.arange(N, dtype=np.int64) // k  # (rank, token)
            ukey, entry_copy = np.unique(key, return_inverse=True)
            h.copy_tok = ukey % max(n, 1)
            h.copy_send, h.copy_recv = copies[me].copy(), copies[:, me].copy()
            coff = _excl_cumsum(h.copy_send)
            h.token_plan = _slot_plan(np.argsort(h.copy_tok, kind="stable"),
                                      np.bincount(h.copy_tok, minlength=n))
            return h, (entry_copy.reshape(-1) - coff[e // El])[order]
        return h, None

    def _exchange_meta(self, h: DispatchHandle, meta: np.ndarray) -> None:
        """per_rank: send each entry's copy index; build the receiver's expansion."""
        N, R, p = h.order.size, h.num_rows, self.size
        ms = self._esend[:N * _META].view(np.int32)
        mr = self._erecv[:R * _META].view(np.int32)
        if self._xp is np:
            ms[...] = meta
        else:
            ms.set(meta.astype(np.int32))
        self._exchange(h.sendcounts, h.recvcounts, _META, self._esend, self._erecv, "dispatch")
        got = mr.astype(np.int64) if self._xp is np else self._xp.asnumpy(mr).astype(np.int64)
        rc = int(h.copy_recv.sum())
        src = np.repeat(np.arange(p), h.recvcounts)
        xsrc = (got + _excl_cumsum(h.copy_recv)[src])[h.rperm]
        np.clip(xsrc, 0, max(rc - 1, 0), out=xsrc)  # a copy index comes from the wire
        h.xsrc = xsrc
        h.owner_plan = _slot_plan(np.argsort(xsrc, kind="stable"),
                                  np.bincount(xsrc, minlength=rc)[:rc])

    # ------------------------------------------------------------------ combine
    def combine(self, expert_y: Any, topk_weight: Any, handle: DispatchHandle, *,
                out: Any = None) -> Any:
        """Send expert outputs back and sum them per token, weighted. Collective.

        Args:
            expert_y: (num_rows, hidden) array of ``dtype`` in ``expert_x``'s layout (it may
                be ``expert_x`` itself, modified in place).
            topk_weight: (n, topk) float array (host or device), the router's weights.
            handle: from the matching :meth:`dispatch` on this object.
            out: optional (n, hidden) array of ``dtype`` to write into (not with autograd).

        Returns:
            y: (n, hidden) array of ``dtype``: ``y[t] = sum_k topk_weight[t, k] * (expert
            output for token t, slot k)``, accumulated in float32 (float64 for float64
            data) and cast back: in k order (per_expert), or per owner rank in expert order,
            cast to ``dtype``, then over ranks in rank order (per_rank). Differentiable in
            ``expert_y`` and ``topk_weight`` when either is a torch tensor requiring grad.

        Raises:
            TypeError, ValueError: bad arguments on any rank (raised on every rank).
        """
        if _wants_grad(expert_y, topk_weight):
            from .moe_autograd import combine as grad_combine

            return grad_combine(self, expert_y, topk_weight, handle, out=out)
        return self._combine(expert_y, topk_weight, handle, out=out, grad=False)[0]

    def _combine(self, expert_y: Any, topk_weight: Any, handle: DispatchHandle, *,
                 out: Any, grad: bool) -> tuple[Any, Any]:
        """combine; with ``grad`` also returns what its backward pass needs."""
        guard = watch(self._icomm, "ExpertParallel.combine") \
            if watchdog.timeout() is not None else None
        try:
            return self._combine_watched(expert_y, topk_weight, handle, out, grad)
        finally:
            watchdog.leave(guard)

    def _combine_watched(self, expert_y: Any, topk_weight: Any, handle: DispatchHandle,
                         out: Any, grad: bool) -> tuple[Any, Any]:
        if self._fused is not None:
            y = self._fused.combine(expert_y, topk_weight, handle, out=out, grad=grad)
            return y, (handle.rows if grad else None)
        call = "ExpertParallel.combine"
        exc: BaseException | None = None
        w = None
        try:
            self._check_handle(call, handle)
            n, R = handle.num_tokens, handle.num_rows
            self._check_rows(call, "expert_y", expert_y, R)
            w = self._check_weight(call, topk_weight, n)
            if out is not None:
                if grad:
                    raise ValueError(f"{call}: out= cannot be used when the result needs "
                                     f"gradients")
                self._check_rows(call, "out", out, n)
        except Exception as err:
            exc = err
        table = agree(self._icomm, exc, np.array([grad], dtype=np.int64))
        if (table[:, 1] != table[0, 1]).any():
            raise ValueError(f"{call}: expert_y / topk_weight require grad on some ranks "
                             f"only (requires_grad must agree on every rank)")
        h, n = handle, handle.num_tokens
        with _on_device(self.device):
            ey = self._storage(expert_y)
            saved = None
            if h.mode == "per_expert":
                acc = self._back_per_expert(ey, w, h, "combine")
                if grad:  # the expert rows as they arrived, for d(loss)/d(topk_weight)
                    saved = self._sbuf[:h.order.size].copy()
            else:
                w_x = self._weights_to_owners(w, h)
                acc = self._back_per_rank(ey, w_x, h, "combine")
                saved = w_x
            if out is None:
                return self._wrap(self._cast(acc), expert_y), saved
            self._storage(out)[...] = self._cast(acc)
            return out, saved

    def _back_per_expert(self, ey: Any, w: Any, h: DispatchHandle, phase: str) -> Any:
        """per_expert: rows of ``ey`` back to their tokens, summed in k order (weighted by
        ``w`` (n, k), or 1 for None); the float accumulator (n, H), a reused buffer."""
        xp, k, n, R = self._xp, self.topk, h.num_tokens, h.num_rows
        self._gather(ey, h.rinv, self._rbuf[:R], h, "rinv")
        self._exchange(h.recvcounts, h.sendcounts, self.row_bytes, self._rb, self._sb, phase)
        acc, prod, tmp = self._acc[:n], self._prod[:n], self._tmp[:n]
        inv = self._di(h, "inv").reshape(n, k)
        w32 = None
        if w is not None:
            if xp is np:
                w32 = np.asarray(w, dtype=self._acc_dtype)
            elif self._acc_dtype == np.float32:
                w32 = self._dw[:n]
                w32[...] = w
            else:
                w32 = w.astype(self._acc_dtype)
        for j in range(k):
            if xp is np:
                np.take(self._sbuf, inv[:, j], axis=0, out=tmp, mode="clip")
            else:
                xp.take(self._sbuf, inv[:, j], axis=0, out=tmp)
            row = self._to_acc(tmp) if self._bf16 else tmp  # else promoted by the ufuncs
            if w32 is None:
                if j == 0:
                    acc[...] = row
                else:
                    xp.add(acc, row, out=acc)
            elif j == 0:
                xp.multiply(row, w32[:, 0:1], out=acc)
            else:
                xp.multiply(row, w32[:, j:j + 1], out=prod)
                xp.add(acc, prod, out=acc)
        return acc

    def _weights_to_owners(self, w: Any, h: DispatchHandle) -> Any:
        """per_rank: each entry's weight to its expert's rank, in ``expert_x`` row order."""
        N, R, xp = h.order.size, h.num_rows, self._xp
        ws = self._esend[:N * self._wdt.itemsize].view(self._wdt)
        wr = self._erecv[:R * self._wdt.itemsize].view(self._wdt)
        xp.take(w.reshape(-1).astype(self._wdt, copy=False), self._di(h, "order"), out=ws)
        self._exchange(h.sendcounts, h.recvcounts, self._wdt.itemsize, self._esend,
                       self._erecv, "combine")
        return xp.take(wr, self._di(h, "rperm"))

    def _back_per_rank(self, ey: Any, w_x: Any, h: DispatchHandle, phase: str) -> Any:
        """per_rank: sum each received copy's ``expert_x`` rows (weighted by ``w_x``, or 1)
        into one row, send it back, sum a token's rows; the float accumulator (n, H)."""
        n, rc, S = h.num_tokens, int(h.copy_recv.sum()), h.copy_tok.size
        with_w = None if w_x is None else w_x.astype(self._acc_dtype, copy=False)
        part = self._slot_sum(ey, h, "owner_plan", rc, with_w)
        self._rbuf[:rc] = self._cast(part)
        self._exchange(h.copy_recv, h.copy_send, self.row_bytes, self._rb, self._sb, phase)
        return self._slot_sum(self._sbuf[:S], h, "token_plan", n, None)

    def _slot_sum(self, src: Any, h: DispatchHandle, plan: str, nseg: int, w: Any) -> Any:
        """acc[s] = sum over j of w[r] * src[r], r the j-th row of segment s (j order)."""
        xp = self._xp
        acc = xp.zeros((nseg, self.hidden), dtype=self._acc_dtype)
        for j, (segs, rows) in enumerate(getattr(h, plan)):
            dsegs, drows = self._di(h, f"{plan}{j}s", segs), self._di(h, f"{plan}{j}r", rows)
            v = self._to_acc(xp.take(src, drows, axis=0))
            if w is not None:
                v = v * xp.take(w, drows)[:, None]
            if j == 0 and segs.size == nseg:
                acc[...] = v
            else:
                acc[dsegs] += v
        return acc

    # ------------------------------------------------------------------ backward passes
    def _dispatch_backward(self, grad_x: Any, handle: DispatchHandle) -> Any:
        """d(loss)/dx from d(loss)/d(expert_x): each token's copies summed (float32, cast).

        The mirrored exchange of dispatch: what :meth:`combine` does with unit weights.
        ``grad_x`` is (num_rows, hidden) of ``dtype`` (any array type of the instance).
        Collective.
        """
        if self._fused is not None:
            return self._wrap(self._fused.dispatch_backward(grad_x, handle), grad_x)
        h = handle
        with _on_device(self.device):
            g = self._storage(grad_x)
            if h.mode == "per_expert":
                acc = self._back_per_expert(g, None, h, "dispatch_backward")
            else:
                acc = self._back_per_rank(g, None, h, "dispatch_backward")
            return self._wrap(self._cast(acc), grad_x)

    def _combine_backward(self, grad_y: Any, expert_y: Any, topk_weight: Any,
                          handle: DispatchHandle, saved: Any) -> tuple[Any, Any]:
        """(d(loss)/d(expert_y), d(loss)/d(topk_weight)) from d(loss)/dy. Collective.

        ``d expert_y[row of (t, k)] = topk_weight[t, k] * grad_y[t]`` (sent to the experts
        along the dispatch route); ``d topk_weight[t, k] = <grad_y[t], expert row (t, k)>``
        in float32 (on the token's rank from the rows combine received, per_expert; on the
        owner, sent back as one word per entry, per_rank).
        """
        if self._fused is not None:
            gey, gw = self._fused.combine_backward(grad_y, expert_y, topk_weight, handle, saved)
            return self._wrap(gey, expert_y), gw
        h, xp, k, n, R = handle, self._xp, self.topk, handle.num_tokens, handle.num_rows
        N = h.order.size
        with _on_device(self.device):
            g = self._storage(grad_y)
            w = self._check_weight("ExpertParallel.combine", topk_weight, n)
            g32 = self._to_acc(g)
            if h.mode == "per_expert":
                wf = xp.asarray(w, dtype=self._acc_dtype).reshape(-1)
                d_order = self._di(h, "order")
                rows = xp.take(g32, d_order // k, axis=0) * xp.take(wf, d_order)[:, None]
                self._sbuf[:N] = self._cast(rows)
                self._exchange(h.sendcounts, h.recvcounts, self.row_bytes, self._sb, self._rb,
                               "combine_backward")
                gey = xp.take(self._rbuf[:R], self._di(h, "rperm"), axis=0)
                back = self._to_acc(xp.take(saved, self._di(h, "inv"), axis=0))
                gw = (back.reshape(n, k, self.hidden) * g32[:, None, :]).sum(axis=2)
            else:
                S, rc = h.copy_tok.size, int(h.copy_recv.sum())
                self._gather(g, h.copy_tok, self._sbuf[:S], h, "copy_tok")
                self._exchange(h.copy_send, h.copy_recv, self.row_bytes, self._sb, self._rb,
                               "combine_backward")
                gx = self._to_acc(xp.take(self._rbuf[:rc], self._di(h, "xsrc"), axis=0))
                gey = self._cast(gx * saved.astype(self._acc_dtype, copy=False)[:, None])
                gw_x = (gx * self._to_acc(self._storage(expert_y))).sum(axis=1)
                ws = self._esend[:N * self._wdt.itemsize].view(self._wdt)
                wr = self._erecv[:R * self._wdt.itemsize].view(self._wdt)
                xp.take(gw_x.astype(self._wdt), self._di(h, "rinv"), out=wr)
                self._exchange(h.recvcounts, h.sendcounts, self._wdt.itemsize, self._erecv,
                               self._esend, "combine_backward")
                gw = xp.take(ws, self._di(h, "inv")).reshape(n, k)
            return self._wrap(gey, expert_y), gw

    # ------------------------------------------------------------------ helpers
    def _exchange(self, scounts: np.ndarray, rcounts: np.ndarray, unit: int, sb: Any, rb: Any,
                  phase: str) -> None:
        sc, rc = scounts * unit, rcounts * unit
        pya2a.Alltoallv(self.comm, [sb, (sc, _excl_cumsum(sc)), MPI.BYTE],
                        [rb, (rc, _excl_cumsum(rc)), MPI.BYTE], algorithm=self.algorithm)
        self.traffic[phase] += int(sc.sum() - sc[self.rank])

    def _di(self, h: DispatchHandle, name: str, host: Any = None) -> Any:
        """Index array ``name`` of the handle (or ``host``) where the rows live (cached)."""
        a = getattr(h, name) if host is None else host
        if self._xp is np:
            return a
        d = h.dev.get(name)
        if d is None:
            d = h.dev[name] = self._xp.asarray(a)
        return d

    def _gather(self, src: Any, idx: np.ndarray, out: Any, h: DispatchHandle,
                name: str) -> None:
        """out[i] = src[idx[i]] (rows); ``idx`` is a host array, cached on the device."""
        if self._xp is np:
            np.take(src, idx, axis=0, out=out, mode="clip")
        else:
            self._xp.take(src, self._di(h, name, idx), axis=0, out=out)

    def _to_acc(self, a: Any) -> Any:
        """Rows in the accumulation type (float32; float64 for float64 data)."""
        if self._bf16:
            return (a.astype(np.uint32) << 16).view(np.float32)
        return a.astype(self._acc_dtype, copy=False)

    def _cast(self, acc: Any) -> Any:
        """Accumulated rows back to ``dtype`` (bfloat16: round to nearest even)."""
        if not self._bf16:
            return acc.astype(self.dtype)
        xp = self._xp
        u = xp.ascontiguousarray(acc, dtype=np.float32).view(np.uint32)
        r = ((u + np.uint32(0x7FFF) + ((u >> 16) & np.uint32(1))) >> 16).astype(np.uint16)
        r[xp.isnan(acc)] = 0x7FC0
        return r

    def _storage(self, a: Any) -> Any:
        """The NumPy / CuPy view of a caller's array, bfloat16 as uint16 words (no copy)."""
        fam = array_family(a)
        if fam == "torch":
            t = a.detach()
            if str(t.dtype) == "torch.bfloat16":
                import torch

                t = t.view(torch.int16)
                arr = t.numpy() if self._xp is np else self._xp.asarray(t)
                return arr.view(np.uint16)
            return t.numpy() if self._xp is np else self._xp.asarray(t)
        if fam == "cupy" or self._xp is np:
            return a.view(np.uint16) if a.dtype.name == "bfloat16" else a
        return self._xp.asarray(a)

    def _wrap(self, arr: Any, like: Any) -> Any:
        """``arr`` (NumPy / CuPy storage) as the caller's array type (torch stays torch)."""
        if array_family(like) != "torch":
            return arr
        import torch

        if self._bf16:
            arr = arr.view(np.int16)
        t = torch.from_numpy(arr) if self._xp is np else \
            torch.as_tensor(arr, device=f"cuda:{self.device}")
        return t.view(torch.bfloat16) if self._bf16 else t

    def _check_kind(self, call: str, name: str, a: Any) -> None:
        fam = array_family(a)
        if self.device is None:
            host_torch = fam == "torch" and a.device.type == "cpu"
            if not (isinstance(a, np.ndarray) or host_torch):
                raise TypeError(f"{call}: {name} must be a NumPy array or a torch CPU tensor "
                                f"on a host instance (device=None), got {type(a).__name__}")
        elif not is_device_buffer(a):
            raise TypeError(f"{call}: {name} must be a device array (CuPy, torch) on device "
                            f"{self.device}, got {type(a).__name__}")

    def _check_dtype(self, call: str, name: str, a: Any) -> None:
        got = _dtype_name(a.dtype)
        if got != self.dtype_name and not (self._bf16 and got == "uint16"
                                           and array_family(a) != "torch"):
            raise TypeError(f"{call}: {name} has dtype {a.dtype}, expected {self.dtype_name}")

    def _check_x(self, call: str, x: Any) -> int:
        self._check_kind(call, "x", x)
        shape = tuple(x.shape)
        if len(shape) != 2 or shape[1] != self.hidden:
            raise ValueError(f"{call}: x has shape {shape}, expected (n, {self.hidden})")
        if shape[0] > self.max_tokens:
            raise ValueError(f"{call}: x has {shape[0]} tokens, more than "
                             f"max_tokens={self.max_tokens}")
        self._check_dtype(call, "x", x)
        return shape[0]

    def _check_idx(self, call: str, topk_idx: Any, n: int) -> np.ndarray:
        idx = _to_host(topk_idx)
        if idx.shape != (n, self.topk):
            raise ValueError(f"{call}: topk_idx has shape {idx.shape}, expected "
                             f"({n}, {self.topk})")
        if not np.issubdtype(idx.dtype, np.integer):
            raise TypeError(f"{call}: topk_idx must be integers, got {idx.dtype}")
        e = idx.reshape(-1).astype(np.int64)
        if e.size and (int(e.min()) < 0 or int(e.max()) >= self.num_experts):
            bad = int(e[(e < 0) | (e >= self.num_experts)][0])
            raise ValueError(f"{call}: topk_idx has expert {bad}, outside "
                             f"[0, {self.num_experts})")
        return e

    def _check_handle(self, call: str, handle: Any) -> None:
        if not isinstance(handle, DispatchHandle):
            raise TypeError(f"{call}: handle must be the DispatchHandle from dispatch, got "
                            f"{type(handle).__name__}")
        if handle.owner != id(self):
            raise ValueError(f"{call}: handle comes from another ExpertParallel")

    def _check_rows(self, call: str, name: str, a: Any, rows: int) -> None:
        self._check_kind(call, name, a)
        if tuple(a.shape) != (rows, self.hidden):
            raise ValueError(f"{call}: {name} has shape {tuple(a.shape)}, expected "
                             f"({rows}, {self.hidden})")
        self._check_dtype(call, name, a)

    def _check_weight(self, call: str, w: Any, n: int) -> Any:
        shape = tuple(getattr(w, "shape", ()))
        if shape != (n, self.topk):
            raise ValueError(f"{call}: topk_weight has shape {shape}, expected "
                             f"({n}, {self.topk})")
        if not _dtype_name(w.dtype).startswith(("float", "bfloat")):
            raise TypeError(f"{call}: topk_weight must be floating point, got {w.dtype}")
        if array_family(w) == "torch":
            w = w.detach()
            if str(w.dtype) == "torch.bfloat16":
                w = w.float()
        if self.device is None:
            return w.numpy() if array_family(w) == "torch" else np.asarray(w)
        return self._xp.asarray(w) if is_device_buffer(w) else self._xp.asarray(np.asarray(w))

    def expert_output(self, rows: int) -> Any:
        """A (rows, hidden) buffer of ``dtype`` for the expert op to write ``expert_y`` into.

        On the fused path it is the symmetric buffer :meth:`combine` reads from peers, so
        combining from it skips a copy; elsewhere it is a buffer kept for reuse. Valid until
        the next call; ``rows`` is the dispatch's ``sum(expert_counts)``.
        """
        if self._fused is not None:
            return self._fused.expert_output(rows)
        if not 0 <= rows <= self.max_recv_tokens:
            raise ValueError(f"ExpertParallel.expert_output: rows={rows} outside "
                             f"[0, {self.max_recv_tokens}]")
        if getattr(self, "_ybuf", None) is None:
            with _on_device(self.device):
                self._ybuf = self._xp.empty((self.max_recv_tokens, self.hidden), self.dtype)
        return self._ybuf[:rows]

    def graph_buffers(self) -> Any:
        """The static device arrays that calls in :meth:`graph_mode` read and write
        (:class:`pya2a.gpu.moe_fused.GraphBuffers`: ``x``, ``topk_idx``, ``topk_weight``,
        ``num_tokens``, ``y``). Fused backend only (ValueError elsewhere)."""
        return self._graph_state("graph_buffers").graph_buffers()

    def graph_mode(self) -> Any:
        """Collective context manager: dispatch and combine inside can be captured in a
        CUDA graph and replayed with new routing and token counts (no host
        synchronisation, no MPI call per call); see
        :meth:`pya2a.gpu.moe_fused.FusedExpertParallel.graph_mode` and docs/moe.md
        "Graph capture". Fused backend only (ValueError on every rank elsewhere)."""
        return self._graph_state("graph_mode").graph_mode()

    def _graph_state(self, name: str) -> Any:
        if self._fused is None:  # the backend is the same on every rank
            raise ValueError(f"ExpertParallel.{name}: graph capture needs the fused backend "
                             f"(this instance runs {self.backend!r})")
        return self._fused

    def free(self) -> None:
        """Release device and IPC memory (collective on the fused path). Idempotent."""
        if self._fused is not None:
            self._fused.free()


def _slot_plan(order: np.ndarray, cnt: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
    """Segments of ``order`` (lengths ``cnt``) as one (segments, rows) pair per slot j."""
    start = _excl_cumsum(cnt)
    plan = []
    for j in range(int(cnt.max()) if cnt.size else 0):
        segs = np.flatnonzero(cnt > j)
        plan.append((segs, order[start[segs] + j]))
    return plan


# ---------------------------------------------------------------------------------------
def reference(comm: MPI.Intracomm, x: np.ndarray, topk_idx: np.ndarray,
              topk_weight: np.ndarray, num_experts: int, expert_fn: Any,
              mode: str = "per_expert") -> tuple[list[np.ndarray], np.ndarray]:
    """The straightforward oracle: all-gather everything, compute locally (host only).

    Args:
        x: (n, H) host array; topk_idx: (n, k) ints; topk_weight: (n, k) floats.
        expert_fn: ``expert_fn(e, rows) -> rows`` for global expert ``e`` (same dtype).
        mode: the summation order of :meth:`ExpertParallel.combine` to reproduce
            ("per_expert" or "per_rank", see ``DispatchHandle.mode``).

    Returns:
        (expert_x, y): ``expert_x[l]`` are the rows local expert ``l`` of this rank
        receives, in the order :meth:`ExpertParallel.dispatch` promises (source rank, then
        token, then k); ``y`` is this rank's combined (n, H) output, accumulated in float32
        (float64 for float64 data) in the order and with the roundings of combine in
        ``mode``.
    """
    p, me = comm.Get_size(), comm.Get_rank()
    El = num_experts // p
    xs = allgather_object(comm, np.asarray(x))
    idxs = allgather_object(comm, np.asarray(topk_idx))
    expert_x = []
    for le in range(El):
        g = me * El + le
        parts = [xs[s][np.nonzero(idxs[s] == g)[0]] for s in range(p)]
        expert_x.append(np.concatenate(parts) if parts else x[:0])
    acc_t = np.promote_types(x.dtype, np.float32)
    acc = np.zeros(x.shape, dtype=acc_t)
    w = np.asarray(topk_weight, dtype=acc_t)
    prods = []
    for j in range(topk_idx.shape[1]):
        yj = np.empty_like(x)
        for t in range(x.shape[0]):
            yj[t] = expert_fn(int(topk_idx[t, j]), x[t:t + 1])[0]
        prods.append(np.multiply(yj, w[:, j:j + 1], dtype=acc_t))
    if mode != "per_rank":
        for j, prod in enumerate(prods):
            acc = prod if j == 0 else np.add(acc, prod)
        return expert_x, acc.astype(x.dtype)
    for t in range(x.shape[0]):  # a partial per owner rank (its experts in order), rounded
        slots = sorted((int(topk_idx[t, j]) // El, int(topk_idx[t, j]), j)
                       for j in range(topk_idx.shape[1]))
        for r in sorted({s[0] for s in slots}):
            part = np.zeros(x.shape[1], dtype=acc_t)
            for _, _, j in (s for s in slots if s[0] == r):
                part = part + prods[j][t]
            acc[t] = acc[t] + part.astype(x.dtype).astype(acc_t)
    return expert_x, acc.astype(x.dtype)


_ROW_NAMES = ("float16", "bfloat16", "float32", "float64")


def _row_type(call: str, dtype: Any) -> tuple[str, np.dtype]:
    """(name, storage dtype) of a row type; bfloat16 is stored as uint16."""
    try:
        name = _dtype_name(dtype)
        return name, np.dtype(np.uint16) if name == "bfloat16" else np.dtype(name)
    except TypeError as e:
        raise TypeError(f"{call}: dtype {dtype!r} is not understood ({e})") from None


def _type_code(name: str) -> int:
    """A number for a dtype name that is the same on every rank."""
    return _ROW_NAMES.index(name) if name in _ROW_NAMES else 100 + np.dtype(name).num


def _dtype_name(dt: Any) -> str:
    """Name of a NumPy / CuPy / ml_dtypes / torch dtype or of a dtype name."""
    if type(dt).__module__ == "torch":
        return str(dt).replace("torch.", "")
    if isinstance(dt, str) and dt == "bfloat16":
        return dt
    return np.dtype(dt).name


def _to_host(a: Any) -> np.ndarray:
    if isinstance(a, np.ndarray):
        return a
    fam = array_family(a)
    if fam == "cupy":
        return a.get()
    if fam == "torch":
        return a.detach().cpu().numpy()
    return np.asarray(a)


def _bytes(a: Any) -> Any:
    return a.reshape(-1).view(np.uint8)




class _on_device:  # noqa: N801 (a context manager used like a function)
    """Make ``device`` current inside the block (no-op for host)."""

    def __init__(self, device: int | None) -> None:
        self.device, self._ctx = device, None

    def __enter__(self) -> None:
        if self.device is not None:
            from .gpu import cupy

            self._ctx = cupy().cuda.Device(self.device)
            self._ctx.__enter__()

    def __exit__(self, *exc: object) -> None:
        if self._ctx is not None:
            self._ctx.__exit__(*exc)
