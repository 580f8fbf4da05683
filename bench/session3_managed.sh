#!/bin/bash
# Session 3: managed (unified) memory through every device algorithm on real GPUs
# (nvidia-h200-x4, .whl carried): 4 ranks x 1 GPU, then 4 ranks sharing GPU 0.
set -u
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 NCCL_NVLS_ENABLE=0
export PYTHONWARNINGS=ignore::DeprecationWarning
python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/cython*.whl
export PYTHONPATH=/tmp/site:$PWD
python3 setup.py build_ext --inplace -q > "$OUT/build.log" 2>&1 || { tail "$OUT/build.log"; exit 1; }
M="mpiexec --allow-run-as-root --oversubscribe --bind-to none"
echo "== 4 x 1 GPU"
timeout -k 5 120 $M -n 4 python3 -m mpi4py tests/run_mpi.py -q -p no:cacheprovider -o addopts= \
  tests/test_gpu_api.py -k managed > "$OUT/managed_4x1.log" 2>&1
echo "rc=$?"; tail -n 1 "$OUT/managed_4x1.log"; grep -a "Error\|assert" "$OUT/managed_4x1.log" | head
echo "== 4 on GPU 0"
CUDA_VISIBLE_DEVICES=0 timeout -k 5 100 $M -n 4 python3 -m mpi4py tests/run_mpi.py -q \
  -p no:cacheprovider -o addopts= tests/test_gpu_api.py -k managed > "$OUT/managed_4on1.log" 2>&1
echo "rc=$?"; tail -n 1 "$OUT/managed_4on1.log"; grep -a "Error\|assert" "$OUT/managed_4on1.log" | head
