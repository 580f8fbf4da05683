#!/bin/bash
# Session 3, device call 3 (nvidia-h200-x4, .whl carried): the CPU sweep again with the
# selector that interpolates measured times (auto rows measured, not inferred), then the GPU
# suites after the ipc-availability fix: 4 ranks x 1 GPU (all GPU test files) and 4 ranks
# sharing GPU 0.
set -u
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT" /tmp/cpures
PS="64 32 16" PATTERNS="uniform skew" PLOT=0 BENCH_TIMEOUT=110 \
  timeout 330 bash bench/results/cpu_run.sh /tmp/cpures > /tmp/cpures/cpu_run_log.txt 2>&1
echo "cpu rc=$?"
tar czf "$OUT/cpu_results.tgz" -C /tmp/cpures .
grep -a "==\|geomean\|worst\|Terminated" /tmp/cpures/cpu_run_log.txt
SANITIZE=0 EXAMPLES=0 BENCH=0 bash bench/session3_gpu_run.sh
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 PYTHONPATH=/tmp/site:$PWD
echo "== 4 ranks on GPU 0"
CUDA_VISIBLE_DEVICES=0 timeout -k 5 120 mpiexec --allow-run-as-root --oversubscribe \
  --bind-to none -n 4 python3 -m mpi4py tests/run_mpi.py -q -p no:cacheprovider -o addopts= \
  -m "not serial" tests/test_gpu_api.py tests/test_gpu_shm.py tests/test_gpu_device.py \
  > "$OUT/gpu_tests_4on1.log" 2>&1
echo "rc=$?"; tail -n 2 "$OUT/gpu_tests_4on1.log"
