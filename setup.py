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
