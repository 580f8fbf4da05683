#!/bin/bash
# Session 4, last x4 device call (.whl carried), after moving the block count to the start
# of each call (begin_call) and reading the LL "finished" flag with the call number: the
# floor script (new protocol, without PDL, and the session-3 protocol), the GPU suites on
# 4 ranks, compute-sanitizer memcheck and racecheck on small cases, the bench of record.
set -u
T0=$SECONDS
stamp() { echo "== $1 at +$((SECONDS - T0))s"; }
. bench/device_env.sh
export PYTHONUNBUFFERED=1
mkdir -p /tmp/logs
PT="-q -p no:cacheprovider -o addopts="
SUITES="tests/test_gpu_api.py tests/test_gpu_shm.py tests/test_gpu_ipc.py tests/test_gpu_device.py tests/test_moe.py"
stamp "floor"
timeout -k 5 150 $M -n 4 python3 bench/ipc_floor.py --variants default,default_nopdl,late_fin \
  --chunks 2048 --out "$OUT/ipc_floor4_h200x4.json" > /tmp/logs/floor4.log 2>&1
echo "rc=$?"; grep "^ll\|^nccl" /tmp/logs/floor4.log
stamp "GPU tests, 4 ranks x 1 GPU"
timeout -k 5 240 $M -n 4 python3 -m mpi4py tests/run_mpi.py $PT -m "not serial" $SUITES \
  > /tmp/logs/gpu_tests_4x1_run5.log 2>&1
echo "rc=$?"; tail -n 1 /tmp/logs/gpu_tests_4x1_run5.log
grep -aE "^(FAILED|ERROR)" /tmp/logs/gpu_tests_4x1_run5.log | head
T="tests/test_gpu_ipc.py"
SMALL="$T::test_ll $T::test_push_staged $T::test_pull_symmetric_send $T::test_copy_engine $T::test_mixed_methods_in_sequence $T::test_cuda_graph_capture $T::test_programmatic_dependent_launch"
for tool in memcheck racecheck; do
  stamp "compute-sanitizer $tool, 4 ranks"
  timeout -k 5 150 $M -n 4 compute-sanitizer --tool $tool --print-limit 20 \
    python3 -m mpi4py tests/run_mpi.py $PT $SMALL > /tmp/logs/sanitizer_${tool}_run5.log 2>&1
  echo "rc=$?"; sed 's/\x1b\[[0-9;]*m//g' /tmp/logs/sanitizer_${tool}_run5.log | \
    grep -a "ERROR SUMMARY\|RACECHECK SUMMARY\|passed\|failed\|FAILED" | sort | uniq -c | head
done
stamp "bench"
timeout -k 5 240 $M -n 4 python3 -m pya2a.gpu.bench --passes 3 \
  --sizes 128,1024,8192,65536,262144,1048576,16777216,268435456 --nccl-graph \
  --out "$OUT/gpu_bench_h200x4_s4b.json" > /tmp/logs/gpu_bench_s4b.log 2>&1
echo "rc=$?"; grep -aE " (nccl|ll_pdl|api:auto|nccl_graph|ll_pdl_plan|ll_pdl_graph|push_inplace) " \
  /tmp/logs/gpu_bench_s4b.log | head -60
tar czf "$OUT/logs_run5.tgz" -C /tmp/logs .
stamp done
