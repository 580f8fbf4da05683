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

Differences from the portable path (documented in docs/moe.md): ``expert_x`` is the whole
receive buffer (``max_recv_tokens`` rows; the first ``sum(expert_counts)`` are valid) and
``expert_counts`` is a device int64 array, since the row count is only known on the
device; dispatch and combine must alternate; expert ids outside ``[0, num_experts)`` are
dropped, not reported; the weighted sum uses fused multiply-adds.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..core.validate import agree, error_code
from . import cupy as _cupy
from . import loader
from .ipc import CTRL_BYTES, IpcGroup, check_ipc, client_sms, device_share, grid_budget

__all__ = ["FusedExpertParallel", "FusedHandle", "fused_available", "scale_experts",
           "MAX_EXPERTS", "MAX_RANKS"]

MAX_RANKS = 8  # MOE_MAXP in kernels/moe_fused.cu
MAX_EXPERTS = 512  # MOE_MAXE
_THREADS = 512
_WARPS = _THREADS // 32
# row type -> kernel template type; bfloat16 rows are uint16 words in CuPy
_TYPES = {"float16": "F16", "bfloat16": "BF16", "float32": "F32"}
_NAMES = tuple(f"pya2a_moe_{k}<{t}>" for k in ("combine", "scale_experts")
               for t in _TYPES.values())

_P = MAX_RANKS
_DISPATCH = np.dtype([("x", np.uint64), ("idx", np.uint64), ("ctrl", np.uint64),
                      ("slot", np.uint64), ("expert_counts", np.uint64),
                      ("peer_ctrl", np.uint64, (_P,)), ("peer_x", np.uint64, (_P,)),
                      ("seq", np.uint64), ("n", np.int64), ("topk", np.int64),
                      ("E", np.int64), ("El", np.int64), ("row_bytes", np.int64),
                      ("rank", np.int64), ("p", np.int64), ("epb", np.int64),
                      ("segs", np.int64), ("seg_bytes", np.int64), ("idx_own", np.uint64)])
_COMBINE = np.dtype([("y", np.uint64), ("w", np.uint64), ("idx", np.uint64),
                     ("slot", np.uint64), ("ctrl", np.uint64),
                     ("peer_ctrl", np.uint64, (_P,)), ("peer_x", np.uint64, (_P,)),
                     ("peer_y", np.uint64, (_P,)), ("seq", np.uint64), ("n", np.int64),
                     ("topk", np.int64), ("E", np.int64), ("El", np.int64),
                     ("row_bytes", np.int64), ("rank", np.int64), ("p", np.int64),
                     ("use_x", np.int64), ("segs", np.int64), ("seg_vecs", np.int64)])


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
        expert_counts: int64 device array (E_local,).
    """

    owner: int
    seq: int
    num_tokens: int
    expert_counts: Any
    done: bool = False

    def num_rows(self) -> int:
        """Rows this rank received (synchronises with the device)."""
        return int(self.expert_counts.sum().get())


def _word(dt: np.dtype, field: str) -> int:
    """Index of a scalar field in the struct seen as 8-byte words."""
    return dt.fields[field][1] // 8


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
    ``max_recv_tokens * hidden * itemsize`` bytes, plus small index buffers.
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
                ("scale", f"pya2a_moe_scale_experts<{self.type}>"))}
            self.slot = cp.empty(max(N, 1), dtype=np.int32)
            self.idx = cp.empty(max(N, 1), dtype=np.int64)
            self.counts = cp.zeros(ep.local_experts, dtype=np.int64)
            self.xbuf = self.group.as_array(self.xa, (cap, ep.hidden), ep.dtype)
            self.ybuf = self.group.as_array(self.ya, (cap, ep.hidden), ep.dtype)
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
        self._dw = np.frombuffer(d.data, dtype=np.uint64)
        self._cw = np.frombuffer(c.data, dtype=np.uint64)
        self._dk = {f: _word(_DISPATCH, f) for f in ("x", "idx", "seq", "n", "epb", "segs",
                                                      "seg_bytes")}
        self._ck = {f: _word(_COMBINE, f) for f in ("y", "w", "seq", "n", "use_x", "segs",
                                                     "seg_vecs")}
        self._dparams = (ctypes.c_void_p * 1)(d.ctypes.data)
        self._cparams = (ctypes.c_void_p * 1)(c.ctypes.data)
        self._scale_params: dict[tuple[int, int], Any] = {}
        self._rec = np.zeros(1, dtype=np.int64)
        self._table = np.zeros(ep.size, dtype=np.int64)
        self._launch_fn = cp.cuda.driver.launchKernel
        self._ndarray = cp.ndarray
        self.seq = 0
        self._pending: FusedHandle | None = None
        self._keep: Any = None
        self._freed = False

    # ------------------------------------------------------------------ helpers
    def _agree(self, exc: BaseException | None) -> None:
        """validate.agree's outcome, with one preallocated 8-byte Allgather when all is well."""
        if not self.agree_errors:
            if exc is not None:
                raise exc
            return
        self._rec[0] = error_code(exc)
        self.comm.Allgather(self._rec, self._table)
        if self._table.any():  # every rank sees it: all run the full agreement, which raises
            agree(self.comm, exc, np.zeros(0, dtype=np.int64))

    def _device_array(self, call: str, name: str, a: Any) -> Any:
        """A CuPy view of a CuPy / torch / CAI device array on this rank's device
        (torch bfloat16 as uint16 words: CuPy has no bfloat16)."""
        if type(a) is not self._ndarray:
            bf16 = str(getattr(a, "dtype", "")) == "torch.bfloat16"
            if bf16:
                import torch

                a = a.detach().view(torch.int16)
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

    # ------------------------------------------------------------------ calls
    def dispatch(self, x: Any, topk_idx: Any, *,
                 grad: bool = False) -> tuple[Any, Any, FusedHandle]:
        """See :meth:`pya2a.moe.ExpertParallel.dispatch`; ``expert_x`` is the whole buffer.

        ``topk_idx`` is read by the dispatch kernel only (it keeps its own copy for
        combine); int64 C-contiguous avoids a conversion. ``grad`` (autograd) is refused
        on every rank: this path has no backward pass.
        """
        call = "ExpertParallel.dispatch"
        ep = self.ep
        exc = None
        n = 0
        xa = ia = None
        try:
            if self._freed:
                raise ValueError(f"{call}: used after free()")
            _no_grad(call, grad)
            if self._pending is not None:
                raise ValueError(f"{call}: the previous dispatch was not combined yet (the "
                                 f"fused path needs dispatch and combine to alternate)")
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
        self._agree(exc)
        N = n * ep.topk
        if N and (ia.dtype != np.int64 or not ia.flags.c_contiguous):
            ia = self._cp.ascontiguousarray(ia, dtype=np.int64)  # allocates; stream-ordered
        self._keep = (x, topk_idx, ia)
        self.seq += 1
        g = min(self.grid_max, max(1, N))
        epb = _cdiv(N, g) if N else 1
        g = _cdiv(N, epb) if N else 1
        segs = max(1, min(_cdiv(g * _WARPS, max(N, 1)), ep.row_bytes // 512))
        w, k = self._dw, self._dk
        w[k["x"]] = xa.data.ptr if n else self.xa.ptr
        w[k["idx"]] = ia.data.ptr if N else self.idx.data.ptr
        w[k["seq"]] = self.seq
        w[k["n"]] = n
        w[k["epb"]] = epb
        w[k["segs"]] = segs
        w[k["seg_bytes"]] = _cdiv(_cdiv(ep.row_bytes, segs), 16) * 16
        self._launch(self._fn["dispatch"], g, _THREADS, self._dparams)
        h = FusedHandle(id(self), self.seq, n, self.counts)
        self._pending = h
        return (self.xbuf if type(x) is self._ndarray else ep._wrap(self.xbuf, x)), \
            self.counts, h

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
        """See :meth:`pya2a.moe.ExpertParallel.combine` (``y`` is a CuPy / torch array)."""
        call = "ExpertParallel.combine"
        ep, cp = self.ep, self._cp
        exc = None
        n = 0
        ya = wa = oa = None
        try:
            _no_grad(call, grad)
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
            if str(getattr(topk_weight, "dtype", "")) == "torch.bfloat16":
                topk_weight = topk_weight.float()  # the kernel reads float32 weights
            wa = self._device_array(call, "topk_weight", topk_weight)
            if wa.shape != (n, ep.topk):
                raise ValueError(f"{call}: topk_weight has shape {tuple(wa.shape)}, "
                                 f"expected ({n}, {ep.topk})")
            if wa.dtype.kind != "f":
                raise TypeError(f"{call}: topk_weight must be floating point, got {wa.dtype}")
            if out is not None:
                oa = self._check_rows(call, "out", out, n)
                if oa.shape[0] != n:
                    raise ValueError(f"{call}: out has {oa.shape[0]} rows, expected {n}")
        except Exception as e:
            exc = e
        self._agree(exc)
        N = n * ep.topk
        yp = ya.data.ptr
        use_x = int(yp == self.xa.ptr)
        if not use_x and yp != self.ya.ptr and ya.shape[0]:
            with cp.cuda.Device(self.device):
                cp.cuda.runtime.memcpyAsync(self.ya.ptr, yp, ya.nbytes, 3,
                                            cp.cuda.get_current_stream().ptr)  # D2D
        if N and (wa.dtype != np.float32 or not wa.flags.c_contiguous):
            with cp.cuda.Device(self.device):
                wa = cp.ascontiguousarray(wa, dtype=np.float32)  # allocates; stream-ordered
        if oa is None:
            with cp.cuda.Device(self.device):
                oa = cp.empty((n, ep.hidden), dtype=ep.dtype)
        segs = max(1, min(_cdiv(self.grid_max * _WARPS, max(n, 1)), ep.row_bytes // 512))
        w, k = self._cw, self._ck
        w[k["y"]] = oa.data.ptr if n else self.ya.ptr
        w[k["w"]] = wa.data.ptr if N else self.idx.data.ptr
        w[k["seq"]] = handle.seq
        w[k["n"]] = n
        w[k["use_x"]] = use_x
        w[k["segs"]] = segs
        w[k["seg_vecs"]] = _cdiv(ep.row_bytes // 16, segs)
        self._launch(self._fn["combine"], min(self.grid_max, max(1, _cdiv(n * segs, _WARPS))),
                     _THREADS, self._cparams)
        handle.done = True
        self._pending = None
        self._keep = (expert_y, topk_weight, wa)
        if out is not None:
            return out
        like = topk_weight if type(topk_weight).__module__.startswith("torch") else expert_y
        return ep._wrap(oa, like)

    def free(self) -> None:
        """Collective: release the symmetric memory. Idempotent."""
        if self._freed:
            return
        self._freed = True
        self._keep = None
        self.group.free()


def _no_grad(call: str, grad: bool) -> None:
    if grad:
        raise NotImplementedError(f"{call}: the fused backend has no backward pass; use "
                                  f"backend='staged' for tensors that require grad")


def scale_experts(ep: Any, expert_x: Any, out: Any) -> None:
    """Trivial expert op on the fused path (see :meth:`FusedExpertParallel.scale_experts`)."""
    if ep._fused is None:
        raise ValueError("scale_experts: ExpertParallel is not on the fused path")
    ep._fused.scale_experts(expert_x, out)
