#!/bin/bash
# Session 3 on nvidia-h100-x1 (.whl carried): the device suites with 4 ranks sharing the one
# GPU (ipc refused, auto falls back) and with 1 rank (p = 1: device-to-device copy path).
set -u
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 PYTHONWARNINGS=ignore::DeprecationWarning
python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/cython*.whl
export PYTHONPATH=/tmp/site:$PWD
python3 setup.py build_ext --inplace -q > "$OUT/build.log" 2>&1 || { tail "$OUT/build.log"; exit 1; }
nvidia-smi -L
M="mpiexec --allow-run-as-root --oversubscribe --bind-to none"
for n in 4 1; do
  echo "== $n rank(s) on one H100"
  timeout -k 5 150 $M -n $n python3 -m mpi4py tests/run_mpi.py -q -p no:cacheprovider -o addopts= \
    -m "not serial" tests/test_gpu_api.py tests/test_gpu_shm.py tests/test_gpu_device.py \
    tests/test_gpu_ipc.py > "$OUT/gpu_tests_h100x1_n$n.log" 2>&1
  echo "rc=$?"; tail -n 1 "$OUT/gpu_tests_h100x1_n$n.log"; grep -a "FAILED" "$OUT/gpu_tests_h100x1_n$n.log" | head
done
