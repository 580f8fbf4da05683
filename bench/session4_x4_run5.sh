#!/bin/bash
# Session 4, last x4 device call (.whl carried), after moving the block count to the start
# of each call (begin_call) and reading the LL "finished" flag with the call number: the
# floor script (new protocol, without PDL, and the session-3 protocol), the GPU suites on
# 4 ranks, compute-sanitizer memcheck and racecheck on small cases, the bench of record.
set -u
. bench/device_env.sh
stamp "floor"
timeout -k 5 150 $M -n 4 python3 bench/ipc_floor.py --variants default,default_nopdl,late_fin \
  --chunks 2048 --out "$OUT/ipc_floor4_h200x4.json" > /tmp/logs/floor4.log 2>&1
echo "rc=$?"; grep "^ll\|^nccl" /tmp/logs/floor4.log
stamp "GPU tests, 4 ranks x 1 GPU"
gpu_suites 4 gpu_tests_4x1_run5
T="tests/test_gpu_ipc.py"
SMALL="$T::test_ll $T::test_push_staged $T::test_pull_symmetric_send $T::test_copy_engine $T::test_mixed_methods_in_sequence $T::test_cuda_graph_capture $T::test_programmatic_dependent_launch"
for tool in memcheck racecheck; do sanitize $tool 4 sanitizer_${tool}_run5 $SMALL; done
gpu_bench 4 gpu_bench_h200x4_s4b
tar czf "$OUT/logs_run5.tgz" -C /tmp/logs .
stamp done
