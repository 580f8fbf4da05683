#!/bin/bash
# Device run for issue 5 (staged device buffers): build, GPU tests (4 ranks x 1 GPU,
# then 4 ranks sharing GPU 0), staged benchmark. Results and logs go to $OUT.
# Usage on a lent nvidia-h200-x4 machine, from the repository root, with .whl carried:
#   bash bench/gpu_staged_run.sh
set -u
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PYTHONWARNINGS=ignore::DeprecationWarning
T0=$(date +%s)
stamp() { echo "== $1 at +$(( $(date +%s) - T0 ))s"; }
stamp build
python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/cython*.whl
export PYTHONPATH=/tmp/site:$PWD
python3 setup.py build_ext --inplace -q > "$OUT/build.log" 2>&1 || { tail "$OUT/build.log"; exit 1; }
{ nvidia-smi -L; python3 -c "import pya2a.gpu.device as d, json; print(json.dumps(d.info()))"; } \
  > "$OUT/env.txt" 2>&1; cat "$OUT/env.txt"
M="mpiexec --oversubscribe --bind-to none"
PT="-q -p no:cacheprovider -o addopts="
stamp serial
timeout -k 5 90 python3 -m pytest $PT -m serial tests/test_gpu_device.py > "$OUT/serial.log" 2>&1
tail -n 3 "$OUT/serial.log"
stamp mpi4
PYA2A_EXPECT_CUDA_AWARE=0 timeout -k 5 150 $M -n 4 python3 -m mpi4py tests/run_mpi.py $PT \
  -m "not serial" tests/test_gpu_device.py > "$OUT/mpi4.log" 2>&1
tail -n 3 "$OUT/mpi4.log"
stamp bench
[ "${BENCH:-1}" = 1 ] && timeout -k 5 120 $M -n 4 python3 -m pya2a.tools.gpu_bench_staged \
  --out "$OUT/gpu_staged_h200x4.json" > "$OUT/bench.log" 2>&1
tail -n 4 "$OUT/bench.log"
stamp extras
[ "${EXTRAS:-0}" = 1 ] && {
  ompi_info --parsable --param btl vader --level 9 2>/dev/null | grep -E "single_copy|max_send|eager" | head
  for mech in cma none; do
    echo "-- btl_vader_single_copy_mechanism=$mech"
    OMPI_MCA_btl_vader_single_copy_mechanism=$mech timeout -k 5 40 $M -n 4 python3 -m \
      pya2a.tools.gpu_bench_staged --sizes 16777216 --algorithms pairwise --chunks "" 2>&1 | \
      grep -E "host_mpi|pairwise|rror" | cut -c1-160
  done
  for alg in native pairwise; do
    timeout -k 5 40 $M -n 4 python3 -m pya2a.tools.gpu_bench_staged --profile $alg:4096 2>&1 | head -45
  done
} > "$OUT/extras.log" 2>&1  # EXTRAS=1: vader copy mechanism, small-call profiles
stamp one_gpu
CUDA_VISIBLE_DEVICES=0 timeout -k 5 90 $M -n 4 python3 -m mpi4py tests/run_mpi.py $PT \
  -m "not serial" -k "gpu_every or gpu_in_place or torch or gpu_dtypes" \
  tests/test_gpu_device.py > "$OUT/mpi4_1gpu.log" 2>&1
tail -n 3 "$OUT/mpi4_1gpu.log"
stamp done
