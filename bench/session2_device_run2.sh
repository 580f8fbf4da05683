#!/bin/bash
# Second device call of this round (nvidia-h200-x4, .whl carried): the GPU API tests after
# the float fix, the ipc suite, and the small-size API rows against NCCL after trimming the
# device one-shot path.
set -u
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 NCCL_NVLS_ENABLE=0
export PYTHONWARNINGS=ignore::DeprecationWarning
python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/cython*.whl
export PYTHONPATH=/tmp/site:$PWD
python3 setup.py build_ext --inplace -q > /tmp/build.log 2>&1 || { tail /tmp/build.log; exit 1; }
M="mpiexec --allow-run-as-root --oversubscribe --bind-to none"
PT="-q -p no:cacheprovider -o addopts="
echo "== tests 4x1"
timeout -k 5 150 $M -n 4 python3 -m mpi4py tests/run_mpi.py $PT -m "not serial" \
  tests/test_gpu_api.py tests/test_gpu_shm.py tests/test_gpu_ipc.py > "$OUT/tests_4x1.log" 2>&1
echo "rc=$?"; tail -n 2 "$OUT/tests_4x1.log"
echo "== tests 4 on GPU 0"
CUDA_VISIBLE_DEVICES=0 timeout -k 5 90 $M -n 4 python3 -m mpi4py tests/run_mpi.py $PT \
  -m "not serial" tests/test_gpu_api.py tests/test_gpu_shm.py > "$OUT/tests_4on1.log" 2>&1
echo "rc=$?"; tail -n 2 "$OUT/tests_4on1.log"
echo "== bench small sizes"
timeout -k 5 120 $M -n 4 python3 -m pya2a.tools.gpu_bench --sizes 128,1024,8192,65536,524288 \
  --methods ll --out "$OUT/gpu_small_api_h200x4.json" 2>&1 | grep -E "nccl|api:auto|  ll "
echo "== api overhead"
timeout -k 5 60 $M -n 4 python3 bench/gpu_api_overhead.py \
  --out "$OUT/gpu_api_overhead_fast_h200x4.json" 2>&1 | tail -5
