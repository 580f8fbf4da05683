#!/bin/bash
# One device call (nvidia-h200-x4, .whl carried) for this round's checks and numbers:
#   1. bench/gpu_shm_run.sh with Open MPI only, 128 B .. 256 MiB per pair (GPU tests of shm
#      and the public API at 4x1 and 4-on-1, bench --device cuda with NCCL, ipc, staged,
#      shm and one-shot auto rows, the 4-on-1 shm/staged sweep);
#   2. bench/gpu_api_overhead.py: host time per call of the public API on device buffers;
#   3. CPU: Zipf-skewed exchanges at 8 B .. 32 KiB, p = 16/32/64 (MPICH wheel), with the
#      committed tuning table, after padded's waste pricing.
set -u
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
SKIP_MPICH=1 SIZES="-b 128 -e 256M -f 8" BENCH_TIMEOUT=150 bash bench/gpu_shm_run.sh
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 NCCL_NVLS_ENABLE=0
export PYTHONWARNINGS=ignore::DeprecationWarning PYTHONPATH=/tmp/shm_site:$PWD
echo "== api overhead"
timeout -k 5 60 mpiexec --allow-run-as-root --oversubscribe --bind-to none -n 4 \
  python3 bench/gpu_api_overhead.py --out "$OUT/gpu_api_overhead_fast_h200x4.json" 2>&1 | tail -12
echo "== cpu skew small sizes"
mkdir -p /tmp/cpures && cp bench/results/cpu_tune.json /tmp/cpures/
SITE=/tmp/pya2a_site PS="16 32 64" TUNE_PS="" PATTERNS=skew SIZES="-b 8 -e 32K -f 4" PLOT=0 \
  BENCH_TIMEOUT=60 PROFILE_MIN_P=1000 timeout 200 bash bench/results/cpu_run.sh /tmp/cpures \
  > /tmp/cpures/log.txt 2>&1
for p in 16 32 64; do cp /tmp/cpures/cpu_p${p}_skew.json "$OUT/cpu_p${p}_skew_small.json"; done
grep -a "==\|geomean\|worst" /tmp/cpures/log.txt
