"""Signatures of one-shot calls, so that a repeated call skips parsing, agreement and selection.

A one-shot ``Alltoallv`` must agree across ranks before any data moves (a bad argument on
one rank raises on every rank). The full agreement all-gathers a record of ``6 + 2p``
integers and is followed by parsing, checks and selection: tens of microseconds at small p,
hundreds at p = 64. Applications call the same exchange over and over, so each rank keeps,
per communicator, the *signature* of its recent valid calls: everything its parse and checks
depended on (buffer addresses, sizes, formats, counts, displacements, datatypes, algorithm,
options). A call whose signature is cached on this rank, under the same entry number on
every rank, is a call every rank has already validated and agreed on in exactly this form.
One ``Allreduce`` of two integers establishes that; any other outcome takes the full path.

Entry numbers are consistent across ranks by construction: every full-path call (collective:
all ranks take it together) draws the next number from a per-communicator counter on every
rank, failed calls included. A signature is only computed for forms whose meaning is fixed
by what it records: NumPy arrays, ``bytes`` / ``bytearray``, contiguous CuPy arrays and
contiguous CUDA torch tensors (on CuPy's current stream) as buffers; Python ints, flat
lists / tuples of Python ints and NumPy integer arrays as counts and displacements; typecode
strings and *predefined* MPI datatypes (a derived datatype's handle may be reused for another
layout after ``Free``). Anything else always takes the full path, which stays the reference
behaviour.

What a cached entry does not see: a changed tuning table or ``PYA2A_MESH_GRID`` applies to
signatures not cached yet (``clear()`` forgets them all). ``PYA2A_ALGORITHM`` is part of the
signature.
"""

from __future__ import annotations

import weakref
from collections import OrderedDict
from typing import Any

import numpy as np
from mpi4py import MPI

__all__ = ["FastCache", "signature", "register", "clear"]

CAPACITY = 64  # signatures kept per communicator (least recently used evicted)
_NO = object()  # "this part has no signature": take the full path
_INT_CHARS = frozenset(np.typecodes["AllInteger"])  # NumPy integer type codes

_PREDEFINED: frozenset[int] = frozenset(
    dt.handle for dt in MPI._typedict.values() if dt != MPI.DATATYPE_NULL) | frozenset(
    getattr(MPI, n).handle for n in ("BYTE", "PACKED", "CHAR", "WCHAR", "SHORT", "INT",
                                      "LONG", "LONG_LONG", "FLOAT", "DOUBLE", "LONG_DOUBLE",
                                      "INT8_T", "INT16_T", "INT32_T", "INT64_T", "UINT8_T",
                                      "UINT16_T", "UINT32_T", "UINT64_T", "C_BOOL")
    if getattr(MPI, n, MPI.DATATYPE_NULL) != MPI.DATATYPE_NULL)

# buffer types by how their signature is taken: 1 NumPy / bytes-like, 2 CuPy array,
# 3 torch tensor, 0 none (always the full path)
_KIND: dict[type, int] = {np.ndarray: 1, bytes: 1, bytearray: 1}


def _kind(t: type) -> int:
    k = _KIND.get(t)
    if k is None:
        top = t.__module__.split(".")[0]
        k = 2 if (top == "cupy" and t.__name__ == "ndarray") else \
            3 if (top == "torch" and t.__name__ in ("Tensor", "Parameter")) else 0
        _KIND[t] = k
    return k


def _torch(obj: Any) -> tuple[Any, Any] | None:
    """Signature of a CUDA tensor whose producer stream is CuPy's current stream.

    The full path imports the tensor through DLPack on CuPy's current stream, which makes
    that stream wait for torch's current stream; a tensor signature is only taken when the
    two are the same stream (the common case), so skipping that import changes nothing.
    """
    if not obj.is_cuda or obj.requires_grad or not obj.is_contiguous():
        return None
    import cupy
    import torch

    dev = obj.device.index
    if torch.cuda.current_stream(dev).cuda_stream != cupy.cuda.get_current_stream().ptr:
        return None
    return (torch.Tensor, obj.data_ptr(), obj.numel() * obj.element_size(), obj.dtype,
            dev), obj


def _buffer(obj: Any) -> tuple[Any, Any] | None:
    """(signature, keepalive) of a buffer object, or None where it has no signature."""
    t = type(obj)
    k = _kind(t)
    if k == 1:
        try:
            m = MPI.buffer(obj)  # BufferError if not contiguous: the full path says so
        except Exception:
            return None
        fmt = obj.dtype if t is np.ndarray else t
        return (m.address, m.nbytes, m.readonly, fmt), m
    if k == 2:
        try:
            c = getattr(obj, "_c_contiguous", None)  # CuPy's own flag: no Flags object
            if not (obj.flags.c_contiguous if c is None else c):
                return None
            mem = obj.data
            return (t, mem.ptr, obj.nbytes, obj.dtype, mem.device_id), obj
        except Exception:
            return None
    if k == 3:
        try:
            return _torch(obj)
        except Exception:
            return None
    return None


def _part(x: Any) -> Any:
    """Signature of a counts / displacements / datatype item of a message."""
    t = type(x)
    if t is int or t is str or x is None:
        return x
    if t is list or t is tuple:
        s = None
        if not x or type(x[0]) is int:  # (a pair of arrays would be summed elementwise)
            try:
                s = sum(x)
            except TypeError:
                s = None
        if type(s) is int:  # a flat sequence of Python ints
            return (t, tuple(x))
        if len(x) == 2:  # (counts, displs)
            a, b = _part(x[0]), _part(x[1])
            return _NO if a is _NO or b is _NO else (t, a, b)
        return _NO
    if t is np.ndarray:
        c = x.dtype.char
        if c not in _INT_CHARS or x.ndim != 1:
            return _NO
        return (c, x.tobytes())  # the type code and the bytes fix the values and the length
    if t is MPI.Datatype or isinstance(x, MPI.Datatype):
        h = x.handle
        return ("T", h) if h in _PREDEFINED else _NO
    return _NO


def _message(msg: Any) -> tuple[Any, Any, Any] | None:
    """(signature, buffer object, keepalive) of one message, or None."""
    t = type(msg)
    if t is list or t is tuple:
        n = len(msg)
        if n < 2 or n > 4:
            return None
        buf = msg[0]
        b = _buffer(buf)
        if b is None:
            return None
        p1 = _part(msg[1])
        if p1 is _NO:
            return None
        if n == 2:
            return (t, b[0], p1), buf, b[1]
        p2 = _part(msg[2])
        if p2 is _NO:
            return None
        if n == 3:
            return (t, b[0], p1, p2), buf, b[1]
        p3 = _part(msg[3])
        if p3 is _NO:
            return None
        return (t, b[0], p1, p2, p3), buf, b[1]
    b = _buffer(msg)
    if b is None:
        return None
    return b[0], msg, b[1]


def signature(kind: str, sendmsg: Any, recvmsg: Any, inplace: bool, requested: str,
              check: bool, options: Any) -> tuple[tuple, Any, Any, Any, Any] | None:
    """(key, send object, send keepalive, recv object, recv keepalive), or None.

    The key determines everything the full path's parsing and local checks depend on.
    """
    if options is not None:
        try:
            opt = tuple(sorted(options.items()))
            hash(opt)
        except Exception:
            return None
    else:
        opt = None
    r = _message(recvmsg)
    if r is None:
        return None
    if inplace:
        s = (None, None, None)
    else:
        s = _message(sendmsg)
        if s is None:
            return None
    return ((kind, requested, check, opt, inplace, s[0], r[0]), s[1], s[2], r[1], r[2])


class FastCache:
    """Per-communicator signatures of valid calls -> their agreed decision.

    ``seq`` numbers full-path calls identically on every rank; an entry is
    ``(number, decision)``.
    """

    __slots__ = ("seq", "entries", "_buf", "__weakref__")

    def __init__(self) -> None:
        self.seq = 0
        self.entries: OrderedDict[tuple, tuple[int, Any]] = OrderedDict()
        self._buf = np.empty(2, dtype=np.int64)

    def next_number(self) -> int:
        """Number of the full-path call now starting (same on every rank)."""
        self.seq += 1
        return self.seq

    def lookup(self, key: tuple | None) -> tuple[int, Any] | None:
        """This rank's entry for ``key`` if it is still usable (local, no communication)."""
        if key is None:
            return None
        hit = self.entries.get(key)
        if hit is None or not hit[1].usable():
            return None
        self.entries.move_to_end(key)
        return hit

    def agree(self, comm: MPI.Intracomm, number: int) -> bool:
        """Collective: True iff every rank found an entry, and the same one."""
        buf = self._buf
        buf[0] = number
        buf[1] = -number
        comm.Allreduce(MPI.IN_PLACE, buf, op=MPI.MAX)
        return number >= 0 and int(buf[0]) == number and int(buf[1]) == -number

    def store(self, key: tuple, number: int, decision: Any) -> None:
        """Remember a validated, agreed call's decision under this rank's signature."""
        self.entries[key] = (number, decision)
        self.entries.move_to_end(key)
        while len(self.entries) > CAPACITY:
            self.entries.popitem(last=False)

    def clear(self) -> None:
        """Forget every signature (local; numbering continues)."""
        self.entries.clear()


_CACHES: weakref.WeakSet[FastCache] = weakref.WeakSet()


def register(cache: FastCache) -> FastCache:
    """Track a communicator's cache so :func:`clear` reaches it."""
    _CACHES.add(cache)
    return cache


def clear() -> None:
    """Forget every cached signature on every communicator (e.g. after re-tuning).

    Local: the next call with any signature takes the full path on this rank, which makes
    every rank take it.
    """
    for c in _CACHES:
        c.clear()
