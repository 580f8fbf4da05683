"""Build the Cython extension; metadata lives in pyproject.toml."""

import os
import shlex
import shutil
import subprocess
import sys

import numpy
from Cython.Build import cythonize
from setuptools import Extension, setup


def mpi_flags():
    """Compile and link flags for the MPI library mpi4py uses, or None when none is found.

    ``MPICC`` names an MPI compiler wrapper explicitly; otherwise mpi4py built from source
    records its ``mpicc``; a binary mpi4py with the MPICH wheel has ``mpi.h`` and ``libmpi``
    under this environment's prefix; otherwise an ``mpicc`` on PATH. pya2a checks at
    import that the library linked is the one mpi4py loaded.
    """
    mpicc = os.environ.get("MPICC")
    if not mpicc:
        try:
            import mpi4py

            mpicc = mpi4py.get_config().get("mpicc")
        except Exception:
            mpicc = None
    prefix = sys.prefix
    if not mpicc and os.path.exists(os.path.join(prefix, "include", "mpi.h")) and \
            os.path.exists(os.path.join(prefix, "lib", "libmpi.so")):
        lib = os.path.join(prefix, "lib")
        return {"include_dirs": [os.path.join(prefix, "include")], "library_dirs": [lib],
                "libraries": ["mpi"], "runtime_library_dirs": [lib]}
    mpicc = mpicc or shutil.which("mpicc")
    if not mpicc:
        return None
    for args in (["-show"], ["--showme"]):
        try:
            out = subprocess.run(shlex.split(mpicc) + args, capture_output=True, text=True,
                                 timeout=30, check=True).stdout
        except Exception:
            continue
        words = shlex.split(out)[1:]
        flags: dict = {"include_dirs": [], "library_dirs": [], "libraries": [],
                       "runtime_library_dirs": [], "extra_link_args": []}
        for w in words:
            if w.startswith("-I"):
                flags["include_dirs"].append(w[2:])
            elif w.startswith("-L"):
                flags["library_dirs"].append(w[2:])
                flags["runtime_library_dirs"].append(w[2:])
            elif w.startswith("-l"):
                flags["libraries"].append(w[2:])
            elif w.startswith("-Wl,"):
                flags["extra_link_args"].append(w)
        if "mpi" in flags["libraries"]:
            return flags
    return None


extensions = [
    Extension(
        "pya2a.core._pack",
        ["pya2a/core/_pack.pyx"],
        include_dirs=[numpy.get_include()],
        define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")],
        extra_compile_args=["-O3"],
    ),
    Extension(
        "pya2a.core._typepack",
        ["pya2a/core/_typepack.pyx"],
        include_dirs=[numpy.get_include()],
        define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")],
        extra_compile_args=["-O3"],
    ),
    # the first stage of the message parser (mpi4py's message rules, the one-shot signature)
    Extension(
        "pya2a.core._msg",
        ["pya2a/core/_msg.pyx"],
        include_dirs=[numpy.get_include()],
        define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")],
        extra_compile_args=["-O3"],
    ),
    # GPU kernel launches through a dlopen'ed libcuda: no CUDA toolkit needed to build
    Extension(
        "pya2a.gpu._launch",
        ["pya2a/gpu/_launch.pyx"],
        extra_compile_args=["-O3"],
        libraries=["dl"],
    ),
]

_mpi = mpi_flags()
if _mpi is not None:
    # exchange programs: MPI calls in one C loop (optional: pya2a runs without it)
    extensions.append(Extension(
        "pya2a.core._exec",
        ["pya2a/core/_exec.pyx"],
        include_dirs=[numpy.get_include()] + _mpi.pop("include_dirs"),
        define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")],
        extra_compile_args=["-O3"],
        optional=True,
        **_mpi,
    ))

setup(ext_modules=cythonize(extensions, compiler_directives={"language_level": "3"}))
