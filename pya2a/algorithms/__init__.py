"""Algorithm registry.

Each algorithm module registers an :class:`AlgorithmInfo` at import time. Every module has
the same shape (DESIGN.md): a pure ``schedule(rank, size, ...)`` where the algorithm has one,
``run(send, recv, ctx)`` that walks it with ``ctx.transport``, and ``cost(p, m, params)``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mpi4py import MPI

    from ..bufspec import VSpec

__all__ = ["AlgorithmInfo", "Bound", "Context", "register", "get", "names", "available"]


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
        model_m: optional ``model_m(stats) -> bytes``: the bytes per peer at which the
            selector evaluates ``cost`` and the measured correction, from the global
            :class:`pya2a.select.Stats`. None: ``stats.m_eff`` (the busiest rank's bytes / p).
            ``padded`` moves every block in a slot of the largest one, so it is priced at
            ``max_block``.
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
    try:
        return _REGISTRY[name]
    except KeyError:
        known = ", ".join(["auto", *_REGISTRY])
        raise ValueError(f"{call}: unknown algorithm {name!r}; known: {known}") from None


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


def _load_builtin() -> None:
    from . import (  # noqa: F401  (registration)
        direct,
        hierarchical,
        hypercube,
        ipc,
        mesh,
        native,
        padded,
        pairwise,
        ring,
        shm,
    )


_load_builtin()
