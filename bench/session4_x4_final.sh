#!/bin/bash
# Session 4, final device call on nvidia-h200-x4 (.whl carried): the GPU suites on 4 ranks,
# the bench of record against NCCL (every row best of 3 passes, NCCL's too), and the
# public-API auto path at 4 / 16 MiB with its registration and method reported.
set -u
T0=$SECONDS
stamp() { echo "== $1 at +$((SECONDS - T0))s"; }
. bench/device_env.sh
export PYTHONUNBUFFERED=1
mkdir -p /tmp/logs
PT="-q -p no:cacheprovider -o addopts="
SUITES="tests/test_gpu_api.py tests/test_gpu_shm.py tests/test_gpu_ipc.py tests/test_gpu_device.py tests/test_moe.py"
stamp "GPU tests, 4 ranks x 1 GPU"
timeout -k 5 240 $M -n 4 python3 -m mpi4py tests/run_mpi.py $PT -m "not serial" $SUITES \
  > /tmp/logs/gpu_tests_4x1_final.log 2>&1
echo "rc=$?"; tail -n 1 /tmp/logs/gpu_tests_4x1_final.log
grep -aE "^(FAILED|ERROR)" /tmp/logs/gpu_tests_4x1_final.log | head
stamp "bench"
timeout -k 5 300 $M -n 4 python3 -m pya2a.gpu.bench --passes 3 \
  --sizes 128,1024,8192,65536,262144,1048576,16777216,268435456 --nccl-graph \
  --out "$OUT/gpu_bench_h200x4_s4.json" > /tmp/logs/gpu_bench_s4_final.log 2>&1
echo "rc=$?"; grep -aE " (nccl|ll_pdl|api:auto|push_inplace|ce_inplace_plan|nccl_graph|ll_pdl_plan|ll_pdl_graph) " \
  /tmp/logs/gpu_bench_s4_final.log | head -80
stamp "auto at 4 / 16 MiB"
timeout -k 5 120 $M -n 4 python3 bench/ipc_direct_api.py --sizes 4194304,16777216 \
  > /tmp/logs/direct_api.log 2>&1
echo "rc=$?"; cat /tmp/logs/direct_api.log | cut -c1-400
tar czf "$OUT/logs_final.tgz" -C /tmp/logs .
stamp done
