#!/bin/bash
# Session 4, first device call (nvidia-h200-x4, .whl carried): where the small ll time goes
# (bench/ipc_floor.py: launch costs, kernel variants, ll_min_chunk, NCCL reference), then
# the GPU suites on 4 ranks x 1 GPU (early fin + Cython launcher), 1 rank, 4 ranks on 1 GPU.
set -u
. bench/device_env.sh
stamp "floor"
timeout -k 5 240 $M -n 4 python3 bench/ipc_floor.py ${FLOOR_ARGS:-} --out "$OUT/ipc_floor_h200x4.json" \
  2>&1 | tee /tmp/logs/floor.log | grep -v "^ll .*chunk  *[0-9]* *262144"
stamp "GPU tests, 4 ranks x 1 GPU"
gpu_suites 4 gpu_tests_4x1
stamp "GPU tests, 1 rank"
gpu_suites 1 gpu_tests_1
stamp "GPU tests, 4 ranks on 1 GPU"
CUDA_VISIBLE_DEVICES=0 gpu_suites 4 gpu_tests_4on1 -x CUDA_VISIBLE_DEVICES
tar czf "$OUT/logs_floor.tgz" -C /tmp/logs .
stamp done
