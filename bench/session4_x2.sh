#!/bin/bash
# Session 4, nvidia-h200-x2 (.whl carried): the GPU suites on 2 ranks, compute-sanitizer
# racecheck on the graph-capture tests as fixed (the send data is now complete before the
# non-blocking stream replays) and as they were (old_s3/test_gpu_ipc.py, carried), then
# the bench against NCCL, best of 3 passes.
set -u
. bench/device_env.sh
stamp "GPU tests, 2 ranks x 1 GPU"
gpu_suites 2 gpu_tests_2x1
G="::test_cuda_graph_capture"
cp old_s3/test_gpu_ipc.py tests/test_gpu_ipc_old_s3.py
for t in tests/test_gpu_ipc.py tests/test_gpu_ipc_old_s3.py; do
  sanitize racecheck 2 racecheck_$(basename $t .py) "$t$G"
done
rm tests/test_gpu_ipc_old_s3.py
gpu_bench 2 gpu_bench_h200x2_s4
tar czf "$OUT/logs_x2.tgz" -C /tmp/logs .
stamp done
