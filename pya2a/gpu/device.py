"""Device buffers: recognition, CUDA-aware-MPI detection, the device transport seam.

* :func:`describe` reads a device array (CuPy, torch, JAX, numba, anything with
  ``__dlpack__`` or ``__cuda_array_interface__``) into address / size / format / device,
  honouring the producer's stream (DLPack stream handshake; CAI v3 ``stream``).
* :func:`cuda_aware` decides whether MPI may be handed device pointers:
  ``PYA2A_CUDA_AWARE=0|1`` overrides; else ``MPIX_Query_cuda_support`` (or
  ``MPIX_Query_rocm_support`` under ROCm) called through ctypes on the loaded libmpi; else
  Open MPI's ``mpi_built_with_cuda_support`` from ``ompi_info``; else False. A
  non-CUDA-aware MPI segfaults on a device pointer, so "unknown" means "not aware".
* :func:`transport` returns :class:`~pya2a.gpu.staging.AwareTransport` (pointers straight
  to MPI) when every rank of the communicator agrees MPI is CUDA-aware, else
  :class:`~pya2a.gpu.staging.StagedTransport` (pipelined pinned-host staging).
  The host algorithms that take device buffers say so in their own registrations and run
  unchanged on these transports; ``native`` calls :meth:`DeviceTransport.native`.

This module imports without CuPy; CUDA work goes through a backend object
(:class:`CupyBackend`), which tests may replace with :func:`set_backend`.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import functools
import os
import subprocess
import warnings
from typing import Any

import numpy as np
from mpi4py import MPI

from ..core.devices import array_family
from ..core.state import state
from . import cupy as _cupy
from .staging import AwareTransport, DeviceTransport, StagedTransport

__all__ = ["DeviceBuffer", "RawArray", "describe", "cuda_aware", "cuda_aware_reason",
           "comm_cuda_aware", "transport", "empty_rows", "byte_view", "info", "CupyBackend",
           "backend", "set_backend", "SelfCopy"]

# Algorithms whose bodies use only the transport primitives (DESIGN.md), so they run on
# device buffers unchanged; native is handled separately (whole-exchange staging).

# DLPack device types (dlpack.h)
_DL_CUDA, _DL_CUDA_HOST, _DL_ROCM, _DL_ROCM_HOST, _DL_CUDA_MANAGED = 2, 3, 10, 11, 13
_DL_DEVICE = {_DL_CUDA, _DL_ROCM, _DL_CUDA_MANAGED}


@dataclasses.dataclass(frozen=True)
class DeviceBuffer:
    """What :mod:`pya2a.bufspec` needs to know about a device buffer.

    Attributes:
        addr: device address of the first byte.
        nbytes: size in bytes (C-contiguous).
        readonly: the producer marked it read-only.
        fmt: typestr that ``MPI._typedict`` maps ('f4', 'i8', 'u2', ...); bfloat16 and
            other types MPI has no name for map to the unsigned integer of the same size
            (all-to-all only moves bytes), '' when none fits (pass a datatype).
        device: CUDA/HIP device ordinal.
        managed: unified (managed) memory; staged like device memory.
        keepalive: objects that keep the memory alive for the call.
    """

    addr: int
    nbytes: int
    readonly: bool
    fmt: str
    device: int
    managed: bool
    keepalive: object


# ---------------------------------------------------------------------------------------
# backend: the CUDA operations the transports need
# ---------------------------------------------------------------------------------------
class CupyBackend:
    """CUDA / HIP operations through CuPy's runtime bindings (raw pointers, no arrays)."""

    name = "cupy"

    def __init__(self) -> None:
        self.cp = _cupy()
        self.rt = self.cp.cuda.runtime
        self._side: dict[int, Any] = {}
        self._kernels: dict[int, Any] = {}

    # devices, streams, events
    def use_device(self, device: int):
        """Context manager: make ``device`` current."""
        return self.cp.cuda.Device(device)

    def current_device(self) -> int:
        """The current device ordinal."""
        return int(self.rt.getDevice())

    def current_stream(self):
        """CuPy's current stream on the current device."""
        return self.cp.cuda.get_current_stream()

    def side_stream(self, device: int):
        """A persistent non-blocking stream of ``device`` for downloads."""
        s = self._side.get(device)
        if s is None:
            with self.cp.cuda.Device(device):
                s = self._side[device] = self.cp.cuda.Stream(non_blocking=True)
        return s

    def external_stream(self, handle: int):
        """A stream object for a raw handle (CAI / DLPack producers)."""
        with warnings.catch_warnings():  # deprecated (not removed) in CuPy 14
            warnings.simplefilter("ignore", DeprecationWarning)
            return self.cp.cuda.ExternalStream(int(handle))

    def stream_handle(self, stream) -> int:
        """The raw handle of ``stream`` (0 = legacy default)."""
        return int(stream.ptr)

    def record(self, stream):
        """Record a timing-free event on ``stream``."""
        ev = self.cp.cuda.Event(block=False, disable_timing=True)
        ev.record(stream)
        return ev

    @staticmethod
    def done(ev) -> bool:
        """True if the event has completed."""
        return bool(ev.done)

    @staticmethod
    def event_sync(ev) -> None:
        """Block until the event completes."""
        ev.synchronize()

    @staticmethod
    def wait(stream, ev) -> None:
        """Make ``stream`` wait for ``ev``."""
        stream.wait_event(ev)

    @staticmethod
    def sync(stream) -> None:
        """Block until ``stream`` is idle."""
        stream.synchronize()

    # memory
    def memcpy(self, dst: int, src: int, n: int, stream) -> None:
        """Asynchronous copy of ``n`` bytes, direction inferred (unified addressing)."""
        self.rt.memcpyAsync(int(dst), int(src), int(n), self.rt.memcpyDefault, stream.ptr)

    def pinned(self, nbytes: int) -> np.ndarray:
        """Page-locked host memory as a uint8 NumPy array."""
        mem = self.cp.cuda.alloc_pinned_memory(int(nbytes))
        return np.frombuffer(mem, dtype=np.uint8, count=int(nbytes))

    def host_register(self, ptr: int, nbytes: int) -> None:
        """Page-lock existing host memory (cudaHostRegister, portable to every device)."""
        if nbytes > 0:
            self.rt.hostRegister(int(ptr), int(nbytes), 1)  # cudaHostRegisterPortable

    def host_unregister(self, ptr: int) -> None:
        """Undo :meth:`host_register` (cudaHostUnregister)."""
        self.rt.hostUnregister(int(ptr))

    def alloc(self, nbytes: int) -> tuple[object, int]:
        """Device memory from CuPy's pool on the current device: (keepalive, address)."""
        mem = self.cp.cuda.alloc(max(int(nbytes), 1))
        return mem, int(mem.ptr)

    def pointer(self, ptr: int) -> tuple[int, bool]:
        """(device ordinal, managed?) of a device address."""
        a = self.rt.pointerGetAttributes(int(ptr))
        managed = int(a.type) == 3  # cudaMemoryTypeManaged (informational only)
        return int(a.device), managed

    # kernels
    def _pack_kernel(self) -> Any:
        dev = self.current_device()
        kern = self._kernels.get(dev)
        if kern is None:
            from . import loader

            kern = self._kernels[dev] = loader.module("pack.cu", dev).get_function("pya2a_pack")
        return kern

    def _launch_pack(self, src: int, dtab: Any, n: int, maxlen: int, dst: int,
                     stream) -> None:
        threads = 256
        # a warp per run where a warp's four 16-byte vectors per lane cover the longest run
        lanes = 32 if maxlen <= 32 * 16 * 4 else threads
        gx = max(1, min(512, -(-maxlen // (lanes * 16 * 4))))
        gy = min(-(-n // (threads // lanes)), 65535)
        kern = self._pack_kernel()
        with stream:  # RawKernel launches on the current stream
            kern((gx, gy, 1), (threads, 1, 1),
                 (np.uint64(src), dtab, np.uint64(dst), np.int32(n), np.int32(lanes)))

    def pack(self, src: int, src_off: np.ndarray, lens: np.ndarray, dst: int,
             dst_off: np.ndarray, stream) -> None:
        """One launch of ``pya2a_pack`` for all blocks (offsets, lengths in bytes)."""
        n = int(lens.size)
        if n == 0:
            return
        tab = np.concatenate([src_off, dst_off, lens]).astype(np.int64, copy=False)
        with stream:
            dtab = self.cp.asarray(tab)
        self._launch_pack(src, dtab, n, int(lens.max()), dst, stream)
        # dtab goes back to CuPy's pool for this stream: reuse is ordered after the kernel

    def upload_table(self, src_off: np.ndarray, dst_off: np.ndarray,
                     lens: np.ndarray) -> tuple:
        """A ``pya2a_pack`` table kept on the current device for repeated launches."""
        tab = np.concatenate([src_off, dst_off, lens]).astype(np.int64, copy=False)
        dtab = self.cp.asarray(tab)
        self.current_stream().synchronize()  # launches may come on another stream
        return (dtab, int(lens.size), int(lens.max()) if lens.size else 0)

    def pack_table(self, src: int, table: tuple, dst: int, stream) -> None:
        """:meth:`pack` with a table from :meth:`upload_table` (no upload per launch)."""
        dtab, n, maxlen = table
        if n:
            self._launch_pack(src, dtab, n, maxlen, dst, stream)


_BACKEND: Any = None


def backend() -> Any:
    """The process's CUDA backend (CuPy unless :func:`set_backend` installed another)."""
    global _BACKEND
    if _BACKEND is None:
        _BACKEND = CupyBackend()
    return _BACKEND


class SelfCopy:
    """A one-rank exchange on device memory: the own block, one copy in stream order.

    What a repeated one-shot call on a one-rank communicator runs for device buffers: a
    device-to-device copy on the caller's current stream, then a wait for that stream (the
    call returns with the receive buffer complete, as every exchange does).
    """

    carries = True
    __slots__ = ("device", "dst", "src", "nbytes")

    def __init__(self, device: int, dst: int, src: int, nbytes: int) -> None:
        self.device, self.dst, self.src, self.nbytes = device, dst, src, nbytes

    def run(self) -> bool:
        """Copy and wait; always True (nothing to confirm on one rank)."""
        be = backend()
        if be.current_device() == self.device:  # the usual case: no device switch
            self._copy(be)
        else:
            with be.use_device(self.device):
                self._copy(be)
        return True

    def _copy(self, be: Any) -> None:
        stream = be.current_stream()
        if self.nbytes and self.dst != self.src:
            be.memcpy(self.dst, self.src, self.nbytes, stream)
        be.sync(stream)

    def free(self) -> None:
        """Nothing held."""


def set_backend(be: Any) -> Any:
    """Install another backend (tests emulate CUDA on the host); returns the previous one."""
    global _BACKEND
    old, _BACKEND = _BACKEND, be
    return old


# ---------------------------------------------------------------------------------------
# describing device buffers
# ---------------------------------------------------------------------------------------
class _DLDevice(ctypes.Structure):
    _fields_ = [("device_type", ctypes.c_int), ("device_id", ctypes.c_int)]


class _DLDataType(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint8), ("bits", ctypes.c_uint8), ("lanes", ctypes.c_uint16)]


class _DLTensor(ctypes.Structure):
    _fields_ = [("data", ctypes.c_void_p), ("device", _DLDevice), ("ndim", ctypes.c_int),
                ("dtype", _DLDataType), ("shape", ctypes.POINTER(ctypes.c_int64)),
                ("strides", ctypes.POINTER(ctypes.c_int64)), ("byte_offset", ctypes.c_uint64)]


class _DLManagedTensor(ctypes.Structure):
    _fields_ = [("dl_tensor", _DLTensor), ("manager_ctx", ctypes.c_void_p),
                ("deleter", ctypes.c_void_p)]


class _DLPackVersion(ctypes.Structure):
    _fields_ = [("major", ctypes.c_uint32), ("minor", ctypes.c_uint32)]


class _DLManagedTensorVersioned(ctypes.Structure):
    _fields_ = [("version", _DLPackVersion), ("manager_ctx", ctypes.c_void_p),
                ("deleter", ctypes.c_void_p), ("flags", ctypes.c_uint64),
                ("dl_tensor", _DLTensor)]


_capsule_name = ctypes.pythonapi.PyCapsule_GetName
_capsule_name.restype = ctypes.c_char_p
_capsule_name.argtypes = [ctypes.py_object]
_capsule_ptr = ctypes.pythonapi.PyCapsule_GetPointer
_capsule_ptr.restype = ctypes.c_void_p
_capsule_ptr.argtypes = [ctypes.py_object, ctypes.c_char_p]

# DLPack type codes -> typestr kind
_DL_KIND = {0: "i", 1: "u", 2: "f", 5: "c"}


@dataclasses.dataclass
class RawArray:
    """A device array as pointer, shape and type, read from DLPack or CAI (or made by
    :meth:`flat`); it exposes ``__cuda_array_interface__`` itself, so engines that take
    device arrays take it too."""

    ptr: int
    shape: tuple[int, ...]
    strides: tuple[int, ...] | None  # bytes
    itemsize: int
    typestr: str  # without byte-order prefix, or '' if no typestr exists
    readonly: bool
    device: int | None
    keep: object

    @classmethod
    def flat(cls, addr: int, nbytes: int) -> RawArray:
        """``nbytes`` bytes at device address ``addr`` as a flat uint8 array."""
        return cls(int(addr), (int(nbytes),), None, 1, "u1", False, None, None)

    @property
    def __cuda_array_interface__(self) -> dict:
        return {"shape": self.shape, "typestr": "|" + (self.typestr or f"V{self.itemsize}"),
                "data": (self.ptr, self.readonly), "strides": self.strides, "version": 3}


def _from_dlpack(obj: object, be: Any) -> RawArray:
    dev_type, dev_id = (int(x) for x in obj.__dlpack_device__())
    if dev_type not in _DL_DEVICE:
        raise TypeError(f"DLPack device type {dev_type} is not CUDA/ROCm memory")
    with be.use_device(dev_id):
        h = be.stream_handle(be.current_stream())
        # DLPack: 1 = legacy default stream (0 is ambiguous and not allowed)
        cap = obj.__dlpack__(stream=h if h else 1)
    name = _capsule_name(cap)
    if name == b"dltensor_versioned":
        mt = _DLManagedTensorVersioned.from_address(_capsule_ptr(cap, name))
        t, readonly = mt.dl_tensor, bool(mt.flags & 1)
    elif name == b"dltensor":
        t, readonly = _DLManagedTensor.from_address(_capsule_ptr(cap, name)).dl_tensor, False
    else:
        raise TypeError(f"unexpected DLPack capsule {name!r}")
    ndim = int(t.ndim)
    shape = tuple(int(t.shape[i]) for i in range(ndim))
    bits, lanes, code = int(t.dtype.bits), int(t.dtype.lanes), int(t.dtype.code)
    itemsize = bits * lanes // 8
    strides = None
    if t.strides:
        strides = tuple(int(t.strides[i]) * itemsize for i in range(ndim))
    if lanes != 1 or bits % 8:
        typestr = ""
    elif code == 6:  # bool
        typestr = "?"
    elif code == 4:  # bfloat16: no MPI name; moved as 2-byte words
        typestr = f"u{itemsize}"
    else:
        kind = _DL_KIND.get(code)
        typestr = f"{kind}{itemsize}" if kind else ""
    ptr = (int(t.data or 0) + int(t.byte_offset)) if t.data else 0
    # the capsule stays alive with the call: the producer's memory cannot go away
    return RawArray(ptr, shape, strides, itemsize, typestr, readonly, dev_id, (obj, cap))


def _from_cai(obj: object, be: Any) -> RawArray:
    cai = obj.__cuda_array_interface__
    if cai.get("mask") is not None:
        raise TypeError("masked arrays are not supported")
    ptr, readonly = cai["data"]
    shape = tuple(int(s) for s in cai["shape"])
    typestr = str(cai["typestr"])
    if typestr[:1] == ">" and np.little_endian and not typestr.endswith("1"):
        raise BufferError(f"non-native byte order {typestr!r}")
    t = typestr.lstrip("<>|=")
    itemsize = int(t[1:]) if t[1:].isdigit() else np.dtype(typestr).itemsize
    t = "?" if t == "b1" else t
    strides = cai.get("strides")
    stream = cai.get("stream")
    if stream is not None and int(stream) != -1 and ptr:
        cur = be.current_stream()
        if be.stream_handle(cur) != int(stream):
            be.wait(cur, be.record(be.external_stream(int(stream))))
    return RawArray(int(ptr or 0), shape, None if strides is None else tuple(strides), itemsize,
                t, bool(readonly), None, obj)


def _contiguous(shape: tuple[int, ...], strides: tuple[int, ...] | None, itemsize: int) -> bool:
    """One dense run of memory, as mpi4py reads ``__cuda_array_interface__`` and DLPack: no
    strides, no elements, or strides of a C- or Fortran-ordered array. Dimensions of length 1
    may report any stride (CuPy and torch give them whatever they like); the array's bytes
    are then taken in memory order, as mpi4py takes them."""
    if strides is None or 0 in shape:
        return True
    if len(strides) != len(shape):
        return False
    for order in (reversed, iter):  # C: last index fastest; Fortran: first index fastest
        want, ok = itemsize, True
        for n, s in zip(order(shape), order(strides), strict=True):
            if n != 1 and s != want:
                ok = False
                break
            want *= n
        if ok:
            return True
    return False


def _mpi_fmt(typestr: str, itemsize: int) -> str:
    """A typecode MPI can use: the buffer's own, else the unsigned integer of its size.

    mpi4py's table names some types the library lacks (Open MPI 4 has no float16: 'f2'
    there is a handle that fails with MPI_ERR_TYPE), so each is tried, not just looked up.
    """
    table = MPI._typedict

    def ok(code: str) -> bool:
        dt = table.get(code)
        if dt is None or dt == MPI.DATATYPE_NULL:
            return False
        try:  # a placeholder handle answers MPI_ERR_TYPE
            return dt.Get_size() == itemsize
        except MPI.Exception:
            return False

    if typestr and ok(typestr):
        return typestr
    alt = f"u{itemsize}"
    return alt if typestr and ok(alt) else ""


def _has(obj: object, name: str, errors: list[str] | None = None) -> bool:
    """hasattr() that survives properties raising other errors (torch: requires_grad)."""
    try:
        getattr(obj, name)
    except AttributeError:
        return False
    except Exception as exc:
        if errors is not None:
            errors.append(f"{name}: {exc}")
        return False
    return True


def describe(obj: object, *, call: str = "pya2a", what: str = "buffer",
             readonly: bool = True) -> DeviceBuffer:
    """Address, size, format and device of a device array.

    Args:
        obj: CuPy / torch / JAX / numba array or any object with ``__dlpack__`` (CUDA/ROCm
            device) or ``__cuda_array_interface__``; one dense run of memory (C- or
            Fortran-contiguous, as mpi4py requires), read in memory order.
        call, what: for error messages ("Alltoallv: send message ...").
        readonly: the caller only reads the buffer; False requires a writable one.

    Raises:
        TypeError: the object cannot be read as a device buffer (e.g. a torch tensor that
            requires grad: pass ``t.detach()``), or GPU support is not installed.
        BufferError: non-contiguous, or read-only where a receive buffer is needed.
    """
    try:
        be = backend()
    except ImportError as exc:
        raise TypeError(f"{call}: {what} is a device buffer, but {exc}") from exc
    errors: list[str] = []
    raw = None
    if _has(obj, "__dlpack__") and _has(obj, "__dlpack_device__"):
        try:
            raw = _from_dlpack(obj, be)
        except BufferError as exc:  # DLPack's own "cannot export" error
            errors.append(f"DLPack: {exc}")
        except Exception as exc:
            errors.append(f"DLPack: {exc}")
    if raw is None and _has(obj, "__cuda_array_interface__", errors):
        try:
            raw = _from_cai(obj, be)
        except Exception as exc:
            errors.append(f"__cuda_array_interface__: {exc}")
    if raw is None:
        raise TypeError(f"{call}: {what}: cannot read {type(obj).__name__} as a device "
                        f"buffer ({'; '.join(errors) or 'no array interface'})")
    if not _contiguous(raw.shape, raw.strides, raw.itemsize):
        raise BufferError(f"{call}: {what} device buffer is not contiguous; pass a "
                          f"contiguous array (cupy.ascontiguousarray, tensor.contiguous())")
    if raw.readonly and not readonly:
        raise BufferError(f"{call}: {what} device buffer is read-only")
    nbytes = int(np.prod(raw.shape, dtype=np.int64)) * raw.itemsize
    managed = False
    if raw.ptr and nbytes:
        dev, managed = be.pointer(raw.ptr)
        if dev < 0:  # managed memory may report no device: use the producer's
            dev = raw.device if raw.device is not None else be.current_device()
    else:
        dev = raw.device if raw.device is not None else be.current_device()
    return DeviceBuffer(raw.ptr, nbytes, raw.readonly, _mpi_fmt(raw.typestr, raw.itemsize),
                        int(dev), managed, raw.keep)


# ---------------------------------------------------------------------------------------
# CUDA-aware MPI detection
# ---------------------------------------------------------------------------------------
def _libmpi_handles() -> list[ctypes.CDLL]:
    """ctypes handles that can see the loaded MPI library's symbols."""
    out = []
    try:
        with open("/proc/self/maps") as f:
            paths = {line.split()[-1] for line in f if "/libmpi" in line}
        for path in sorted(paths):
            base = os.path.basename(path)
            if base.startswith("libmpi.") or base.startswith("libmpi_abi"):
                with contextlib.suppress(OSError):
                    out.append(ctypes.CDLL(path))
    except OSError:  # no /proc (macOS)
        pass
    with contextlib.suppress(OSError):
        out.append(ctypes.CDLL(MPI.__file__))  # dlsym searches its dependencies too
    with contextlib.suppress(OSError):
        out.append(ctypes.CDLL(None))
    return out


def _query_symbol(name: str) -> int | None:
    for lib in _libmpi_handles():
        fn = getattr(lib, name, None)
        if fn is not None:
            fn.restype = ctypes.c_int
            fn.argtypes = []
            return int(fn())
    return None


def _ompi_info_cuda() -> bool | None:
    try:
        out = subprocess.run(["ompi_info", "--parsable", "--all"], capture_output=True,
                             text=True, timeout=20, check=False).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    for line in out.splitlines():
        if "mpi_built_with_cuda_support:value:" in line:
            return line.rstrip().endswith(":true")
    return None


@functools.lru_cache(maxsize=1)
def _detect() -> tuple[bool, str]:
    env = os.environ.get("PYA2A_CUDA_AWARE", "").strip().lower()
    if env in ("1", "true", "yes", "on"):
        return True, "PYA2A_CUDA_AWARE=1"
    if env in ("0", "false", "no", "off"):
        return False, "PYA2A_CUDA_AWARE=0"
    hip = False
    with contextlib.suppress(Exception):
        hip = bool(_cupy().cuda.runtime.is_hip)
    sym = "MPIX_Query_rocm_support" if hip else "MPIX_Query_cuda_support"
    val = _query_symbol(sym)
    if val is not None:
        return bool(val), f"{sym}() = {val}"
    if "Open MPI" in MPI.Get_library_version():
        ok = _ompi_info_cuda()
        if ok is not None:
            return ok, f"ompi_info mpi_built_with_cuda_support:{str(ok).lower()}"
    return False, "no CUDA-awareness query in this MPI: assumed not CUDA-aware"


def cuda_aware() -> bool:
    """True if this process's MPI may be handed device pointers (see module doc)."""
    return _detect()[0]


def cuda_aware_reason() -> str:
    """How :func:`cuda_aware` decided, e.g. ``'MPIX_Query_cuda_support() = 0'``."""
    return _detect()[1]


def comm_cuda_aware(comm: MPI.Intracomm) -> bool:
    """:func:`cuda_aware` agreed over ``comm`` (all ranks must be), kept in its state."""
    st = state(comm)
    val = st.slot("cuda_aware")
    if val is None:
        flag = np.array([int(cuda_aware())], dtype=np.int64)
        comm.Allreduce(MPI.IN_PLACE, flag, op=MPI.MIN)
        val = st.set_slot("cuda_aware", bool(flag[0]))
    return bool(val)


# ---------------------------------------------------------------------------------------
# transports and algorithms
# ---------------------------------------------------------------------------------------
def transport(comm: MPI.Intracomm, device: int) -> DeviceTransport:
    """The device transport for an exchange on ``comm`` with buffers on ``device``."""
    be = backend()
    if comm_cuda_aware(comm):
        return AwareTransport(comm, int(device), be)
    return StagedTransport(comm, int(device), be)


# ---------------------------------------------------------------------------------------
# arrays for the array-level API
# ---------------------------------------------------------------------------------------


def _as_cupy(obj: object):
    cp = _cupy()
    if hasattr(obj, "__dlpack__"):
        with contextlib.suppress(Exception):
            return cp.from_dlpack(obj)
    return cp.asarray(obj)


def empty_rows(like: object, nrows: int):
    """A new array like ``like`` (type, device, dtype) of shape (nrows, *like.shape[1:]).

    torch tensors give torch tensors, CuPy arrays CuPy arrays; other device arrays (numba,
    JAX, ...) give CuPy arrays.
    """
    hook = getattr(backend(), "empty_rows", None)
    if hook is not None:
        out = hook(like, nrows)
        if out is not None:
            return out
    fam = array_family(like)
    shape = (int(nrows), *tuple(like.shape)[1:])
    if fam == "torch":
        import torch

        return torch.empty(shape, dtype=like.dtype, device=like.device)
    cp = _cupy()
    arr = like if fam == "cupy" else _as_cupy(like)
    with cp.cuda.Device(arr.device.id):
        return cp.empty(shape, dtype=arr.dtype)


def byte_view(arr: object):
    """A flat uint8 view of ``arr`` on its device (a contiguous copy if it is strided)."""
    hook = getattr(backend(), "byte_view", None)
    if hook is not None:
        out = hook(arr)
        if out is not None:
            return out
    fam = array_family(arr)
    if fam == "torch":
        import torch

        t = arr if arr.is_contiguous() else arr.contiguous()
        return t.reshape(-1).view(torch.uint8)
    cp = _cupy()
    a = arr if fam == "cupy" else _as_cupy(arr)
    with cp.cuda.Device(a.device.id):
        a = cp.ascontiguousarray(a)
        return a.reshape(-1).view(cp.uint8)


def info() -> dict:
    """Facts for ``python -m pya2a info``: CUDA-awareness and how it was decided, GPUs."""
    out: dict = {"cuda_aware": cuda_aware(), "cuda_aware_reason": cuda_aware_reason(),
                 "mpi_library": MPI.Get_library_version().splitlines()[0].strip(),
                 "staging_chunk_bytes": None}
    from .staging import default_chunk

    out["staging_chunk_bytes"] = default_chunk()
    try:
        cp = _cupy()
        out["cupy"] = cp.__version__
        out["devices"] = int(cp.cuda.runtime.getDeviceCount())
        out["hip"] = bool(cp.cuda.runtime.is_hip)
    except Exception as exc:  # no CuPy / no driver
        out["cupy"] = None
        out["devices"] = 0
        out["gpu_error"] = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return out
