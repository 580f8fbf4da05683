# cython: language_level=3, boundscheck=False, wraparound=False
"""Kernel launches straight through the CUDA driver, for the IPC engine's hot path.

``libcuda.so.1`` is opened at run time (``dlopen``), so this module builds without the
CUDA toolkit and imports on machines without a GPU; :func:`available` then says False
and the engine launches through CuPy instead. A :class:`Launcher` holds one
kernel, its grid, its block and its parameter block; :meth:`Launcher.run` is one C call
(``cuLaunchKernel``, or ``cuLaunchKernelEx`` with programmatic stream serialization),
which is what a small exchange costs on the host (ctypes adds ~0.5-1 us per launch).
"""

from libc.stdint cimport int32_t, uint32_t, uintptr_t
from libc.string cimport memset


cdef extern from "<dlfcn.h>" nogil:
    void* dlopen(const char* filename, int flag)
    void* dlsym(void* handle, const char* symbol)
    int RTLD_NOW


ctypedef int (*launch_ex_t)(const void* config, void* f, void** params,
                            void** extra) noexcept nogil
ctypedef int (*launch_t)(void* f, unsigned int gx, unsigned int gy, unsigned int gz,
                         unsigned int bx, unsigned int by, unsigned int bz,
                         unsigned int smem, void* stream, void** params,
                         void** extra) noexcept nogil


# CUlaunchAttribute: id, padding to 8 bytes, 64-byte value union (cuda.h, CUDA 12)
cdef struct LaunchAttr:
    uint32_t id
    uint32_t pad
    int32_t value
    char rest[60]


# CUlaunchConfig (cuda.h, CUDA 12)
cdef struct LaunchConfig:
    unsigned int gx
    unsigned int gy
    unsigned int gz
    unsigned int bx
    unsigned int by
    unsigned int bz
    unsigned int smem
    void* stream
    LaunchAttr* attrs
    unsigned int nattrs


# CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION
cdef enum:
    PDL_ATTRIBUTE = 6

cdef launch_ex_t _launch_ex = NULL
cdef launch_t _launch = NULL
cdef bint _tried = False


def available() -> bool:
    """Whether the driver's ``cuLaunchKernel`` could be resolved (libcuda present)."""
    global _tried, _launch_ex, _launch
    cdef void* h
    if not _tried:
        _tried = True
        h = dlopen(b"libcuda.so.1", RTLD_NOW)
        if h != NULL:
            _launch = <launch_t>dlsym(h, b"cuLaunchKernel")
            _launch_ex = <launch_ex_t>dlsym(h, b"cuLaunchKernelEx")
    return _launch != NULL


def has_launch_ex() -> bool:
    """Whether the driver also has ``cuLaunchKernelEx`` (CUDA 12+)."""
    return available() and _launch_ex != NULL


cdef class Launcher:
    """One kernel launch with a fixed grid, block and single by-value parameter block.

    Args:
        fn: ``CUfunction`` (e.g. ``RawModule.get_function(name).kernel.ptr``).
        grid, block: 1-D grid and block sizes.
        args_addr: host address of the kernel's one parameter (a struct passed by
            value); the caller keeps that memory alive and may rewrite it between runs.
        keep: any object to hold on to for the launcher's lifetime (the parameter memory).
    """

    cdef LaunchConfig cfg
    cdef LaunchAttr attr
    cdef void* fn
    cdef void* params[1]
    cdef object keep

    def __init__(self, uintptr_t fn, unsigned int grid, unsigned int block,
                 uintptr_t args_addr, object keep=None):
        if not available():
            raise RuntimeError("pya2a: libcuda.so.1 / cuLaunchKernel not found")
        self.fn = <void*>fn
        self.params[0] = <void*>args_addr
        self.keep = keep
        memset(&self.attr, 0, sizeof(LaunchAttr))
        self.attr.id = PDL_ATTRIBUTE
        self.attr.value = 1
        memset(&self.cfg, 0, sizeof(LaunchConfig))
        self.cfg.gx = grid
        self.cfg.gy = 1
        self.cfg.gz = 1
        self.cfg.bx = block
        self.cfg.by = 1
        self.cfg.bz = 1
        self.cfg.attrs = &self.attr
        self.cfg.nattrs = 1

    def run(self, uintptr_t stream, bint pdl) -> int:
        """Launch on ``stream``; ``pdl`` asks for programmatic dependent launch.

        Returns the driver's ``CUresult`` (0 = success); nothing is raised here.
        """
        cdef int rc
        cdef void* s = <void*>stream
        if pdl and _launch_ex != NULL:
            self.cfg.stream = s
            with nogil:
                rc = _launch_ex(&self.cfg, self.fn, self.params, NULL)
            return rc
        if pdl:
            return 801  # CUDA_ERROR_NOT_SUPPORTED: no cuLaunchKernelEx in this driver
        with nogil:
            rc = _launch(self.fn, self.cfg.gx, 1, 1, self.cfg.bx, 1, 1, 0, s, self.params,
                         NULL)
        return rc


def layout() -> tuple:
    """Sizes and offsets of the driver structs as compiled here, for a layout test:
    (sizeof CUlaunchConfig, sizeof CUlaunchAttribute, offsets of hStream, attrs,
    numAttrs in the config, offset of the value in the attribute)."""
    cdef LaunchConfig c
    cdef LaunchAttr a
    cdef char* cb = <char*>&c
    cdef char* ab = <char*>&a
    return (sizeof(LaunchConfig), sizeof(LaunchAttr), <char*>&c.stream - cb,
            <char*>&c.attrs - cb, <char*>&c.nattrs - cb, <char*>&a.value - ab)
