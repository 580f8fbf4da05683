"""The algorithm registry: what each algorithm is and what it can take.

Host algorithms (:mod:`pya2a.algorithms`) and device-only ones (:mod:`pya2a.gpu.algorithms`)
register an :class:`AlgorithmInfo` at import time, in their own module; the public face asks
these records (``host``, ``device``, ``in_place``, ...) and never compares names.
"""

from __future__ import annotations

import os
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mpi4py import MPI

    from .spec import VSpec

__all__ = ["AlgorithmInfo", "Bound", "Context", "register", "get", "names", "available",
           "usable", "execute", "requested", "raw_env", "name_code", "available_here", "refusal"]


@dataclass
class Context:
    """What an algorithm's ``run`` needs besides the two buffer specs.

    Attributes:
        comm: internal duplicate of the user's communicator (never matches user messages).
        rank, size: this rank and the number of ranks.
        kind: "alltoall" or "alltoallv" (native uses the matching MPI call).
        transport: transfer primitives for this buffer kind (see pya2a.transport).
        in_place: the send data lives in the receive buffer (MPI.IN_PLACE).
        options: algorithm-specific options (e.g. {"window": 8} for direct, {"grid": (r, c)}).
    """

    comm: MPI.Intracomm
    rank: int
    size: int
    kind: str
    transport: Any
    in_place: bool = False
    options: dict = field(default_factory=dict)


@dataclass
class Bound:
    """An exchange bound to two buffers by an algorithm's ``prepare`` (persistent requests).

    ``run()`` performs one exchange with no allocation and no schedule work; ``free()``
    releases the requests (local, never collective). ``persistent_collective`` is True when
    ``run`` starts a persistent *collective* request, which every rank must start in step.
    """

    run: Callable[[], None]
    free: Callable[[], None] = lambda: None
    persistent_collective: bool = False


@dataclass(frozen=True)
class AlgorithmInfo:
    """A registered algorithm.

    Attributes:
        name: public name, as passed to ``algorithm=``.
        run: ``run(send, recv, ctx)``; ``send`` is None when in place with ``ctx.in_place``.
        cost: ``cost(p, m, params) -> seconds`` for ``m`` bytes per peer.
        schedule: the pure schedule function, if the algorithm has one.
        supports: ``supports(p, send, recv, device) -> reason or None``; None means usable.
            For ``auto`` the answer is memoised per (p, device, datatype density, the
            registry, PYA2A_MESH_GRID): it must not depend on anything else.
        host, device: buffer kinds the algorithm accepts.
        needs_contiguous: works on bytes, so the datatype must be dense.
        prepare: optional ``prepare(send, recv, ctx) -> Bound | None``: bind the exchange to
            these two buffers once (persistent requests, precomputed views) for plans;
            ``ctx.options["persistent_collective"]`` allows a collective init (native's
            ``Alltoallv_init``). None (or a None result) means plans call ``run`` each time.
        program: optional ``program(send, recv, ctx) -> (rows, scratch, vtables) | None``:
            the exchange as an operation table that does not depend on the buffers'
            addresses (:mod:`pya2a.algorithms._bound`), made once per plan from its
            templates (``send`` None: in place); plans then run any buffer pair in one C
            loop. Host buffers only; it must send exactly the messages ``prepare``'s
            binding sends.
        model_m: optional ``model_m(stats) -> bytes``: the bytes per peer at which the
            selector evaluates ``cost`` and the measured correction, from the global
            :class:`pya2a.select.Stats`. None: ``stats.m_eff`` (the busiest rank's bytes / p).
            ``padded`` moves every block in a slot of the largest one, so it is priced at
            ``max_block``.
        takes_in_place: ``run(None, recv, ctx)`` handles an in-place exchange itself;
            otherwise the executor hands it a private copy of the receive buffer as ``send``.
        uses_transport: ``run`` moves data through ``ctx.transport``; False for algorithms
            that drive their own engine (``ipc``), which get ``ctx.transport = None``.
        oneshot_plan: one-shot calls may bind small exchanges as cached plans.
        schedule_options: keyword options that ``schedule`` takes from ``ctx.options``
            (``mesh``: ``("grid",)``).
        comm_available: optional ``comm_available(icomm, device) -> (ok, reason)``,
            collective on first use per communicator and the same on every rank: whether
            the algorithm can run on this communicator at all (node layout, peer access).
        comm_auto: optional ``comm_auto(icomm, device) -> (ok, reason)``, collective and
            cached like ``comm_available``: whether ``auto`` may pick it here, where it
            runs when asked for but slowly (``ipc`` with ranks time-slicing one GPU).
    """

    name: str
    run: Callable[..., None]
    cost: Callable[[int, float, dict], float]
    schedule: Callable[..., Any] | None = None
    supports: Callable[..., str | None] | None = None
    host: bool = True
    device: bool = False
    needs_contiguous: bool = True
    doc: str = ""
    prepare: Callable[[VSpec | None, VSpec, Context], Bound | None] | None = None
    model_m: Callable[[Any], float] | None = None
    takes_in_place: bool = False
    uses_transport: bool = True
    oneshot_plan: bool = True
    program: Callable[[VSpec | None, VSpec, Context], tuple | None] | None = None
    schedule_options: tuple[str, ...] = ()
    comm_available: Callable[[Any, int | None], tuple[bool, str]] | None = None
    comm_auto: Callable[[Any, int | None], tuple[bool, str]] | None = None


_REGISTRY: dict[str, AlgorithmInfo] = {}


def register(info: AlgorithmInfo) -> AlgorithmInfo:
    """Add (or replace) an algorithm under ``info.name``."""
    _REGISTRY[info.name] = info
    return info


def names() -> list[str]:
    """All registered algorithm names, in registration order."""
    return list(_REGISTRY)


def get(name: str, call: str = "pya2a") -> AlgorithmInfo:
    """The algorithm called ``name``; ValueError listing the known ones otherwise."""
    if not isinstance(name, str):
        raise TypeError(f"{call}: algorithm must be a string, not {type(name).__name__}")
    info = _REGISTRY.get(name)
    if info is None:  # the device algorithms register on first need: a name may be theirs
        from .devices import load_device_algorithms
        load_device_algorithms()
        info = _REGISTRY.get(name)
    if info is None:
        known = ", ".join(["auto", *_REGISTRY])
        raise ValueError(f"{call}: unknown algorithm {name!r}; known: {known}")
    return info


def available(p: int | None = None, device: bool = False) -> list[str]:
    """Names usable for ``p`` ranks (None: any) on host or device buffers."""
    out = []
    for info in _REGISTRY.values():
        if (device and not info.device) or (not device and not info.host):
            continue
        if p is not None and info.supports is not None and info.supports(p, None, None,
                                                                           device):
            continue
        out.append(info.name)
    return out



def usable(info: AlgorithmInfo, p: int, send: VSpec, recv: VSpec) -> str | None:
    """Why ``info`` cannot run this exchange of ``p`` ranks, or None if it can."""
    device = recv.device is not None
    if device and not info.device:
        return "does not take device buffers"
    if not device and not info.host:
        return "takes device buffers only"
    if info.needs_contiguous and not (send.contiguous and recv.contiguous):
        return "needs a contiguous datatype (size == extent); use 'native'"
    if info.supports is not None:
        return info.supports(p, send, recv, device)
    return None


def execute(info: AlgorithmInfo, send: VSpec | None, recv: VSpec, ctx: Context) -> None:
    """Run one exchange: a device transport is begun before and always finished after."""
    t = ctx.transport
    if t is None or t.device is None:
        info.run(send, recv, ctx)
        return
    t.begin()
    ok = False
    try:
        info.run(send, recv, ctx)
        ok = True
    finally:
        t.finish(ok)


_ENV_DATA = getattr(os.environ, "_data", None)  # POSIX: the raw mapping, keys in bytes
_ENV_KEY = b"PYA2A_ALGORITHM"

if isinstance(_ENV_DATA, dict) and os.name == "posix":
    # read on every call (tests and users change settings at run time), without
    # os.environ's per-call key encoding: this sits on the one-shot fast path
    raw_env = _ENV_DATA.get
else:  # pragma: no cover - non-POSIX

    def raw_env(key: bytes) -> bytes | None:
        """The environment variable ``key`` as bytes (None when unset)."""
        value = os.environ.get(key.decode())
        return None if value is None else value.encode()


def requested(algorithm: object) -> str:
    """The algorithm asked for: ``algorithm``, or ``PYA2A_ALGORITHM`` when it is "auto"."""
    if algorithm == "auto":
        raw = raw_env(_ENV_KEY)
        return raw.decode() if raw else "auto"
    return algorithm  # type: ignore[return-value]


def name_code(name: str) -> int:
    """A name as an integer for agreement records (the same on every rank)."""
    return zlib.crc32(name.encode())


def refusal(icomm: Any, device: int | None, name: str, *, auto: bool = False) -> str | None:
    """Why ``name`` cannot run on this communicator at all (with ``auto``: or should not
    be picked by ``auto`` here), or None.

    Collective on first use per (communicator, algorithm); the same verdict on every rank.
    """
    info = get(name)
    for check in (info.comm_available, info.comm_auto if auto else None):
        if check is not None:
            ok, why = check(icomm, device)
            if not ok:
                return why
    return None


def available_here(icomm: Any, device: int | None, cands: tuple[str, ...], *,
                   auto: bool = False) -> tuple[str, ...]:
    """``cands`` less the algorithms that cannot run on this communicator at all (with
    ``auto``: less those ``auto`` should not pick here either)."""
    return tuple(n for n in cands if refusal(icomm, device, n, auto=auto) is None)
