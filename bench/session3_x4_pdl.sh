#!/bin/bash
# Session 3, last device call (nvidia-h200-x4, .whl carried): programmatic dependent launch
# for the IPC engine (tests with PDL forced, then ll vs ll_pdl vs NCCL, eager and in graphs,
# in one bench run), and device p = 1 (reshard on 2 ranks has size-1 column communicators).
set -u
. bench/device_env.sh
PT="-q -p no:cacheprovider -o addopts="
echo "== GPU tests 4x1 (ipc, device, api)"
timeout -k 5 150 $M -n 4 python3 -m mpi4py tests/run_mpi.py $PT -m "not serial" \
  tests/test_gpu_ipc.py tests/test_gpu_device.py tests/test_gpu_api.py > "$OUT/tests_4x1.log" 2>&1
echo "rc=$?"; tail -n 1 "$OUT/tests_4x1.log"; grep -a "FAILED\|pdl" "$OUT/tests_4x1.log" | head
echo "== GPU api + ipc tests 4x1 with PYA2A_IPC_PDL=1"
PYA2A_IPC_PDL=1 timeout -k 5 120 $M -x PYA2A_IPC_PDL -n 4 python3 -m mpi4py tests/run_mpi.py \
  $PT -m "not serial" tests/test_gpu_ipc.py tests/test_gpu_api.py > "$OUT/tests_4x1_pdl.log" 2>&1
echo "rc=$?"; tail -n 1 "$OUT/tests_4x1_pdl.log"; grep -a "FAILED" "$OUT/tests_4x1_pdl.log" | head
echo "== reshard on 2 ranks (1 x 2 mesh: size-1 column communicators), and on 1 rank"
timeout -k 5 60 $M -n 2 python3 examples/reshard.py --device cuda 2>&1 | tail -n 1
timeout -k 5 60 $M -n 1 python3 examples/reshard.py --device cuda 2>&1 | tail -n 1
echo "== bench: ll, ll_pdl, NCCL (eager and graphs)"
timeout -k 5 150 $M -n 4 python3 -m pya2a.tools.gpu_bench --sizes 128,1024,8192,65536,262144 \
  --methods ll --no-staged --nccl-graph --out "$OUT/gpu_pdl_h200x4.json" > "$OUT/gpu_pdl_h200x4.log" 2>&1
echo "rc=$?"; grep -aE "nccl|  ll" "$OUT/gpu_pdl_h200x4.log" | head -60
