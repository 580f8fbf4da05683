#!/bin/bash
# Session 3: the staged device path (host MPI between pinned mirrors, the path across
# nodes) with the MPICH 5.0.2 wheel as the host MPI instead of Open MPI 4.1.6, on
# nvidia-h200-x4, 4 ranks x 1 GPU; both MPIs in the same call. .whl carried.
set -u
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
SITE=/tmp/pya2a_site
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 NCCL_NVLS_ENABLE=0
export PYTHONWARNINGS=ignore::DeprecationWarning
python3 -m pip install -q --no-index --no-deps --no-compile --target $SITE .whl/cython*.whl
python3 -c "import glob, zipfile; zipfile.ZipFile(glob.glob('.whl/mpich*.whl')[0]).extractall('$SITE/whl')"
mkdir -p $SITE/mpich && cp -r $SITE/whl/mpich-*.data/data/* $SITE/mpich/ && chmod +x $SITE/mpich/bin/*
export PYTHONPATH=$SITE:$PWD
python3 setup.py build_ext --inplace -q > "$OUT/build.log" 2>&1 || { tail "$OUT/build.log"; exit 1; }
SZ="--sizes 1048576,16777216,67108864 --algorithms pairwise,native"
echo "== MPICH wheel"
MPI4PY_LIBMPI=$SITE/mpich/lib/libmpi.so.12 timeout -k 5 150 $SITE/mpich/bin/mpiexec -n 4 \
  python3 -m pya2a.tools.gpu_bench_staged $SZ --out "$OUT/gpu_staged_mpich_h200x4.json" \
  > "$OUT/staged_mpich.log" 2>&1; echo "rc=$?"; tail -n 25 "$OUT/staged_mpich.log" | cut -c1-170
echo "== Open MPI 4.1.6"
timeout -k 5 150 mpiexec --allow-run-as-root --oversubscribe --bind-to none -n 4 \
  python3 -m pya2a.tools.gpu_bench_staged $SZ --out "$OUT/gpu_staged_ompi_h200x4.json" \
  > "$OUT/staged_ompi.log" 2>&1; echo "rc=$?"; tail -n 25 "$OUT/staged_ompi.log" | cut -c1-170
