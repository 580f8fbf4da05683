# cython: language_level=3, boundscheck=False, wraparound=False, initializedcheck=False
"""Exchange programs: a plan's whole exchange as a table of operations run in one C loop.

A :class:`Program` is everything about an exchange that does not depend on where the two
user buffers are: per operation, which buffer (0 = send, 1 = receive, 2.. = scratch the
program owns) and which byte offset, length, peer and tag. Running it on a buffer pair is
one loop without the GIL over memcpys, ``MPI_Isend`` / ``MPI_Irecv`` / ``MPI_Waitall`` and
the library's ``MPI_Alltoall(v)`` on the communicator's handle, with each operation's
address taken as the buffer's base plus the stored offset: nothing is bound, so any number
of distinct buffers costs the same as one. :meth:`Program.bind` makes a :class:`Binding`
for a buffer pair seen repeatedly: the same loop with persistent requests
(``MPI_Send_init`` / ``MPI_Recv_init``, created here in one loop, started per phase).

Every offset is checked against its buffer when the program is made (scratch) or run
(the user buffers' sizes, against the furthest byte the program touches in each), so a
bad table raises instead of writing outside a buffer. Message lengths are C ints; a table
with a longer message is refused (the caller then runs the algorithm's own code).

Built against the ``mpi.h`` of the library mpi4py uses; :func:`library_version` lets the
importer check at run time that it is the same library.
"""

from cpython.buffer cimport (PyBUF_C_CONTIGUOUS, PyBUF_FORMAT, PyBUF_WRITABLE,
                             PyBuffer_Release, PyObject_CheckBuffer, PyObject_GetBuffer)
from libc.stdint cimport int64_t, intptr_t, uintptr_t
from libc.stdlib cimport free, malloc
from libc.string cimport memcpy
from mpi4py cimport libmpi as mpi

import numpy as np
from mpi4py import MPI

cimport numpy as cnp

cnp.import_array()

__all__ = ["Program", "Binding", "Persistent", "ProbedRound", "library_version", "pair_key", "find_pair", "COPY",
           "RECV",
           "SEND", "WAIT",
           "ALLTOALL", "ALLTOALLV", "INT_MAX"]

cdef enum:
    _COPY = 0       # src buffer, src offset, dst buffer, dst offset, bytes
    _RECV = 1       # buffer, offset, bytes, source, tag
    _SEND = 2       # buffer, offset, bytes, destination, tag
    _WAIT = 3       # wait for every request posted since the last wait
    _ALLTOALL = 4   # send buffer, offset, receive buffer, offset, bytes per peer
    _ALLTOALLV = 5  # send buffer (-1: MPI_IN_PLACE), receive buffer; tables in the program

COPY, RECV, SEND, WAIT, ALLTOALL, ALLTOALLV = _COPY, _RECV, _SEND, _WAIT, _ALLTOALL, _ALLTOALLV
INT_MAX = 2147483647


def library_version():
    """``MPI_Get_library_version`` of the library this module was linked against."""
    cdef char buf[8192]
    cdef int n = 0
    mpi.MPI_Get_library_version(buf, &n)
    return buf[:n].decode("utf-8", "replace")


cdef inline object _span(object obj, bint writable, Py_ssize_t *addr, Py_ssize_t *n):
    """The buffer's format, with its address and size in ``addr`` / ``n``; None when it is
    not a C-contiguous buffer (writable if asked). A NumPy array is read from its fields
    (its dtype stands for the format); anything else through the buffer protocol."""
    cdef Py_buffer view
    cdef cnp.ndarray a
    if type(obj) is cnp.ndarray:
        a = <cnp.ndarray> obj
        if not cnp.PyArray_IS_C_CONTIGUOUS(a) or (writable and not cnp.PyArray_ISWRITEABLE(a)):
            return None
        addr[0] = <Py_ssize_t> cnp.PyArray_DATA(a)
        n[0] = cnp.PyArray_NBYTES(a)
        return <object> cnp.PyArray_DESCR(a)
    if not PyObject_CheckBuffer(obj):
        return None
    cdef int flags = PyBUF_C_CONTIGUOUS | PyBUF_FORMAT
    if writable:
        flags |= PyBUF_WRITABLE
    try:
        PyObject_GetBuffer(obj, &view, flags)
    except Exception:
        return None
    addr[0] = <Py_ssize_t> view.buf
    n[0] = view.len
    fmt = (<bytes> view.format).decode("ascii", "replace") if view.format != NULL else "B"
    PyBuffer_Release(&view)
    return fmt


cdef object _pair(object sendbuf, object recvbuf, bint inplace, bint formats):
    """:func:`pair_key`'s answer (``formats``) or its key alone; None when either buffer is
    not C-contiguous (the receive one writable)."""
    cdef Py_ssize_t ra = 0, rn = 0, sa = 0, sn = 0
    rf = _span(recvbuf, True, &ra, &rn)
    if rf is None:
        return None
    if inplace:
        return ((None, ra, rn), None, rf) if formats else (None, ra, rn)
    sf = _span(sendbuf, False, &sa, &sn)
    if sf is None:
        return None
    return ((sa, sn, ra, rn), sf, rf) if formats else (sa, sn, ra, rn)


def pair_key(sendbuf, recvbuf, bint inplace):
    """``(key, send format, receive format)`` of a buffer pair for a plan's address-keyed
    cache: key ``(send address, send bytes, receive address, receive bytes)``, or
    ``(None, receive address, receive bytes)`` in place (send format None); None when
    either is not a C-contiguous buffer (the receive one writable)."""
    return _pair(sendbuf, recvbuf, inplace, True)


def find_pair(by_addr, sendbuf, recvbuf, bint inplace):
    """The entry that ``by_addr`` (an OrderedDict keyed as :func:`pair_key` keys) holds for
    this buffer pair, made the most recent; None when it holds none (or the buffers are not
    C-contiguous, the receive one writable). A plan's run on a pair it has bound before."""
    key = _pair(sendbuf, recvbuf, inplace, False)
    if key is None:
        return None
    entry = by_addr.get(key)
    if entry is not None:
        by_addr.move_to_end(key)
    return entry


cdef int _raise(int ierr) except -1 with gil:
    raise MPI.Exception(ierr)


cdef inline int _init_request(int64_t kind, void *addr, int nbytes, int peer, int tag,
                              mpi.MPI_Comm comm, mpi.MPI_Request *req) noexcept nogil:
    """``MPI_Recv_init`` (kind RECV) or ``MPI_Send_init`` of ``nbytes`` bytes; MPI's code."""
    if kind == _RECV:
        return mpi.MPI_Recv_init(addr, nbytes, mpi.MPI_BYTE, peer, tag, comm, req)
    return mpi.MPI_Send_init(addr, nbytes, mpi.MPI_BYTE, peer, tag, comm, req)


cdef void _free_requests(mpi.MPI_Request *reqs, int n) noexcept nogil:
    """Release ``n`` persistent requests and their array (``reqs`` may be NULL)."""
    cdef int i
    if reqs == NULL:
        return
    for i in range(n):
        if reqs[i] != mpi.MPI_REQUEST_NULL:
            mpi.MPI_Request_free(&reqs[i])
    free(reqs)


cdef class Program:
    """An exchange as an operation table over (send, receive, scratch...) buffers.

    Args:
        comm: the mpi4py communicator the messages travel on (kept alive here).
        ops: (n, 6) int64 rows ``(op, a, b, c, d, e)``, see the module constants.
        scratch: buffers the program owns (numpy byte arrays), numbered 2, 3, ...
        vtables: for an ``ALLTOALLV`` row: ``(sendcounts, senddispls, recvcounts,
            recvdispls)`` int arrays (elements of the datatypes) and ``(sendtype,
            recvtype)`` mpi4py datatypes.
    """

    cdef int64_t[:, ::1] ops
    cdef Py_ssize_t nops
    cdef int nbuf
    cdef intptr_t *base
    cdef int64_t *size
    cdef mpi.MPI_Comm comm
    cdef int maxreq
    cdef mpi.MPI_Request *reqs
    cdef int *vint
    cdef mpi.MPI_Datatype stype, rtype
    cdef object keep
    cdef readonly int64_t send_need
    cdef readonly int64_t recv_need
    cdef readonly Py_ssize_t nrequests
    cdef readonly bint collective  # has MPI_Alltoall(v) rows

    def __cinit__(self):
        self.base = NULL
        self.size = NULL
        self.reqs = NULL
        self.vint = NULL

    def __init__(self, comm, ops, scratch=(), vtables=None):
        a = np.ascontiguousarray(np.asarray(ops, dtype=np.int64).reshape(-1, 6))
        self.ops = a
        self.nops = a.shape[0]
        scratch = [np.ascontiguousarray(s).view(np.uint8).reshape(-1) for s in scratch]
        self.nbuf = 2 + len(scratch)
        self.base = <intptr_t *> malloc(self.nbuf * sizeof(intptr_t))
        self.size = <int64_t *> malloc(self.nbuf * sizeof(int64_t))
        if self.base == NULL or self.size == NULL:
            raise MemoryError()
        self.base[0] = self.base[1] = 0
        self.size[0] = self.size[1] = 0
        for k, s in enumerate(scratch):
            self.base[2 + k] = <intptr_t> s.ctypes.data
            self.size[2 + k] = s.nbytes
        self.comm = <mpi.MPI_Comm> <uintptr_t> comm.handle
        self.keep = (comm, a, scratch, vtables)
        cdef int64_t need[2]
        need[0] = need[1] = 0
        cdef int n = 0, most = 0
        cdef Py_ssize_t i
        cdef int64_t op
        for i in range(self.nops):
            op = a[i, 0]
            if op == _COPY:
                self._span(a[i, 1], a[i, 2], a[i, 5], need)
                self._span(a[i, 3], a[i, 4], a[i, 5], need)
            elif op == _RECV or op == _SEND:
                if a[i, 3] > INT_MAX or a[i, 3] < 0 or a[i, 5] < 0 or a[i, 5] > 32767 or \
                        a[i, 4] < 0 or a[i, 4] >= comm.Get_size():
                    raise ValueError(f"Program: row {i}: bad length, peer or tag")
                self._span(a[i, 1], a[i, 2], a[i, 3], need)
                n += 1
                most = max(most, n)
            elif op == _WAIT:
                n = 0
            elif op == _ALLTOALL:
                p = comm.Get_size()
                self._span(a[i, 1], a[i, 2], a[i, 5] * p, need)
                self._span(a[i, 3], a[i, 4], a[i, 5] * p, need)
                if a[i, 5] > INT_MAX:
                    raise ValueError(f"Program: row {i}: slot longer than a C int")
            elif op == _ALLTOALLV:
                self._vtables(a[i, 1], a[i, 2], vtables, need)
            else:
                raise ValueError(f"Program: row {i}: unknown operation {op}")
        self.send_need, self.recv_need = need[0], need[1]
        self.maxreq = most
        self.nrequests = sum(1 for i in range(self.nops) if a[i, 0] in (_RECV, _SEND))
        self.collective = any(a[i, 0] in (_ALLTOALL, _ALLTOALLV) for i in range(self.nops))
        self.reqs = <mpi.MPI_Request *> malloc(max(most, 1) * sizeof(mpi.MPI_Request))
        if self.reqs == NULL:
            raise MemoryError()

    cdef int _span(self, int64_t buf, int64_t off, int64_t n, int64_t *need) except -1:
        """Record (user buffers) or check (scratch) that bytes [off, off + n) of buf exist."""
        if n < 0 or off < 0 or buf < 0 or buf >= self.nbuf or n > INT_MAX * 64:
            raise ValueError(f"Program: bad block (buffer {buf}, offset {off}, {n} bytes)")
        if n == 0:
            return 0
        if buf < 2:
            if off + n > need[buf]:
                need[buf] = off + n
        elif off + n > self.size[buf]:
            raise ValueError(f"Program: block [{off}, {off + n}) outside scratch {buf}")
        return 0

    cdef int _vtables(self, int64_t sbuf, int64_t rbuf, vtables, int64_t *need) except -1:
        counts, types = vtables
        p = len(counts[0])
        cdef int i, k
        self.vint = <int *> malloc(4 * max(p, 1) * sizeof(int))
        if self.vint == NULL:
            raise MemoryError()
        for k in range(4):
            for i in range(p):
                v = int(counts[k][i])
                if v < 0 or v > INT_MAX:
                    raise ValueError("Program: Alltoallv count or displacement beyond a C int")
                self.vint[k * p + i] = v
        self.stype = <mpi.MPI_Datatype> <uintptr_t> types[0].handle
        self.rtype = <mpi.MPI_Datatype> <uintptr_t> types[1].handle
        if sbuf not in (-1, 0) or rbuf != 1:
            raise ValueError("Program: Alltoallv runs on the user buffers")
        # the caller has checked the layouts against the buffers (spec.bind): extents of
        # derived types are not counted here
        return 0

    def __dealloc__(self):
        free(self.base)
        free(self.size)
        free(self.reqs)
        free(self.vint)

    cdef int _exec(self, intptr_t *base, mpi.MPI_Request *preqs) except -1 nogil:
        """One exchange; ``preqs``: persistent requests in row order, or NULL."""
        cdef Py_ssize_t i
        cdef int ierr = 0, n = 0, first = 0, p
        cdef int64_t op
        cdef int64_t[:, ::1] a = self.ops
        cdef mpi.MPI_Request *reqs = self.reqs
        cdef void *sptr
        for i in range(self.nops):
            op = a[i, 0]
            if op == _COPY:
                if a[i, 5]:
                    memcpy(<void *> (base[a[i, 3]] + a[i, 4]),
                           <const void *> (base[a[i, 1]] + a[i, 2]), <size_t> a[i, 5])
            elif op == _RECV:
                if preqs == NULL:
                    ierr = mpi.MPI_Irecv(<void *> (base[a[i, 1]] + a[i, 2]), <int> a[i, 3],
                                         mpi.MPI_BYTE, <int> a[i, 4], <int> a[i, 5],
                                         self.comm, &reqs[n])
                n += 1
            elif op == _SEND:
                if preqs == NULL:
                    ierr = mpi.MPI_Isend(<void *> (base[a[i, 1]] + a[i, 2]), <int> a[i, 3],
                                         mpi.MPI_BYTE, <int> a[i, 4], <int> a[i, 5],
                                         self.comm, &reqs[n])
                n += 1
            elif op == _WAIT:
                if preqs == NULL:
                    if n:
                        ierr = mpi.MPI_Waitall(n, reqs, mpi.MPI_STATUSES_IGNORE)
                    n = 0
                else:
                    if n > first:
                        ierr = mpi.MPI_Startall(n - first, preqs + first)
                        if ierr == 0:
                            ierr = mpi.MPI_Waitall(n - first, preqs + first,
                                                   mpi.MPI_STATUSES_IGNORE)
                    first = n
            elif op == _ALLTOALL:
                ierr = mpi.MPI_Alltoall(<void *> (base[a[i, 1]] + a[i, 2]), <int> a[i, 5],
                                        mpi.MPI_BYTE, <void *> (base[a[i, 3]] + a[i, 4]),
                                        <int> a[i, 5], mpi.MPI_BYTE, self.comm)
            else:  # _ALLTOALLV
                mpi.MPI_Comm_size(self.comm, &p)
                sptr = mpi.MPI_IN_PLACE if a[i, 1] < 0 else <void *> base[a[i, 1]]
                ierr = mpi.MPI_Alltoallv(sptr, self.vint, self.vint + p, self.stype,
                                         <void *> base[a[i, 2]], self.vint + 2 * p,
                                         self.vint + 3 * p, self.rtype, self.comm)
            if ierr:
                _raise(ierr)
        return 0

    cdef int _check(self, int64_t snb, int64_t rnb) except -1:
        if snb < self.send_need or rnb < self.recv_need:
            raise ValueError(f"Program: buffers of {snb} and {rnb} bytes, the exchange "
                             f"needs {self.send_need} and {self.recv_need}")
        return 0

    def run(self, intptr_t send, int64_t send_nbytes, intptr_t recv, int64_t recv_nbytes):
        """One exchange on the buffers at these addresses (non-persistent requests)."""
        self._check(send_nbytes, recv_nbytes)
        self.base[0] = send
        self.base[1] = recv
        with nogil:
            self._exec(self.base, NULL)

    def bind(self, intptr_t send, int64_t send_nbytes, intptr_t recv, int64_t recv_nbytes,
             bint now=True):
        """A :class:`Binding` of this program to two buffers.

        ``now``: make the persistent requests here; otherwise the binding's first run posts
        non-persistent requests and its second run makes them (a pair run once costs no
        request set-up).
        """
        self._check(send_nbytes, recv_nbytes)
        return Binding(self, send, recv, now)

    def quick(self, tuple key, sfmt, rfmt, formats, int64_t send_need, int64_t recv_need):
        """A lazy :class:`Binding` for a buffer pair read by :func:`pair_key`, or None
        unless both are at least ``*_need`` bytes (and what the program touches), of a
        format in ``formats``, and do not overlap."""
        cdef intptr_t ra, sa = 0
        cdef int64_t rn, sn = 0
        if len(key) == 3:  # in place
            ra, rn = key[1], key[2]
            if self.send_need:
                return None
        else:
            sa, sn, ra, rn = key
            if sn < send_need or sn < self.send_need or sfmt not in formats or (
                    sn and rn and sa < ra + rn and ra < sa + sn):
                return None
        if rn < recv_need or rn < self.recv_need or rfmt not in formats:
            return None
        return Binding(self, sa, ra, False)


cdef class Binding:
    """A :class:`Program` bound to two buffers: its messages as persistent requests.

    ``run()`` is the program's loop with ``MPI_Startall`` / ``MPI_Waitall`` per phase (the
    first run of a binding made with ``now=False`` posts non-persistent requests instead,
    the second makes the persistent ones); ``free()`` (local) releases the requests. The
    buffers must outlive the binding's use.
    """

    cdef Program prog
    cdef intptr_t *base
    cdef mpi.MPI_Request *reqs
    cdef int nreq
    cdef int state  # 0: not run yet (lazy), 1: run once without requests, 2: requests made
    cdef readonly bint persistent_collective

    @property
    def bound(self):
        """Itself: a plan's cache entry (``entry.bound.run()``)."""
        return self

    @property
    def scratch(self):
        """None: in-place copies are rows of the program (a plan's cache entry)."""
        return None

    def __cinit__(self):
        self.base = NULL
        self.reqs = NULL
        self.nreq = 0
        self.state = 0
        self.persistent_collective = False

    def __init__(self, Program prog, intptr_t send, intptr_t recv, bint now=True):
        self.prog = prog
        self.base = <intptr_t *> malloc(prog.nbuf * sizeof(intptr_t))
        if self.base == NULL:
            raise MemoryError()
        memcpy(self.base, prog.base, prog.nbuf * sizeof(intptr_t))
        self.base[0] = send
        self.base[1] = recv
        if now:
            self._requests()

    cdef int _requests(self) except -1:
        """Create the persistent requests (once)."""
        cdef Program prog = self.prog
        self.reqs = <mpi.MPI_Request *> malloc(max(prog.nrequests, 1) * sizeof(mpi.MPI_Request))
        if self.reqs == NULL:
            raise MemoryError()
        self.state = 2
        cdef Py_ssize_t i
        cdef int ierr = 0
        cdef int64_t[:, ::1] a = prog.ops
        cdef intptr_t *b = self.base
        with nogil:
            for i in range(prog.nops):
                if a[i, 0] != _RECV and a[i, 0] != _SEND:
                    continue
                ierr = _init_request(a[i, 0], <void *> (b[a[i, 1]] + a[i, 2]), <int> a[i, 3],
                                     <int> a[i, 4], <int> a[i, 5], prog.comm,
                                     &self.reqs[self.nreq])
                if ierr:
                    break
                self.nreq += 1
        if ierr:
            self.free()
            _raise(ierr)
        return 0

    def run(self):
        """One exchange on the bound buffers."""
        if self.state == 2:
            if self.reqs == NULL:
                raise ValueError("Binding.run: the binding was freed")
            with nogil:
                self.prog._exec(self.base, self.reqs)
        elif self.state == 1:
            self._requests()
            with nogil:
                self.prog._exec(self.base, self.reqs)
        else:
            if self.base == NULL:
                raise ValueError("Binding.run: the binding was freed")
            self.state = 1
            self.prog.base[0] = self.base[0]  # the program's loop, non-persistent
            self.prog.base[1] = self.base[1]
            with nogil:
                self.prog._exec(self.prog.base, NULL)

    def free(self):
        """Release the persistent requests (local). Idempotent; a freed binding cannot run."""
        _free_requests(self.reqs, self.nreq)
        self.reqs = NULL
        self.nreq = 0
        self.state = 2  # reqs NULL: run() raises


    def __dealloc__(self):
        # requests are freed by free() (MPI may be finalized by the time of collection)
        free(self.base)
        if self.reqs != NULL:
            free(self.reqs)


cdef extern from "<sched.h>" nogil:
    int sched_yield()


cdef int _mprobe(int src, int tag, mpi.MPI_Comm comm, mpi.MPI_Message *msg,
                 mpi.MPI_Status *status) noexcept nogil:
    """``MPI_Mprobe`` as ``MPI_Improbe`` until it matches, yielding the core between tries
    (a blocking ``MPI_Mprobe`` spins: with more ranks than cores, the rank it waits for
    then runs only when the spinning one's time slice ends, milliseconds later); MPI's
    code."""
    cdef int ierr, flag = 0
    while True:
        ierr = mpi.MPI_Improbe(src, tag, comm, &flag, msg, status)
        if ierr or flag:
            return ierr
        sched_yield()


cdef class ProbedRound:
    """One round of a dissemination confirmation (:class:`pya2a._stamp.Forward`): a
    persistent send of ``send_nbytes`` bytes to ``dst``, and the message from ``src``
    received by matched probe, so a message of another size is taken whole (into scratch,
    and reported) instead of truncated: Open MPI 4.1 can leave a later persistent receive
    unmatched after a truncated one. Byte messages on ``comm`` with tag ``tag``; the memory
    must outlive the object's use."""

    cdef mpi.MPI_Request send
    cdef mpi.MPI_Comm comm
    cdef int src, tag, nbytes
    cdef intptr_t addr
    cdef object keep

    def __cinit__(self):
        self.send = mpi.MPI_REQUEST_NULL

    def __init__(self, comm, intptr_t send_addr, int64_t send_nbytes, int dst,
                 intptr_t recv_addr, int64_t recv_nbytes, int src, int tag):
        p = comm.Get_size()
        if not (0 <= send_nbytes <= INT_MAX and 0 <= recv_nbytes <= INT_MAX and
                0 <= dst < p and 0 <= src < p):
            raise ValueError("ProbedRound: bad length or peer")
        self.comm = <mpi.MPI_Comm> <uintptr_t> comm.handle
        self.keep = comm
        self.src, self.tag, self.nbytes, self.addr = src, tag, <int> recv_nbytes, recv_addr
        cdef int ierr = _init_request(_SEND, <void *> send_addr, <int> send_nbytes, dst, tag,
                                      self.comm, &self.send)
        if ierr:
            _raise(ierr)

    def exchange(self):
        """Send, receive; False where the message received was not ``recv_nbytes`` long."""
        cdef int ierr, n = 0
        cdef bint ok = True
        cdef mpi.MPI_Message msg
        cdef mpi.MPI_Status status
        cdef void *other
        if self.send == mpi.MPI_REQUEST_NULL:
            raise ValueError("ProbedRound.exchange: freed")
        with nogil:
            ierr = mpi.MPI_Start(&self.send)
            if ierr == 0:
                ierr = _mprobe(self.src, self.tag, self.comm, &msg, &status)
            if ierr == 0:
                ierr = mpi.MPI_Get_count(&status, mpi.MPI_BYTE, &n)
            if ierr == 0:
                if n == self.nbytes:
                    ierr = mpi.MPI_Mrecv(<void *> self.addr, n, mpi.MPI_BYTE, &msg,
                                         mpi.MPI_STATUS_IGNORE)
                else:
                    ok = False
                    other = malloc(max(n, 1))
                    ierr = mpi.MPI_Mrecv(other, n, mpi.MPI_BYTE, &msg, mpi.MPI_STATUS_IGNORE)
                    free(other)
            if ierr == 0:
                ierr = mpi.MPI_Wait(&self.send, mpi.MPI_STATUS_IGNORE)
        if ierr:
            _raise(ierr)
        return ok

    def free(self):
        """Release the send request (local). Idempotent."""
        if self.send != mpi.MPI_REQUEST_NULL:
            mpi.MPI_Request_free(&self.send)


cdef class Persistent:
    """Persistent point-to-point requests started and completed together, in C.

    ``messages`` are ``(kind, address, nbytes, peer, tag, want)`` with kind :data:`RECV` or
    :data:`SEND` (byte messages on ``comm``; the memory must outlive the object's use);
    ``want`` >= 0 on a receive is the length it must bring (its ``nbytes`` may be more, so
    that no message is ever truncated). :meth:`exchange` starts them all and waits for them
    all; it returns False where a receive brought another length, or where MPI reported an
    error (every request then completed, and made anew: a persistent request that completed
    in error cannot be started again in every MPI). :meth:`free` (local) releases them.
    """

    cdef mpi.MPI_Request *reqs
    cdef mpi.MPI_Status *statuses
    cdef int n
    cdef mpi.MPI_Comm comm
    cdef int64_t[:, ::1] msgs  # (kind, address, nbytes, peer, tag, want) per request
    cdef object keep

    def __cinit__(self):
        self.reqs = NULL
        self.statuses = NULL
        self.n = 0

    def __init__(self, comm, list messages):
        self.comm = <mpi.MPI_Comm> <uintptr_t> comm.handle
        rows = np.zeros((len(messages), 6), dtype=np.int64)
        for i, m in enumerate(messages):
            k, addr, nbytes, peer, tag, want = m
            if nbytes < 0 or nbytes > INT_MAX or peer < 0 or peer >= comm.Get_size() or \
                    want > nbytes:
                raise ValueError(f"Persistent: bad message {m}")
            if k != _RECV and k != _SEND:
                raise ValueError(f"Persistent: message kind {k} is neither RECV nor SEND")
            rows[i] = (k, addr, nbytes, peer, tag, want if k == _RECV else -1)
        self.msgs = rows
        self.keep = (comm, rows)
        self.reqs = <mpi.MPI_Request *> malloc(max(len(messages), 1) * sizeof(mpi.MPI_Request))
        self.statuses = <mpi.MPI_Status *> malloc(max(len(messages), 1) * sizeof(mpi.MPI_Status))
        if self.reqs == NULL or self.statuses == NULL:
            raise MemoryError()
        cdef int ierr = self._make()
        if ierr:
            self.free()
            _raise(ierr)

    cdef int _make(self) noexcept nogil:
        """Create every request (``self.n`` of them made so far); MPI's code on failure."""
        cdef int ierr = 0
        cdef int64_t[:, ::1] m = self.msgs
        self.n = 0
        while self.n < m.shape[0]:
            ierr = _init_request(m[self.n, 0], <void *> <intptr_t> m[self.n, 1],
                                 <int> m[self.n, 2], <int> m[self.n, 3], <int> m[self.n, 4],
                                 self.comm, &self.reqs[self.n])
            if ierr:
                return ierr
            self.n += 1
        return 0

    def exchange(self):
        """Start every request, wait for every one; False if a receive brought another
        length than it must, or MPI reported an error."""
        cdef int ierr, i, got = 0
        cdef bint ok = True
        cdef int64_t[:, ::1] m = self.msgs
        if m.shape[0] == 0:
            return True
        if self.reqs == NULL:
            raise ValueError("Persistent.exchange: the requests were freed")
        with nogil:
            ierr = mpi.MPI_Startall(self.n, self.reqs)
        if ierr:
            _raise(ierr)
        with nogil:
            ierr = mpi.MPI_Waitall(self.n, self.reqs, self.statuses)
            if ierr:  # complete whatever is still pending, then make the requests anew
                for i in range(self.n):
                    mpi.MPI_Wait(&self.reqs[i], mpi.MPI_STATUS_IGNORE)
                for i in range(self.n):
                    if self.reqs[i] != mpi.MPI_REQUEST_NULL:
                        mpi.MPI_Request_free(&self.reqs[i])
                i = self._make()
            else:
                for i in range(self.n):
                    if m[i, 5] >= 0:
                        mpi.MPI_Get_count(&self.statuses[i], mpi.MPI_BYTE, &got)
                        if got != m[i, 5]:
                            ok = False
                i = 0
        if ierr and i:
            _raise(i)
        return ierr == 0 and ok

    def free(self):
        """Release the requests (local). Idempotent."""
        _free_requests(self.reqs, self.n)
        self.reqs = NULL
        self.n = 0

    def __dealloc__(self):
        # requests are freed by free() (MPI may be finalized by the time of collection)
        if self.reqs != NULL:
            free(self.reqs)
        free(self.statuses)
