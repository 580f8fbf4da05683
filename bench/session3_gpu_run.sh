#!/bin/bash
# Session 3, GPU checks and numbers on every GPU of the lent machine (x4, then x2), .whl
# carried: compute-sanitizer memcheck on the IPC registration tests (user buffers that
# peers write into directly), the GPU test suites, the examples in GPU mode, then
# pya2a.tools.gpu_bench (ll/push engine, one-shot API rows, NCCL eager and in a CUDA graph).
set -u
TAG=${TAG:-x$(nvidia-smi -L | wc -l)}
T0=$SECONDS
stamp() { echo "== $1 at +$((SECONDS - T0))s"; }
. bench/device_env.sh
NG=$(nvidia-smi -L | wc -l)
PT="-q -p no:cacheprovider -o addopts="
mkdir -p /tmp/logs
if [ "${SANITIZE:-1}" = 1 ]; then
  stamp "memcheck, registration tests, $NG ranks"
  timeout -k 5 240 $M -n "$NG" compute-sanitizer --tool memcheck --print-limit 20 \
    python3 -m mpi4py tests/run_mpi.py $PT tests/test_gpu_ipc.py -k "registered or \
registration or buffers_change or many_distinct or stream_ordered or large_blocks_direct or \
copy_engine_plan" > /tmp/logs/memcheck_registration_$TAG.log 2>&1
  echo "rc=$?"; grep -a "ERROR SUMMARY\|passed\|failed\|error" /tmp/logs/memcheck_registration_$TAG.log | sort | uniq -c | head
fi
stamp "GPU tests, $NG ranks x 1 GPU"
timeout -k 5 240 $M -n "$NG" python3 -m mpi4py tests/run_mpi.py $PT -m "not serial" \
  tests/test_gpu_api.py tests/test_gpu_shm.py tests/test_gpu_ipc.py tests/test_gpu_device.py \
  tests/test_moe.py > /tmp/logs/gpu_tests_$TAG.log 2>&1
echo "rc=$?"; tail -n 2 /tmp/logs/gpu_tests_$TAG.log
if [ "${EXAMPLES:-1}" = 1 ]; then
  stamp "examples, --device cuda"
  for ex in transpose fft2d sample_sort hash_join reshard moe; do
    timeout -k 5 60 $M -n "$NG" python3 examples/$ex.py --device cuda > /tmp/logs/ex_$ex.log 2>&1
    echo "$ex rc=$?  $(tail -n 1 /tmp/logs/ex_$ex.log | cut -c1-150)"
  done
fi
if [ "${BENCH:-1}" = 1 ]; then
  stamp "bench"
  timeout -k 5 ${BENCH_S:-200} $M -n "$NG" python3 -m pya2a.tools.gpu_bench \
    ${BENCH_ARGS:---sizes 128,1024,8192,65536,1048576,16777216,268435456 --nccl-graph} \
    --out "$OUT/gpu_bench_h200$TAG.json" > /tmp/logs/gpu_bench_$TAG.log 2>&1
  echo "rc=$?"; grep -aE "^ *(bytes|[0-9])|nccl|auto" /tmp/logs/gpu_bench_$TAG.log | head -60
fi
tar czf "$OUT/logs_$TAG.tgz" -C /tmp/logs .
stamp done
