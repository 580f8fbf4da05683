#!/bin/bash
# Session 4, second device call (nvidia-h200-x4, .whl carried), after the first one's
# findings (early fin, no finish fence, ll_min_chunk 2 KiB) and two more kernel changes
# (payload load before the call number, no barrier for the call number): the floor
# script again, the GPU suites on 4 ranks, the bench against NCCL, the one-shot profile.
set -u
. bench/device_env.sh
stamp "floor"
timeout -k 5 200 $M -n 4 python3 bench/ipc_floor.py --variants default,default_nopdl,late_fin \
  --chunks 1024,2048,4096 --out "$OUT/ipc_floor2_h200x4.json" > /tmp/logs/floor2.log 2>&1
echo "rc=$?"; grep -v "chunk   1024\|chunk   4096" /tmp/logs/floor2.log
stamp "GPU tests, 4 ranks x 1 GPU"
gpu_suites 4 gpu_tests_4x1_run2
stamp "bench"
timeout -k 5 240 $M -n 4 python3 -m pya2a.tools.gpu_bench \
  --sizes 128,1024,8192,65536,262144,1048576,16777216,268435456 --nccl-graph \
  --out "$OUT/gpu_bench_h200x4_s4.json" > /tmp/logs/gpu_bench_s4.log 2>&1
echo "rc=$?"; grep -aE "nccl|ll|auto|push_inplace |ce_inplace" /tmp/logs/gpu_bench_s4.log | grep -v "_graph\|_plan" | head -70
grep -aE "_graph|_plan" /tmp/logs/gpu_bench_s4.log | grep -aE "ll|nccl" | head -40
stamp "one-shot profile"
timeout -k 5 60 $M -n 4 python3 bench/gpu_oneshot_profile.py 1024 > "$OUT/gpu_oneshot_profile_h200x4_s4.txt" 2>&1
echo "rc=$?"; head -12 "$OUT/gpu_oneshot_profile_h200x4_s4.txt"
tar czf "$OUT/logs_run2.tgz" -C /tmp/logs .
stamp done
