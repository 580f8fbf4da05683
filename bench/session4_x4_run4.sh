#!/bin/bash
# Session 4, fourth device call (nvidia-h200-x4, .whl carried): how many thread blocks copy
# the rank's own block (engine self_chunk) at 8-256 KiB, then compute-sanitizer memcheck
# and racecheck on small cases of every method with this session's kernels, 4 ranks.
# (The --self-chunks option and the engine attribute self_chunk it set existed only for this
# run; with no effect measured, 4.70-4.71 us at 64 KiB for every value, both were removed.)
set -u
. bench/device_env.sh
stamp "floor: self_chunk"
timeout -k 5 150 $M -n 4 python3 bench/ipc_floor.py --variants default --chunks 2048 \
  --self-chunks 131072,32768,16384,8192 --sizes 128,8192,65536,262144 \
  --out "$OUT/ipc_floor3_h200x4.json" > /tmp/logs/floor3.log 2>&1
echo "rc=$?"; grep "^ll\|^nccl" /tmp/logs/floor3.log
T="tests/test_gpu_ipc.py"
SMALL="$T::test_ll $T::test_push_staged $T::test_push_symmetric_recv_in_place $T::test_pull_symmetric_send $T::test_copy_engine $T::test_mixed_methods_in_sequence $T::test_misaligned_displacements $T::test_cuda_graph_capture $T::test_programmatic_dependent_launch"
for tool in memcheck racecheck; do sanitize $tool 4 sanitizer_${tool}_s4 $SMALL; done
tar czf "$OUT/logs_run4.tgz" -C /tmp/logs .
stamp done
