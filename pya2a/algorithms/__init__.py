"""The built-in host algorithms; importing this package registers them.

Every module has the same shape (DESIGN.md): a pure ``schedule(rank, size, ...)`` where the
algorithm has one, ``run(send, recv, ctx)`` that walks it with ``ctx.transport`` (so host,
staged device and CUDA-aware transports share one body), ``cost(p, m, params)``, and its
``register(AlgorithmInfo(...))`` at the bottom with its capabilities. The registry itself
is :mod:`pya2a.core.registry`; device-only algorithms register from
:mod:`pya2a.gpu.algorithms`.
"""

from __future__ import annotations

from ..core.registry import (
    AlgorithmInfo,
    Bound,
    Context,
    available,
    execute,
    get,
    names,
    register,
    usable,
)

__all__ = ["AlgorithmInfo", "Bound", "Context", "register", "get", "names", "available",
           "usable", "execute"]

from . import (  # noqa: E402,F401  (registration, in this order)
    direct,
    hierarchical,
    hypercube,
    mesh,
    native,
    padded,
    pairwise,
    ring,
)
