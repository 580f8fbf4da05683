#!/bin/bash
# Session 4, final device call on nvidia-h200-x4 (.whl carried): the GPU suites on 4 ranks,
# the bench of record against NCCL (every row best of 3 passes, NCCL's too), and the
# public-API auto path at 4 / 16 MiB with its registration and method reported.
set -u
. bench/device_env.sh
stamp "GPU tests, 4 ranks x 1 GPU"
gpu_suites 4 gpu_tests_4x1_final
gpu_bench 4 gpu_bench_h200x4_s4
stamp "auto at 4 / 16 MiB"
timeout -k 5 120 $M -n 4 python3 bench/ipc_direct_api.py --sizes 4194304,16777216 \
  > /tmp/logs/direct_api.log 2>&1
echo "rc=$?"; cat /tmp/logs/direct_api.log | cut -c1-400
tar czf "$OUT/logs_final.tgz" -C /tmp/logs .
stamp done
