#!/bin/bash
# Session 3: managed (unified) memory through every device algorithm on real GPUs
# (nvidia-h200-x4, .whl carried): 4 ranks x 1 GPU, then 4 ranks sharing GPU 0.
set -u
. bench/device_env.sh
echo "== 4 x 1 GPU"
timeout -k 5 120 $M -n 4 python3 -m mpi4py tests/run_mpi.py -q -p no:cacheprovider -o addopts= \
  tests/test_gpu_api.py -k managed > "$OUT/managed_4x1.log" 2>&1
echo "rc=$?"; tail -n 1 "$OUT/managed_4x1.log"; grep -a "Error\|assert" "$OUT/managed_4x1.log" | head
echo "== 4 on GPU 0"
CUDA_VISIBLE_DEVICES=0 timeout -k 5 100 $M -n 4 python3 -m mpi4py tests/run_mpi.py -q \
  -p no:cacheprovider -o addopts= tests/test_gpu_api.py -k managed > "$OUT/managed_4on1.log" 2>&1
echo "rc=$?"; tail -n 1 "$OUT/managed_4on1.log"; grep -a "Error\|assert" "$OUT/managed_4on1.log" | head
