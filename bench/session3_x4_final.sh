#!/bin/bash
# Session 3, final device call (nvidia-h200-x4, .whl carried): the GPU suites with
# programmatic dependent launch on by default, the bench against NCCL (the one-shot rows
# now with PDL), and a profile of the device one-shot path.
set -u
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
SANITIZE=0 EXAMPLES=0 TAG=x4_final BENCH_ARGS="--sizes 128,1024,8192,65536,1048576,16777216,268435456 --nccl-graph" \
  bash bench/session3_gpu_run.sh
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 PYTHONPATH=/tmp/site:$PWD
echo "== one-shot profile, 1 KiB"
timeout -k 5 60 mpiexec --allow-run-as-root --oversubscribe --bind-to none -n 4 \
  python3 bench/gpu_oneshot_profile.py 1024 > "$OUT/gpu_oneshot_profile_h200x4.txt" 2>&1
echo "rc=$?"; head -40 "$OUT/gpu_oneshot_profile_h200x4.txt"
