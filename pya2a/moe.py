"""Expert-parallel MoE token dispatch and combine on top of pya2a.

Each rank holds ``num_experts // p`` experts, partitioned contiguously: rank ``r`` owns
global experts ``[r * E_local, (r + 1) * E_local)``. A router has picked ``topk`` experts per
token. :meth:`ExpertParallel.dispatch` sends every (token, expert) pair to the rank owning
the expert and returns the received tokens grouped by local expert, contiguous per expert;
:meth:`ExpertParallel.combine` sends the expert outputs back along the mirrored route and
sums them per token, weighted by the router's scores (in float32, cast back)::

    import pya2a.moe
    ep = pya2a.moe.ExpertParallel(comm, num_experts=64, hidden=2048, max_tokens=512,
                                  topk=6, dtype=np.float16)
    expert_x, expert_counts, handle = ep.dispatch(x, topk_idx)
    # rows [sum(expert_counts[:l]), sum(expert_counts[:l+1])) belong to local expert l
    expert_y = run_experts(expert_x, expert_counts)
    y = ep.combine(expert_y, topk_weight, handle)

How it works (portable path, host NumPy or device arrays through :func:`pya2a.Alltoallv`):

* the flat (token, k) entries are ordered by global expert with one stable argsort; since
  experts are contiguous per rank this also groups them by destination rank;
* every rank's per-expert counts travel in the same ``Allgather`` that agrees on errors
  (:func:`pya2a.validate.agree`), so the counts are exchanged once per dispatch and every
  rank knows the whole ``p x num_experts`` count matrix;
* one ``Alltoallv`` moves the rows; the receiver reorders them from (source, expert) to
  (expert, source) order with one gather whose permutation comes from the counts alone;
* combine gathers ``expert_y`` back into (source, expert) order with the inverse
  permutation, runs the mirrored ``Alltoallv`` and accumulates the ``topk`` slots per token.

Rows inside one (expert, source) segment keep the source's token order (then k order).

Memory and allocation: every token-sized buffer is allocated once in the constructor from
``max_tokens`` (and ``max_recv_tokens``); what remains per call is O(tokens * topk) integer
index arrays (argsort, permutations), the per-rank count record, the returned ``y`` unless
``out=`` is given, and whatever the chosen all-to-all algorithm allocates. The fused GPU
path (:mod:`pya2a.gpu.moe_fused`) allocates nothing per call.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from mpi4py import MPI

import pya2a  # the exchange is looked up at call time (pya2a.Alltoallv), so wrappers apply

from .core.spec import is_device_buffer
from .core.state import check_comm as _check_comm
from .core.state import internal_comm
from .core.validate import agree

__all__ = ["ExpertParallel", "DispatchHandle", "reference", "BACKENDS"]

BACKENDS = ("auto", "host", "staged", "fused")


def _excl_cumsum(a: np.ndarray) -> np.ndarray:
    out = np.zeros(a.size, dtype=np.int64)
    np.cumsum(a[:-1], out=out[1:])
    return out


@dataclass(eq=False)
class DispatchHandle:
    """What :meth:`ExpertParallel.combine` needs from one dispatch (host index arrays).

    Attributes:
        owner: id of the :class:`ExpertParallel` that made it.
        num_tokens: tokens this rank dispatched (n).
        num_rows: rows this rank received (sum of ``expert_counts``).
        inv: int64 (n * topk,): position of flat entry ``t * topk + k`` in the sent order.
        rinv: int64 (num_rows,): for each received row in (source, expert) order, its row
            in ``expert_x`` (expert, source) order.
        sendcounts, recvcounts: int64 (p,): rows sent to / received from each rank.
        counts: int64 (p, num_experts): every rank's per-expert counts for this dispatch.
        expert_counts: int64 (E_local,): rows per local expert.
    """

    owner: int
    num_tokens: int
    num_rows: int
    inv: np.ndarray
    rinv: np.ndarray
    sendcounts: np.ndarray
    recvcounts: np.ndarray
    counts: np.ndarray
    expert_counts: np.ndarray
    dev_inv: Any = None  # device copies for the staged path (views of preallocated arrays)
    dev_rinv: Any = None


def _family(obj: object) -> str:
    mod = type(obj).__module__.split(".")[0]
    return "torch" if mod == "torch" else "cupy" if mod == "cupy" else mod


class ExpertParallel:
    """Expert-parallel dispatch and combine for one MoE layer configuration. Collective.

    Args:
        comm: mpi4py intracommunicator; every rank holds ``num_experts // p`` experts.
        num_experts: total experts E; must be a multiple of the communicator size.
        hidden: hidden size H (elements per token row).
        max_tokens: most tokens any rank passes to one :meth:`dispatch` (sizes the buffers).
        topk: experts per token (k >= 1); duplicate experts in one token's row are allowed
            and count twice.
        dtype: dtype of token rows (NumPy dtype or name; float16 / float32 / float64, or
            any dtype for dispatch alone).
        device: None for host NumPy arrays, else the CUDA device ordinal that this rank's
            device arrays (CuPy or torch) live on.
        backend: "auto" (host for ``device=None``; on a device, "fused" when the ranks can
            map each other's GPU memory (one node, IPC), else "staged"), "host", "staged"
            (device arrays through :func:`pya2a.Alltoallv`, staged through host memory when
            MPI is not CUDA-aware) or "fused" (:mod:`pya2a.gpu.moe_fused`).
        max_recv_tokens: most rows one rank may receive in one dispatch; default
            ``p * max_tokens * topk`` (the worst case). A dispatch exceeding it raises
            ValueError on every rank.
        algorithm: all-to-all algorithm for the host / staged paths (as for
            :func:`pya2a.Alltoallv`).

    Raises:
        TypeError, ValueError: bad or rank-inconsistent arguments, on every rank.
    """

    def __init__(self, comm: MPI.Intracomm, num_experts: int, hidden: int, max_tokens: int,
                 topk: int, dtype: Any, device: int | None = None, *,
                 backend: str = "auto", max_recv_tokens: int | None = None,
                 algorithm: str = "auto") -> None:
        call = "ExpertParallel"
        _check_comm(call, comm)
        self.comm = comm
        self._icomm = internal_comm(comm)
        p, rank = self._icomm.Get_size(), self._icomm.Get_rank()
        self.size, self.rank = p, rank
        exc: BaseException | None = None
        conf = np.zeros(7, dtype=np.int64)
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
            self.dtype = _dtype(call, dtype)
            if device is not None and (isinstance(device, bool)
                                       or not isinstance(device, (int, np.integer))
                                       or device < 0):
                raise TypeError(f"{call}: device must be None or a CUDA device ordinal, "
                                f"got {device!r}")
            if backend not in BACKENDS:
                raise ValueError(f"{call}: unknown backend {backend!r}, known: {BACKENDS}")
            if device is None and backend in ("staged", "fused"):
                raise ValueError(f"{call}: backend {backend!r} needs device=<ordinal>")
            if device is not None and backend == "host":
                raise ValueError(f"{call}: backend 'host' takes device=None")
            cap = p * max_tokens * topk if max_recv_tokens is None else max_recv_tokens
            if isinstance(cap, bool) or not isinstance(cap, (int, np.integer)) or cap < 0:
                raise ValueError(f"{call}: max_recv_tokens must be an int >= 0, got {cap!r}")
            conf[:] = (num_experts, hidden, max_tokens, topk, self.dtype.num,
                       -1 if device is None else 1 + BACKENDS.index(backend), cap)
        except Exception as e:
            exc = e
        table = agree(self._icomm, exc, conf)
        for col, name in enumerate(("num_experts", "hidden", "max_tokens", "topk", "dtype",
                                    "device/backend", "max_recv_tokens")):
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
        self._acc_dtype = (np.promote_types(self.dtype, np.float32)
                           if self.dtype.kind in "fc" else np.dtype(np.float32))
        self._fused = None
        if self.device is None:
            self.backend = "host"
        elif backend == "auto":
            from .gpu.moe_fused import fused_available

            ok, _why = fused_available(self._icomm, self)
            self.backend = "fused" if ok else "staged"
        else:
            self.backend = backend
        if self.backend == "fused":
            from .gpu.moe_fused import FusedExpertParallel, fused_available

            if backend == "fused":
                ok, why = fused_available(self._icomm, self)  # collective, same everywhere
                if not ok:
                    raise ValueError(f"{call}: backend 'fused' cannot run here: {why}")
            self._fused = FusedExpertParallel(self._icomm, self)
            return
        self._xp = np if self.device is None else _cupy_on(self.device)
        xp, n, r, h = self._xp, self.max_tokens * self.topk, self.max_recv_tokens, self.hidden
        with _on_device(self.device):
            self._sbuf = xp.empty((n, h), dtype=self.dtype)  # sent rows, expert order
            self._rbuf = xp.empty((r, h), dtype=self.dtype)  # received, (source, expert)
            self._xbuf = xp.empty((r, h), dtype=self.dtype)  # expert_x, (expert, source)
            self._tmp = xp.empty((self.max_tokens, h), dtype=self.dtype)
            self._acc = xp.empty((self.max_tokens, h), dtype=self._acc_dtype)
            self._prod = xp.empty((self.max_tokens, h), dtype=self._acc_dtype)
            if self.device is not None:
                self._didx = xp.empty(max(n, r), dtype=np.int64)  # gather indices
                self._dinv = xp.empty(n, dtype=np.int64)
                self._drinv = xp.empty(r, dtype=np.int64)
                self._dw = xp.empty((self.max_tokens, self.topk), dtype=np.float32)
        self._sb, self._rb = _bytes(self._sbuf), _bytes(self._rbuf)

    # ------------------------------------------------------------------ dispatch
    def dispatch(self, x: Any, topk_idx: Any) -> tuple[Any, Any, DispatchHandle]:
        """Send each token to the ranks of its experts. Collective.

        Args:
            x: (n, hidden) array of ``dtype``, n <= max_tokens (n may be 0); NumPy for a
                host instance, CuPy / torch on ``device`` otherwise.
            topk_idx: (n, topk) integer array (any integer dtype, host or device) of global
                expert ids in ``[0, num_experts)``.

        Returns:
            (expert_x, expert_counts, handle): ``expert_x`` is (num_rows, hidden) of
            ``dtype``, same array type as ``x``, tokens grouped by local expert, contiguous
            per expert (within an expert by source rank, then token order); it is a view of
            a buffer reused by the next dispatch. ``expert_counts`` is int64 (E_local,)
            (NumPy; a device array on the fused path). ``handle`` goes to :meth:`combine`.

        Raises:
            TypeError, ValueError: bad arguments on any rank (raised on every rank).
        """
        if self._fused is not None:
            return self._fused.dispatch(x, topk_idx)
        call = "ExpertParallel.dispatch"
        p, me, El, k = self.size, self.rank, self.local_experts, self.topk
        exc: BaseException | None = None
        stats = np.zeros(1 + self.num_experts, dtype=np.int64)
        e = np.zeros(0, dtype=np.int64)
        try:
            n = self._check_x(call, x)
            e = self._check_idx(call, topk_idx, n)
            stats[0] = n
            stats[1:] = np.bincount(e, minlength=self.num_experts)
        except Exception as err:
            exc = err
        table = agree(self._icomm, exc, stats)
        counts = table[:, 2:]  # (p, E): rank s sends counts[s, e] rows to expert e
        mine = counts[:, me * El:(me + 1) * El]  # (p, El): what each source sends me
        recv_all = counts.reshape(p, p, El).sum(axis=(0, 2))  # rows each rank receives
        if int(recv_all.max()) > self.max_recv_tokens:
            r = int(recv_all.argmax())
            raise ValueError(f"{call}: rank {r} would receive {int(recv_all[r])} rows, more "
                             f"than max_recv_tokens={self.max_recv_tokens}")
        n, N = int(table[me, 1]), e.size
        order = np.argsort(e, kind="stable")
        inv = np.empty(N, dtype=np.int64)
        inv[order] = np.arange(N, dtype=np.int64)
        sendcounts = counts[me].reshape(p, El).sum(axis=1)
        recvcounts = mine.sum(axis=1)
        R = int(recvcounts.sum())
        # received rows come in (source, expert) blocks; expert_x wants (expert, source)
        so = _excl_cumsum(mine.ravel()).reshape(p, El)
        cT, soT = mine.T.ravel(), so.T.ravel()
        rperm = np.repeat(soT - _excl_cumsum(cT), cT) + np.arange(R, dtype=np.int64)
        rinv = np.empty(R, dtype=np.int64)
        rinv[rperm] = np.arange(R, dtype=np.int64)
        expert_counts = mine.sum(axis=0)
        handle = DispatchHandle(id(self), n, R, inv, rinv, sendcounts, recvcounts,
                                counts.copy(), expert_counts)
        rows = order // k
        xp = self._xp
        with _on_device(self.device):
            xs = self._as_xp(x)
            if xp is np:
                np.take(xs, rows, axis=0, out=self._sbuf[:N], mode="clip")
            else:
                self._didx[:N].set(rows)
                xp.take(xs, self._didx[:N], axis=0, out=self._sbuf[:N])
                self._dinv[:N].set(inv)
                self._drinv[:R].set(rinv)
                handle.dev_inv, handle.dev_rinv = self._dinv[:N], self._drinv[:R]
            self._exchange(sendcounts, recvcounts, self._sb, self._rb)
            out = self._xbuf[:R]
            if xp is np:
                np.take(self._rbuf[:R], rperm, axis=0, out=out, mode="clip")
            else:
                self._didx[:R].set(rperm)
                xp.take(self._rbuf[:R], self._didx[:R], axis=0, out=out)
        return self._wrap(out, x), expert_counts, handle

    # ------------------------------------------------------------------ combine
    def combine(self, expert_y: Any, topk_weight: Any, handle: DispatchHandle, *,
                out: Any = None) -> Any:
        """Send expert outputs back and sum them per token, weighted. Collective.

        Args:
            expert_y: (num_rows, hidden) array of ``dtype`` in ``expert_x``'s layout (it may
                be ``expert_x`` itself, modified in place).
            topk_weight: (n, topk) float array (host or device), the router's weights.
            handle: from the matching :meth:`dispatch` on this object.
            out: optional (n, hidden) array of ``dtype`` to write into.

        Returns:
            y: (n, hidden) array of ``dtype``: ``y[t] = sum_k topk_weight[t, k] * (expert
            output for token t, slot k)``, accumulated in float32 (float64 for float64
            data) in k order, then cast back.

        Raises:
            TypeError, ValueError: bad arguments on any rank (raised on every rank).
        """
        if self._fused is not None:
            return self._fused.combine(expert_y, topk_weight, handle, out=out)
        call = "ExpertParallel.combine"
        exc: BaseException | None = None
        w = None
        try:
            self._check_handle(call, handle)
            n, R, k = handle.num_tokens, handle.num_rows, self.topk
            self._check_rows(call, "expert_y", expert_y, R)
            w = self._check_weight(call, topk_weight, n)
            if out is not None:
                self._check_rows(call, "out", out, n)
        except Exception as err:
            exc = err
        agree(self._icomm, exc, np.zeros(0, dtype=np.int64))
        xp = self._xp
        with _on_device(self.device):
            ey = self._as_xp(expert_y)
            if xp is np:
                np.take(ey, handle.rinv, axis=0, out=self._rbuf[:R], mode="clip")
            else:
                xp.take(ey, handle.dev_rinv, axis=0, out=self._rbuf[:R])
            self._exchange(handle.recvcounts, handle.sendcounts, self._rb, self._sb)
            acc, prod, tmp = self._acc[:n], self._prod[:n], self._tmp[:n]
            if xp is np:
                inv = handle.inv.reshape(n, k)
                w32 = np.asarray(w, dtype=self._acc_dtype)
            else:
                inv = handle.dev_inv.reshape(n, k)
                if self._acc_dtype == np.float32:
                    w32 = self._dw[:n]
                    w32[...] = w
                else:
                    w32 = w.astype(self._acc_dtype)
            back = self._sbuf
            for j in range(k):
                if xp is np:
                    np.take(back, inv[:, j], axis=0, out=tmp, mode="clip")
                else:
                    xp.take(back, inv[:, j], axis=0, out=tmp)
                if j == 0:
                    xp.multiply(tmp, w32[:, 0:1], out=acc)
                else:
                    xp.multiply(tmp, w32[:, j:j + 1], out=prod)
                    xp.add(acc, prod, out=acc)
            if out is None:
                y = acc.astype(self.dtype, copy=True)
                return self._wrap(y, expert_y)
            o = self._as_xp(out)
            o[...] = acc
            return out

    # ------------------------------------------------------------------ helpers
    def _exchange(self, scounts: np.ndarray, rcounts: np.ndarray, sb: Any, rb: Any) -> None:
        rowb = self.row_bytes
        sc, rc = scounts * rowb, rcounts * rowb
        pya2a.Alltoallv(self.comm, [sb, (sc, _excl_cumsum(sc)), MPI.BYTE],
                        [rb, (rc, _excl_cumsum(rc)), MPI.BYTE], algorithm=self.algorithm)

    def _as_xp(self, a: Any) -> Any:
        if self.device is None:
            return a
        return a if _family(a) == "cupy" else self._xp.asarray(a)

    def _wrap(self, arr: Any, like: Any) -> Any:
        if self.device is not None and _family(like) == "torch":
            import torch

            return torch.as_tensor(arr, device=f"cuda:{self.device}")
        return arr

    def _check_kind(self, call: str, name: str, a: Any) -> None:
        dev = is_device_buffer(a)
        if self.device is None and (dev or not isinstance(a, np.ndarray)):
            raise TypeError(f"{call}: {name} must be a NumPy array on a host instance "
                            f"(device=None), got {type(a).__name__}")
        if self.device is not None and not dev:
            raise TypeError(f"{call}: {name} must be a device array (CuPy, torch) on device "
                            f"{self.device}, got {type(a).__name__}")

    def _check_x(self, call: str, x: Any) -> int:
        self._check_kind(call, "x", x)
        shape = tuple(x.shape)
        if len(shape) != 2 or shape[1] != self.hidden:
            raise ValueError(f"{call}: x has shape {shape}, expected (n, {self.hidden})")
        if shape[0] > self.max_tokens:
            raise ValueError(f"{call}: x has {shape[0]} tokens, more than "
                             f"max_tokens={self.max_tokens}")
        if _np_dtype(x.dtype) != self.dtype:
            raise TypeError(f"{call}: x has dtype {x.dtype}, expected {self.dtype}")
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
        if _np_dtype(a.dtype) != self.dtype:
            raise TypeError(f"{call}: {name} has dtype {a.dtype}, expected {self.dtype}")

    def _check_weight(self, call: str, w: Any, n: int) -> Any:
        shape = tuple(getattr(w, "shape", ()))
        if shape != (n, self.topk):
            raise ValueError(f"{call}: topk_weight has shape {shape}, expected "
                             f"({n}, {self.topk})")
        if _np_dtype(w.dtype).kind != "f":
            raise TypeError(f"{call}: topk_weight must be floating point, got {w.dtype}")
        if self.device is None:
            return np.asarray(w)
        return self._as_xp(w) if is_device_buffer(w) else self._xp.asarray(np.asarray(w))

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

    def free(self) -> None:
        """Release device and IPC memory (collective on the fused path). Idempotent."""
        if self._fused is not None:
            self._fused.free()


# ---------------------------------------------------------------------------------------
def reference(comm: MPI.Intracomm, x: np.ndarray, topk_idx: np.ndarray,
              topk_weight: np.ndarray, num_experts: int,
              expert_fn: Any) -> tuple[list[np.ndarray], np.ndarray]:
    """The straightforward oracle: all-gather everything, compute locally (host only).

    Args:
        x: (n, H) host array; topk_idx: (n, k) ints; topk_weight: (n, k) floats.
        expert_fn: ``expert_fn(e, rows) -> rows`` for global expert ``e`` (same dtype).

    Returns:
        (expert_x, y): ``expert_x[l]`` are the rows local expert ``l`` of this rank
        receives, in the order :meth:`ExpertParallel.dispatch` promises (source rank, then
        token, then k); ``y`` is this rank's combined (n, H) output, accumulated in k order
        in float32 (float64 for float64 data) like :meth:`ExpertParallel.combine`.
    """
    p, me = comm.Get_size(), comm.Get_rank()
    El = num_experts // p
    xs, idxs = comm.allgather(np.asarray(x)), comm.allgather(np.asarray(topk_idx))
    expert_x = []
    for le in range(El):
        g = me * El + le
        parts = [xs[s][np.nonzero(idxs[s] == g)[0]] for s in range(p)]
        expert_x.append(np.concatenate(parts) if parts else x[:0])
    acc_t = np.promote_types(x.dtype, np.float32)
    acc = np.zeros(x.shape, dtype=acc_t)
    w = np.asarray(topk_weight, dtype=acc_t)
    for j in range(topk_idx.shape[1]):
        yj = np.empty_like(x)
        for t in range(x.shape[0]):
            yj[t] = expert_fn(int(topk_idx[t, j]), x[t:t + 1])[0]
        prod = np.multiply(yj, w[:, j:j + 1], dtype=acc_t)
        acc = prod if j == 0 else np.add(acc, prod)
    return expert_x, acc.astype(x.dtype)


def _dtype(call: str, dtype: Any) -> np.dtype:
    try:
        return _np_dtype(dtype)
    except TypeError as e:
        raise TypeError(f"{call}: dtype {dtype!r} is not understood ({e})") from None


def _np_dtype(dt: Any) -> np.dtype:
    """NumPy dtype of a NumPy / CuPy dtype, a name, or a torch dtype."""
    if type(dt).__module__ == "torch":
        name = str(dt).replace("torch.", "")
        if name == "bfloat16":
            raise TypeError("bfloat16 has no NumPy dtype; the host and staged paths need one")
        return np.dtype(name)
    return np.dtype(dt)


def _to_host(a: Any) -> np.ndarray:
    if isinstance(a, np.ndarray):
        return a
    fam = _family(a)
    if fam == "cupy":
        return a.get()
    if fam == "torch":
        return a.detach().cpu().numpy()
    return np.asarray(a)


def _bytes(a: Any) -> Any:
    return a.reshape(-1).view(np.uint8)


def _cupy_on(device: int) -> Any:
    from .gpu import cupy

    return cupy()


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
