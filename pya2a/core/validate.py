"""Input checks and collective error agreement.

A bad argument on one rank must not leave the others waiting in a collective. Each call
therefore checks its arguments locally, then all ranks exchange a small record (an error code
plus the statistics the selector needs) in one ``Allgather`` before any data moves. If any
rank failed, every rank raises: the failing rank its own exception, the others the same type
with the failing rank's message. The user's receive buffer is untouched in that case.

The same record carries a digest of every *setting* that shapes the collective (the
algorithm asked for, ``check``, the options, the mesh grid, the tuning table that ``auto``
reads, the call, in place or not): if any differ between ranks, every rank raises the same
``ValueError`` naming the setting and the ranks, where the ranks would otherwise walk
different schedules and wait for each other forever. Settings that may legally differ per
rank (the ``direct`` window, ``PYA2A_DIRECT_WINDOW``) are validated locally but not agreed.

Everything here is buffer-based (``Allgather``, ``Bcast`` of bytes): no pickle-based
collective, which would hold the GIL while it waits and deadlock threads that drive other
communicators.
"""

from __future__ import annotations

import builtins
import os
import pickle
import zlib
from collections.abc import Mapping

import numpy as np
from mpi4py import MPI

from . import _pack
from .spec import VSpec

__all__ = ["CollectiveError", "agree", "check_pair", "check_layout", "check_counts_match",
           "check_pairs_match", "check_block_sizes", "check_uniform", "check_options", "error_code",
           "same_everywhere", "digest", "parse_grid", "parse_window", "window_setting",
           "resolved_grid", "table_digest", "allreduce_max", "allgather_bytes",
           "call_settings", "check_buffer_dtype", "allgather_object", "ranges_overlap"]

# Error kinds carried in the agreement record; 0 = no error.
_KINDS: list[type[BaseException]] = [TypeError, ValueError, BufferError, OverflowError,
                                      KeyError, MemoryError]
OPTION_KEYS = ("grid", "window")  # user options any algorithm reads (see check_options)


class CollectiveError(RuntimeError):
    """Another rank failed with an exception that is not a built-in exception type."""


def error_code(exc: BaseException | None) -> int:
    """Code of ``exc`` for the agreement record: 0 none, 1.. known kinds, 99 other."""
    if exc is None:
        return 0
    for i, kind in enumerate(_KINDS):
        if isinstance(exc, kind):
            return i + 1
    return 99


def digest(value: object) -> int:
    """A 32-bit digest of ``value``'s repr, the same in every process (no hash seed)."""
    if isinstance(value, Mapping):
        value = sorted((str(k), repr(v)) for k, v in value.items())
    return zlib.crc32(repr(value).encode())


def _bcast_bytes(comm: MPI.Intracomm, data: bytes | None, root: int) -> bytes:
    """Broadcast a byte string from ``root`` (two buffer-based Bcasts)."""
    n = np.array([len(data) if data is not None else 0], dtype=np.int64)
    comm.Bcast(n, root=root)
    buf = np.frombuffer(data, dtype=np.uint8).copy() if data is not None else \
        np.empty(int(n[0]), dtype=np.uint8)
    if n[0]:
        comm.Bcast(buf, root=root)
    return buf.tobytes()


def allgather_bytes(comm: MPI.Intracomm, data: bytes) -> list[bytes]:
    """Every rank's byte string (Allgather of the lengths, Allgatherv of the bytes)."""
    p = comm.Get_size()
    lens = np.empty(p, dtype=np.int64)
    comm.Allgather(np.array([len(data)], dtype=np.int64), lens)
    offs = np.zeros(p, dtype=np.int64)
    np.cumsum(lens[:-1], out=offs[1:])
    out = np.empty(int(lens.sum()), dtype=np.uint8)
    comm.Allgatherv(np.frombuffer(data, dtype=np.uint8),
                    [out, (lens, offs), MPI.BYTE])
    raw = out.tobytes()
    return [raw[int(o):int(o) + int(n)] for o, n in zip(offs, lens, strict=True)]


def allreduce_max(comm: MPI.Intracomm, value: int) -> int:
    """The largest of every rank's integer (buffer-based Allreduce)."""
    buf = np.array([int(value)], dtype=np.int64)
    comm.Allreduce(MPI.IN_PLACE, buf, op=MPI.MAX)
    return int(buf[0])


def _ranks(idx: np.ndarray) -> str:
    r = [int(i) for i in idx]
    if len(r) > 8:
        return f"{', '.join(map(str, r[:8]))}, ... ({len(r)} ranks)"
    return ", ".join(map(str, r))


def _split(column: np.ndarray) -> str:
    """'ranks a, b have one value, ranks c another' for a column that is not uniform."""
    values, first = np.unique(column, return_index=True)
    groups = [np.flatnonzero(column == values[k]) for k in np.argsort(first)]
    parts = [f"rank{'s' if g.size > 1 else ''} {_ranks(g)}" for g in groups]
    if len(parts) == 2:
        verb = "have" if groups[0].size > 1 else "has"
        return f"{parts[0]} {verb} one value, {parts[1]} another"
    return "; ".join(parts) + f" ({len(parts)} different values)"


def _exception(name: str, message: str, code: int) -> BaseException:
    """The exception to raise on a healthy rank for a failure elsewhere."""
    cls = getattr(builtins, name, None)
    if isinstance(cls, type) and issubclass(cls, Exception):
        try:
            return cls(message)
        except Exception:
            pass
    kind = _KINDS[code - 1] if 0 < code <= len(_KINDS) else CollectiveError
    return kind(message)


def agree(comm: MPI.Intracomm, exc: BaseException | None, stats: np.ndarray,
          settings: Mapping[str, object] | None = None, call: str = "pya2a") -> np.ndarray:
    """All-gather ``[error code, *stats, *setting digests]``; raise everywhere on failure.

    Args:
        comm: the internal communicator (all ranks of the call).
        exc: this rank's exception from local validation, or None.
        stats: int64 vector of per-rank statistics, the same length on every rank.
        settings: name -> value of the settings that must be the same on every rank
            (compared by :func:`digest`); the same names, in the same order, on every rank.
        call: the call's name, for the message of a settings disagreement.

    Returns:
        int64 array of shape (p, 1 + len(stats)): every rank's record (column 0 is 0).

    Raises:
        On every rank: the failing rank's exception (its own object there, the same type
        with its message elsewhere); ValueError naming the setting and the ranks when the
        settings differ.
    """
    names = list(settings) if settings else []
    rec = np.empty(1 + stats.size + len(names), dtype=np.int64)
    rec[0] = error_code(exc)
    rec[1:1 + stats.size] = stats
    for k, name in enumerate(names):
        rec[1 + stats.size + k] = digest(settings[name])  # type: ignore[index]
    table = np.empty((comm.Get_size(), rec.size), dtype=np.int64)
    comm.Allgather(rec, table)
    bad = np.flatnonzero(table[:, 0])
    if bad.size:
        root = int(bad[0])
        payload = None
        if comm.Get_rank() == root:
            assert exc is not None  # internal invariant: root's code was nonzero
            text = str(exc) if not isinstance(exc, KeyError) else str(exc.args[0])
            payload = f"{type(exc).__name__}\n{text}".encode(errors="replace")
        name, _, text = _bcast_bytes(comm, payload, root).decode(errors="replace") \
            .partition("\n")
        if exc is not None:
            raise exc
        raise _exception(name, f"{text} [raised on rank {root}]", int(table[root, 0]))
    for k, name in enumerate(names):
        col = table[:, 1 + stats.size + k]
        if (col != col[0]).any():
            raise ValueError(f"{call}: {name} differs between ranks ({_split(col)}); it "
                             f"must be the same on every rank")
    return table[:, :1 + stats.size] if names else table


def parse_grid(value: object, p: int, where: str) -> tuple[int, int]:
    """A mesh grid ``(r, c)`` from a pair or ``"r,c"`` / ``"rxc"``; ValueError naming
    ``where`` unless r, c >= 1 and r * c == p."""
    if isinstance(value, str):
        parts = value.replace("x", ",").split(",")
        try:
            value = tuple(int(v) for v in parts)
        except ValueError:
            raise ValueError(f"mesh: {where} must be 'r,c', got {value!r}") from None
    try:
        r, c = (int(v) for v in value)  # type: ignore[union-attr]
    except (TypeError, ValueError):
        raise ValueError(f"mesh: {where} must be a pair (r, c), got {value!r}") from None
    if r < 1 or c < 1 or r * c != p:
        raise ValueError(f"mesh: {where} {r} x {c} does not match {p} ranks (need r * c = p)")
    return r, c


def resolved_grid(p: int, options: Mapping | None) -> object:
    """The mesh grid a call would use: ``options["grid"]``, else ``PYA2A_MESH_GRID``, as
    parsed, or the text of why it does not parse (None: the default grid). For agreement:
    a grid that differs between ranks, or is valid on some only, must not reach mesh."""
    try:
        if options and options.get("grid") is not None:
            return parse_grid(options["grid"], p, "options['grid']")
        env = os.environ.get("PYA2A_MESH_GRID", "").strip()
        return parse_grid(env, p, "PYA2A_MESH_GRID") if env else None
    except ValueError as e:
        return str(e)


def parse_window(value: object, where: str) -> int:
    """A ``direct`` window: a positive integer; ValueError naming ``where`` otherwise."""
    if isinstance(value, bool):
        raise ValueError(f"direct: {where} must be a positive integer, got {value!r}")
    try:
        w = int(value.strip() if isinstance(value, str) else value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise ValueError(f"direct: {where} must be a positive integer, "
                         f"got {value!r}") from None
    if isinstance(value, float) and w != value or w < 1:
        raise ValueError(f"direct: {where} must be a positive integer, got {value!r}")
    return w


def window_setting(options: Mapping | None, default: int) -> int:
    """The ``direct`` window: ``options["window"]``, else ``PYA2A_DIRECT_WINDOW``, else
    ``default``. It may differ between ranks (each rank throttles only its own posts)."""
    if options and options.get("window") is not None:
        return parse_window(options["window"], "options['window']")
    env = os.environ.get("PYA2A_DIRECT_WINDOW", "").strip()
    return parse_window(env, "PYA2A_DIRECT_WINDOW") if env else default


def check_options(call: str, options: object, p: int) -> dict:
    """Validate user ``options`` locally: a mapping of known keys with valid values.

    Returns the options as a dict. Raises TypeError for a non-mapping, ValueError for an
    unknown key or a bad grid / window (naming it).
    """
    if options is None:
        return {}
    if not isinstance(options, Mapping):
        raise TypeError(f"{call}: options must be a dict, not {type(options).__name__}")
    unknown = sorted(str(k) for k in options if k not in OPTION_KEYS)
    if unknown:
        raise ValueError(f"{call}: unknown option{'s' if len(unknown) > 1 else ''} "
                         f"{', '.join(map(repr, unknown))}; known: {', '.join(OPTION_KEYS)}")
    out = dict(options)
    if out.get("grid") is not None:
        out["grid"] = parse_grid(out["grid"], p, "options['grid']")
    if out.get("window") is not None:
        out["window"] = parse_window(out["window"], "options['window']")
    return out


_TABLE_DIGESTS: dict[int, tuple[object, int]] = {}


def table_digest(table: Mapping) -> int:
    """Digest of a tuning table's numbers (what ``auto`` reads), memoised per table object."""
    hit = _TABLE_DIGESTS.get(id(table))
    if hit is not None and hit[0] is table:
        return hit[1]
    d = digest([table.get(k) for k in ("params", "margin", "corrections")])
    if len(_TABLE_DIGESTS) > 8:
        _TABLE_DIGESTS.clear()
    _TABLE_DIGESTS[id(table)] = (table, d)
    return d


def call_settings(kind: str, check: bool, options: Mapping | None,
                  in_place: bool, p: int, table: Mapping) -> dict[str, object]:
    """The settings of an exchange that must be the same on every rank (see :func:`agree`).

    ``options`` must have been validated (:func:`check_options`); the ``direct`` window is
    left out: it may differ per rank. ``table`` is the tuning table in use (what ``auto``
    reads; agreed whatever the algorithm, so the record has one layout on every rank).
    The algorithm asked for travels in the record's statistics (:func:`check_uniform`).
    """
    opts = {k: v for k, v in (options or {}).items() if k != "window"}
    out: dict[str, object] = {"the call (Alltoall / Alltoallv / Alltoallw)": kind,
                              "check": bool(check),
                              "MPI.IN_PLACE (in place or not)": bool(in_place),
                              "options": opts,
                              "mesh grid (options['grid'] / PYA2A_MESH_GRID)":
                                  resolved_grid(p, options)}
    out["tuning table (PYA2A_TUNING; a rank whose file could not be read uses the "
        "built-in table)"] = table_digest(table)
    return out


def check_uniform(call: str, table: np.ndarray) -> None:
    """Raise (on every rank: all see the same table) if ranks disagree on what must match.

    ``table`` is the all-gathered record of an exchange: column 1 the requested algorithm's
    code, column 4 whether the buffers are on a device.
    """
    if (table[:, 1] != table[0, 1]).any():
        raise ValueError(f"{call}: ranks asked for different algorithms "
                         f"({_split(table[:, 1])}); algorithm must be the same on every rank")
    if (table[:, 4] != table[0, 4]).any():
        raise TypeError(f"{call}: some ranks pass device buffers and others host buffers "
                        f"({_split(table[:, 4])})")


def ranges_overlap(a: int, an: int, b: int, bn: int) -> bool:
    """True if the byte ranges [a, a + an) and [b, b + bn) share a byte (empty ranges share
    none): the send / receive overlap every call path refuses."""
    return bool(an and bn and a < b + bn and b < a + an)


def check_pair(call: str, send: VSpec, recv: VSpec, rank: int, kind: str) -> None:
    """Local consistency checks between this rank's send and receive specs."""
    if (send.device is None) != (recv.device is None):
        where = "device" if send.device is not None else "host"
        other = "device" if recv.device is not None else "host"
        raise TypeError(f"{call}: send buffer is in {where} memory but receive buffer in "
                        f"{other} memory; use the same kind for both")
    if send.device is not None and send.device != recv.device:
        raise ValueError(f"{call}: send buffer is on device {send.device}, receive buffer on "
                         f"device {recv.device}")
    if kind == "alltoall":
        sb = int(send.counts[0]) * send.tsize
        rb = int(recv.counts[0]) * recv.tsize
        if sb != rb:
            raise ValueError(f"{call}: send block is {sb} bytes ({send.counts[0]} x "
                             f"{send.tsize}) but receive block is {rb} bytes "
                             f"({recv.counts[0]} x {recv.tsize})")
    elif send.tsize != recv.tsize:
        raise ValueError(f"{call}: send datatype size {send.tsize} differs from receive "
                         f"datatype size {recv.tsize}")
    check_layout(call, send, recv, rank)
    if send is not recv and send.device == recv.device and \
            ranges_overlap(send.addr, send.nbytes, recv.addr, recv.nbytes):
        raise ValueError(f"{call}: send and receive buffers overlap; pass MPI.IN_PLACE "
                         f"as the send message for an in-place exchange")


def check_layout(call: str, send: VSpec, recv: VSpec, rank: int) -> None:
    """Checks of the block tables alone (no buffers needed): own block, receive overlaps."""
    if int(send.counts[rank]) * send.tsize != int(recv.counts[rank]) * recv.tsize:
        raise ValueError(f"{call}: rank {rank} sends itself {send.counts[rank]} elements but "
                         f"expects {recv.counts[rank]} from itself")
    if recv.contiguous:
        hit = _pack.blocks_overlap(recv.bdispls, recv.bcounts)
        if hit is not None:
            raise ValueError(f"{call}: receive blocks {hit[0]} and {hit[1]} overlap")


def check_counts_match(comm: MPI.Intracomm, call: str, send: VSpec, recv: VSpec) -> None:
    """``check=True``: what rank i sends to j must equal, in bytes, what j expects from i."""
    p = comm.Get_size()
    sent = np.ascontiguousarray(send.counts * send.tsize, dtype=np.int64)
    incoming = np.empty(p, dtype=np.int64)
    comm.Alltoall(sent, incoming)
    want = recv.counts * recv.tsize
    exc = None
    bad = np.flatnonzero(incoming != want)
    if bad.size:
        j = int(bad[0])
        exc = ValueError(f"{call}: rank {j} sends {incoming[j]} bytes to rank "
                         f"{comm.Get_rank()}, which expects {want[j]} bytes (check=True)")
    agree(comm, exc, np.zeros(0, dtype=np.int64))


def check_block_sizes(call: str, blocks: np.ndarray) -> None:
    """Raise on every rank unless every rank's Alltoall block (bytes, one per rank, from
    the agreement record) is the same: rank i sends every rank ``blocks[i]`` bytes and
    expects as many from each."""
    bad = np.flatnonzero(blocks != blocks[0])
    if bad.size:
        i = int(bad[0])
        raise ValueError(f"{call}: rank {i} sends {int(blocks[i])} bytes to rank 0, which "
                         f"expects {int(blocks[0])} bytes from rank {i}")


def same_everywhere(comm: MPI.Intracomm, value: str) -> bool:
    """Collective: True iff ``value`` is the same string on every rank (buffer-based)."""
    h = np.array([zlib.crc32(value.encode()), -zlib.crc32(value.encode())], dtype=np.int64)
    comm.Allreduce(MPI.IN_PLACE, h, op=MPI.MAX)
    return int(h[0]) == -int(h[1])


def check_pairs_match(call: str, sent: np.ndarray, expected: np.ndarray,
                      in_place: bool = False) -> None:
    """Raise on every rank unless rank i sends rank j what j expects from i (all in bytes).

    ``sent[i, j]`` / ``expected[j, i]`` come from the all-gathered agreement record, which
    every rank holds whole, so every rank reaches the same verdict with no communication.
    """
    bad = np.argwhere(sent != expected.T)
    if bad.size:
        i, j = (int(x) for x in bad[0])
        extra = (" (in place: each rank's receive counts are also its send counts, so they "
                 "must be symmetric)") if in_place else ""
        raise ValueError(f"{call}: rank {i} sends {int(sent[i, j])} bytes to rank {j}, "
                         f"which expects {int(expected[j, i])} bytes from rank {i}{extra}")


def _buffer_dtype(buf: object) -> np.dtype | None:
    """The element type a buffer declares (buffer-protocol format or CUDA array interface)."""
    cai = getattr(buf, "__cuda_array_interface__", None) if not isinstance(
        buf, (np.ndarray, bytes, bytearray, memoryview)) else None
    try:
        if isinstance(cai, Mapping):
            return np.dtype(cai["typestr"])
        dt = getattr(buf, "dtype", None)
        if isinstance(dt, np.dtype):
            return None if dt.char in "Bb" else dt  # a byte view: untyped
        fmt = memoryview(buf).format  # type: ignore[arg-type]
        return None if fmt in ("B", "b", "c") else np.dtype(fmt)  # bytes: untyped
    except Exception:
        return None


def check_buffer_dtype(call: str, what: str, buf: object, dt: MPI.Datatype) -> None:
    """TypeError when ``buf`` declares an element type other than ``dt``'s (plans).

    A plan fixes its datatype; a buffer of another type of the same size would otherwise be
    reinterpreted silently. ``MPI.BYTE`` / ``MPI.PACKED`` plans, derived datatypes, and
    untyped byte buffers are not checked.
    """
    if dt == MPI.BYTE or dt == MPI.PACKED:
        return
    code = MPI._typecode(dt)
    if code is None:
        return
    have = _buffer_dtype(buf)
    if have is None or have.fields is not None:
        return
    try:
        want = np.dtype(code)
    except TypeError:
        return
    if have.newbyteorder("=") != want.newbyteorder("="):
        raise TypeError(f"{call}: {what} holds {have} elements but the plan is for {want}; "
                        f"pass an array of the plan's dtype (or a byte view of it)")


def allgather_object(comm: MPI.Intracomm, obj: object) -> list:
    """Every rank's ``obj``: pickled locally, moved with buffer-based calls only.

    The same result as mpi4py's ``comm.allgather(obj)``, without a pickle-based collective
    (which holds the GIL while it waits, so threads driving other communicators stall).
    """
    return [pickle.loads(b) for b in allgather_bytes(comm, pickle.dumps(obj))]
