#!/bin/bash
# Session 3 on nvidia-h100-x1 (.whl carried): the device suites with 4 ranks sharing the one
# GPU (ipc refused, auto falls back) and with 1 rank (p = 1: device-to-device copy path).
set -u
. bench/device_env.sh
nvidia-smi -L
for n in 4 1; do
  echo "== $n rank(s) on one H100"
  timeout -k 5 150 $M -n $n python3 -m mpi4py tests/run_mpi.py -q -p no:cacheprovider -o addopts= \
    -m "not serial" tests/test_gpu_api.py tests/test_gpu_shm.py tests/test_gpu_device.py \
    tests/test_gpu_ipc.py > "$OUT/gpu_tests_h100x1_n$n.log" 2>&1
  echo "rc=$?"; tail -n 1 "$OUT/gpu_tests_h100x1_n$n.log"; grep -a "FAILED" "$OUT/gpu_tests_h100x1_n$n.log" | head
done
