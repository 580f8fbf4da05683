# cython: language_level=3, boundscheck=False, wraparound=False, initializedcheck=False
"""Block gather/scatter between byte buffers.

These are the local rearrangement steps of every algorithm that stages data: a list of
(offset, length) blocks is copied with memcpy, without the GIL and without a Python loop
over blocks. Offsets and lengths are in bytes. Bounds are checked once per call, before
any byte moves, so a bad index list raises instead of corrupting memory.
"""

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize
from libc.string cimport memcpy, memmove
from libc.stdint cimport int64_t, intptr_t

import numpy as np

cimport numpy as cnp

cnp.import_array()

cdef extern from *:
    """
    static inline int pya2a_mul_ovf(long long a, long long b, long long *r) {
        return __builtin_mul_overflow(a, b, r);
    }
    static inline int pya2a_add_ovf(long long a, long long b, long long *r) {
        return __builtin_add_overflow(a, b, r);
    }
    """
    bint mul_ovf "pya2a_mul_ovf"(long long a, long long b, long long *r) nogil
    bint add_ovf "pya2a_add_ovf"(long long a, long long b, long long *r) nogil

__all__ = ["pack", "gather", "scatter", "blocks_overlap", "check_blocks", "block_end",
           "take_runs",
           "record_arrival", "CopyList", "StampRun", "int64_key"]

cdef int64_t _NOGIL_BYTES = 1 << 16  # copy lists at least this long release the GIL


cdef inline Py_ssize_t _vec_i64(object x):
    """Length of ``x`` if it is a C-contiguous 1-D int64 numpy array, else -1."""
    if type(x) is not cnp.ndarray:
        return -1
    cdef cnp.ndarray a = <cnp.ndarray>x
    if (cnp.PyArray_TYPE(a) != cnp.NPY_INT64 or cnp.PyArray_NDIM(a) != 1
            or not cnp.PyArray_IS_C_CONTIGUOUS(a)):
        return -1
    return cnp.PyArray_DIM(a, 0)


def int64_key(a, b, c, d):
    """The bytes of four int64 vectors of one length, one after the other, or None.

    A cache key for (counts, displacements) of both sides of an exchange that costs one
    allocation instead of four ``tobytes`` calls. None when any argument is not a
    C-contiguous 1-D int64 numpy array or the lengths differ (callers then key otherwise).
    """
    cdef Py_ssize_t n = _vec_i64(a)
    if n < 0 or _vec_i64(b) != n or _vec_i64(c) != n or _vec_i64(d) != n:
        return None
    cdef Py_ssize_t nb = n * 8
    out = PyBytes_FromStringAndSize(NULL, 4 * nb)
    cdef char* o = PyBytes_AS_STRING(out)
    memcpy(o, cnp.PyArray_DATA(<cnp.ndarray>a), nb)
    memcpy(o + nb, cnp.PyArray_DATA(<cnp.ndarray>b), nb)
    memcpy(o + 2 * nb, cnp.PyArray_DATA(<cnp.ndarray>c), nb)
    memcpy(o + 3 * nb, cnp.PyArray_DATA(<cnp.ndarray>d), nb)
    return out


cdef int _check(const int64_t[::1] offs, const int64_t[::1] lens,
                Py_ssize_t size) except -1 nogil:
    """Every non-empty block inside ``[0, size)`` (an empty block may lie anywhere)."""
    cdef Py_ssize_t i
    for i in range(lens.shape[0]):
        if lens[i] == 0:
            continue
        if lens[i] < 0 or offs[i] < 0 or offs[i] > size - lens[i]:
            with gil:
                raise ValueError(
                    f"block {i} (offset {offs[i]}, length {lens[i]}) "
                    f"outside a buffer of {size} bytes")
    return 0


def pack(const unsigned char[::1] src, const int64_t[::1] src_off,
         const int64_t[::1] lens, unsigned char[::1] dst,
         const int64_t[::1] dst_off):
    """Copy block i, ``src[src_off[i]:+lens[i]]``, to ``dst[dst_off[i]:+lens[i]]``.

    Blocks must not overlap between ``src`` and ``dst`` (memcpy semantics), except
    that a block whose source and destination coincide is skipped.
    """
    cdef Py_ssize_t i, n = lens.shape[0]
    if src_off.shape[0] != n or dst_off.shape[0] != n:
        raise ValueError("pack: offset and length arrays differ in length")
    cdef const unsigned char *s = &src[0] if src.shape[0] > 0 else NULL
    cdef unsigned char *d = &dst[0] if dst.shape[0] > 0 else NULL
    with nogil:
        _check(src_off, lens, src.shape[0])
        _check(dst_off, lens, dst.shape[0])
        for i in range(n):
            if lens[i] > 0 and s + src_off[i] != d + dst_off[i]:
                memcpy(d + dst_off[i], s + src_off[i], <size_t> lens[i])


def gather(const unsigned char[::1] src, const int64_t[::1] offs,
           const int64_t[::1] lens, unsigned char[::1] dst, int64_t start=0):
    """Pack the blocks ``src[offs[i]:+lens[i]]`` back to back into ``dst`` from ``start``.

    Returns the offset in ``dst`` one past the last byte written.
    """
    cdef Py_ssize_t i, n = lens.shape[0]
    if offs.shape[0] != n:
        raise ValueError("gather: offset and length arrays differ in length")
    cdef int64_t pos = start, total = 0
    cdef const unsigned char *s = &src[0] if src.shape[0] > 0 else NULL
    cdef unsigned char *d = &dst[0] if dst.shape[0] > 0 else NULL
    with nogil:
        _check(offs, lens, src.shape[0])
        for i in range(n):
            total += lens[i]  # each length is within src (checked): no wrap for n < 2^31
        if start < 0 or total > dst.shape[0] - start:
            with gil:
                raise ValueError(
                    f"gather: {total} bytes from offset {start} do not fit "
                    f"in {dst.shape[0]} bytes")
        for i in range(n):
            if lens[i] > 0:
                memcpy(d + pos, s + offs[i], <size_t> lens[i])
                pos += lens[i]
    return pos


def scatter(const unsigned char[::1] src, unsigned char[::1] dst,
            const int64_t[::1] offs, const int64_t[::1] lens, int64_t start=0):
    """Unpack back-to-back blocks of ``src`` from ``start`` to ``dst[offs[i]:+lens[i]]``.

    Returns the offset in ``src`` one past the last byte read.
    """
    cdef Py_ssize_t i, n = lens.shape[0]
    if offs.shape[0] != n:
        raise ValueError("scatter: offset and length arrays differ in length")
    cdef int64_t pos = start, total = 0
    cdef const unsigned char *s = &src[0] if src.shape[0] > 0 else NULL
    cdef unsigned char *d = &dst[0] if dst.shape[0] > 0 else NULL
    with nogil:
        _check(offs, lens, dst.shape[0])
        for i in range(n):
            total += lens[i]
        if start < 0 or total > src.shape[0] - start:
            with gil:
                raise ValueError(
                    f"scatter: {total} bytes from offset {start} exceed "
                    f"{src.shape[0]} bytes")
        for i in range(n):
            if lens[i] > 0:
                memmove(d + offs[i], s + pos, <size_t> lens[i])
                pos += lens[i]
    return pos


def blocks_overlap(const int64_t[::1] offs, const int64_t[::1] lens):
    """Index pair (i, j) of two non-empty blocks that share a byte, or None.

    Linear when the offsets are already in order (the usual layouts); sorts otherwise.
    """
    cdef Py_ssize_t n = lens.shape[0], k, a
    cdef int64_t end = -1, last = -1, prev = -1
    cdef bint ordered = True
    for k in range(n):
        if offs[k] < prev:
            ordered = False
            break
        prev = offs[k]
    if ordered:
        order = np.arange(n, dtype=np.int64)
    else:
        order = np.argsort(np.asarray(offs), kind="stable").astype(np.int64)
    cdef int64_t[::1] o = order
    with nogil:
        for k in range(n):
            a = o[k]
            if lens[a] == 0:
                continue
            if last >= 0 and offs[a] < end:
                with gil:
                    return (int(last), int(a))
            if offs[a] + lens[a] > end:
                end = offs[a] + lens[a]
                last = a
    return None


def check_blocks(const int64_t[::1] counts, const int64_t[::1] displs, int64_t extent,
                 int64_t true_lb, int64_t true_extent, int64_t nbytes):
    """Validate a block table in one pass, with overflow-checked arithmetic.

    Returns ``(code, j, value, total, largest)``: code 0 = valid, 1 = ``counts[j]``
    negative, 2 = ``displs[j]`` negative, 3 = block j ends at byte ``value`` beyond
    ``nbytes`` (or starts before 0; ``value`` is -1 when its end does not fit in 64 bits),
    4 = non-empty blocks with a non-positive extent. Blocks of count 0 may have any
    non-negative displacement (they touch no byte). ``total`` and ``largest`` are the sum
    and maximum of the counts (valid only when code 0).
    """
    cdef Py_ssize_t j, n = counts.shape[0]
    cdef long long total = 0, largest = 0, c, d, lo, hi, span
    cdef bint wrap
    if displs.shape[0] != n:
        raise ValueError("check_blocks: counts and displs differ in length")
    for j in range(n):
        c = counts[j]
        d = displs[j]
        if c < 0:
            return (1, j, c, 0, 0)
        if d < 0:
            return (2, j, d, 0, 0)
        if c == 0:
            continue
        if extent <= 0:
            return (4, j, extent, 0, 0)
        # lo = d * extent + true_lb; hi = lo + (c - 1) * extent + true_extent
        wrap = mul_ovf(d, extent, &lo) or add_ovf(lo, true_lb, &lo)
        if not wrap:
            wrap = mul_ovf(c - 1, extent, &span) or add_ovf(span, true_extent, &span) or \
                add_ovf(lo, span, &hi)
        if wrap:
            return (3, j, -1, 0, 0)
        if lo < 0 or hi > nbytes:
            return (3, j, hi, 0, 0)
        if add_ovf(total, c, &total):
            return (3, j, -1, 0, 0)
        if c > largest:
            largest = c
    return (0, -1, 0, total, largest)


def block_end(const int64_t[::1] counts, const int64_t[::1] displs, int64_t extent):
    """One past the last byte of the furthest non-empty block, or -1 if it would wrap.

    For block tables without a buffer (plans): the size a buffer must have.
    """
    cdef Py_ssize_t j, n = counts.shape[0]
    cdef long long end = 0, e, c, d
    if displs.shape[0] != n:
        raise ValueError("block_end: counts and displs differ in length")
    for j in range(n):
        c = counts[j]
        d = displs[j]
        if c <= 0:
            continue
        if add_ovf(d, c, &e) or mul_ovf(e, extent, &e):
            return -1
        if e > end:
            end = e
    return end


# ---- index builders for the store-and-forward schedules (hypercube) -------------------------
__all__ += ["take_runs", "record_arrival"]


def take_runs(const int64_t[::1] offset, const int64_t[::1] length,
              const int64_t[::1] index, const int64_t[::1] cuts):
    """Offsets and lengths of the blocks ``index[cuts[s]:cuts[s+1]]``, one run per s.

    A message built from several buffers is one run per buffer; this returns, in one call,
    what each run's ``gather`` takes. Returns ``(runs, total)``: ``runs`` a list of
    ``(offsets, lengths)`` int64 arrays, ``total`` the sum of all lengths (bytes).
    """
    cdef Py_ssize_t nrun = cuts.shape[0] - 1, s, i, a, b, n = offset.shape[0]
    cdef int64_t total = 0, j
    cdef int64_t[::1] o, l
    if length.shape[0] != n:
        raise ValueError("take_runs: offset and length differ in length")
    runs = []
    for s in range(nrun):
        a, b = cuts[s], cuts[s + 1]
        if a < 0 or b < a or b > index.shape[0]:
            raise ValueError(f"take_runs: run {s} [{a}, {b}) outside the index")
        offs = np.empty(b - a, dtype=np.int64)
        lens = np.empty(b - a, dtype=np.int64)
        o, l = offs, lens
        for i in range(a, b):
            j = index[i]
            if j < 0 or j >= n:
                raise ValueError(f"take_runs: index {j} outside 0..{n - 1}")
            o[i - a] = offset[j]
            l[i - a] = length[j]
            total += length[j]
        runs.append((offs, lens))
    return runs, total


def record_arrival(int64_t[::1] offset, int64_t[::1] length, const int64_t[::1] index,
                   const int64_t[::1] incoming, const int64_t[::1] done,
                   const int64_t[::1] home):
    """Record a received message whose blocks now sit back to back in its buffer.

    Block i (length ``incoming[i]``) takes position ``index[i]``: ``offset`` becomes the
    exclusive prefix sum of ``incoming``, ``length`` becomes ``incoming``. For the blocks
    ``done`` (indices into ``index``) that have arrived home, returns the ``pack`` arguments
    ``(src_offsets, lengths, dst_offsets)`` with ``dst_offsets[k] = home[index[done[k]]]``.
    """
    cdef Py_ssize_t m = index.shape[0], nd = done.shape[0], n = offset.shape[0], i, k
    cdef int64_t pos = 0, j
    if incoming.shape[0] != m or length.shape[0] != n or home.shape[0] != n:
        raise ValueError("record_arrival: array lengths differ")
    for i in range(m):
        j = index[i]
        if j < 0 or j >= n:
            raise ValueError(f"record_arrival: index {j} outside 0..{n - 1}")
        offset[j] = pos
        length[j] = incoming[i]
        pos += incoming[i]
    so = np.empty(nd, dtype=np.int64)
    ln = np.empty(nd, dtype=np.int64)
    do = np.empty(nd, dtype=np.int64)
    cdef int64_t[::1] a = so, b = ln, c = do
    for k in range(nd):
        i = done[k]
        if i < 0 or i >= m:
            raise ValueError(f"record_arrival: done index {i} outside 0..{m - 1}")
        j = index[i]
        a[k] = offset[j]
        b[k] = length[j]
        c[k] = home[j]
    return so, ln, do


cdef class CopyList:
    """A fixed list of copies between raw addresses, made once and run many times.

    ``rows`` is an (n, 3) int64 array of (source address, destination address, bytes).
    Bound plans build one per phase boundary from buffers they keep alive (``keep``) and
    whose bounds they checked when building it, so a call is one memcpy loop without the
    GIL: no per-call memoryview set-up, no Python loop over gathers. Zero-byte rows are
    dropped. Copies must not overlap (memcpy semantics).
    """

    cdef int64_t[:, ::1] _rows
    cdef object _keep
    cdef readonly Py_ssize_t n
    cdef readonly int64_t nbytes

    def __init__(self, rows, keep=None):
        a = np.asarray(rows, dtype=np.int64).reshape(-1, 3)
        a = np.ascontiguousarray(a[a[:, 2] > 0])
        if (a < 0).any():
            raise ValueError("CopyList: negative address or length")
        self._rows = a
        self._keep = (a, keep)
        self.n = a.shape[0]
        self.nbytes = int(a[:, 2].sum()) if self.n else 0

    def __call__(self):
        self.run()

    cdef void run(self):
        """The copies; the GIL is released only where they are long enough to matter."""
        cdef Py_ssize_t i
        cdef int64_t[:, ::1] r = self._rows
        if self.nbytes < _NOGIL_BYTES:
            for i in range(r.shape[0]):
                memcpy(<void *> <intptr_t> r[i, 1], <const void *> <intptr_t> r[i, 0],
                       <size_t> r[i, 2])
            return
        with nogil:
            for i in range(r.shape[0]):
                memcpy(<void *> <intptr_t> r[i, 1], <const void *> <intptr_t> r[i, 0],
                       <size_t> r[i, 2])


cdef class StampRun:
    """One stamped exchange's run (:class:`pya2a._stamp.Stamp`), in C between MPI calls.

    Copies the blocks into the send staging, runs ``exchange()`` (starts and completes the
    persistent requests; False where MPI reported an error, a message longer than its
    slot), checks that every received message ended in ``number`` (resetting those words),
    and only then copies the blocks out into the receive buffer. Returns whether every
    stamp matched and the exchange reported no error.
    """

    cdef CopyList _pack, _unpack
    cdef int64_t[::1] _words
    cdef int64_t[::1] _trail
    cdef int64_t _number, _reset
    cdef object _exchange

    def __init__(self, CopyList pack, CopyList unpack, int64_t[::1] words,
                 int64_t[::1] trail, int64_t number, int64_t reset, exchange):
        cdef Py_ssize_t i
        for i in range(trail.shape[0]):
            if trail[i] < 0 or trail[i] >= words.shape[0]:
                raise IndexError(f"StampRun: stamp word {trail[i]} outside the staging")
        self._pack, self._unpack = pack, unpack
        self._words, self._trail = words, trail
        self._number, self._reset = number, reset
        self._exchange = exchange

    def __call__(self):
        cdef bint ok
        cdef Py_ssize_t i, j
        self._pack.run()
        ok = self._exchange()
        for i in range(self._trail.shape[0]):
            j = self._trail[i]
            if self._words[j] != self._number:
                ok = False
            self._words[j] = self._reset
        if ok:
            self._unpack.run()
        return ok


cdef class ForwardRun:
    """A confirmation in dissemination rounds (:class:`pya2a._stamp.Forward`), in C
    between MPI calls.

    Round k: copy the blocks this rank forwards into the round's send staging, end the
    message with this rank's (smallest, largest) entry number seen so far, put the
    ``unset`` mark where the received message's two words must land, run
    ``exchanges[k]()`` (one send, one receive; False where MPI reported an error, a message
    longer than its slot), then fold the received pair in. A round whose message did not
    end in a pair (the mark left: a shorter message) or failed makes the smallest number
    -1, which no entry has. After the last round every rank has folded in every rank's
    pair; only when both are its own number are the staged blocks copied out into the
    receive buffer. Returns whether they were.
    """

    cdef list _packs
    cdef list _exchanges
    cdef CopyList _unpack
    cdef int64_t[::1] _sw
    cdef int64_t[::1] _rw
    cdef int64_t[::1] _ot
    cdef int64_t[::1] _it
    cdef int64_t _number, _unset

    def __init__(self, list packs, list exchanges, int64_t[::1] sw, int64_t[::1] rw,
                 int64_t[::1] out_trail, int64_t[::1] in_trail, CopyList unpack,
                 int64_t number, int64_t unset):
        cdef Py_ssize_t k, n = len(exchanges)
        if len(packs) != n or out_trail.shape[0] != n or in_trail.shape[0] != n:
            raise ValueError("ForwardRun: one pack list and two stamp words per round")
        for k in range(n):
            if not isinstance(packs[k], CopyList):
                raise TypeError("ForwardRun: packs must be CopyLists")
            if out_trail[k] < 0 or out_trail[k] + 1 >= sw.shape[0] or \
                    in_trail[k] < 0 or in_trail[k] + 1 >= rw.shape[0]:
                raise IndexError(f"ForwardRun: round {k}'s stamp words outside the staging")
        self._packs, self._exchanges, self._unpack = packs, exchanges, unpack
        self._sw, self._rw, self._ot, self._it = sw, rw, out_trail, in_trail
        self._number, self._unset = number, unset

    def __call__(self):
        cdef int64_t lo = self._number, hi = self._number, a, b, unset = self._unset
        cdef Py_ssize_t k, o, i
        cdef bint ok
        for k in range(len(self._exchanges)):
            (<CopyList> self._packs[k]).run()
            o = self._ot[k]
            i = self._it[k]
            self._sw[o] = lo
            self._sw[o + 1] = hi
            self._rw[i] = unset
            self._rw[i + 1] = unset
            ok = self._exchanges[k]()
            a = self._rw[i]
            b = self._rw[i + 1]
            if not ok or a == unset or b == unset or a < -1 or b < -1:
                lo = -1
            else:
                if a < lo:
                    lo = a
                if b > hi:
                    hi = b
        if self._number >= 0 and lo == self._number and hi == self._number:
            self._unpack.run()
            return True
        return False
