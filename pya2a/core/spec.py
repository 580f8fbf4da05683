"""The one parser of mpi4py-style buffer specifications.

Every public entry point turns its message arguments into frozen :class:`VSpec` values here;
algorithms never see raw user arguments. The forms and their meaning follow mpi4py's
``Comm.Alltoallv`` / ``Comm.Alltoall`` exactly:

vector (Alltoallv) messages
    ``buf``, ``[buf, counts]``, ``[buf, (counts, displs)]``, ``[buf, counts, displs, dtype]``,
    ``[buf, dtype]``, ``[buf, counts, dtype]``, ``[buf, (counts, displs), dtype]``. ``counts``
    is a sequence of p integers or one integer (same for every peer); ``displs`` is a sequence,
    one integer (a stride: block j at ``j * displs``) or ``None`` (packed). A *tuple* in the
    second place means ``(counts, displs)``, a *list* means counts only. No counts: the buffer
    is split as evenly as possible, the first ``n % p`` blocks one element longer.

block (Alltoall) messages
    ``buf``, ``[buf, count]``, ``[buf, (count, displ)]``, ``[buf, count, dtype]``,
    ``[buf, count, displ, dtype]``, ``[buf, dtype]``: ``count`` elements per peer, blocks back
    to back from element ``displ``.

Datatypes are ``MPI.Datatype`` objects or typecode strings (``"d"``, ``"i4"``, ...); without
one, the buffer's own format decides. ``MPI.IN_PLACE`` or ``None`` as the send message means
in place. Host buffers are anything with the buffer protocol; device buffers are recognised
through ``__cuda_array_interface__`` / DLPack and described by :mod:`pya2a.gpu.device`.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
from mpi4py import MPI

from . import _pack

__all__ = ["VSpec", "parse_vector", "parse_block", "in_place", "is_device_buffer"]

_TYPEDICT: dict[str, MPI.Datatype] = MPI._typedict  # mpi4py's own format -> datatype map

# DLPack device types that are not host memory (CUDA, CUDA host is host, ROCm, managed...)
_DLPACK_HOST = {1, 3}  # kDLCPU, kDLCUDAHost


@dataclass(frozen=True, eq=False)
class VSpec:
    """A parsed message: one buffer cut into p blocks.

    Counts and displacements are in datatype elements, as in MPI; block ``j`` starts at byte
    ``displs[j] * extent``. ``bcounts`` / ``bdispls`` are the same in bytes, valid when
    ``contiguous`` (datatype size equals extent, no holes), which every algorithm but
    ``native`` requires.
    """

    obj: object  # the user's buffer object, passed on to MPI for the native path
    addr: int
    nbytes: int
    readonly: bool
    device: int | None  # CUDA/HIP device ordinal, or None for host memory
    datatype: MPI.Datatype
    extent: int
    tsize: int
    true_lb: int
    true_extent: int
    counts: np.ndarray  # int64[p]
    displs: np.ndarray  # int64[p]
    keepalive: object = field(default=None, repr=False)
    total: int = 0  # sum of counts, elements
    largest: int = 0  # largest count, elements

    @property
    def contiguous(self) -> bool:
        """True if the datatype is a dense run of bytes (size == extent, no lower bound)."""
        return self.tsize == self.extent and self.true_lb == 0 and self.true_extent == self.tsize

    @property
    def bcounts(self) -> np.ndarray:
        """Block lengths in bytes (int64)."""
        return self.counts * self.extent

    @property
    def bdispls(self) -> np.ndarray:
        """Block offsets from the buffer start in bytes (int64)."""
        return self.displs * self.extent

    @property
    def total_bytes(self) -> int:
        """Bytes in all blocks together."""
        return self.total * self.tsize

    def with_buffer(self, obj: object, keepalive: object) -> VSpec:
        """The same spec for another object over the same memory (or None, None: none)."""
        new = object.__new__(VSpec)
        d = new.__dict__
        d.update(self.__dict__)
        d["obj"] = obj
        d["keepalive"] = keepalive
        return new

    def message(self) -> list:
        """The equivalent mpi4py vector message, for handing to MPI itself."""
        return [self.obj, (self.counts, self.displs), self.datatype]

    def host_bytes(self) -> np.ndarray:
        """The whole host buffer as a flat uint8 NumPy array (a view, no copy)."""
        if self.device is not None:
            raise TypeError("host_bytes() on a device buffer")
        arr = np.frombuffer(self.keepalive, dtype=np.uint8)
        return arr


def in_place(msg: object) -> bool:
    """True for the in-place markers mpi4py accepts as a send message."""
    return msg is None or msg is MPI.IN_PLACE


def is_device_buffer(obj: object) -> bool:
    """True if ``obj`` lives in device memory (CUDA array interface or non-host DLPack)."""
    if isinstance(obj, (bytes, bytearray, memoryview, np.ndarray)):
        return False
    try:  # DLPack first: torch's __cuda_array_interface__ raises for tensors needing grad
        dev = getattr(obj, "__dlpack_device__", None)
        if dev is not None:
            return int(dev()[0]) not in _DLPACK_HOST
        return hasattr(obj, "__cuda_array_interface__")
    except Exception:
        return hasattr(type(obj), "__cuda_array_interface__")


def _is_datatype(ob: object) -> bool:
    return isinstance(ob, (MPI.Datatype, str))


def _datatype(call: str, what: str, ob: object) -> MPI.Datatype:
    if isinstance(ob, MPI.Datatype):
        if ob == MPI.DATATYPE_NULL:
            raise ValueError(f"{call}: {what} datatype is MPI.DATATYPE_NULL")
        return ob
    if isinstance(ob, str):
        try:
            return _TYPEDICT[ob]
        except KeyError:
            raise ValueError(
                f"{call}: {what}: cannot map typecode {ob!r} to an MPI datatype") from None
    raise TypeError(f"{call}: {what} datatype must be an MPI.Datatype or typecode string, "
                    f"not {type(ob).__name__}")


def _format_datatype(call: str, what: str, fmt: str, itemsize: int = 0) -> MPI.Datatype:
    if fmt and fmt[0] in "@=<>!":
        if fmt[0] in ">!" and np.little_endian or fmt[0] == "<" and not np.little_endian:
            raise BufferError(f"{call}: {what} has non-native byte order (format {fmt!r})")
        fmt = fmt[1:]
    dt = _TYPEDICT.get(fmt)
    if dt is not None:
        try:
            dt.Get_size()
            return dt
        except MPI.Exception:  # a type this MPI only names (float16 in Open MPI 4)
            pass
    # All-to-all only moves bytes: a format this MPI cannot map (float16 where the MPI has
    # none, structured NumPy dtypes) travels as elements of the same size.
    if itemsize > 0:
        return _TYPEDICT.get(f"u{itemsize}") or _bytes_type(itemsize)
    raise TypeError(f"{call}: {what}: cannot map buffer format {fmt!r} to an MPI datatype; "
                    f"pass the datatype explicitly, e.g. [buf, MPI.BYTE]")


_BYTE_TYPES: dict[int, MPI.Datatype] = {}


def _bytes_type(n: int) -> MPI.Datatype:
    """A committed contiguous type of ``n`` bytes (made once per size)."""
    dt = _BYTE_TYPES.get(n)
    if dt is None:
        dt = _BYTE_TYPES[n] = MPI.BYTE.Create_contiguous(n).Commit()
    return dt


class _Buf(NamedTuple):
    """Address, size and format of one acquired buffer (a tuple: cheap to make per call)."""

    obj: object
    addr: int
    nbytes: int
    readonly: bool
    fmt: str
    device: int | None
    keepalive: object
    itemsize: int = 0


def _acquire(call: str, what: str, obj: object, readonly: bool) -> _Buf:
    """Address, size and format of a host or device buffer, with mpi4py's checks."""
    if obj is None or obj is MPI.BOTTOM:
        raise TypeError(f"{call}: {what} buffer is {obj!r}; pya2a needs a real buffer")
    if is_device_buffer(obj):
        try:
            from .devices import gpu_device

            _device = gpu_device()
        except ImportError as exc:  # pragma: no cover - depends on the GPU extra
            raise TypeError(f"{call}: {what} is a device buffer, but pya2a's GPU support "
                            f"is not available ({exc})") from exc
        d = _device.describe(obj, call=call, what=what, readonly=readonly)
        return _Buf(obj, d.addr, d.nbytes, d.readonly, d.fmt, d.device, d.keepalive,
                    int(getattr(d, "itemsize", 0) or 0))
    try:
        mv = memoryview(obj)
    except TypeError:
        raise TypeError(f"{call}: {what} must support the buffer protocol, "
                        f"__cuda_array_interface__ or DLPack, not {type(obj).__name__}") from None
    if not mv.contiguous:
        raise BufferError(f"{call}: {what} buffer is not contiguous")
    if not readonly and mv.readonly:
        raise BufferError(f"{call}: {what} buffer is not writable")
    mem = MPI.buffer(obj)
    return _Buf(obj, mem.address, mem.nbytes, mv.readonly, mv.format, None, mem, mv.itemsize)


def _index(call: str, what: str, name: str, ob: object) -> int:
    try:
        return operator.index(ob)
    except TypeError:
        raise TypeError(
            f"{call}: {what} {name} must be an integer, not {type(ob).__name__}") from None


def int_vector(call: str, what: str, name: str, ob: object, p: int) -> np.ndarray:
    """``ob`` as a new int64 array of exactly ``p`` integers (TypeError / ValueError)."""
    who = f"{what} {name}" if what else name
    if isinstance(ob, (str, bytes)):
        raise TypeError(f"{call}: {who} must be a sequence of integers")
    try:
        arr = np.asarray(ob)
    except Exception:
        raise TypeError(f"{call}: {who} must be a sequence of integers") from None
    if arr.ndim != 1:
        raise ValueError(f"{call}: {name} must be one-dimensional, got shape {arr.shape}")
    if arr.size and not (np.issubdtype(arr.dtype, np.integer) and arr.dtype != np.bool_):
        raise TypeError(f"{call}: {who} must be integers, got {arr.dtype}")
    if arr.size != p:
        raise ValueError(f"{call}: {name} has {arr.size} entries, expected {p}")
    return arr.astype(np.int64, copy=True)


def _finish(call: str, what: str, b: _Buf, dt: MPI.Datatype, counts: np.ndarray,
            displs: np.ndarray, name: str) -> VSpec:
    lb, extent = dt.Get_extent()
    tlb, textent = dt.Get_true_extent()
    code, j, value, total, largest = _pack.check_blocks(counts, displs, extent, tlb, textent,
                                                        b.nbytes)
    if code == 1:
        raise ValueError(f"{call}: {name}counts[{j}] = {value} is negative")
    if code == 2:
        raise ValueError(f"{call}: {name}displs[{j}] = {value} is negative")
    if code == 3:
        raise ValueError(
            f"{call}: {what} block {j} (displacement {displs[j]}, count {counts[j]}, "
            f"extent {extent}) ends at byte {value}, outside the {b.nbytes}-byte buffer")
    if code == 4:
        raise ValueError(f"{call}: {what} datatype extent {extent} is not positive")
    counts.setflags(write=False)
    displs.setflags(write=False)
    return VSpec(b.obj, b.addr, b.nbytes, b.readonly, b.device, dt, extent, dt.Get_size(),
                 tlb, textent, counts, displs, b.keepalive, total, largest)


def _unpack(call: str, what: str, msg: object, vector: bool):
    """Split a message into (buf, counts, displs, datatype) following mpi4py's rules."""
    o_counts = o_displs = o_type = None
    if isinstance(msg, (list, tuple)):
        n = len(msg)
        if n == 2:
            o_buf, o_counts = msg
            if _is_datatype(o_counts):
                o_counts, o_type = None, o_counts
            elif isinstance(o_counts, tuple) or (not vector and isinstance(o_counts, list)):
                if len(o_counts) != 2:
                    raise ValueError(f"{call}: {what}: expecting (counts, displs), "
                                     f"got {len(o_counts)} items")
                o_counts, o_displs = o_counts
        elif n == 3:
            o_buf, o_counts, o_type = msg
            if isinstance(o_counts, tuple) or (not vector and isinstance(o_counts, list)):
                if len(o_counts) != 2:
                    raise ValueError(f"{call}: {what}: expecting (counts, displs), "
                                     f"got {len(o_counts)} items")
                o_counts, o_displs = o_counts
        elif n == 4:
            o_buf, o_counts, o_displs, o_type = msg
        else:
            raise ValueError(f"{call}: {what}: expecting 2 to 4 items, got {n}")
    else:
        o_buf = msg
    return o_buf, o_counts, o_displs, o_type


def parse_vector(msg: object, p: int, *, readonly: bool, call: str = "Alltoallv",
                 what: str = "send message", name: str = "send") -> VSpec:
    """Parse an Alltoallv message for ``p`` peers into a :class:`VSpec`."""
    o_buf, o_counts, o_displs, o_type = _unpack(call, what, msg, vector=True)
    b = _acquire(call, what, o_buf, readonly)
    dt = _datatype(call, what, o_type) if o_type is not None else \
        _format_datatype(call, what, b.fmt, b.itemsize)
    if o_counts is None:
        _, extent = dt.Get_extent()
        if b.nbytes and extent <= 0:
            raise ValueError(f"{call}: {what}: cannot infer counts, datatype extent {extent}")
        if b.nbytes % max(extent, 1):
            raise ValueError(f"{call}: {what}: cannot infer counts, buffer length {b.nbytes} "
                             f"is not a multiple of datatype extent {extent}")
        n = b.nbytes // max(extent, 1)
        counts = np.full(p, n // p, dtype=np.int64)
        counts[: n % p] += 1
    elif isinstance(o_counts, (list, tuple, np.ndarray)) or hasattr(o_counts, "__len__"):
        counts = int_vector(call, what, name + "counts", o_counts, p)
    else:
        counts = np.full(p, _index(call, what, "counts", o_counts), dtype=np.int64)
    if o_displs is None:
        displs = np.zeros(p, dtype=np.int64)
        if p > 1:
            np.cumsum(counts[:-1], out=displs[1:])
    elif isinstance(o_displs, (list, tuple, np.ndarray)) or hasattr(o_displs, "__len__"):
        displs = int_vector(call, what, name + "displs", o_displs, p)
    else:
        displs = np.arange(p, dtype=np.int64) * _index(call, what, "displs", o_displs)
    return _finish(call, what, b, dt, counts, displs, name)


def parse_block(msg: object, p: int, *, readonly: bool, call: str = "Alltoall",
                what: str = "send message", name: str = "send") -> VSpec:
    """Parse an Alltoall message (``count`` elements for each of ``p`` peers)."""
    o_buf, o_count, o_displ, o_type = _unpack(call, what, msg, vector=False)
    b = _acquire(call, what, o_buf, readonly)
    dt = _datatype(call, what, o_type) if o_type is not None else \
        _format_datatype(call, what, b.fmt, b.itemsize)
    _, extent = dt.Get_extent()
    displ = 0 if o_displ is None else _index(call, what, "displacement", o_displ)
    if displ < 0:
        raise ValueError(f"{call}: {what}: negative displacement {displ}")
    if o_count is None:
        length = b.nbytes - displ * max(extent, 0)
        if length < 0:
            raise ValueError(f"{call}: {what}: displacement {displ} out of bounds")
        if length and extent <= 0:
            raise ValueError(f"{call}: {what}: cannot infer count, datatype extent {extent}")
        if length % max(extent, 1):
            raise ValueError(f"{call}: {what}: cannot infer count, buffer length {length} "
                             f"is not a multiple of datatype extent {extent}")
        n = length // max(extent, 1)
        if n % p:
            raise ValueError(f"{call}: {what}: cannot infer count, number of entries {n} "
                             f"is not a multiple of the number of blocks {p}")
        count = n // p
    else:
        count = _index(call, what, "count", o_count)
        if count < 0:
            raise ValueError(f"{call}: {what}: negative count {count}")
    counts = np.full(p, count, dtype=np.int64)
    displs = displ + np.arange(p, dtype=np.int64) * count
    return _finish(call, what, b, dt, counts, displs, name)
