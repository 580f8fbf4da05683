"""The lowest layer: per-communicator state, the message parser, validation and agreement,
the algorithm registry, the transport protocol and the host transport. Never imports
:mod:`pya2a.gpu` at module level (:mod:`pya2a.core.devices` is the one lazy seam)."""
