# Sourced by the session-3 device scripts, from the repository root on a lent GPU machine
# with .whl carried: $OUT, Open MPI allowed as root, NCCL without NVLink SHARP, Cython from
# .whl into /tmp/site, the extension built in place (exits the caller if the build fails),
# and $M, the mpiexec command line.
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 NCCL_NVLS_ENABLE=0
export PYTHONWARNINGS=ignore::DeprecationWarning
python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/cython*.whl
export PYTHONPATH=/tmp/site:$PWD
python3 setup.py build_ext --inplace -q > "$OUT/build.log" 2>&1 || { tail "$OUT/build.log"; exit 1; }
M="mpiexec --allow-run-as-root --oversubscribe --bind-to none"
