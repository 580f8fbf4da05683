"""Build the Cython extension; metadata lives in pyproject.toml."""

import numpy
from Cython.Build import cythonize
from setuptools import Extension, setup

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

setup(ext_modules=cythonize(extensions, compiler_directives={"language_level": "3"}))
