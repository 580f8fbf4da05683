"""MPI datatypes decoded into flat byte layouts.

An ``Alltoallw`` message describes each peer's block as ``count`` elements of a datatype at a
byte displacement. pya2a moves bytes, so every datatype is turned once into a
:class:`Layout`: the runs of bytes one element covers, as (byte offset from the element's
origin, byte length) pairs **in type-map order** (the order ``MPI_Pack`` writes them), with
adjacent runs coalesced, plus the datatype's size, lower bound and extent. Element ``k`` of a
block starts ``k * extent`` bytes after the block's origin.

:func:`decode` walks ``MPI.Datatype.decode()`` (mpi4py >= 4 returns ``(basetype, combiner,
params)``) recursively and frees every derived datatype it hands back. It understands
predefined types, ``DUP``, ``CONTIGUOUS``, ``VECTOR`` / ``HVECTOR``, ``INDEXED`` /
``HINDEXED`` / ``INDEXED_BLOCK`` / ``HINDEXED_BLOCK``, ``SUBARRAY`` (C and Fortran order),
``RESIZED``, ``STRUCT`` and any nesting of these. Anything else (``DARRAY``, the Fortran 90
parameterised types, predefined pair types with holes such as ``MPI.SHORT_INT``, layouts of
more than :data:`MAX_RUNS` runs) gives a :class:`NotDecodable` with the reason; callers then
use the MPI library's own call. Every decoded layout is checked against the MPI's own size and
true bounds, so a decoder mistake becomes "not decodable", never wrong data.

:func:`layout` is :func:`decode` remembered per datatype: predefined datatypes for the life of
the process, derived ones until they are freed. A derived datatype's layout is also attached
to it as an MPI attribute whose delete callback runs when the datatype is freed and forgets
it, so a freed handle value that MPI hands out again for another datatype is never matched
with the old layout.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from itertools import count

import numpy as np
from mpi4py import MPI

__all__ = ["Layout", "NotDecodable", "decode", "layout", "generation", "MAX_RUNS"]

# More runs than this in one datatype's layout (16 bytes of table per run): not decodable,
# the MPI's own datatype engine handles it.
MAX_RUNS = 1 << 24

_SERIAL = count(1)


@dataclass(frozen=True, eq=False)
class Layout:
    """The bytes one element of a datatype covers.

    Attributes:
        offs: int64[n], byte offset of each run from the element's origin, type-map order.
        lens: int64[n], byte length of each run (all > 0; adjacent runs already merged).
        size: bytes of data in one element (``Get_size``; the sum of ``lens``).
        lb, extent: ``Get_extent``: element ``k`` of a block starts at ``k * extent``.
        true_lb, true_ub: lowest and one past the highest byte touched (``Get_true_extent``).
        serial: a number no other decoded layout has (cache keys use it).
    """

    offs: np.ndarray
    lens: np.ndarray
    size: int
    lb: int
    extent: int
    true_lb: int
    true_ub: int
    serial: int = field(default_factory=lambda: next(_SERIAL))
    alive: list = field(default_factory=lambda: [True], repr=False)

    @property
    def runs(self) -> int:
        """Number of runs of one element."""
        return int(self.lens.size)

    @property
    def dense(self) -> bool:
        """One run as long as the extent: ``count`` elements are one run of bytes."""
        return self.lens.size == 1 and int(self.lens[0]) == self.extent

    def span(self, count: int) -> tuple[int, int]:
        """(lowest byte, one past the highest byte) that ``count`` elements touch."""
        if count <= 0 or self.size == 0:
            return (0, 0)
        last = (count - 1) * self.extent
        return (min(self.true_lb, self.true_lb + last), max(self.true_ub, self.true_ub + last))


@dataclass(frozen=True)
class NotDecodable:
    """A datatype :func:`decode` does not turn into a layout, and why."""

    reason: str

    def __bool__(self) -> bool:
        return False


class _Undecodable(Exception):
    pass


def _free(dt: MPI.Datatype) -> None:
    """Free a datatype handed back by ``decode()`` unless it is predefined or null."""
    try:
        if dt != MPI.DATATYPE_NULL and not dt.is_predefined:
            dt.Free()
    except MPI.Exception:
        pass


def _coalesce(offs: np.ndarray, lens: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Drop empty runs and merge each run into the previous one when it starts where that ends."""
    keep = lens > 0
    if not keep.all():
        offs, lens = offs[keep], lens[keep]
    if offs.size <= 1:
        return np.ascontiguousarray(offs, np.int64), np.ascontiguousarray(lens, np.int64)
    ends = offs + lens
    start = np.empty(offs.size, dtype=bool)
    start[0] = True
    np.not_equal(offs[1:], ends[:-1], out=start[1:])
    heads = np.flatnonzero(start)
    if heads.size == offs.size:
        return np.ascontiguousarray(offs, np.int64), np.ascontiguousarray(lens, np.int64)
    new_lens = np.add.reduceat(lens, heads)
    return np.ascontiguousarray(offs[heads], np.int64), new_lens.astype(np.int64)


def _check_runs(n: int) -> None:
    if n > MAX_RUNS:
        raise _Undecodable(f"more than {MAX_RUNS} runs of bytes")


class _Flat:
    """A layout under construction: runs plus the extent that replication steps by."""

    __slots__ = ("offs", "lens", "extent")

    def __init__(self, offs: np.ndarray, lens: np.ndarray, extent: int) -> None:
        self.offs, self.lens = _coalesce(offs, lens)
        self.extent = extent

    @property
    def dense(self) -> bool:
        return self.lens.size == 1 and int(self.lens[0]) == self.extent

    def at(self, starts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """One element at each byte offset in ``starts``, in that order."""
        starts = np.asarray(starts, dtype=np.int64)
        n = starts.size * self.lens.size
        _check_runs(n)
        offs = (starts[:, None] + self.offs[None, :]).reshape(-1)
        lens = np.broadcast_to(self.lens[None, :], (starts.size, self.lens.size)).reshape(-1)
        return offs, lens

    def blocks(self, starts: np.ndarray, blocklens: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Block i: ``blocklens[i]`` consecutive elements from byte ``starts[i]``."""
        starts = np.asarray(starts, dtype=np.int64)
        blocklens = np.asarray(blocklens, dtype=np.int64)
        if starts.size == 0:
            return np.zeros(0, np.int64), np.zeros(0, np.int64)
        if self.dense:  # a block is one run
            return starts + self.offs[0], blocklens * self.extent
        total = int(blocklens.sum())
        _check_runs(total * self.lens.size)
        # element starts: starts[i] + k * extent for k < blocklens[i], block after block
        first = np.repeat(starts, blocklens)
        within = np.arange(total, dtype=np.int64) - np.repeat(
            np.cumsum(blocklens) - blocklens, blocklens)
        return self.at(first + within * self.extent)


def _ints(x: object) -> np.ndarray:
    return np.asarray(list(x) if not isinstance(x, np.ndarray) else x, dtype=np.int64)


def _flatten(dt: MPI.Datatype) -> _Flat:
    """The runs of one element of ``dt`` (recursive over the constructor tree)."""
    lb, extent = dt.Get_extent()
    base, combiner, params = dt.decode()
    inner: list[MPI.Datatype] = []
    try:
        if combiner == "NAMED":
            size = dt.Get_size()
            tlb, text = dt.Get_true_extent()
            if size and (tlb != 0 or text != size):
                raise _Undecodable(f"predefined datatype {dt.Get_name() or dt.handle} has "
                                   f"holes (size {size}, true extent {text})")
            return _Flat(np.zeros(1, np.int64), np.array([size], np.int64), extent)
        if combiner == "STRUCT":
            inner = list(params["datatypes"])
            bls = _ints(params["blocklengths"])
            dis = _ints(params["displacements"])
            offs, lens = [], []
            for t, bl, d in zip(inner, bls.tolist(), dis.tolist(), strict=True):
                sub = _flatten(t)
                o, n = sub.blocks(np.array([d]), np.array([bl]))
                offs.append(o)
                lens.append(n)
            _check_runs(sum(o.size for o in offs))
            if not offs:
                return _Flat(np.zeros(0, np.int64), np.zeros(0, np.int64), extent)
            return _Flat(np.concatenate(offs), np.concatenate(lens), extent)
        inner = [base]
        sub = _flatten(base)
        ext = sub.extent
        if combiner in ("DUP", "RESIZED"):
            return _Flat(sub.offs, sub.lens, extent)
        if combiner == "CONTIGUOUS":
            o, n = sub.blocks(np.zeros(1, np.int64), np.array([params["count"]]))
        elif combiner in ("VECTOR", "HVECTOR"):
            cnt, bl, stride = params["count"], params["blocklength"], params["stride"]
            step = stride * ext if combiner == "VECTOR" else stride
            o, n = sub.blocks(np.arange(cnt, dtype=np.int64) * step, np.full(cnt, bl))
        elif combiner in ("INDEXED", "HINDEXED"):
            dis = _ints(params["displacements"])
            o, n = sub.blocks(dis * ext if combiner == "INDEXED" else dis,
                              _ints(params["blocklengths"]))
        elif combiner in ("INDEXED_BLOCK", "HINDEXED_BLOCK"):
            dis = _ints(params["displacements"])
            o, n = sub.blocks(dis * ext if combiner == "INDEXED_BLOCK" else dis,
                              np.full(dis.size, params["blocklength"]))
        elif combiner == "SUBARRAY":
            o, n = _subarray(sub, params)
        else:
            raise _Undecodable(f"datatype combiner {combiner} is not decoded")
        return _Flat(o, n, extent)
    finally:
        for t in inner:
            _free(t)


def _subarray(sub: _Flat, params: dict) -> tuple[np.ndarray, np.ndarray]:
    sizes = [int(x) for x in params["sizes"]]
    subsizes = [int(x) for x in params["subsizes"]]
    starts = [int(x) for x in params["starts"]]
    if params["order"] == MPI.ORDER_FORTRAN:  # first index fastest: reverse to C order
        sizes, subsizes, starts = sizes[::-1], subsizes[::-1], starts[::-1]
    nd = len(sizes)
    if nd == 0 or 0 in subsizes:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    strides = [0] * nd  # bytes, C order: the last index varies fastest
    acc = sub.extent
    for d in range(nd - 1, -1, -1):
        strides[d] = acc
        acc *= sizes[d]
    # origins of the innermost rows, outer dimensions in order (last outer index fastest)
    rows = np.zeros(1, dtype=np.int64)
    for d in range(nd - 1):
        step = (starts[d] + np.arange(subsizes[d], dtype=np.int64)) * strides[d]
        _check_runs(rows.size * step.size)
        rows = (rows[:, None] + step[None, :]).reshape(-1)
    rows = rows + starts[-1] * strides[-1]
    return sub.blocks(rows, np.full(rows.size, subsizes[-1]))


def decode(dt: MPI.Datatype) -> Layout | NotDecodable:
    """The :class:`Layout` of ``dt``, or :class:`NotDecodable` with the reason (no caching)."""
    try:
        if dt == MPI.DATATYPE_NULL:
            return NotDecodable("MPI.DATATYPE_NULL")
        lb, extent = dt.Get_extent()
        size = dt.Get_size()
        tlb, text = dt.Get_true_extent()
        flat = _flatten(dt)
    except _Undecodable as e:
        return NotDecodable(str(e))
    except (MPI.Exception, KeyError, ValueError, TypeError, MemoryError) as e:
        return NotDecodable(f"decode failed: {e}")
    offs, lens = flat.offs, flat.lens
    if int(lens.sum()) != size or (size and (int(offs.min()) != tlb or
                                             int((offs + lens).max()) != tlb + text)):
        return NotDecodable(f"decoded layout disagrees with the MPI's size {size} / true "
                            f"extent [{tlb}, {tlb + text})")
    offs.setflags(write=False)
    lens.setflags(write=False)
    return Layout(offs, lens, size, lb, extent, tlb, tlb + text)


# ---- remembered layouts ---------------------------------------------------------------------
_KNOWN: dict[int, Layout | NotDecodable] = {}  # datatype handle -> layout, forgotten on free
_KEYVAL: int | None = None
_GENERATION = [0]


def generation() -> int:
    """A number that changes whenever a remembered derived datatype's layout is forgotten."""
    return _GENERATION[0]


def _forget(dt: MPI.Datatype, keyval: int, held: tuple) -> None:
    handle, lay = held
    if _KNOWN.get(handle) is lay:
        del _KNOWN[handle]
    if isinstance(lay, Layout):
        lay.alive[0] = False
    _GENERATION[0] += 1


def layout(dt: MPI.Datatype) -> Layout | NotDecodable:
    """:func:`decode`, remembered until ``dt`` is freed (see the module docstring)."""
    h = dt.handle
    hit = _KNOWN.get(h)
    if hit is not None:
        return hit
    lay = decode(dt)
    if dt == MPI.DATATYPE_NULL:
        return lay
    if dt.is_predefined:
        _KNOWN[h] = lay
        return lay
    global _KEYVAL
    if _KEYVAL is None:
        _KEYVAL = MPI.Datatype.Create_keyval(delete_fn=_forget)
    try:
        dt.Set_attr(_KEYVAL, (h, lay))
    except MPI.Exception:
        return lay  # no attribute, no memory: decoded again next time
    _KNOWN[h] = lay
    return lay
