"""The Cython block mover against plain NumPy, and its bounds checks (no MPI)."""

from __future__ import annotations

import numpy as np
import pytest

from pya2a.core import _pack

pytestmark = pytest.mark.serial


def test_gather_then_scatter_round_trips_random_blocks():
    rng = np.random.default_rng(5)
    src = rng.integers(0, 255, 10_000, dtype=np.uint8)
    lens = rng.integers(0, 50, 100).astype(np.int64)
    offs = rng.integers(0, 10_000 - 50, 100).astype(np.int64)
    packed = np.zeros(int(lens.sum()), np.uint8)
    end = _pack.gather(src, offs, lens, packed)
    assert end == lens.sum()
    want = np.concatenate([src[o:o + n] for o, n in zip(offs, lens, strict=True)])
    np.testing.assert_array_equal(packed, want)
    dst = np.zeros(int(lens.sum()) + 7, np.uint8)
    dpos = np.cumsum(lens) - lens + 7
    assert _pack.scatter(packed, dst, dpos, lens) == lens.sum()
    np.testing.assert_array_equal(dst[7:], want)


def test_pack_moves_each_block_and_skips_identity():
    src = np.arange(32, dtype=np.uint8)
    dst = np.zeros(32, np.uint8)
    _pack.pack(src, np.array([0, 10], np.int64), np.array([4, 2], np.int64), dst,
               np.array([20, 0], np.int64))
    assert list(dst[20:24]) == [0, 1, 2, 3] and list(dst[0:2]) == [10, 11]


@pytest.mark.parametrize("fn", ["gather", "scatter", "pack"])
def test_out_of_range_blocks_raise_before_copying(fn):
    a = np.arange(16, dtype=np.uint8)
    b = np.zeros(16, np.uint8)
    bad = np.array([12], np.int64), np.array([8], np.int64)
    with pytest.raises(ValueError, match="outside|fit|exceed"):
        if fn == "gather":
            _pack.gather(a, *bad, b)
        elif fn == "scatter":
            _pack.scatter(a, b, *bad)
        else:
            _pack.pack(a, bad[0], bad[1], b, np.array([0], np.int64))
    assert not b.any()


def test_blocks_overlap_finds_a_pair_and_ignores_empty_blocks():
    offs = np.array([0, 4, 8, 5], np.int64)
    assert _pack.blocks_overlap(offs, np.array([4, 4, 4, 0], np.int64)) is None
    assert _pack.blocks_overlap(offs, np.array([4, 4, 4, 1], np.int64)) is not None


def test_even_split_gives_the_remainder_to_the_first_blocks():
    from pya2a.core.spec import parse_vector

    spec = parse_vector(np.zeros(11), 4, readonly=True)
    assert spec.counts.tolist() == [3, 3, 3, 2]
    assert spec.displs.tolist() == [0, 3, 6, 9]


def test_unmappable_formats_are_refused_as_mpi4py_refuses_them():
    from mpi4py import MPI

    from pya2a.core.spec import parse_vector

    rec = np.zeros(6, dtype=[("key", "i4"), ("val", "f8")])  # no MPI datatype for this
    with pytest.raises(KeyError, match="cannot map"):  # mpi4py: KeyError too
        parse_vector(rec, 3, readonly=True)
    spec = parse_vector([rec, MPI.BYTE], 3, readonly=True)  # as bytes, with a datatype
    assert spec.tsize == 1 and spec.counts.tolist() == [24, 24, 24]  # 12-byte records
    half = parse_vector(np.zeros(4, np.float16), 2, readonly=True)
    assert half.tsize == 2 and half.datatype.Get_size() == 2
    assert MPI.BYTE.Get_size() == 1


def test_int64_key_concatenates_four_plain_int64_vectors_and_refuses_the_rest():
    """The IPC engine's call-cache key: the four vectors' bytes in order, or None for any
    argument that is not a C-contiguous 1-D int64 array of the common length."""
    a, b = np.arange(4, dtype=np.int64), np.arange(4, 8, dtype=np.int64)
    assert _pack.int64_key(a, b, b, a) == a.tobytes() + b.tobytes() + b.tobytes() + a.tobytes()
    assert _pack.int64_key(a, b, a, b) != _pack.int64_key(b, a, a, b)
    assert _pack.int64_key(a, b, a, np.arange(3, dtype=np.int64)) is None  # lengths differ
    assert _pack.int64_key(a, b, a, [0, 1, 2, 3]) is None  # not an array
    assert _pack.int64_key(a, b, a, a.astype(np.int32)) is None  # other dtype
    assert _pack.int64_key(a, b, a, np.arange(8, dtype=np.int64)[::2]) is None  # strided
    assert _pack.int64_key(a, b, a, a.reshape(2, 2)) is None  # not 1-D
    e = np.zeros(0, dtype=np.int64)
    assert _pack.int64_key(e, e, e, e) == b""
