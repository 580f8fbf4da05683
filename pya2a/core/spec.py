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

Counts and displacements are read as mpi4py reads them: one integer is anything with
``__index__`` that is not a sequence (a 0-d integer array included); a sequence is anything
with a length whose items have ``__index__``. Datatypes are ``MPI.Datatype`` objects or keys
of ``MPI._typedict`` (typecodes, KeyError otherwise); without one, the buffer's own format
decides (KeyError for a format MPI has no type for). ``MPI.IN_PLACE`` or ``None`` as the
send message means in place. A ``None`` buffer carries no data (an explicit datatype, zero
counts); ``MPI.BOTTOM`` takes absolute displacements (``MPI.Get_address(x) // extent``).

Buffers: anything with the buffer protocol; host DLPack producers (torch CPU tensors) and
``__cuda_array_interface__`` objects when no CUDA stack is present are host memory, read
through ``MPI.buffer`` with mpi4py's element formats (bfloat16 and other types mpi4py has
no format for are bytes); device buffers (CUDA DLPack, CAI with CuPy present) are described
by :mod:`pya2a.gpu.device`.

The first stage (the message's form, the buffer's memory, the datatype, the counts and
displacements expanded to 2p int64) is :mod:`pya2a.core._msg`, in C; its record is also
the one-shot signature. :func:`finish` checks the blocks against the buffer into a VSpec.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field

import numpy as np
from mpi4py import MPI

from . import _msg, _pack

__all__ = ["VSpec", "parse_vector", "parse_block", "finish", "in_place", "is_device_buffer",
           "int_vector", "counts_vector", "displs_vector", "element_type", "template", "bind"]

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

    def mpi_displs(self) -> np.ndarray:
        """The displacements as MPI gets them: an empty block's at 0 (it touches no byte,
        and any value past a C int fails in an MPI without large-count calls)."""
        return np.where(self.counts == 0, 0, self.displs)

    def message(self) -> list:
        """The equivalent mpi4py vector message, for handing to MPI itself.

        Counts and displacements (:meth:`mpi_displs`) go as tuples of Python ints (made
        once per spec and kept by :meth:`with_buffer`): mpi4py reads those fastest.
        """
        d = self.__dict__
        cd = d.get("_cd")
        if cd is None:
            cd = d["_cd"] = (tuple(self.counts.tolist()), tuple(self.mpi_displs().tolist()))
        return [self.obj, cd, self.datatype]

    def host_bytes(self) -> np.ndarray:
        """The whole host buffer as a flat uint8 NumPy array (a view, no copy)."""
        if self.device is not None:
            raise TypeError("host_bytes() on a device buffer")
        keep = self.keepalive
        if keep is None:
            keep = MPI.buffer(self.obj) if self.obj is not None else bytearray()
        return np.frombuffer(keep, dtype=np.uint8)


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
        if hasattr(obj, "__cuda_array_interface__"):
            # with no CUDA stack a CAI pointer cannot be device memory pya2a could use:
            # it is read as host memory, as mpi4py reads it
            return _has_cuda_stack()
        return False
    except Exception:
        return hasattr(type(obj), "__cuda_array_interface__") and _has_cuda_stack()


_BYTE_TYPES: dict[int, MPI.Datatype] = {}


def _bytes_type(n: int) -> MPI.Datatype:
    """A committed contiguous type of ``n`` bytes (made once per size, never freed)."""
    dt = _BYTE_TYPES.get(n)
    if dt is None:
        dt = _BYTE_TYPES[n] = MPI.BYTE.Create_contiguous(n).Commit()
        _msg.add_cacheable(dt.handle)
    return dt


def _unsigned_type(n: int) -> MPI.Datatype:
    """Elements of ``n`` bytes: the unsigned integer of that size, else ``n`` bytes."""
    return _TYPEDICT.get(f"u{n}") or _bytes_type(n)


_PREDEFINED: frozenset[int] = frozenset(
    dt.handle for dt in _TYPEDICT.values() if dt != MPI.DATATYPE_NULL) | frozenset(
    getattr(MPI, n).handle for n in ("BYTE", "PACKED", "CHAR", "WCHAR", "SHORT", "INT",
                                      "LONG", "LONG_LONG", "FLOAT", "DOUBLE", "LONG_DOUBLE",
                                      "INT8_T", "INT16_T", "INT32_T", "INT64_T", "UINT8_T",
                                      "UINT16_T", "UINT32_T", "UINT64_T", "C_BOOL",
                                      "SIGNED_CHAR", "UNSIGNED_CHAR", "UNSIGNED_SHORT",
                                      "UNSIGNED", "UNSIGNED_LONG", "UNSIGNED_LONG_LONG",
                                      "C_FLOAT_COMPLEX", "C_DOUBLE_COMPLEX", "AINT",
                                      "OFFSET", "COUNT")
    if getattr(MPI, n, MPI.DATATYPE_NULL) != MPI.DATATYPE_NULL)

# DLPack data types (code, bits) -> buffer format, as mpi4py reads DLPack producers (types
# it has no format for, bfloat16 among them, are bytes)
_DL_FORMATS = {(0, 8): "b", (0, 16): "h", (0, 32): "i", (0, 64): "q", (1, 8): "B",
               (1, 16): "H", (1, 32): "I", (1, 64): "Q", (2, 16): "e", (2, 32): "f",
               (2, 64): "d", (5, 64): "Zf", (5, 128): "Zd", (6, 8): "?"}
_TORCH_FORMATS: dict[object, str] = {}
_cuda_stack: bool | None = None


def _has_cuda_stack() -> bool:
    """True when device pointers can be told from host ones: a device backend is installed
    (tests install an emulated one) or CuPy imports."""
    global _cuda_stack
    try:
        from .devices import gpu_device

        if getattr(gpu_device(), "_BACKEND", None) is not None:
            return True
    except ImportError:  # pragma: no cover - depends on the GPU extra
        return False
    if _cuda_stack is None:
        try:
            import cupy  # noqa: F401

            _cuda_stack = True
        except Exception:
            _cuda_stack = False
    return _cuda_stack


def _dlpack_format(obj: object) -> str:
    """The format mpi4py gives a host DLPack producer's elements ("B" when it has none)."""
    dtype = getattr(obj, "dtype", None)
    hit = _TORCH_FORMATS.get(dtype) if dtype is not None else None
    if hit is not None:
        return hit
    fmt = "B"
    try:
        a = np.from_dlpack(obj)
        fmt = a.dtype.char if a.dtype.char in _TYPEDICT else "B"
    except Exception:
        import_name = type(obj).__module__.split(".")[0]
        if import_name == "torch" and dtype is not None:
            import torch

            bits = torch.empty(0, dtype=dtype).element_size() * 8
            code = 2 if dtype.is_floating_point and dtype != torch.bfloat16 else \
                5 if dtype.is_complex else 6 if dtype == torch.bool else \
                0 if dtype.is_signed else 1
            fmt = _DL_FORMATS.get((code, bits), "B") if dtype != torch.bfloat16 else "B"
    if dtype is not None:
        try:
            _TORCH_FORMATS[dtype] = fmt
        except TypeError:
            pass
    return fmt


# CuPy arrays described once per (pointer, size, dtype, device): a contiguous CuPy array is
# read on CuPy's current stream, so describing it again would only repeat the same answer
_CUPY_DESC: dict[tuple, tuple] = {}
_CUPY_TYPES: dict[type, bool] = {}  # type -> is it CuPy's ndarray (decided once per type)
_FMT_TYPES: dict[tuple, MPI.Datatype] = {}  # (device format, itemsize) -> its datatype


def _cupy_key(obj: object, readonly: bool) -> tuple | None:
    t = type(obj)
    is_cupy = _CUPY_TYPES.get(t)
    if is_cupy is None:
        is_cupy = _CUPY_TYPES[t] = t.__name__ == "ndarray" and t.__module__.startswith("cupy")
    if not is_cupy:
        return None
    try:
        # ``_c_contiguous`` is the attribute behind ``flags.c_contiguous``, which builds a
        # flags object on every read
        contiguous = getattr(obj, "_c_contiguous", None)
        if contiguous is None:
            contiguous = obj.flags.c_contiguous  # type: ignore[attr-defined]
        if not contiguous:
            return None
        mem = obj.data  # type: ignore[attr-defined]
        return (mem.ptr, obj.nbytes, obj.dtype, mem.device_id, readonly)  # type: ignore
    except Exception:
        return None


def described(obj: object, readonly: bool) -> tuple[int, int, bool, int] | None:
    """(address, bytes, read-only, device) of a C-contiguous CuPy array this process has
    described before, with no call into the device; None for anything else (the caller
    then reads it in full, which describes it for the next time)."""
    ckey = _cupy_key(obj, readonly)
    hit = _CUPY_DESC.get(ckey) if ckey is not None else None
    return None if hit is None else hit[:4]


def _format_datatype(call: str, what: str, fmt: str, itemsize: int) -> MPI.Datatype:
    """``_msg.format_type`` for device formats, kept per (format, itemsize)."""
    dt = _FMT_TYPES.get((fmt, itemsize))
    if dt is None:
        dt = _msg.format_type(call, what, fmt, itemsize)  # raises for a format MPI lacks
        _FMT_TYPES[(fmt, itemsize)] = dt
    return dt


def _torch_on_cupy_stream(obj: object) -> bool:
    """A contiguous CUDA torch tensor whose current torch stream is CuPy's current stream."""
    t = type(obj)
    if not t.__module__.startswith("torch") or t.__name__ not in ("Tensor", "Parameter"):
        return False
    try:
        if not obj.is_cuda or not obj.is_contiguous():  # type: ignore[attr-defined]
            return False
        import cupy
        import torch

        dev = obj.device.index  # type: ignore[attr-defined]
        return bool(torch.cuda.current_stream(dev).cuda_stream ==
                    cupy.cuda.get_current_stream().ptr)
    except Exception:
        return False


def _other(m: _msg.Msg, obj: object, readonly: bool, call: str, what: str,
           want_type: bool = True) -> None:
    """The first stage for objects without the buffer protocol (DLPack, CAI, device);
    the datatype from the element format only with ``want_type`` (no explicit one)."""
    ckey = _cupy_key(obj, readonly)
    hit = _CUPY_DESC.get(ckey) if ckey is not None else None
    if hit is not None:  # a CuPy array described before: nothing to ask the device
        m.addr, m.nbytes, m.readonly, m.device, fmt, m.itemsize = hit
        m.keepalive = obj
        if want_type:
            m.datatype = _format_datatype(call, what, fmt, m.itemsize)
        m.cacheable = True
        return
    if is_device_buffer(obj):
        try:
            from .devices import gpu_device

            _device = gpu_device()
        except ImportError as exc:  # pragma: no cover - depends on the GPU extra
            raise TypeError(f"{call}: {what} is a device buffer, but pya2a's GPU "
                            f"support is not available ({exc})") from exc
        d = _device.describe(obj, call=call, what=what, readonly=readonly)
        hit = (d.addr, d.nbytes, d.readonly, d.device, d.fmt,
               int(getattr(d, "itemsize", 0) or 0))
        if ckey is not None:
            _CUPY_DESC[ckey] = hit
            while len(_CUPY_DESC) > 256:
                _CUPY_DESC.pop(next(iter(_CUPY_DESC)))
        m.addr, m.nbytes, m.readonly, m.device, fmt, m.itemsize = hit
        m.keepalive = d.keepalive
        if want_type:
            m.datatype = _format_datatype(call, what, fmt, m.itemsize)
        # a repeated call skips describe() and with it the producer's stream handshake: only
        # CuPy arrays (read on CuPy's current stream anyway) and torch tensors produced on
        # that same stream may be replayed; any other producer takes the full path each time
        m.cacheable = ckey is not None or _torch_on_cupy_stream(obj)
        return
    # host memory behind DLPack, or a CUDA array interface with no CUDA stack to tell:
    # mpi4py reads both as host buffers
    try:
        mem = MPI.buffer(obj)
    except BufferError as exc:
        raise BufferError(f"{call}: {what}: {exc}") from None
    except Exception as exc:
        raise TypeError(f"{call}: {what} must support the buffer protocol, DLPack or "
                        f"__cuda_array_interface__, not {type(obj).__name__} ({exc})") from None
    if not readonly and mem.readonly:
        raise BufferError(f"{call}: {what} buffer is not writable")
    m.addr, m.nbytes, m.readonly, m.device = mem.address, mem.nbytes, mem.readonly, None
    m.keepalive = mem
    m.itemsize = 0
    m.cacheable = True  # host memory: the address range fixes it, as for NumPy
    if not want_type:
        return
    if hasattr(obj, "__dlpack__"):
        fmt = _dlpack_format(obj)
    else:
        typestr = obj.__cuda_array_interface__.get("typestr", "|u1")  # type: ignore[attr-defined]
        fmt = typestr[1:] if typestr[0] in "<>|=" else typestr
        if typestr[0] == ">" and np.little_endian:
            raise BufferError(f"{call}: {what}: format string {typestr!r} with non-native "
                              f"byte order")
    m.datatype = _msg.format_type(call, what, fmt, 0)


_msg.set_hooks(_other, _unsigned_type, _PREDEFINED, described)


def _acquire(call: str, what: str, obj: object, readonly: bool) -> _msg.Msg:
    """A bare buffer's memory (obj, addr, nbytes, readonly, device, keepalive): the same
    first stage as messages, for callers that bring their own datatypes (Alltoallw)."""
    return _msg.acquire(obj, readonly, call, what, False)


def int_vector(call: str, what: str, name: str, ob: object, p: int) -> np.ndarray:
    """``ob`` read as mpi4py reads a counts sequence: a new int64 array of ``p`` integers.

    One integer (``__index__``, not a sequence) means the same value for every peer.
    """
    who = f"{what} {name}" if what else name
    if _msg.is_integral(ob):
        return np.full(p, operator.index(ob), dtype=np.int64)  # type: ignore[arg-type]
    return _msg.int64_vector(ob, p, call, who)


def counts_vector(call: str, name: str, ob: object, p: int) -> np.ndarray:
    """p non-negative int64 counts (one integer: the same for every peer), read-only."""
    arr = int_vector(call, "", name, ob, p)
    if (arr < 0).any():
        j = int(np.argmax(arr < 0))
        raise ValueError(f"{call}: {name}[{j}] = {arr[j]} is negative")
    arr.setflags(write=False)
    return arr


def displs_vector(call: str, name: str, ob: object, counts: np.ndarray) -> np.ndarray:
    """Displacements for ``counts``: given (read-only, non-negative) or packed (None)."""
    p = counts.size
    if ob is None:
        d = np.zeros(p, dtype=np.int64)
        if p > 1:
            np.cumsum(counts[:-1], out=d[1:])
        d.setflags(write=False)
        return d
    return counts_vector(call, name, ob, p)


def element_type(call: str, dtype: object) -> MPI.Datatype:
    """The element datatype of a plan: ``MPI.Datatype``, NumPy dtype or typecode, or a torch
    dtype (types MPI has no name for, such as bfloat16, are elements of their size)."""
    if isinstance(dtype, MPI.Datatype):
        if dtype == MPI.DATATYPE_NULL:
            raise ValueError(f"{call}: dtype is MPI.DATATYPE_NULL")
        _msg.check_committed(call, "dtype", dtype)
        return dtype
    if type(dtype).__module__.split(".")[0] == "torch":
        import torch

        if not isinstance(dtype, torch.dtype):
            raise TypeError(f"{call}: dtype must be a NumPy dtype, typecode, torch dtype or "
                            f"MPI.Datatype, not {type(dtype).__name__}")
        size = torch.empty(0, dtype=dtype).element_size()
        name = str(dtype).split(".")[-1]
        try:
            npd = np.dtype(name)
        except TypeError:
            return _unsigned_type(size)
        return _TYPEDICT.get(npd.char) if npd.itemsize == size and npd.char in _TYPEDICT \
            else _unsigned_type(size)
    try:
        npd = np.dtype(dtype)  # type: ignore[call-overload]
    except TypeError:
        raise TypeError(f"{call}: dtype must be a NumPy dtype, typecode, torch dtype or "
                        f"MPI.Datatype, not {type(dtype).__name__}") from None
    dt = _TYPEDICT.get(npd.char)
    if dt is None:
        if npd.kind == "V" or npd.hasobject:
            raise TypeError(f"{call}: dtype {npd} has no MPI datatype; pass "
                            f"MPI.BYTE with counts in bytes")
        raise TypeError(f"{call}: dtype {npd} has no MPI datatype")
    return dt


def template(counts: np.ndarray, displs: np.ndarray, dt: MPI.Datatype,
             device: int | None) -> VSpec:
    """A VSpec with no buffer, for the checks made before buffers exist (plans)."""
    _, extent = dt.Get_extent()
    tlb, textent = dt.Get_true_extent()
    end = _pack.block_end(counts, displs, extent)
    if end < 0:
        raise ValueError("plan: a block's end (displacement + count, times the extent "
                         f"{extent}) lies beyond 2^63 bytes")
    total = int(counts.sum())
    largest = int(counts.max()) if counts.size else 0
    return VSpec(None, 0, end, False, device, dt, extent, dt.Get_size(), tlb, textent,
                 counts, displs, None, total, largest)


def bind(t: VSpec, obj: object, readonly: bool, call: str, what: str) -> VSpec:
    """``t`` (a plan's template) on the buffer ``obj``: read the buffer, check its size.

    The VSpec holds no reference to a host buffer's object (``obj`` is an address range),
    so a plan's cached bindings keep no user memory alive.
    """
    m = _msg.acquire(obj, readonly, call, what)
    if m.nbytes < t.nbytes:
        raise ValueError(f"{call}: {what} has {m.nbytes} bytes, the plan's blocks need "
                         f"{t.nbytes}")
    if m.device is None:
        mem = MPI.buffer.fromaddress(m.addr, m.nbytes, m.readonly) if m.nbytes else \
            bytearray()
        held = mem
    else:
        mem, held = obj, m.keepalive
    new = object.__new__(VSpec)
    d = new.__dict__
    d.update(t.__dict__)
    d.update(obj=mem, addr=m.addr, nbytes=m.nbytes, readonly=m.readonly, device=m.device,
             keepalive=held)
    return new


def finish(m: _msg.Msg, p: int, call: str, what: str, name: str) -> VSpec:
    """The second stage: a read message (:func:`pya2a.core._msg.read`) checked into a VSpec.

    Checks every block against the buffer, rejects negative counts and displacements, and
    turns a None buffer (no data) or ``MPI.BOTTOM`` (absolute displacements) into a spec
    every algorithm can take.
    """
    dt = m.datatype
    lay = np.frombuffer(m.layout, dtype=np.int64)  # read-only views of the parse
    counts, displs = lay[:p], lay[p:]
    extent = m.extent
    tlb, textent = dt.Get_true_extent()
    tsize = dt.Get_size()
    obj, addr, nbytes, readonly, keep = m.obj, m.addr, m.nbytes, m.readonly, m.keepalive
    if m.bottom:
        obj, addr, nbytes, counts, displs, keep = _bottom(m, p, call, what, name, counts,
                                                          displs, tsize, tlb, textent)
        if obj is MPI.BOTTOM:  # a derived datatype at absolute addresses: MPI reads it
            total = int(counts.sum())
            return VSpec(obj, 0, 0, readonly, None, dt, extent, tsize, tlb, textent,
                         counts, displs, None, total, int(counts.max()) if p else 0)
    code, j, value, total, largest = _pack.check_blocks(counts, displs, extent, tlb,
                                                        textent, nbytes)
    if code == 1:
        raise ValueError(f"{call}: {name}counts[{j}] = {value} is negative")
    if code == 2:
        raise ValueError(f"{call}: {name}displs[{j}] = {value} is negative")
    if code == 3:
        end = f"byte {value}" if value >= 0 else "beyond 2^63 bytes"
        raise ValueError(
            f"{call}: {what} block {j} (displacement {displs[j]}, count {counts[j]}, "
            f"extent {extent}) ends at {end}, outside the {nbytes}-byte buffer")
    if code == 4:
        raise ValueError(f"{call}: {what} datatype extent {extent} is not positive")
    if extent > 0 and int(displs.max(initial=0)) > nbytes // extent:
        # empty blocks may have any displacement (they touch no byte); place the ones past
        # the end at 0 so that byte offsets (displs * extent) never wrap
        displs = np.where(counts == 0, 0, displs)
        displs.setflags(write=False)
    return VSpec(obj, addr, nbytes, readonly, m.device, dt, extent, tsize, tlb, textent,
                 counts, displs, keep, total, largest)


def _bottom(m: _msg.Msg, p: int, call: str, what: str, name: str, counts: np.ndarray,
            displs: np.ndarray, tsize: int, tlb: int, textent: int):
    """A None / BOTTOM buffer as an address range the blocks lie in (or BOTTOM itself)."""
    if (counts < 0).any():
        j = int(np.argmax(counts < 0))
        raise ValueError(f"{call}: {name}counts[{j}] = {counts[j]} is negative")
    nz = counts > 0
    if not nz.any():
        empty = bytearray()
        return empty, 0, 0, counts, np.zeros(p, dtype=np.int64), empty
    if m.obj is None:
        raise ValueError(f"{call}: {what}: buffer is None but {name}counts are not all "
                         f"zero")
    ext = m.extent
    dense = tsize == ext and tlb == 0 and textent == tsize
    if not dense or ext <= 0:
        return MPI.BOTTOM, 0, 0, counts, displs, None
    base = int(displs[nz].min())
    if base < 0:
        raise ValueError(f"{call}: {name}displs of MPI.BOTTOM must be addresses >= 0")
    end = int(((displs + counts) * ext)[nz].max())
    new_displs = np.where(nz, displs - base, 0)
    mem = MPI.buffer.fromaddress(base * ext, end - base * ext, False)
    return mem, base * ext, end - base * ext, counts, new_displs, mem


def parse_vector(msg: object, p: int, *, readonly: bool, call: str = "Alltoallv",
                 what: str = "send message", name: str = "send") -> VSpec:
    """Parse an Alltoallv message for ``p`` peers into a :class:`VSpec`."""
    return finish(_msg.read(msg, p, True, readonly, call, what, name), p, call, what, name)


def parse_block(msg: object, p: int, *, readonly: bool, call: str = "Alltoall",
                what: str = "send message", name: str = "send") -> VSpec:
    """Parse an Alltoall message (``count`` elements for each of ``p`` peers)."""
    return finish(_msg.read(msg, p, False, readonly, call, what, name), p, call, what, name)
