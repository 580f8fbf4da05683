"""Fused MoE dispatch / combine for the GPUs of one node (IPC, one kernel each way).

Used by :class:`pya2a.moe.ExpertParallel` with ``backend="fused"`` (or "auto" on a device
when :func:`fused_available`). Each rank allocates three symmetric buffers through
:class:`pya2a.gpu.ipc.IpcGroup` (control block with flags and counts, expert inputs,
expert outputs); the kernels in ``kernels/moe_fused.cu`` move the data:

* dispatch: one launch routes the tokens (count per expert, rank within expert), publishes
  this rank's counts into every rank's control block, waits for everyone's, and stores each
  (token, expert) row straight into the owning rank's expert-input buffer at its final row
  (expert-major, then source rank, then token order); a flag per source marks completion.
* combine: one launch raises "my expert outputs are ready", waits for every rank's, and
  each warp reads a token's ``topk`` rows from the owners' buffers, sums them weighted in
  float32 and stores the token.

No host synchronisation, no allocation per call (except ``y`` when ``out`` is not given),
stream-ordered on the current CuPy stream. By default each call also agrees on argument
errors across ranks with one small ``Allgather`` (``agree=True``), so that a bad argument
raises on every rank instead of leaving the others' kernels waiting for it.

Backward passes (autograd, :mod:`pya2a.moe_autograd`) reuse the two kernels, on the
device, with no host round trip of the data: the gradient of combine is a dispatch launch
of the ``n * topk`` rows ``topk_weight[t, k] * grad_y[t]`` (as ``n * topk`` tokens of one
expert each: the same flat order, so each row lands where the forward's expert row was)
plus the router-weight gradient ``<grad_y[t], expert row (t, k)>`` from the rows the
forward combine read (kept with ``save``); the gradient of dispatch is a combine launch
with unit weights over the owners' ``expert_x`` gradients and the forward's slots.

per_rank mode (``ExpertParallel(..., mode="per_rank")``): one copy per
(token, destination rank) through extra symmetric buffers: three dispatch launches
(routing, copies, each copy's table of expert_x rows), ``pya2a_moe_expand`` on the
receiver; combine: a dispatch launch of the weights, ``pya2a_moe_partials`` on the owner,
and a combine launch with unit weights that pulls one partial per (token, rank). Its
backward passes compose the same launches (see ``_per_rank_combine_backward``).

Graph capture (:meth:`FusedExpertParallel.graph_mode`): the calls read the token count
and the call number from device memory, make no MPI call, and take the static buffers of
:meth:`FusedExpertParallel.graph_buffers`.

Differences from the portable path (documented in docs/moe.md): ``expert_x`` is the whole
receive buffer (``max_recv_tokens`` rows; the first ``sum(expert_counts)`` are valid) and
``expert_counts`` is a device int64 array, since the row count is only known on the
device; a combine must follow its dispatch with no other dispatch in between; expert ids
outside ``[0, num_experts)`` are dropped, not reported; the weighted sum uses fused
multiply-adds.
"""

from __future__ import annotations

import contextlib
import ctypes
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..core.validate import agree, error_code
from . import cupy as _cupy
from . import loader
from .ipc import CTRL_BYTES, IpcGroup, check_ipc, client_sms, device_share, grid_budget

__all__ = ["FusedExpertParallel", "FusedHandle", "GraphBuffers", "fused_available",
           "scale_experts", "MAX_EXPERTS", "MAX_RANKS"]

MAX_RANKS = 8  # MOE_MAXP in kernels/moe_fused.cu
MAX_EXPERTS = 512  # MOE_MAXE
_THREADS = 512
_WARPS = _THREADS // 32
# row type -> kernel template type; bfloat16 rows are uint16 words in CuPy
_TYPES = {"float16": "F16", "bfloat16": "BF16", "float32": "F32"}
_NAMES = tuple(f"pya2a_moe_{k}<{t}>" for k in ("combine", "scale_experts", "partials")
               for t in _TYPES.values())

_P = MAX_RANKS
_DISPATCH = np.dtype([("x", np.uint64), ("idx", np.uint64), ("ctrl", np.uint64),
                      ("slot", np.uint64), ("expert_counts", np.uint64),
                      ("peer_ctrl", np.uint64, (_P,)), ("peer_x", np.uint64, (_P,)),
                      ("seq", np.uint64), ("n", np.int64), ("topk", np.int64),
                      ("E", np.int64), ("El", np.int64), ("row_bytes", np.int64),
                      ("rank", np.int64), ("p", np.int64), ("epb", np.int64),
                      ("segs", np.int64), ("seg_bytes", np.int64), ("idx_own", np.uint64),
                      ("n_dev", np.uint64), ("seq_dev", np.uint64)])
_COMBINE = np.dtype([("y", np.uint64), ("w", np.uint64), ("idx", np.uint64),
                     ("slot", np.uint64), ("ctrl", np.uint64),
                     ("peer_ctrl", np.uint64, (_P,)), ("peer_x", np.uint64, (_P,)),
                     ("peer_y", np.uint64, (_P,)), ("seq", np.uint64), ("n", np.int64),
                     ("topk", np.int64), ("E", np.int64), ("El", np.int64),
                     ("row_bytes", np.int64), ("rank", np.int64), ("p", np.int64),
                     ("use_x", np.int64), ("segs", np.int64), ("seg_vecs", np.int64),
                     ("save", np.uint64), ("n_dev", np.uint64), ("seq_dev", np.uint64)])


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)




def fused_available(comm: Any, ep: Any = None, *, auto: bool = False) -> tuple[bool, str]:
    """Collective: can the fused path run on ``comm`` (for ``ep``'s configuration)?

    Needs everything :func:`pya2a.gpu.ipc.check_ipc` needs (one node, peer access between
    distinct GPUs, at most 8 ranks; ranks may share a GPU), at most 512 experts, float16 /
    bfloat16 / float32 rows and ``hidden * itemsize`` a multiple of 16 bytes. With
    ``auto`` (should ``backend="auto"`` take it?) ranks sharing a GPU must also be MPS
    clients: time-sliced, every wait on a peer costs a time slice. Same answer on every
    rank.
    """
    why = ""
    if ep is not None:
        if ep.dtype_name not in _TYPES:
            why = f"dtype {ep.dtype_name} (fused path: float16, bfloat16, float32)"
        elif ep.row_bytes % 16:
            why = f"rows of {ep.row_bytes} bytes (fused path: a multiple of 16)"
        elif ep.num_experts > MAX_EXPERTS:
            why = f"{ep.num_experts} experts (fused path: at most {MAX_EXPERTS})"
    if why:  # configuration is agreed on every rank already: same answer everywhere
        return False, why
    dev = None if ep is None else ep.device
    ok, why = check_ipc(comm, dev)
    if ok and auto:
        share = device_share(comm, dev)
        if not share.fast:
            return False, f"{share.ranks_per_device} ranks share a GPU without MPS (time-sliced)"
    return ok, why


@dataclass(eq=False)
class FusedHandle:
    """One fused dispatch, for :meth:`FusedExpertParallel.combine`.

    Attributes:
        owner: id of the FusedExpertParallel.
        seq: call number (the flags' value).
        num_tokens: n.
        mode: "per_expert" (one row per (token, expert) pair).
        expert_counts: int64 device array (E_local,) (the shared one, or this dispatch's
            own copy when autograd may need it).
        idx, slot: autograd: this dispatch's own copies (device) of the routing (int64,
            n * topk) and of each entry's row at its destination (int32); else None (the
            shared buffers, valid until the next dispatch launch).
        rows: autograd: after combine, (n * topk, hidden) the expert row of each entry as
            combine read it (zeros for dropped entries), for the router-weight gradient.
    """

    owner: int
    seq: int
    num_tokens: int
    expert_counts: Any
    done: bool = False
    mode: str = "per_expert"  # as DispatchHandle.mode: the fused path moves a row per pair
    idx: Any = None
    slot: Any = None
    rows: Any = None
    idx2: Any = None  # per_rank, autograd: the copies' routing and rows (this rank's)
    slot2: Any = None
    tables: Any = None  # per_rank, autograd: the received copies' tables and count
    ncopies: Any = None
    wrows: Any = None  # per_rank, autograd: the weights of the received rows (16 B each)

    def num_rows(self) -> int:
        """Rows this rank received (synchronises with the device)."""
        return int(self.expert_counts.sum().get())


@dataclass(eq=False)
class GraphBuffers:
    """The static device arrays (CuPy) that graph-mode calls read and write.

    Each step, write the tokens, routing, weights and count into them (stream-ordered),
    then replay the graph; ``y[:n]`` holds the result. Rows past the count are not read
    (``x``, ``topk_idx``, ``topk_weight``) or written (``y``).

    Attributes:
        x: (max_tokens, hidden) of the row type (bfloat16 as uint16 words).
        topk_idx: (max_tokens, topk) int64 global expert ids.
        topk_weight: (max_tokens, topk) float32.
        num_tokens: (1,) int32: this step's token count n (clamped to [0, max_tokens]).
        y: (max_tokens, hidden) of the row type: combine's output.
    """

    x: Any
    topk_idx: Any
    topk_weight: Any
    num_tokens: Any
    y: Any


_BACKWARD = "backward dispatch"  # FusedExpertParallel._pending after a combine's backward


def _word(dt: np.dtype, field: str) -> int:
    """Index of a scalar field in the struct seen as 8-byte words."""
    return dt.fields[field][1] // 8


class _Args:
    """One kernel-argument struct (a NumPy record) with its 8-byte word view, the launch's
    parameter array and its row size (a variant of the base arguments: other buffers)."""

    def __init__(self, base: np.ndarray, **fields: Any) -> None:
        self.struct = base.copy()
        for f, v in fields.items():
            if isinstance(v, list):
                self.struct[f][:len(v)] = v
            else:
                self.struct[f] = v
        self.words = np.frombuffer(self.struct.data, dtype=np.uint64)
        self.params = (ctypes.c_void_p * 1)(self.struct.ctypes.data)
        self.row_bytes = int(self.struct["row_bytes"])
        self.fn = "combine"  # the kernel of a combine variant (row type)


class FusedExpertParallel:
    """The state of the fused path for one :class:`pya2a.moe.ExpertParallel`. Collective.

    Args:
        comm: the internal communicator (ranks on one node, see :func:`fused_available`).
        ep: the owning ExpertParallel (configuration already agreed across ranks).
        agree_errors: agree on argument errors across ranks with one small Allgather per
            call (default). False removes all host communication from the calls; a bad
            argument on one rank then raises only there, and the other ranks' kernels
            wait for it until their watchdog (5 s) gives up with a message.

    Memory per rank: 64 KiB control block plus two symmetric buffers of
    ``max_recv_tokens * hidden * itemsize`` bytes, plus small index buffers; per_rank
    mode adds two of ``min(p * max_tokens, max_recv_tokens)`` rows and small ones.
    """

    def __init__(self, comm: Any, ep: Any, *, agree_errors: bool = True) -> None:
        cp = _cupy()
        self._cp, self.ep, self.comm = cp, ep, comm
        self.agree_errors = agree_errors
        if ep.size > MAX_RANKS:
            raise ValueError(f"ExpertParallel: fused path takes at most {MAX_RANKS} ranks")
        self.device = ep.device
        self.type = _TYPES[ep.dtype_name]
        cap, rb = ep.max_recv_tokens, ep.row_bytes
        N = ep.max_tokens * ep.topk
        with cp.cuda.Device(self.device):
            self.group = IpcGroup(comm, device=self.device)
            self.ctrl = self.group.allocate(CTRL_BYTES)
            self.xa = self.group.allocate(max(cap * rb, 256))
            self.ya = self.group.allocate(max(cap * rb, 256))
            mod = loader.module("moe_fused.cu", self.device, _NAMES)
            self._fn = {k: loader.function_ptr(mod, f) for k, f in (
                ("dispatch", "pya2a_moe_dispatch"), ("combine", f"pya2a_moe_combine<{self.type}>"),
                ("scale", f"pya2a_moe_scale_experts<{self.type}>"),
                ("expand", "pya2a_moe_expand"), ("partials", f"pya2a_moe_partials<{self.type}>"),
                ("combine_f32", "pya2a_moe_combine<F32>"))}
            self.slot = cp.empty(max(N, 1), dtype=np.int32)
            self.idx = cp.empty(max(N, 1), dtype=np.int64)
            self.counts = cp.zeros(ep.local_experts, dtype=np.int64)
            self.xbuf = self.group.as_array(self.xa, (cap, ep.hidden), ep.dtype)
            self.ybuf = self.group.as_array(self.ya, (cap, ep.hidden), ep.dtype)
            # unit weights of the dispatch backward (a combine launch)
            self._ones = cp.ones(max(N, 1), dtype=np.float32)
        self.sms = client_sms(self.device)
        # Blocks of dispatch and combine wait for other ranks: every rank's grid must be
        # resident at once (grid_budget; a GPU of its own: one block per SM)
        self.grid_max = grid_budget(self.sms, self.group.share.ranks_per_device)
        p = ep.size
        d = self._dargs = np.zeros((), dtype=_DISPATCH)
        d["ctrl"], d["slot"], d["expert_counts"] = self.ctrl.ptr, self.slot.data.ptr, \
            self.counts.data.ptr
        d["idx_own"] = self.idx.data.ptr
        d["peer_ctrl"][:p] = self.ctrl.peer_ptrs
        d["peer_x"][:p] = self.xa.peer_ptrs
        d["topk"], d["E"], d["El"] = ep.topk, ep.num_experts, ep.local_experts
        d["row_bytes"], d["rank"], d["p"] = rb, ep.rank, p
        c = self._cargs = np.zeros((), dtype=_COMBINE)
        c["idx"], c["slot"], c["ctrl"] = self.idx.data.ptr, self.slot.data.ptr, self.ctrl.ptr
        c["peer_ctrl"][:p] = self.ctrl.peer_ptrs
        c["peer_x"][:p] = self.xa.peer_ptrs
        c["peer_y"][:p] = self.ya.peer_ptrs
        c["topk"], c["E"], c["El"] = ep.topk, ep.num_experts, ep.local_experts
        c["row_bytes"], c["rank"], c["p"] = rb, ep.rank, p
        # the per-call fields, written through word views (cheaper than field access)
        self._dvar, self._cvar = _Args(d), _Args(c)
        self._per_rank = ep.mode == "per_rank"
        if self._per_rank:
            self._init_per_rank(d, c)
        self._dk = {f: _word(_DISPATCH, f) for f in ("x", "idx", "seq", "n", "topk", "epb",
                                                      "segs", "seg_bytes", "n_dev", "seq_dev")}
        self._ck = {f: _word(_COMBINE, f) for f in ("y", "w", "idx", "slot", "seq", "n",
                                                     "use_x", "segs", "seg_vecs", "save",
                                                     "n_dev", "seq_dev")}
        self._scale_params: dict[tuple[int, int], Any] = {}
        self._rec = np.zeros(2, dtype=np.int64)
        self._table = np.zeros(2 * ep.size, dtype=np.int64)
        self._launch_fn = cp.cuda.driver.launchKernel
        self._ndarray = cp.ndarray
        self.seq = 0
        # what the last launch was: a forward dispatch waiting for its combine (its handle),
        # a backward dispatch launch (_BACKWARD: a combine launch may follow), or a combine
        # launch / nothing yet (None: a combine launch needs a dispatch launch first)
        self._pending: Any = None
        self._keep: Any = None
        self._freed = False
        # graph capture: the static buffers, whether calls are being captured, and the
        # device word holding the call number (once graph_mode was entered, every launch
        # takes its call number from there)
        self._io: GraphBuffers | None = None
        self._graph = False
        self._seq_dev: Any = None

    def _init_per_rank(self, d: np.ndarray, c: np.ndarray) -> None:
        """per_rank mode's symmetric buffers (collective) and argument variants."""
        cp, ep, p = self._cp, self.ep, self.ep.size
        rb, T, El = ep.row_bytes, ep.max_tokens, ep.local_experts
        N = T * ep.topk
        cc = max(min(p * T, ep.max_recv_tokens), 1)  # copies one rank can receive
        self._tw = _cdiv(ep.topk, 4) * 4  # table row: int32 expert_x rows, 16-byte rows
        with cp.cuda.Device(self.device):
            self.copies_a = self.group.allocate(max(cc * rb, 256))
            self.tables_a = self.group.allocate(max(cc * self._tw * 4, 256))
            self.tables_a_rows = cc
            self.weights_a = self.group.allocate(max(ep.max_recv_tokens * 16, 256))
            self.partials_a = self.group.allocate(max(cc * rb, 256))
            self._slot2 = cp.empty(max(T * p, 1), dtype=np.int32)  # copies' rows at dest
            self._idx2 = cp.empty(max(T * p, 1), dtype=np.int64)  # copies' routing
            self._ncopies = cp.zeros(El, dtype=np.int64)  # [0]: copies received
            self._sslot = cp.empty(max(N, 1), dtype=np.int32)  # scratch of the weights
            self._sidx = cp.empty(max(N, 1), dtype=np.int64)
            self._scounts = cp.zeros(El, dtype=np.int64)
            self._ones2 = cp.ones(max(T * p, 1), dtype=np.float32)
        pseudo = {"slot": self._slot2.data.ptr, "idx_own": self._idx2.data.ptr,
                  "expert_counts": self._ncopies.data.ptr}
        self._route = _Args(d, row_bytes=0)  # slots and counts only, no rows
        self._copies = _Args(d, peer_x=list(self.copies_a.peer_ptrs), **pseudo)
        self._tables = _Args(d, peer_x=list(self.tables_a.peer_ptrs), row_bytes=self._tw * 4,
                             **pseudo)
        self._weights_v = _Args(d, peer_x=list(self.weights_a.peer_ptrs), row_bytes=16,
                                slot=self._sslot.data.ptr, idx_own=self._sidx.data.ptr,
                                expert_counts=self._scounts.data.ptr)
        self._pull = _Args(c, peer_y=list(self.partials_a.peer_ptrs), topk=p)
        # autograd: router-weight gradients pulled per entry from the owners' 16-byte rows
        # (the weights buffer), and unit weights for the dispatch's backward
        self._pull_gw = _Args(c, peer_y=list(self.weights_a.peer_ptrs), topk=1, row_bytes=16)
        self._pull_gw.fn = "combine_f32"
        with cp.cuda.Device(self.device):
            self._ones16 = cp.zeros((max(ep.max_recv_tokens, 1), 4), dtype=np.float32)
            self._ones16[:, 0] = 1
            self._wrows = self.group.as_array(self.weights_a, (max(ep.max_recv_tokens, 1), 4),
                                              np.float32)

    def _raw(self, name: str, grid: int, *vals: Any) -> None:
        """Launch a kernel whose arguments are scalars (ctypes values), 256 threads."""
        arr = (ctypes.c_void_p * len(vals))(*[ctypes.addressof(v) for v in vals])
        self._keep_raw = (arr, vals)
        self._launch(self._fn[name], grid, 256, arr)

    def _per_rank_keep(self, h: FusedHandle, n: int) -> None:
        """per_rank, autograd: the handle's own copies of this dispatch's routing (this
        rank's tokens) and of the tables of the copies it received (stream-ordered)."""
        cp, p = self._cp, self.ep.size
        with cp.cuda.Device(self.device):
            h.idx2, h.slot2 = self._idx2[:n * p].copy(), self._slot2[:n * p].copy()
            h.tables = self.group.as_array(self.tables_a, (self.tables_a_rows, self._tw),
                                           np.int32).copy()
            h.ncopies = self._ncopies.copy()

    def _per_rank_dispatch(self, xa: Any, ia: Any, n: int) -> None:
        """per_rank: routing, copies, tables (three dispatch launches), expansion."""
        cp, ep, p = self._cp, self.ep, self.ep.size
        k, El, tw = ep.topk, ep.local_experts, self._tw
        N = n * k
        self._launch_dispatch(xa.data.ptr if n else 0, ia.data.ptr if N else 0, n, k,
                              var=self._route)
        with cp.cuda.Device(self.device):  # stream-ordered after the routing launch
            idx2 = cp.empty((n, p), dtype=np.int64)
            table = cp.full((n, p, tw), -1, dtype=np.int32)
            if n:
                e = ia.reshape(n, k)
                dest = cp.where((e >= 0) & (e < ep.num_experts), e // El, -1)
                r = cp.arange(p, dtype=np.int64)
                hit = dest[:, None, :] == r[None, :, None]  # (n, p, k)
                idx2[...] = cp.where(hit.any(axis=2), r[None, :] * El, -1)  # a copy per hit
                big = np.int32(2 ** 31 - 1)
                tab = cp.sort(cp.where(hit, self.slot[:N].reshape(n, 1, k), big), axis=2)
                table[:, :, :k] = cp.where(tab == big, np.int32(-1), tab)
        self._keep_pr = (idx2, table)
        self._launch_dispatch(xa.data.ptr if n else 0, idx2.data.ptr if n else 0, n, p,
                              var=self._copies)
        self._launch_dispatch(table.data.ptr if n else 0, idx2.data.ptr if n else 0, n * p, 1,
                              var=self._tables)
        self._raw("expand", self.sms * 2, ctypes.c_uint64(self.xa.ptr),
                  ctypes.c_uint64(self.copies_a.ptr), ctypes.c_uint64(self.tables_a.ptr),
                  ctypes.c_uint64(self._ncopies.data.ptr), ctypes.c_int32(tw),
                  ctypes.c_int64(ep.row_bytes))

    def _per_rank_combine(self, ya: Any, wa: Any, oa: Any, n: int) -> None:
        """per_rank: weights to the owners (a dispatch launch), partial sums per received
        copy on the owner, one combine launch pulling a partial per (token, rank)."""
        cp, ep = self._cp, self.ep
        N = n * ep.topk
        with cp.cuda.Device(self.device):
            w16 = cp.zeros((max(N, 1), 4), dtype=np.float32)
            w16[:N, 0] = wa.reshape(-1)
        self._keep_pr = (*self._keep_pr, w16)
        self._launch_dispatch(w16.data.ptr, self.idx.data.ptr, N, 1, var=self._weights_v)
        self._raw("partials", self.sms * 2, ctypes.c_uint64(self.partials_a.ptr),
                  ctypes.c_uint64(ya.data.ptr if ya.shape[0] else self.ya.ptr),
                  ctypes.c_uint64(self.weights_a.ptr), ctypes.c_uint64(self.tables_a.ptr),
                  ctypes.c_uint64(self._ncopies.data.ptr), ctypes.c_int32(self._tw),
                  ctypes.c_int64(ep.row_bytes))
        h = self._pending
        self._launch_combine(oa.data.ptr, self._ones2.data.ptr, n, 0, h, var=self._pull,
                             idx_slot=(self._idx2.data.ptr, self._slot2.data.ptr))

    # ------------------------------------------------------------------ helpers
    def _agree(self, exc: BaseException | None, flag: bool = False, what: str = "") -> None:
        """validate.agree's outcome, with one preallocated 16-byte Allgather when all is well;
        ``flag`` (requires grad) must also be the same on every rank (else ValueError
        ``what`` everywhere)."""
        if not self.agree_errors:
            if exc is not None:
                raise exc
            return
        self._rec[0], self._rec[1] = error_code(exc), int(flag)
        self.comm.Allgather(self._rec, self._table)
        codes, flags = self._table[0::2], self._table[1::2]
        if codes.any():  # every rank sees it: all run the full agreement, which raises
            agree(self.comm, exc, np.zeros(0, dtype=np.int64))
        if (flags != flags[0]).any():
            raise ValueError(what)

    def _device_array(self, call: str, name: str, a: Any) -> Any:
        """A CuPy view of a CuPy / torch / CAI device array on this rank's device
        (torch bfloat16 as uint16 words: CuPy has no bfloat16)."""
        if type(a) is not self._ndarray:
            bf16 = str(getattr(a, "dtype", "")) == "torch.bfloat16"
            if type(a).__module__.startswith("torch"):
                a = a.detach()  # a tensor requiring grad exports no array interface
            if bf16:
                import torch

                a = a.view(torch.int16)
            if not hasattr(a, "__cuda_array_interface__"):
                raise TypeError(f"{call}: {name} must be a device array (CuPy, torch) on "
                                f"device {self.device}, got {type(a).__name__}")
            a = self._cp.asarray(a)
            if bf16:
                a = a.view(np.uint16)
        if a.data.device_id != self.device:
            raise ValueError(f"{call}: {name} is on device {a.data.device_id}, expected "
                             f"{self.device}")
        return a

    def _check_rows(self, call: str, name: str, a: Any, max_rows: int) -> Any:
        arr = self._device_array(call, name, a)
        ep = self.ep
        shape = arr.shape
        if len(shape) != 2 or shape[1] != ep.hidden or shape[0] > max_rows:
            raise ValueError(f"{call}: {name} has shape {tuple(shape)}, expected "
                             f"(<= {max_rows}, {ep.hidden})")
        if arr.dtype != ep.dtype:
            raise TypeError(f"{call}: {name} has dtype {a.dtype}, expected {ep.dtype_name}")
        if shape[0] and (arr.data.ptr & 15 or not arr.flags.c_contiguous):
            raise ValueError(f"{call}: {name} must be C-contiguous and 16-byte aligned")
        return arr

    def _launch(self, fn: int, grid: int, threads: int, params: Any) -> None:
        cp = self._cp
        if cp.cuda.runtime.getDevice() != self.device:
            with cp.cuda.Device(self.device):
                return self._launch(fn, grid, threads, params)
        stream = cp.cuda.get_current_stream().ptr
        self._launch_fn(fn, grid, 1, 1, threads, 1, 1, 0, stream, ctypes.addressof(params), 0)

    # ------------------------------------------------------------------ launches
    def _launch_dispatch(self, x_ptr: int, idx_ptr: int, n: int, topk: int,
                         n_dev: int = 0, var: _Args | None = None) -> None:
        """One dispatch launch (the next call number) of ``n`` tokens of ``topk`` entries
        (``n_dev``: at most ``n``, the count read from that device int32; ``var``: other
        buffers than the base arguments')."""
        v = self._dvar if var is None else var
        rb = v.row_bytes
        N = n * topk
        self.seq += 1
        g = min(self.grid_max, max(1, N))
        epb = _cdiv(N, g) if N else 1
        g = _cdiv(N, epb) if N else 1
        segs = max(1, min(_cdiv(g * _WARPS, max(N, 1)), rb // 512))
        w, k = v.words, self._dk
        w[k["x"]] = x_ptr if N else self.xa.ptr
        w[k["idx"]] = idx_ptr if N else self.idx.data.ptr
        w[k["seq"]] = self.seq
        w[k["n"]] = n
        w[k["topk"]] = topk
        w[k["epb"]] = epb
        w[k["segs"]] = segs
        w[k["seg_bytes"]] = _cdiv(_cdiv(rb, segs), 16) * 16
        w[k["n_dev"]] = n_dev
        w[k["seq_dev"]] = 0 if self._seq_dev is None else self._seq_dev.data.ptr
        self._launch(self._fn["dispatch"], g, _THREADS, v.params)

    def _launch_combine(self, y_ptr: int, w_ptr: int, n: int, use_x: int, handle: FusedHandle,
                        save_ptr: int = 0, n_dev: int = 0, var: _Args | None = None,
                        idx_slot: tuple[int, int] | None = None) -> None:
        """One combine launch (the current call number) of ``handle``'s ``n`` tokens from the
        peers' expert-output buffers (``use_x``: this rank's lie in its input buffer;
        ``var`` / ``idx_slot``: other buffers / routing than the base's)."""
        v = self._cvar if var is None else var
        segs = max(1, min(_cdiv(self.grid_max * _WARPS, max(n, 1)), v.row_bytes // 512))
        w, k = v.words, self._ck
        w[k["y"]] = y_ptr if n else self.ya.ptr
        w[k["w"]] = w_ptr if n else self.idx.data.ptr
        if idx_slot is None:
            idx_slot = (self.idx.data.ptr if handle.idx is None else handle.idx.data.ptr,
                        self.slot.data.ptr if handle.slot is None else handle.slot.data.ptr)
        w[k["idx"]], w[k["slot"]] = idx_slot
        w[k["save"]] = save_ptr if n else 0
        w[k["seq"]] = self.seq
        w[k["n"]] = n
        w[k["use_x"]] = use_x
        w[k["segs"]] = segs
        w[k["seg_vecs"]] = _cdiv(v.row_bytes // 16, segs)
        w[k["n_dev"]] = n_dev
        w[k["seq_dev"]] = 0 if self._seq_dev is None else self._seq_dev.data.ptr
        self._launch(self._fn[v.fn], min(self.grid_max, max(1, _cdiv(n * segs, _WARPS))),
                     _THREADS, v.params)

    def _rows_to_ybuf(self, a: Any) -> None:
        """Copy rows into this rank's symmetric expert-output buffer (stream-ordered)."""
        cp = self._cp
        if a.shape[0] and a.data.ptr != self.ya.ptr:
            with cp.cuda.Device(self.device):
                cp.cuda.runtime.memcpyAsync(self.ya.ptr, a.data.ptr, a.nbytes, 3,
                                            cp.cuda.get_current_stream().ptr)  # D2D

    # ------------------------------------------------------------------ calls
    def dispatch(self, x: Any, topk_idx: Any, *, grad: bool = False,
                 fresh: bool = False) -> tuple[Any, Any, FusedHandle]:
        """See :meth:`pya2a.moe.ExpertParallel.dispatch`; ``expert_x`` is the whole buffer.

        ``topk_idx`` is read by the dispatch kernel only (it keeps its own copy for
        combine); int64 C-contiguous avoids a conversion. ``grad``: ``x`` requires grad
        (must agree across ranks). ``grad`` or ``fresh`` (torch in grad mode: autograd may
        keep ``expert_x`` or differentiate combine): ``expert_x`` is a new copy of the
        whole buffer, and the handle keeps its own copies of the routing, slots and counts
        for the backward passes.
        """
        if self._graph:
            return self._dispatch_graph(x, topk_idx, grad)
        call = "ExpertParallel.dispatch"
        ep = self.ep
        exc = None
        n = 0
        xa = ia = None
        try:
            if self._freed:
                raise ValueError(f"{call}: used after free()")
            if isinstance(self._pending, FusedHandle):
                raise ValueError(f"{call}: the previous dispatch was not combined yet (the "
                                 f"fused path needs each combine to follow its dispatch)")
            xa = self._check_rows(call, "x", x, ep.max_tokens)
            n = xa.shape[0]
            ia = self._device_array(call, "topk_idx", topk_idx)
            if ia.shape != (n, ep.topk):
                raise ValueError(f"{call}: topk_idx has shape {tuple(ia.shape)}, expected "
                                 f"({n}, {ep.topk})")
            if ia.dtype.kind not in "iu":
                raise TypeError(f"{call}: topk_idx must be integers, got {ia.dtype}")
        except Exception as e:
            exc = e
        self._agree(exc, grad, f"{call}: x requires grad on some ranks only (the backward "
                               f"pass is collective: requires_grad must agree on every rank)")
        N = n * ep.topk
        cp = self._cp
        if N and (ia.dtype != np.int64 or not ia.flags.c_contiguous):
            with cp.cuda.Device(self.device):
                ia = cp.ascontiguousarray(ia, dtype=np.int64)  # allocates; stream-ordered
        self._keep = (x, topk_idx, ia)
        if self._per_rank:
            self._per_rank_dispatch(xa, ia, n)
        else:
            self._launch_dispatch(xa.data.ptr if n else 0, ia.data.ptr if N else 0, n, ep.topk)
        h = FusedHandle(id(self), self.seq, n, self.counts, mode=ep.mode)
        ex = self.xbuf
        if grad or fresh:
            with cp.cuda.Device(self.device):  # stream-ordered copies after the launch
                h.idx, h.slot = self.idx[:N].copy(), self.slot[:N].copy()
                h.expert_counts = self.counts.copy()
                ex = self.xbuf.copy()
            if self._per_rank:
                self._per_rank_keep(h, n)
        self._pending = h
        return (ex if type(x) is self._ndarray else ep._wrap(ex, x)), h.expert_counts, h

    def expert_output(self, rows: int) -> Any:
        """The first ``rows`` rows of the symmetric expert-output buffer (CuPy)."""
        if not 0 <= rows <= self.ep.max_recv_tokens:
            raise ValueError(f"ExpertParallel.expert_output: rows={rows} outside "
                             f"[0, {self.ep.max_recv_tokens}]")
        return self.ybuf[:rows]

    def scale_experts(self, expert_x: Any, out: Any) -> None:
        """The benchmark's trivial expert op on device: ``out = expert_x * factor(expert)``.

        Rows of local expert ``l`` are scaled by ``1 + ((first_expert + l) % 5) / 4``; the
        row count comes from the device counts of the last dispatch (no host sync).
        ``expert_x`` and ``out`` need ``max_recv_tokens`` rows (e.g. the dispatch's
        ``expert_x`` and ``expert_output(max_recv_tokens)``) and may be the same buffer.
        """
        ep = self.ep
        key = (self._device_array("scale_experts", "expert_x", expert_x).data.ptr,
               self._device_array("scale_experts", "out", out).data.ptr)
        params = self._scale_params.get(key)
        if params is None:
            vals = (ctypes.c_uint64(key[0]), ctypes.c_uint64(key[1]),
                    ctypes.c_uint64(self.counts.data.ptr), ctypes.c_int32(ep.local_experts),
                    ctypes.c_int32(ep.first_expert), ctypes.c_int64(ep.row_bytes))
            arr = (ctypes.c_void_p * len(vals))(*[ctypes.addressof(v) for v in vals])
            params = self._scale_params[key] = (arr, vals)
        self._launch(self._fn["scale"], self.sms * 2, 256, params[0])

    def combine(self, expert_y: Any, topk_weight: Any, handle: FusedHandle, *,
                out: Any = None, grad: bool = False) -> Any:
        """See :meth:`pya2a.moe.ExpertParallel.combine` (``y`` is a CuPy / torch array).

        ``grad``: ``expert_y`` or ``topk_weight`` requires grad (must agree across ranks);
        the launch then also stores each entry's expert row as read in ``handle.rows``, for
        the router-weight gradient.
        """
        if self._graph:
            return self._combine_graph(expert_y, topk_weight, handle, out, grad)
        call = "ExpertParallel.combine"
        ep, cp = self.ep, self._cp
        exc = None
        n = 0
        ya = wa = oa = None
        try:
            if not isinstance(handle, FusedHandle):
                raise TypeError(f"{call}: handle must be the handle from dispatch, got "
                                f"{type(handle).__name__}")
            if handle.owner != id(self):
                raise ValueError(f"{call}: handle comes from another ExpertParallel")
            if handle is not self._pending:
                raise ValueError(f"{call}: handle is not the latest dispatch's (or was "
                                 f"combined already)")
            n = handle.num_tokens
            ya = self._check_rows(call, "expert_y", expert_y, ep.max_recv_tokens)
            wa = self._weights(call, topk_weight, n)
            if out is not None:
                if grad:
                    raise ValueError(f"{call}: out= cannot be used when the result needs "
                                     f"gradients")
                oa = self._check_rows(call, "out", out, n)
                if oa.shape[0] != n:
                    raise ValueError(f"{call}: out has {oa.shape[0]} rows, expected {n}")
        except Exception as e:
            exc = e
        self._agree(exc, grad, f"{call}: expert_y / topk_weight require grad on some ranks "
                               f"only (requires_grad must agree on every rank)")
        N = n * ep.topk
        if self._per_rank:
            with cp.cuda.Device(self.device):
                if oa is None:
                    oa = cp.empty((n, ep.hidden), dtype=ep.dtype)
                wa = wa.astype(np.float32, copy=False)
            self._per_rank_combine(ya, wa, oa, n)
            if grad:
                with cp.cuda.Device(self.device):  # the weights as they reached the owners
                    handle.wrows = self._wrows.copy()
            return self._combined(handle, expert_y, topk_weight, wa, oa, out)
        use_x = int(ya.data.ptr == self.xa.ptr)
        if not use_x:
            self._rows_to_ybuf(ya)
        save = None
        with cp.cuda.Device(self.device):
            if N and (wa.dtype != np.float32 or not wa.flags.c_contiguous):
                wa = cp.ascontiguousarray(wa, dtype=np.float32)  # allocates; stream-ordered
            if oa is None:
                oa = cp.empty((n, ep.hidden), dtype=ep.dtype)
            if grad:
                save = cp.empty((N, ep.hidden), dtype=ep.dtype)
        self._launch_combine(oa.data.ptr, wa.data.ptr if N else 0, n, use_x, handle,
                             save.data.ptr if save is not None and N else 0)
        handle.rows = save
        return self._combined(handle, expert_y, topk_weight, wa, oa, out)

    def _combined(self, handle: FusedHandle, expert_y: Any, topk_weight: Any, wa: Any,
                  oa: Any, out: Any) -> Any:
        """The end of a combine: state, and ``y`` as the caller's array type."""
        handle.done = True
        self._pending = None
        self._keep = (expert_y, topk_weight, wa)
        if out is not None:
            return out
        like = topk_weight if type(topk_weight).__module__.startswith("torch") else expert_y
        return self.ep._wrap(oa, like)

    # ------------------------------------------------------------------ backward passes
    def dispatch_backward(self, grad_x: Any, handle: FusedHandle) -> Any:
        """d(loss)/dx from d(loss)/d(expert_x). Collective.

        A combine launch with unit weights over every rank's ``expert_x`` gradient (copied
        into its symmetric expert-output buffer) with this dispatch's slots: each token's
        copies summed in float32 in k order, cast to the row type. Returns a CuPy (n, H)
        array.
        """
        call = "ExpertParallel.dispatch (backward)"
        ep, cp = self.ep, self._cp
        self._backward_check(call, handle)
        g = self._grad_rows(call, "the gradient of expert_x", grad_x, ep.max_recv_tokens,
                            exact=False)
        if self._pending is None:
            # the last launch was a combine (this dispatch's combine got no gradient): a
            # combine launch must follow a dispatch launch, so run an empty one (every rank
            # takes this branch: the ranks make the same calls in the same order)
            self._launch_dispatch(0, 0, 0, ep.topk)
        n = handle.num_tokens
        if self._per_rank:  # each received copy's rows summed on the owner, pulled back
            with cp.cuda.Device(self.device):
                out = cp.empty((n, ep.hidden), dtype=ep.dtype)
            self._raw("partials", self.sms * 2, ctypes.c_uint64(self.partials_a.ptr),
                      ctypes.c_uint64(g.data.ptr if g.shape[0] else self.ya.ptr),
                      ctypes.c_uint64(self._ones16.data.ptr),
                      ctypes.c_uint64(handle.tables.data.ptr),
                      ctypes.c_uint64(handle.ncopies.data.ptr), ctypes.c_int32(self._tw),
                      ctypes.c_int64(ep.row_bytes))
            self._launch_combine(out.data.ptr, self._ones2.data.ptr, n, 0, handle,
                                 var=self._pull,
                                 idx_slot=(handle.idx2.data.ptr, handle.slot2.data.ptr))
            self._pending = None
            self._keep = (grad_x, g, out)
            return out
        self._rows_to_ybuf(g)
        with cp.cuda.Device(self.device):
            out = cp.empty((n, ep.hidden), dtype=ep.dtype)
        self._launch_combine(out.data.ptr, self._ones.data.ptr, n, 0, handle)
        self._pending = None
        self._keep = (grad_x, g, out)
        return out

    def combine_backward(self, grad_y: Any, expert_y: Any, topk_weight: Any,
                         handle: FusedHandle, rows: Any) -> tuple[Any, Any]:
        """(d(loss)/d(expert_y), d(loss)/d(topk_weight)) from d(loss)/dy. Collective.

        ``d expert_y[row of (t, k)] = topk_weight[t, k] * grad_y[t]``: the ``n * topk``
        scaled rows (float32 product, cast to the row type) go out in one dispatch launch as
        tokens of one entry each (same flat order: each lands at the row of (t, k));
        ``expert_y``'s rows past ``sum(expert_counts)`` get zeros. ``d topk_weight[t, k] =
        <grad_y[t], rows[t * topk + k]>`` in float32, ``rows`` the expert rows the forward
        combine read (``handle.rows``). Returns CuPy arrays: (len(expert_y), H) of the row
        type and (n, topk) float32.
        """
        call = "ExpertParallel.combine (backward)"
        ep, cp = self.ep, self._cp
        self._backward_check(call, handle)
        if rows is None and handle.wrows is None:
            raise ValueError(f"{call}: the forward combine ran without gradients, so it "
                             f"kept nothing for the backward pass")
        n, k, H = handle.num_tokens, ep.topk, ep.hidden
        N = n * k
        g = self._grad_rows(call, "the gradient of y", grad_y, n, exact=True)
        m = int(expert_y.shape[0])
        if self._per_rank:
            return self._per_rank_combine_backward(g, expert_y, handle, m)
        wa = self._weights(call, topk_weight, n)
        with cp.cuda.Device(self.device):
            g32 = self._to_acc(g)
            w32 = wa.astype(np.float32, copy=False)
            send = self._cast((w32[:, :, None] * g32[:, None, :]).reshape(N, H))
            gw = (self._to_acc(rows).reshape(n, k, H) * g32[:, None, :]).sum(axis=2)
        self._launch_dispatch(send.data.ptr if N else 0, handle.idx.data.ptr if N else 0,
                              N, 1)
        with cp.cuda.Device(self.device):  # stream-ordered after the launch
            gey = self.xbuf[:m].copy()
            if m:
                valid = cp.arange(m, dtype=np.int64)[:, None] < handle.expert_counts.sum()
                gey = cp.where(valid, gey, cp.zeros((), dtype=gey.dtype))
        self._pending = _BACKWARD
        self._keep = (grad_y, g, send, wa, topk_weight)
        return gey, gw

    def _per_rank_combine_backward(self, g: Any, expert_y: Any, handle: FusedHandle,
                                   m: int) -> tuple[Any, Any]:
        """per_rank: ``g[t]`` once per (token, rank) (a copies launch), expanded on the
        owner to the token's rows; there ``d expert_y = w * g`` and each row's ``<g,
        expert_y>``, which one combine launch (16-byte float32 rows) pulls back per entry."""
        cp, ep = self._cp, self.ep
        n, k, p = handle.num_tokens, ep.topk, ep.size
        N = n * k
        self._launch_dispatch(g.data.ptr if n else 0, handle.idx2.data.ptr if n else 0, n, p,
                              var=self._copies)
        self._raw("expand", self.sms * 2, ctypes.c_uint64(self.xa.ptr),
                  ctypes.c_uint64(self.copies_a.ptr), ctypes.c_uint64(handle.tables.data.ptr),
                  ctypes.c_uint64(handle.ncopies.data.ptr), ctypes.c_int32(self._tw),
                  ctypes.c_int64(ep.row_bytes))
        ey = self._device_array("ExpertParallel.combine (backward)", "expert_y", expert_y)
        with cp.cuda.Device(self.device):  # stream-ordered after the expansion
            gx = self._to_acc(self.xbuf[:m])
            gey = self._cast(gx * handle.wrows[:m, 0:1])
            if m:
                valid = cp.arange(m, dtype=np.int64)[:, None] < handle.expert_counts.sum()
                gey = cp.where(valid, gey, cp.zeros((), dtype=gey.dtype))
                self._wrows[:m, 0] = (gx * self._to_acc(ey)).sum(axis=1)
            out = cp.empty((max(N, 1), 4), dtype=np.float32)
        self._launch_combine(out.data.ptr, self._ones.data.ptr, N, 0, handle,
                             var=self._pull_gw,
                             idx_slot=(handle.idx.data.ptr, handle.slot.data.ptr))
        self._pending = None
        self._keep = (g, ey, out, gey)
        return gey, out[:N, 0].reshape(n, k)

    def _backward_check(self, call: str, handle: FusedHandle) -> None:
        """Same outcome on every rank (the ranks make the same calls in the same order)."""
        if self._freed:
            raise ValueError(f"{call}: used after free()")
        if self._graph:
            raise ValueError(f"{call}: graph mode has no backward pass")
        if isinstance(self._pending, FusedHandle):
            raise ValueError(f"{call}: a dispatch is waiting for its combine (backward "
                             f"passes run after every forward dispatch was combined)")
        if handle.idx is None:
            raise ValueError(f"{call}: the dispatch ran outside torch grad mode, so its "
                             f"routing was not kept for the backward pass")

    def _grad_rows(self, call: str, name: str, a: Any, rows: int, *, exact: bool) -> Any:
        """A C-contiguous, 16-byte aligned CuPy view (or copy) of a gradient's rows."""
        arr = self._device_array(call, name, a)
        ep = self.ep
        if arr.ndim != 2 or arr.shape[1] != ep.hidden or arr.shape[0] > rows or (
                exact and arr.shape[0] != rows):
            raise ValueError(f"{call}: {name} has shape {tuple(arr.shape)}, expected "
                             f"({'' if exact else '<= '}{rows}, {ep.hidden})")
        if arr.dtype != ep.dtype:
            raise TypeError(f"{call}: {name} has dtype {a.dtype}, expected {ep.dtype_name}")
        if arr.shape[0] and (arr.data.ptr & 15 or not arr.flags.c_contiguous):
            with self._cp.cuda.Device(self.device):
                arr = arr.copy()  # a new allocation: aligned, C order
        return arr

    def _weights(self, call: str, topk_weight: Any, n: int) -> Any:
        """The router weights as a CuPy array of floats (n, topk) (torch bfloat16 as float32)."""
        if str(getattr(topk_weight, "dtype", "")) == "torch.bfloat16":
            topk_weight = topk_weight.detach().float()  # the kernel reads float32 weights
        wa = self._device_array(call, "topk_weight", topk_weight)
        if wa.shape != (n, self.ep.topk):
            raise ValueError(f"{call}: topk_weight has shape {tuple(wa.shape)}, expected "
                             f"({n}, {self.ep.topk})")
        if wa.dtype.kind != "f":
            raise TypeError(f"{call}: topk_weight must be floating point, got {wa.dtype}")
        return wa

    def _to_acc(self, a: Any) -> Any:
        """Rows as float32 (bfloat16 words shifted into place)."""
        if self.ep.dtype_name == "bfloat16":
            return (a.astype(np.uint32) << 16).view(np.float32)
        return a.astype(np.float32, copy=False)

    def _cast(self, acc: Any) -> Any:
        """float32 rows to the row type (bfloat16: round to nearest even, NaN kept quiet),
        with no host synchronisation."""
        cp = self._cp
        if self.ep.dtype_name != "bfloat16":
            return cp.ascontiguousarray(acc.astype(self.ep.dtype))
        acc = cp.ascontiguousarray(acc, dtype=np.float32)
        u = acc.view(np.uint32)
        r = ((u + np.uint32(0x7FFF) + ((u >> 16) & np.uint32(1))) >> 16).astype(np.uint16)
        return cp.where(cp.isnan(acc), np.uint16(0x7FC0), r)

    # ------------------------------------------------------------------ graph capture
    def graph_buffers(self) -> GraphBuffers:
        """The static buffers of graph mode (:class:`GraphBuffers`), allocated (zeroed) on
        first use; local (not collective)."""
        if self._io is None:
            cp, ep = self._cp, self.ep
            T = ep.max_tokens
            with cp.cuda.Device(self.device):
                self._io = GraphBuffers(
                    x=cp.zeros((T, ep.hidden), dtype=ep.dtype),
                    topk_idx=cp.zeros((T, ep.topk), dtype=np.int64),
                    topk_weight=cp.zeros((T, ep.topk), dtype=np.float32),
                    num_tokens=cp.zeros(1, dtype=np.int32),
                    y=cp.zeros((T, ep.hidden), dtype=ep.dtype))
        return self._io

    @contextlib.contextmanager
    def graph_mode(self) -> Iterator[GraphBuffers]:
        """Collective: inside, dispatch and combine can be captured in a CUDA graph.

        Graph-mode calls take everything that changes per step from device memory: the
        token count from ``graph_buffers().num_tokens`` and the call number from a device
        word that each dispatch launch advances (from the first ``graph_mode`` on, every
        launch of this instance takes its call number from there). They make no host
        synchronisation, no MPI call (no argument agreement: a bad argument raises on its
        rank only) and no allocation, and accept only the static buffers: ``dispatch(io.x,
        io.topk_idx)`` and ``combine(expert_y, io.topk_weight, handle, out=io.y)``, with
        ``expert_y`` best ``expert_output(max_recv_tokens)`` or the dispatch's ``expert_x``
        (any other array is copied into the output buffer, a capturable device copy). No
        autograd. Entering synchronises the device once (the counter word and the buffers
        must be ready on any stream the graph replays on).

        What the caller must do: every rank captures the same sequence and replays it the
        same number of times in the same order, with no other dispatch or combine of this
        instance on any rank in between; expert ids must be valid (bad ones are dropped,
        not reported); the expert op must be capturable and take its row count from the
        device counts; the launches go on CuPy's current stream (make the capturing
        stream current, e.g. ``with stream: stream.begin_capture()``, or for torch's
        capture ``cupy.cuda.ExternalStream(torch.cuda.current_stream().cuda_stream)``).
        Yields :meth:`graph_buffers`.
        """
        call = "ExpertParallel.graph_mode"
        exc = None
        try:
            if self._freed:
                raise ValueError(f"{call}: used after free()")
            if self._graph:
                raise ValueError(f"{call}: already in graph mode")
            if self._per_rank:
                raise ValueError(f"{call}: graph capture runs mode 'per_expert' only")
            if isinstance(self._pending, FusedHandle):
                raise ValueError(f"{call}: a dispatch is waiting for its combine")
        except Exception as e:
            exc = e
        agree(self.comm, exc, np.zeros(0, dtype=np.int64))  # once, on entering
        io = self.graph_buffers()
        cp = self._cp
        with cp.cuda.Device(self.device):
            if self._seq_dev is None:
                self._seq_dev = cp.full(1, self.seq, dtype=np.uint64)
            cp.cuda.Device(self.device).synchronize()
        self._graph = True
        try:
            yield io
        finally:
            self._graph = False

    def _dispatch_graph(self, x: Any, topk_idx: Any, grad: bool) -> tuple[Any, Any, FusedHandle]:
        """dispatch in graph mode: the static buffers, the count from the device."""
        call = "ExpertParallel.dispatch"
        io, ep = self._io, self.ep
        if grad:
            raise ValueError(f"{call}: graph mode has no autograd (x requires grad)")
        if isinstance(self._pending, FusedHandle):
            raise ValueError(f"{call}: the previous dispatch was not combined yet")
        xa = self._device_array(call, "x", x)
        ia = self._device_array(call, "topk_idx", topk_idx)
        if not (_same(xa, io.x) and _same(ia, io.topk_idx)):
            raise ValueError(f"{call}: in graph mode x and topk_idx must be graph_buffers()'s "
                             f"x and topk_idx (write each step's inputs into them)")
        self._keep = (x, topk_idx)
        T = ep.max_tokens
        self._launch_dispatch(io.x.data.ptr, io.topk_idx.data.ptr, T, ep.topk,
                              n_dev=io.num_tokens.data.ptr)
        h = FusedHandle(id(self), self.seq, T, self.counts)
        self._pending = h
        return (self.xbuf if type(x) is self._ndarray else ep._wrap(self.xbuf, x)), \
            self.counts, h

    def _combine_graph(self, expert_y: Any, topk_weight: Any, handle: Any, out: Any,
                       grad: bool) -> Any:
        """combine in graph mode: the static buffers, the count from the device."""
        call = "ExpertParallel.combine"
        io, ep = self._io, self.ep
        if grad:
            raise ValueError(f"{call}: graph mode has no autograd")
        if not isinstance(handle, FusedHandle) or handle is not self._pending:
            raise ValueError(f"{call}: handle is not the latest dispatch's")
        ya = self._check_rows(call, "expert_y", expert_y, ep.max_recv_tokens)
        wa = self._device_array(call, "topk_weight", topk_weight)
        oa = None if out is None else self._device_array(call, "out", out)
        if oa is None or not (_same(wa, io.topk_weight) and _same(oa, io.y)):
            raise ValueError(f"{call}: in graph mode topk_weight and out must be "
                             f"graph_buffers()'s topk_weight and y")
        use_x = int(ya.data.ptr == self.xa.ptr)
        if not use_x:
            self._rows_to_ybuf(ya)
        self._launch_combine(io.y.data.ptr, io.topk_weight.data.ptr, ep.max_tokens, use_x,
                             handle, n_dev=io.num_tokens.data.ptr)
        handle.done = True
        self._pending = None
        self._keep = (expert_y, topk_weight, out)
        return out

    def free(self) -> None:
        """Collective: release the symmetric memory. Idempotent."""
        if self._freed:
            return
        self._freed = True
        self._keep = None
        self.group.free()


def _same(a: Any, b: Any) -> bool:
    """``a`` is the whole of CuPy array ``b`` (same memory, shape and dtype)."""
    return a.data.ptr == b.data.ptr and a.shape == b.shape and a.dtype == b.dtype


def scale_experts(ep: Any, expert_x: Any, out: Any) -> None:
    """Trivial expert op on the fused path (see :meth:`FusedExpertParallel.scale_experts`)."""
    if ep._fused is None:
        raise ValueError("scale_experts: ExpertParallel is not on the fused path")
    ep._fused.scale_experts(expert_x, out)
