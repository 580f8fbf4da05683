#!/bin/bash
# Session 4, nvidia-h200-x2 (.whl carried): the GPU suites on 2 ranks, compute-sanitizer
# racecheck on the graph-capture tests as fixed (the send data is now complete before the
# non-blocking stream replays) and as they were (old_s3/test_gpu_ipc.py, carried), then
# the bench against NCCL, best of 3 passes.
set -u
T0=$SECONDS
stamp() { echo "== $1 at +$((SECONDS - T0))s"; }
. bench/device_env.sh
export PYTHONUNBUFFERED=1
mkdir -p /tmp/logs
PT="-q -p no:cacheprovider -o addopts="
SUITES="tests/test_gpu_api.py tests/test_gpu_shm.py tests/test_gpu_ipc.py tests/test_gpu_device.py tests/test_moe.py"
stamp "GPU tests, 2 ranks x 1 GPU"
timeout -k 5 240 $M -n 2 python3 -m mpi4py tests/run_mpi.py $PT -m "not serial" $SUITES \
  > /tmp/logs/gpu_tests_2x1.log 2>&1
echo "rc=$?"; tail -n 1 /tmp/logs/gpu_tests_2x1.log
grep -aE "^(FAILED|ERROR)" /tmp/logs/gpu_tests_2x1.log | head
G="::test_cuda_graph_capture"
cp old_s3/test_gpu_ipc.py tests/test_gpu_ipc_old_s3.py
for t in tests/test_gpu_ipc.py tests/test_gpu_ipc_old_s3.py; do
  stamp "racecheck $t$G, 2 ranks"
  timeout -k 5 120 $M -n 2 compute-sanitizer --tool racecheck python3 -m mpi4py tests/run_mpi.py \
    $PT "$t$G" > /tmp/logs/racecheck_$(basename $t .py).log 2>&1
  echo "rc=$?"; sed 's/\x1b\[[0-9;]*m//g' /tmp/logs/racecheck_$(basename $t .py).log | \
    grep -a "FAILED\|passed\|SUMMARY\|assert .* ==" | sort | uniq -c
done
rm tests/test_gpu_ipc_old_s3.py
stamp "bench"
timeout -k 5 240 $M -n 2 python3 -m pya2a.gpu.bench --passes 3 \
  --sizes 128,1024,8192,65536,262144,1048576,16777216,268435456 --nccl-graph \
  --out "$OUT/gpu_bench_h200x2_s4.json" > /tmp/logs/gpu_bench_x2_s4.log 2>&1
echo "rc=$?"; grep -aE " (nccl|ll_pdl|api:auto|push_inplace|ce_inplace_plan|nccl_graph|ll_pdl_plan|ll_pdl_graph) " \
  /tmp/logs/gpu_bench_x2_s4.log | head -60
tar czf "$OUT/logs_x2.tgz" -C /tmp/logs .
stamp done
