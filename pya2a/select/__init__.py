"""Choosing an algorithm for ``algorithm="auto"``: cost models corrected by measurements.

Every rank must reach the same answer without further communication, so the choice is a pure
function of :class:`Stats`, values that are identical on every rank because they come from the
all-gathered agreement record (largest block, mean and busiest-rank bytes, p, ranks per node,
buffer kind), and of the tuning table, which every rank reads from the same file.

Prediction for algorithm ``a`` at p ranks and ``m`` effective bytes per peer::

    t_a(p, m) = r_a(m) * cost_a(p, m, params)

``cost_a`` is the algorithm's own textbook model (``algorithms/<name>.py``) in the machine
parameters ``o`` (per-call software overhead), ``ts`` (message start-up), ``tw`` (seconds per
byte), ``tp`` (our per-message Python overhead) and ``tr`` (local rearrangement, seconds per
byte). ``r_a(m)`` is the measured correction, ``measured / model``, recorded by
``python -m pya2a tune`` at the tuned p and interpolated log-log in ``m`` (clamped at the
ends); for another p the correction of the nearest tuned p is used. At the tuned p the
prediction is therefore the measurement itself, elsewhere the model carries it. An algorithm
other than ``native`` is only chosen when predicted faster than ``native`` by the table's
``margin`` (default 10 %), so noise in the table cannot make ``auto`` lose to the library.

``m`` is the *busiest* rank's bytes per peer, ``max(send or receive bytes of one rank) / p``:
an exchange ends when its busiest rank is done, so a skewed or hot exchange is priced like a
uniform one of the busiest rank's size. An algorithm may name another size
(``AlgorithmInfo.model_m``): ``padded`` carries every block in a slot of the largest block,
so it is priced, model and correction alike, at ``max_block``.

Tuning table: ``PYA2A_TUNING=path``, else ``$XDG_CACHE_HOME/pya2a/tuning.json`` (default
``~/.cache/pya2a/tuning.json``), else the built-in :data:`DEFAULT_TABLE`; docs/selection.md
says where its numbers come from.

Modules: :mod:`.table` (defaults and tuning files), :mod:`.model` (:class:`Stats`, the cost
model, :func:`ranking`), :mod:`.choose` (:func:`choose`). ``PYA2A_ALGORITHM`` or
``algorithm=`` bypass all of this.
"""

from __future__ import annotations

from .choose import DEVICE_PAIRWISE_FROM, DEVICE_SHM_FROM, choose
from .model import Stats, predict, ranking
from .table import (
    DEFAULT_MARGIN,
    DEFAULT_PARAMS,
    DEFAULT_TABLE,
    _builtin,
    _normalize,
    load_table,
    table_path,
)

__all__ = ["Stats", "choose", "ranking", "predict", "load_table", "table_path", "DEFAULT_TABLE",
           "DEFAULT_PARAMS", "DEFAULT_MARGIN", "DEVICE_PAIRWISE_FROM", "DEVICE_SHM_FROM",
           "_builtin", "_normalize"]
