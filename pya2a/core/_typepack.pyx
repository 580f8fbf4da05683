# cython: language_level=3, boundscheck=False, wraparound=False, initializedcheck=False
"""Copy plans for datatype-described blocks: pack into a contiguous staging run and back.

An ``Alltoallw`` block is ``count`` elements of a datatype at a byte displacement; a
:class:`TypeCopy` holds, for every peer, the block's displacement, count and decoded layout
(:mod:`pya2a.core.dtypes`) and the block's place in a staging buffer where the blocks lie
back to back in peer order. ``pack`` copies every block's bytes into the staging buffer in
type-map order (what ``MPI_Pack`` produces), ``unpack`` the reverse. Both are one call
without the GIL and without a Python loop over blocks, elements or runs. ``skip`` names a
block both leave out (a rank's block to itself), which ``copy_block`` copies in one pass
straight from one plan's buffer into another's: the two blocks' runs are walked side by side
as two byte streams in type-map order, so no staging copy is made. ``first`` rotates the
order blocks are visited in (rank r starting with block r + 1 spreads p readers over p
senders' memory instead of all reading the same one first).

Bounds are the caller's to check once per buffer (``lo`` / ``hi`` give the bytes of the user
buffer the plan touches, ``nbytes`` the staging size): the copies themselves run on raw
addresses.
"""

cimport cython
from libc.string cimport memcpy
from libc.stdint cimport int64_t, intptr_t

import numpy as np

__all__ = ["TypeCopy"]


cdef struct _Stream:
    # one block's bytes in type-map order: run r of the element at e, `done` bytes of it used
    char* e
    const int64_t* offs
    const int64_t* lens
    int64_t ext, whole, done
    Py_ssize_t r, r0, r1


# Long copies whose destination sits just past its source modulo 4 KiB: a forward memcpy
# then loads bytes whose low 12 address bits match stores it made a moment before (4K
# aliasing), and the loads wait on those stores; glibc's memcpy ran 4-8x slower there on an
# AMD EPYC (64 KiB runs, destination 16 bytes past the source modulo 4 KiB). Copied instead
# in 256-byte pieces from the end back: each piece loads everything before it stores, and
# the next piece reads below what was just written.
DEF _ALIAS_FROM = 4096  # bytes: shorter copies are left to memcpy
DEF _PIECE = 256


cdef inline void _copy_back(char* d, const char* s, int64_t n) noexcept nogil:
    cdef int64_t head = n % _PIECE
    cdef int64_t k = n - _PIECE
    while k >= head:
        memcpy(d + k, s + k, _PIECE)
        k -= _PIECE
    if head:
        memcpy(d, s, <size_t> head)


cdef inline void _copy(char* d, const char* s, int64_t n) noexcept nogil:
    if n >= _ALIAS_FROM and 0 < ((<intptr_t> d - <intptr_t> s) & 4095) < _PIECE:
        _copy_back(d, s, n)
        return
    # fixed sizes let the compiler inline the copy of the small runs subarrays produce
    if n == 8:
        memcpy(d, s, 8)
    elif n == 16:
        memcpy(d, s, 16)
    elif n == 4:
        memcpy(d, s, 4)
    elif n == 32:
        memcpy(d, s, 32)
    elif n == 64:  # e.g. four complex128 elements of a pencil
        memcpy(d, s, 64)
    elif n == 128:
        memcpy(d, s, 128)
    else:
        memcpy(d, s, <size_t> n)


cdef class TypeCopy:
    """Pack / unpack plan of one side of an ``Alltoallw`` (one buffer, p blocks).

    Args:
        offs, lens: int64 run tables of all layouts, concatenated (bytes).
        starts: int64[L + 1]: layout ``l`` owns runs ``starts[l]:starts[l + 1]``.
        extents: int64[L]: each layout's extent (element ``k`` at ``k * extent``).
        layout_ids: int64[p]: the layout of each peer's block.
        displs: int64[p]: each block's origin, bytes from the buffer start.
        counts: int64[p]: elements in each block.
        sizes: int64[L]: bytes of data in one element of each layout.

    Attributes:
        nbytes: bytes of the staging buffer (all blocks back to back).
        positions: int64[p], each block's offset in the staging buffer.
        lengths: int64[p], each block's packed length in bytes.
    """

    cdef int64_t[::1] _offs, _lens, _starts, _ext, _dense, _lid, _disp, _cnt, _pos
    cdef object _keep
    cdef readonly int64_t nbytes
    cdef readonly object positions, lengths
    cdef public Py_ssize_t skip  # a block pack / unpack leave out (-1: none)
    cdef public Py_ssize_t first  # the block pack / unpack begin with, then on cyclically

    @cython.wraparound(True)  # NumPy slicing with negative ends below
    def __init__(self, offs, lens, starts, extents, layout_ids, displs, counts, sizes):
        a = [np.ascontiguousarray(x, dtype=np.int64) for x in
             (offs, lens, starts, extents, layout_ids, displs, counts, sizes)]
        o, n, st, ext, lid, disp, cnt, size = a
        nl, p = ext.shape[0], lid.shape[0]
        if o.shape[0] != n.shape[0] or st.shape[0] != nl + 1 or size.shape[0] != nl or \
                disp.shape[0] != p or cnt.shape[0] != p:
            raise ValueError("TypeCopy: table lengths differ")
        if p and ((lid < 0).any() or (lid >= nl).any()):
            raise ValueError("TypeCopy: layout id out of range")
        if (cnt < 0).any():
            raise ValueError("TypeCopy: negative count")
        one = (st[1:] - st[:-1]) == 1  # a layout of one run as long as its extent
        first = n[np.minimum(st[:-1], max(n.shape[0] - 1, 0))] if n.shape[0] else ext * 0
        dense = (one & (first == ext)).astype(np.int64)
        lengths = cnt * size[lid] if p else np.zeros(0, np.int64)
        pos = np.zeros(p, dtype=np.int64)
        if p > 1:
            np.cumsum(lengths[:-1], out=pos[1:])
        self._offs, self._lens, self._starts, self._ext = o, n, st, ext
        self._dense, self._lid, self._disp, self._cnt, self._pos = dense, lid, disp, cnt, pos
        self._keep = (a, dense, pos)
        self.nbytes = int(lengths.sum()) if p else 0
        lengths.setflags(write=False)
        pos.setflags(write=False)
        self.positions, self.lengths = pos, lengths
        self.skip = -1
        self.first = 0

    cdef void _walk(self, char* buf, char* base, const int64_t* at,
                    bint to_stage) noexcept nogil:
        # block j's packed bytes start at base + at[j]
        cdef Py_ssize_t i, j, k, r, r0, r1, nb = self._lid.shape[0]
        cdef int64_t l, c, ext, n
        cdef char* e
        cdef char* s
        for i in range(nb):
            j = (i + self.first) % nb
            c = self._cnt[j]
            if c == 0 or j == self.skip:
                continue
            l = self._lid[j]
            r0, r1 = self._starts[l], self._starts[l + 1]
            if r1 == r0:
                continue
            ext = self._ext[l]
            e = buf + self._disp[j]
            s = base + at[j]
            if self._dense[l]:
                n = c * ext
                if to_stage:
                    _copy(s, e + self._offs[r0], n)
                else:
                    _copy(e + self._offs[r0], s, n)
                continue
            for k in range(c):
                for r in range(r0, r1):
                    n = self._lens[r]
                    if to_stage:
                        _copy(s, e + self._offs[r], n)
                    else:
                        _copy(e + self._offs[r], s, n)
                    s += n
                e += ext

    cdef bint _open(self, _Stream* st, Py_ssize_t j, char* buf) noexcept nogil:
        # False: block j has no bytes
        cdef int64_t l = self._lid[j]
        st.r0, st.r1 = self._starts[l], self._starts[l + 1]
        if self._cnt[j] == 0 or st.r1 == st.r0:
            return False
        st.e = buf + self._disp[j]
        st.offs, st.lens = &self._offs[0], &self._lens[0]
        st.ext, st.r, st.done = self._ext[l], st.r0, 0
        st.whole = self._cnt[j] * st.ext if self._dense[l] else 0  # dense: one run
        return True

    def copy_block(self, Py_ssize_t j, intptr_t src, TypeCopy dst_plan, Py_ssize_t i,
                   intptr_t dst):
        """Copy block ``j`` of the buffer at ``src`` into block ``i`` of ``dst_plan``'s
        buffer at ``dst``, byte ``k`` of one type-map order to byte ``k`` of the other (what
        packing one and unpacking into the other does), in one pass. The blocks must hold
        the same number of bytes and must not overlap."""
        if not (0 <= j < self._lid.shape[0] and 0 <= i < dst_plan._lid.shape[0]):
            raise IndexError("TypeCopy.copy_block: block out of range")
        cdef int64_t left = self.lengths[j]
        if dst_plan.lengths[i] != left:
            raise ValueError(f"TypeCopy.copy_block: {left} bytes into {dst_plan.lengths[i]}")
        cdef _Stream a, b
        if left == 0 or not self._open(&a, j, <char*> src) or \
                not dst_plan._open(&b, i, <char*> dst):
            return
        with nogil:
            _copy_streams(&a, &b, left)

    def pack(self, intptr_t buf, intptr_t stage):
        """Copy every block from the buffer at address ``buf`` into ``stage``."""
        if self._lid.shape[0] == 0:
            return
        with nogil:
            self._walk(<char*> buf, <char*> stage, &self._pos[0], True)

    def unpack(self, intptr_t stage, intptr_t buf):
        """Copy every block from ``stage`` back into the buffer at address ``buf``."""
        if self._lid.shape[0] == 0:
            return
        with nogil:
            self._walk(<char*> buf, <char*> stage, &self._pos[0], False)

    def pack_to(self, intptr_t buf, const int64_t[::1] addrs):
        """Copy block j from the buffer at ``buf`` to address ``addrs[j]`` (packed)."""
        if addrs.shape[0] != self._lid.shape[0]:
            raise ValueError("TypeCopy.pack_to: one address per block expected")
        if addrs.shape[0] == 0:
            return
        with nogil:
            self._walk(<char*> buf, <char*> 0, &addrs[0], True)

    def unpack_from(self, const int64_t[::1] addrs, intptr_t buf):
        """Copy block j's packed bytes from address ``addrs[j]`` into the buffer at ``buf``."""
        if addrs.shape[0] != self._lid.shape[0]:
            raise ValueError("TypeCopy.unpack_from: one address per block expected")
        if addrs.shape[0] == 0:
            return
        with nogil:
            self._walk(<char*> buf, <char*> 0, &addrs[0], False)


cdef inline int64_t _run_len(_Stream* s) noexcept nogil:
    return s.whole if s.whole else s.lens[s.r]


cdef inline char* _run_at(_Stream* s) noexcept nogil:
    return s.e + s.offs[s.r0 if s.whole else s.r] + s.done


cdef inline void _advance(_Stream* s, int64_t n, int64_t run) noexcept nogil:
    s.done += n
    if s.done == run:
        s.done = 0
        if not s.whole:
            s.r += 1
            if s.r == s.r1:
                s.r = s.r0
                s.e += s.ext


cdef void _copy_streams(_Stream* a, _Stream* b, int64_t left) noexcept nogil:
    cdef int64_t ra, rb, n
    while left > 0:
        ra, rb = _run_len(a), _run_len(b)
        n = ra - a.done
        if rb - b.done < n:
            n = rb - b.done
        if n > left:
            n = left
        _copy(_run_at(b), _run_at(a), n)
        _advance(a, n, ra)
        _advance(b, n, rb)
        left -= n
