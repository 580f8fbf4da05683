#!/bin/bash
# Session 4, first device call (nvidia-h200-x4, .whl carried): where the small ll time goes
# (bench/ipc_floor.py: launch costs, kernel variants, ll_min_chunk, NCCL reference), then
# the GPU suites on 4 ranks x 1 GPU (early fin + Cython launcher), 1 rank, 4 ranks on 1 GPU.
set -u
T0=$SECONDS
stamp() { echo "== $1 at +$((SECONDS - T0))s"; }
. bench/device_env.sh
export PYTHONUNBUFFERED=1
mkdir -p /tmp/logs
PT="-q -p no:cacheprovider -o addopts="
SUITES="tests/test_gpu_api.py tests/test_gpu_shm.py tests/test_gpu_ipc.py tests/test_gpu_device.py tests/test_moe.py"
stamp "floor"
timeout -k 5 240 $M -n 4 python3 bench/ipc_floor.py ${FLOOR_ARGS:-} --out "$OUT/ipc_floor_h200x4.json" \
  2>&1 | tee /tmp/logs/floor.log | grep -v "^ll .*chunk  *[0-9]* *262144"
stamp "GPU tests, 4 ranks x 1 GPU"
timeout -k 5 240 $M -n 4 python3 -m mpi4py tests/run_mpi.py $PT -m "not serial" $SUITES \
  > /tmp/logs/gpu_tests_4x1.log 2>&1
echo "rc=$?"; tail -n 2 /tmp/logs/gpu_tests_4x1.log
stamp "GPU tests, 1 rank"
timeout -k 5 150 $M -n 1 python3 -m mpi4py tests/run_mpi.py $PT -m "not serial" $SUITES \
  > /tmp/logs/gpu_tests_1.log 2>&1
echo "rc=$?"; tail -n 2 /tmp/logs/gpu_tests_1.log
stamp "GPU tests, 4 ranks on 1 GPU"
CUDA_VISIBLE_DEVICES=0 timeout -k 5 150 $M -n 4 -x CUDA_VISIBLE_DEVICES python3 -m mpi4py \
  tests/run_mpi.py $PT -m "not serial" $SUITES > /tmp/logs/gpu_tests_4on1.log 2>&1
echo "rc=$?"; tail -n 2 /tmp/logs/gpu_tests_4on1.log
grep -aE "^(FAILED|ERROR)" /tmp/logs/gpu_tests_*.log | sort | uniq | head -20
tar czf "$OUT/logs_floor.tgz" -C /tmp/logs .
stamp done
