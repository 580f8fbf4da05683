"""The one loader of pya2a's CUDA / HIP kernel files (``pya2a/gpu/kernels/*.cu``).

:func:`module` reads a kernel file, pastes the shared header ``pya2a_device.cuh`` (and any
other local ``#include "*.cuh"``) in place, compiles it once per process and device with
CuPy's ``RawModule`` (NVRTC, or hiprtc under ROCm) and keeps it. Pasting the headers in
makes CuPy's on-disk cache key on the whole text, so an edited header is never served
from a stale cache, and the compiler needs no include path.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from . import cupy as _cupy

__all__ = ["KERNEL_DIR", "source", "module", "function_ptr"]

KERNEL_DIR = Path(__file__).resolve().parent / "kernels"
_INCLUDE = re.compile(r'^[ \t]*#[ \t]*include[ \t]*"([\w.]+\.cuh)"[ \t]*$', re.MULTILINE)
_OPTIONS = ("-std=c++17",)
_MODULES: dict[tuple[str, int, tuple[str, ...]], Any] = {}
_SOURCES: dict[str, str] = {}


def source(name: str) -> str:
    """The text of kernel file ``name`` with its local headers pasted in (each once)."""
    text = _SOURCES.get(name)
    if text is None:
        seen: set[str] = set()

        def paste(match: re.Match) -> str:
            header = match.group(1)
            if header in seen:
                return ""
            seen.add(header)
            body = (KERNEL_DIR / header).read_text(encoding="utf-8")
            return _INCLUDE.sub(paste, body)

        text = _SOURCES[name] = _INCLUDE.sub(paste, (KERNEL_DIR / name).read_text(encoding="utf-8"))
    return text


def module(name: str, device: int, name_expressions: tuple[str, ...] = ()) -> Any:
    """The compiled ``cupy.RawModule`` of kernel file ``name`` (e.g. ``"pack.cu"``) for
    ``device``; compiled on first use per process, device and name expressions (template
    instances to instantiate)."""
    key = (name, int(device), tuple(name_expressions))
    mod = _MODULES.get(key)
    if mod is None:
        cp = _cupy()
        with cp.cuda.Device(int(device)):
            mod = cp.RawModule(code=source(name), options=_OPTIONS,
                               name_expressions=tuple(name_expressions) or None)
            mod.compile()
        _MODULES[key] = mod
    return mod


def function_ptr(mod: Any, name: str) -> int:
    """The driver handle (``CUfunction``) of kernel ``name`` in ``mod``, for raw launches."""
    return int(mod.get_function(name).kernel.ptr)
