# cython: language_level=3, boundscheck=False, wraparound=False, initializedcheck=False
"""The first stage of the one message parser: an mpi4py message read into a :class:`Msg`.

:func:`read` follows mpi4py 4's ``message_simple`` (Alltoall) and ``message_vector``
(Alltoallv) rule for rule: which list / tuple items are the buffer, the counts, the
displacements and the datatype; which objects are integers (``__index__`` and not a
sequence); how counts are inferred from the buffer and displacements from the counts; and
the exception type of each refusal. Counts and displacements come out expanded, as one
``bytes`` of ``2p`` int64 (counts, then displacements, in datatype elements): that record
together with the buffer's address, size, writability and the datatype is everything the
rest of the parse depends on, so it is also the one-shot call's signature (:func:`read_pair`).

Host buffers with the buffer protocol are read here in C; anything else (DLPack / CUDA array
interface producers, device memory) goes through the ``other`` hook of
:mod:`pya2a.core.spec`.
"""

from cpython.buffer cimport (PyBUF_ANY_CONTIGUOUS, PyBUF_FORMAT, PyBUF_RECORDS_RO,
                             PyBuffer_IsContiguous, PyBuffer_Release, PyObject_CheckBuffer,
                             PyObject_GetBuffer)
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize
from cpython.ref cimport PyObject
from libc.stdint cimport int64_t
from libc.string cimport memcpy, memset, strcmp

import operator

import numpy as np
from mpi4py import MPI

cimport numpy as cnp

cnp.import_array()

cdef extern from "Python.h":
    PyObject *PySequence_Fast_GET_ITEM(object, Py_ssize_t)
    int PyLong_CheckExact(object)
    int PyIndex_Check(object)
    int PySequence_Check(object)
    Py_ssize_t PySequence_Size(object) except -1
    object PyNumber_Index(object)
    long long PyLong_AsLongLong(object) except? -1
    unsigned long long PyLong_AsUnsignedLongLongMask(object) except? -1

__all__ = ["Msg", "read", "read_pair", "acquire", "int64_vector", "is_integral", "set_hooks",
           "add_cacheable", "format_type", "address", "check_committed", "wside"]

cdef int64_t _INT64_MAX = 0x7FFFFFFFFFFFFFFF
cdef object _TYPEDICT = MPI._typedict
cdef object _DATATYPE = MPI.Datatype
cdef object _BOTTOM = MPI.BOTTOM
cdef object _BYTE = MPI.BYTE
cdef bint _LITTLE = np.little_endian
cdef dict _FORMATS = {}   # buffer format string -> MPI datatype (or the KeyError to raise)
cdef dict _EXTENTS = {}   # handle of a cacheable datatype -> extent
cdef set _CACHEABLE = set()  # handles of datatypes that are never freed (predefined, ours)
cdef object _other = None  # spec's reader of non-buffer-protocol objects
cdef object _fallback_type = None  # spec's type for a format MPI names but cannot use
cdef object _described = None  # spec's (address, bytes, read-only, device) of a known array


def set_hooks(other, fallback_type, cacheable_handles, described=None):
    """Install spec.py's reader of other buffers, the handles of long-lived datatypes and
    its look-up of device arrays described before (:func:`wside`)."""
    global _other, _fallback_type, _described
    _other = other
    _fallback_type = fallback_type
    _described = described
    _CACHEABLE.update(cacheable_handles)


def add_cacheable(handle):
    """Mark a datatype handle as never freed (its signature may be cached)."""
    _CACHEABLE.add(handle)


cdef class Msg:
    """One message after the first stage of parsing.

    Attributes:
        obj: the buffer object as given (None and ``MPI.BOTTOM`` included).
        addr, nbytes, readonly: the buffer's memory (0, 0 for None / BOTTOM).
        device: CUDA/HIP ordinal, None for host memory.
        keepalive: what keeps a non-buffer-protocol object's memory readable (or None).
        datatype: the MPI datatype of the elements.
        extent: the datatype's extent.
        layout: ``bytes`` of 2p int64: counts, then displacements (elements).
        cacheable: the record fixes the meaning (host memory, long-lived datatype).
        bottom: the buffer is None or ``MPI.BOTTOM`` (absolute addresses / no data).
    """

    cdef public object obj, keepalive, device, datatype, layout, itemsize, handle
    cdef public Py_ssize_t addr, nbytes, extent
    cdef public bint readonly, cacheable, bottom

    def key(self):
        """The signature of this message, or None where it cannot be cached."""
        if not self.cacheable:
            return None
        return (self.addr, self.nbytes, self.readonly, self.device, self.handle,
                self.layout)


cpdef bint is_integral(object ob):
    """mpi4py's test for "one integer" (``__index__`` and not a sequence with a length)."""
    if not PyIndex_Check(ob):
        return False
    if not PySequence_Check(ob):
        return True
    try:
        PySequence_Size(ob)
    except Exception:
        pass
    else:
        return False
    try:
        PyNumber_Index(ob)
    except Exception:
        return False
    return True


cdef int64_t _one_int(object ob, str call, str what, str name) except? -1:
    """One integer through ``__index__`` (TypeError naming the item otherwise)."""
    try:
        return PyLong_AsLongLong(PyNumber_Index(ob))
    except TypeError:
        raise TypeError(f"{call}: {what} {name} must be an integer, "
                        f"not {type(ob).__name__}") from None


cdef inline bint _is_datatype(object ob):
    return isinstance(ob, (_DATATYPE, str))


cdef int _fill_seq(object ob, int64_t *out, Py_ssize_t p, str call, str who) except -1:
    """mpi4py's ``chkarray``: len(ob) items, each through ``__index__``; then the length."""
    cdef Py_ssize_t n, i
    cdef cnp.ndarray a
    if type(ob) is cnp.ndarray:
        a = <cnp.ndarray> ob
        if cnp.PyArray_NDIM(a) == 1 and a.dtype.kind in "iu":
            n = cnp.PyArray_DIM(a, 0)
            if n != p:
                raise ValueError(f"{call}: {who} has {n} entries, expected {p}")
            if cnp.PyArray_TYPE(a) != cnp.NPY_INT64 or not cnp.PyArray_IS_C_CONTIGUOUS(a):
                a = np.ascontiguousarray(a, dtype=np.int64)
            if n:
                memcpy(out, cnp.PyArray_DATA(a), n * 8)
            return 0
    cdef object item
    if type(ob) is list or type(ob) is tuple:  # the usual form: exact ints, read directly
        n = len(ob)
        if n == p:
            for i in range(n):
                item = <object> PySequence_Fast_GET_ITEM(ob, i)
                if not PyLong_CheckExact(item):
                    break  # anything else through __index__, as below
                out[i] = PyLong_AsLongLong(item)
            else:
                return 0
    if isinstance(ob, (str, bytes)) and not PySequence_Check(ob):
        raise TypeError(f"{call}: {who} must be a sequence of integers")
    try:
        n = len(ob)
    except TypeError:
        raise TypeError(f"{call}: {who} must be a sequence of integers, "
                        f"not {type(ob).__name__}") from None
    cdef list vals = [None] * n
    for i in range(n):
        try:
            vals[i] = PyNumber_Index(ob[i])
        except TypeError:
            raise TypeError(f"{call}: {who} must be integers, "
                            f"got {type(ob[i]).__name__}") from None
    if n != p:
        raise ValueError(f"{call}: {who} has {n} entries, expected {p}")
    for i in range(n):
        out[i] = PyLong_AsLongLong(vals[i])
    return 0


def int64_vector(ob, Py_ssize_t p, str call="pya2a", str who="counts"):
    """``ob`` read as mpi4py reads a counts or displacements sequence: a new int64[p]."""
    out = np.empty(p, dtype=np.int64)
    if p:
        _fill_seq(ob, <int64_t *> cnp.PyArray_DATA(out), p, call, who)
    else:
        _fill_seq(ob, NULL, 0, call, who)
    return out


cdef object _format_type(str call, str what, const char *fmt, Py_ssize_t itemsize):
    """mpi4py's ``getdatatype``: the buffer's format to a datatype (KeyError if none)."""
    cdef bytes raw = fmt
    hit = _FORMATS.get(raw)
    if hit is None:
        s = raw.decode("ascii", "replace")
        if s and s[0] in "@=<>!":
            if (s[0] in ">!" and _LITTLE) or (s[0] == "<" and not _LITTLE):
                raise BufferError(f"{call}: {what}: format string {s!r} with non-native "
                                  f"byte order")
            s = s[1:]
        dt = _TYPEDICT.get(s) if s != "B" else _BYTE
        if dt is None:
            hit = KeyError(f"{call}: {what}: cannot map buffer format {s!r} to an MPI "
                           f"datatype; pass the datatype, e.g. [buf, MPI.BYTE]")
        else:
            try:
                dt.Get_size()
                hit = dt
            except MPI.Exception:  # a type this MPI only names (float16 in Open MPI 4)
                hit = _fallback_type(itemsize) if itemsize > 0 else _BYTE
        _FORMATS[raw] = hit
    if isinstance(hit, KeyError):
        raise KeyError(hit.args[0])
    return hit


def format_type(str call, str what, str fmt, Py_ssize_t itemsize=0):
    """A buffer format (``"d"``, ``"<f4"``, ``"B"``, ...) to its MPI datatype, as mpi4py
    maps it: BufferError for a non-native byte order, KeyError where MPI has no type."""
    return _format_type(call, what, (fmt or "B").encode("ascii", "replace"), itemsize)


_NOTHING, _PACKED = bytearray(0), bytearray(8)


def check_committed(str call, str what, object dt):
    """ValueError naming the datatype if a derived ``dt`` was never committed (local; MPI
    would fail inside the collective, on this rank only)."""
    if dt.handle in _CACHEABLE or dt.is_predefined:
        return
    try:
        dt.Pack_size(1, MPI.COMM_SELF)  # MPICH refuses an uncommitted type here
        if dt.Get_size():  # Open MPI here: packing nothing (mpi4py divides by the size)
            dt.Pack(_NOTHING, _PACKED, 0, MPI.COMM_SELF)
    except MPI.Exception:
        raise ValueError(f"{call}: {what} datatype is a derived datatype that was not "
                         f"committed; call its Commit() first") from None


cdef bint _pointer_format(const char *fmt):
    """True if a buffer-protocol format holds pointers (``O`` objects, ``P`` void *); the
    field names of struct formats (between colons) are skipped."""
    cdef bint inside = False
    cdef Py_ssize_t i = 0
    while fmt[i] != 0:
        if fmt[i] == 58:  # ':'
            inside = not inside
        elif not inside and (fmt[i] == 79 or fmt[i] == 80):  # 'O', 'P'
            return True
        i += 1
    return False


cdef object _explicit_type(str call, str what, object o_type):
    """mpi4py's ``asdatatype``: a Datatype, or a key of ``MPI._typedict`` (KeyError)."""
    if isinstance(o_type, _DATATYPE):
        if o_type == MPI.DATATYPE_NULL:
            raise ValueError(f"{call}: {what} datatype is MPI.DATATYPE_NULL")
        check_committed(call, what, o_type)
        return o_type
    try:
        return _TYPEDICT[o_type]
    except KeyError:
        raise KeyError(f"{call}: {what}: cannot map {o_type!r} to an MPI datatype") from None


cdef Py_ssize_t _extent_of(object dt) except? -1:
    h = dt.handle
    e = _EXTENTS.get(h)
    if e is not None:
        return e
    cdef Py_ssize_t ext = dt.Get_extent()[1]
    if h in _CACHEABLE:
        _EXTENTS[h] = ext
    return ext


cdef dict _HOST_TYPES = {}
# buffer format -> (datatype, handle, extent) where the datatype is long-lived: a repeated
# host message reads its type with one lookup
cdef dict _FMT_INFO = {}


cdef inline bint _host_buffer(object obj):
    """``obj`` is read through the buffer protocol: it has one and is not a device array
    that also exports it (CuPy arrays do, and raise when it is used without managed or
    system memory); those go to the device reader with the other device arrays. The
    answer is kept per type."""
    if not PyObject_CheckBuffer(obj):
        return False
    t = type(obj)
    r = _HOST_TYPES.get(t)
    if r is None:
        r = _HOST_TYPES[t] = not hasattr(t, "__cuda_array_interface__")
    return r


cdef int _host(Msg m, object obj, bint readonly, str call, str what,
               bint want_type=True) except -1:
    """Address, size, format of a buffer-protocol object, with mpi4py's checks."""
    cdef Py_buffer view
    PyObject_GetBuffer(obj, &view, PyBUF_RECORDS_RO)
    try:
        if view.format != NULL and _pointer_format(view.format):
            raise TypeError(f"{call}: {what} holds Python objects or pointers (format "
                            f"{(<bytes> view.format).decode(errors='replace')!r}); they "
                            f"cannot travel between processes")
        if not PyBuffer_IsContiguous(&view, b'A'):
            raise BufferError(f"{call}: {what} buffer is not contiguous")
        if not readonly and view.readonly:
            raise BufferError(f"{call}: {what} buffer is not writable")
        m.addr = <Py_ssize_t> view.buf
        m.nbytes = view.len
        m.readonly = view.readonly
        m.itemsize = view.itemsize
        if not want_type:  # an explicit datatype: the format is not read (as in mpi4py)
            pass
        elif view.format != NULL:
            raw = <bytes> view.format
            info = _FMT_INFO.get(raw)
            if info is not None:
                m.datatype, m.handle, m.extent = <tuple> info
            else:
                m.datatype = dt = _format_type(call, what, view.format, view.itemsize)
                h = dt.handle
                if h in _CACHEABLE:
                    _FMT_INFO[raw] = (dt, h, _extent_of(dt))
        else:
            m.datatype = _BYTE
    finally:
        PyBuffer_Release(&view)
    return 0


def address(obj):
    """(address, size) of a buffer-protocol object's memory, or None (a cheap lookup key;
    nothing is checked)."""
    cdef Py_buffer view
    if not PyObject_CheckBuffer(obj):
        return None
    try:
        PyObject_GetBuffer(obj, &view, PyBUF_RECORDS_RO)
    except Exception:
        return None
    out = (<Py_ssize_t> view.buf, view.len)
    PyBuffer_Release(&view)
    return out


def acquire(obj, bint readonly, str call="pya2a", str what="buffer", bint want_type=False):
    """The first stage for a bare buffer: a Msg with no counts (``layout`` None); its
    datatype (from the buffer's format) only with ``want_type``."""
    cdef Msg m = Msg.__new__(Msg)
    m.obj = obj
    if obj is None or obj is _BOTTOM:
        raise TypeError(f"{call}: {what} buffer is {obj!r}; a real buffer is needed here")
    if _host_buffer(obj):
        _host(m, obj, readonly, call, what, want_type)
        m.cacheable = True
    else:
        _other(m, obj, readonly, call, what, want_type)
    return m


def read(object msg, Py_ssize_t p, bint vector, bint readonly, str call="Alltoallv",
         str what="send message", str name="send"):
    """Read one Alltoall (``vector`` False) or Alltoallv message for ``p`` peers."""
    cdef object o_buf = None, o_counts = None, o_displs = None, o_type = None
    cdef Py_ssize_t n
    if _host_buffer(msg):
        o_buf = msg
    elif type(msg) is list or type(msg) is tuple or isinstance(msg, (list, tuple)):
        n = len(msg)
        if n == 2:
            o_buf, o_counts = msg
            if _is_datatype(o_counts):
                o_counts, o_type = None, o_counts
            elif isinstance(o_counts, tuple) or (not vector and isinstance(o_counts, list)):
                o_counts, o_displs = o_counts
        elif n == 3:
            o_buf, o_counts, o_type = msg
            if isinstance(o_counts, tuple) or (not vector and isinstance(o_counts, list)):
                o_counts, o_displs = o_counts
        elif n == 4:
            o_buf, o_counts, o_displs, o_type = msg
        else:
            raise ValueError(f"{call}: {what}: expecting 2 to 4 items, got {n}")
    elif hasattr(msg, "__dlpack__") or hasattr(msg, "__cuda_array_interface__"):
        o_buf = msg
    else:
        raise TypeError(f"{call}: {what}: expecting a buffer (buffer protocol, DLPack or "
                        f"__cuda_array_interface__) or a list/tuple, "
                        f"not {type(msg).__name__}")
    cdef Msg m = Msg.__new__(Msg)
    m.obj = o_buf
    if o_buf is None or o_buf is _BOTTOM:
        m.bottom = True
        m.datatype = _explicit_type(call, what, o_type)  # None: KeyError, as mpi4py
        m.itemsize = m.datatype.Get_size()
    else:
        if _host_buffer(o_buf):
            _host(m, o_buf, readonly, call, what, o_type is None)
            m.cacheable = True
        else:
            _other(m, o_buf, readonly, call, what, o_type is None)
        if o_type is not None:
            m.datatype = _explicit_type(call, what, o_type)
    cdef Py_ssize_t extent
    if m.handle is not None and o_type is None:  # a long-lived type read from the format
        extent = m.extent
    else:
        m.handle = m.datatype.handle
        if m.cacheable and m.handle not in _CACHEABLE:
            m.cacheable = False
        extent = _extent_of(m.datatype)
        m.extent = extent
    layout = PyBytes_FromStringAndSize(NULL, 16 * p)
    cdef int64_t *c = <int64_t *> PyBytes_AS_STRING(layout)
    cdef int64_t *d = c + p
    cdef Py_ssize_t i
    cdef int64_t v, csize, displ, length, count
    if vector:
        if o_counts is None:
            csize = 0
            if m.nbytes > 0:
                if extent <= 0:
                    raise ValueError(f"{call}: {what}: cannot infer counts, datatype extent "
                                     f"{extent}")
                if m.nbytes % extent:
                    raise ValueError(f"{call}: {what}: cannot infer counts, buffer length "
                                     f"{m.nbytes} is not a multiple of datatype extent "
                                     f"{extent}")
                csize = m.nbytes // extent
            for i in range(p):
                c[i] = csize // p + (1 if csize % p > i else 0)
        elif is_integral(o_counts):
            v = PyLong_AsLongLong(PyNumber_Index(o_counts))
            for i in range(p):
                c[i] = v
        else:
            _fill_seq(o_counts, c, p, call, name + "counts")
        if o_displs is None:
            v = 0
            for i in range(p):
                d[i] = v
                v += c[i]
        elif is_integral(o_displs):
            v = PyLong_AsLongLong(PyNumber_Index(o_displs))
            if p > 1 and (v > _INT64_MAX // (p - 1) or v < -(_INT64_MAX // (p - 1))):
                raise ValueError(f"{call}: {what}: displacement stride {v} puts blocks "
                                 f"beyond 2^63 elements, outside the buffer")
            for i in range(p):
                d[i] = v * i
        else:
            _fill_seq(o_displs, d, p, call, name + "displs")
    else:
        displ = 0
        length = m.nbytes
        if o_displs is not None:
            displ = _one_int(o_displs, call, what, "displacement")
            if displ < 0:
                raise ValueError(f"{call}: {what}: negative displacement {displ}")
            if displ > 0:
                if extent <= 0:
                    raise ValueError(f"{call}: {what}: cannot handle displacement, "
                                     f"datatype extent {extent}")
                if displ > length // extent:
                    raise ValueError(f"{call}: {what}: displacement {displ} out of bounds, "
                                     f"number of datatype entries {length // extent}")
                length -= displ * extent
        if o_counts is not None:
            count = _one_int(o_counts, call, what, "count")
            if count < 0:
                raise ValueError(f"{call}: {what}: negative count {count}")
            if count > 0 and o_buf is None:
                raise ValueError(f"{call}: {what}: buffer is None but count is {count}")
        else:
            count = 0
            if length > 0:
                if extent <= 0:
                    raise ValueError(f"{call}: {what}: cannot infer count, datatype extent "
                                     f"{extent}")
                if length % extent:
                    raise ValueError(f"{call}: {what}: cannot infer count, buffer length "
                                     f"{length} is not a multiple of datatype extent "
                                     f"{extent}")
                if (length // extent) % p:
                    raise ValueError(f"{call}: {what}: cannot infer count, number of "
                                     f"entries {length // extent} is not a multiple of the "
                                     f"number of blocks {p}")
                count = length // extent // p
        if count > 0 and p > 1 and (_INT64_MAX - displ) // count < p - 1:
            raise ValueError(f"{call}: {what}: {p} blocks of {count} elements from element "
                             f"{displ} lie beyond 2^63 elements, outside the buffer")
        for i in range(p):
            c[i] = count
            d[i] = displ + i * count
    m.layout = layout
    return m


def read_pair(str call, bint vector, object sendmsg, object recvmsg, bint inplace,
              Py_ssize_t p):
    """Both messages of a call: (send Msg, recv Msg, signature part or None).

    The signature part fixes everything the rest of the parse depends on; None where a
    message cannot be cached (derived datatype, BOTTOM / None buffer, unkeyed producer).
    """
    cdef Msg r = read(recvmsg, p, vector, False, call, "receive message", "recv")
    cdef Msg s = r if inplace else read(sendmsg, p, vector, True, call, "send message",
                                        "send")
    if not r.cacheable or not s.cacheable:
        return s, r, None
    # one bytes: cheap to hash and compare (a cache key on the one-shot hot path)
    cdef Py_ssize_t lay = 16 * p
    part = PyBytes_FromStringAndSize(NULL, 2 * (5 * 8 + lay))
    cdef char *o = PyBytes_AS_STRING(part)
    _record(o, r, lay)
    if inplace:
        memset(o + 5 * 8 + lay, 0xFF, 5 * 8 + lay)  # no send message
    else:
        _record(o + 5 * 8 + lay, s, lay)
    return s, r, part


cdef void _record(char *o, Msg m, Py_ssize_t lay) except *:
    """A message's signature record: address, size, writability, device, datatype, layout."""
    cdef int64_t *w = <int64_t *> o
    w[0] = m.addr
    w[1] = m.nbytes
    w[2] = m.readonly
    w[3] = -1 if m.device is None else PyLong_AsLongLong(m.device)
    w[4] = <int64_t> PyLong_AsUnsignedLongLongMask(m.handle)
    memcpy(o + 5 * 8, PyBytes_AS_STRING(m.layout), lay)


# ---- Alltoallw call signatures ------------------------------------------------------------
cdef object _NOINTS = object()  # counts or displacements that give no signature


cdef object _wints(object x):
    """Counts or displacements as a hashable key: a tuple of exact ints, (type code, bytes)
    of a 1-d integer array, None for None; :data:`_NOINTS` for anything else."""
    if x is None:
        return None
    t = type(x)
    if t is list or t is tuple:
        for v in x:
            if not PyLong_CheckExact(v):
                return _NOINTS
        return tuple(x)
    if t is np.ndarray and (<cnp.ndarray> x).ndim == 1 and x.dtype.kind in "iu":
        return (x.dtype.char, x.tobytes())
    return _NOINTS


def wside(object msg, bint readonly):
    """``(signature, address, keepalive)`` of one ``Alltoallw`` message, or None (the call
    takes the full path): a NumPy array, ``bytes`` or ``bytearray`` (one dense run), or a
    device array the parser has described before (``set_hooks``' ``described``); counts and
    displacements of exact ints or a 1-d integer array; a list or tuple of
    ``MPI.Datatype``. The signature is (form, bytes, read-only, counts, displacements,
    datatype handles, device)."""
    cdef Py_buffer view
    t = type(msg)
    if t is not list and t is not tuple:
        return None
    n = len(msg)
    if n == 3:
        cd = msg[1]
        if (type(cd) is not tuple and type(cd) is not list) or len(cd) != 2:
            return None
        buf, counts, displs, types = msg[0], cd[0], cd[1], msg[2]
    elif n == 4:
        buf, counts, displs, types = msg
    elif n == 2:
        buf, counts, displs, types = msg[0], None, None, msg[1]
    else:
        return None
    ck = _wints(counts)
    dk = _wints(displs)
    if ck is _NOINTS or dk is _NOINTS or (ck is None) != (dk is None):
        return None
    tt = type(types)
    if tt is not tuple and tt is not list:
        return None
    handles = []
    for x in types:
        if type(x) is not _DATATYPE:
            return None
        handles.append(x.handle)
    bt = type(buf)
    if bt is not np.ndarray and bt is not bytearray and bt is not bytes:
        dev = _described(buf, readonly) if _described is not None else None
        if dev is None:
            return None
        return (n, dev[1], dev[2], ck, dk, tuple(handles), dev[3]), dev[0], buf
    try:
        PyObject_GetBuffer(buf, &view, PyBUF_ANY_CONTIGUOUS)
    except Exception:  # not one run of memory (mpi4py refuses it too): the full path says so
        return None
    try:
        sig = (n, view.len, bool(view.readonly), ck, dk, tuple(handles), None)
        return sig, <Py_ssize_t> view.buf, buf
    finally:
        PyBuffer_Release(&view)
