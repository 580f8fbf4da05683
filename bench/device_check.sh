#!/bin/bash
# Integration check on a lent nvidia-h200-x4 (repository root, .whl carried): the public API
# on device buffers with every device algorithm incl. ipc, 4 ranks x 1 GPU, then 4 ranks
# sharing GPU 0 (ipc unavailable: auto falls back, explicit ipc raises everywhere).
set -u
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PYTHONWARNINGS=ignore::DeprecationWarning
T0=$(date +%s)
stamp() { echo "== $1 at +$(( $(date +%s) - T0 ))s"; }
python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/cython*.whl
export PYTHONPATH=/tmp/site:$PWD
python3 setup.py build_ext --inplace -q > "$OUT/build.log" 2>&1 || { tail "$OUT/build.log"; exit 1; }
M="mpiexec --oversubscribe --bind-to none"
PT="-q -p no:cacheprovider -o addopts="
stamp "4 ranks x 1 GPU"
timeout -k 5 100 $M -n 4 python3 -m mpi4py tests/run_mpi.py $PT -m "not serial" \
  tests/test_gpu_api.py > "$OUT/api4.log" 2>&1; echo "rc=$?"; tail -n 3 "$OUT/api4.log"
stamp "4 ranks on GPU 0"
CUDA_VISIBLE_DEVICES=0 timeout -k 5 60 $M -n 4 python3 -m mpi4py tests/run_mpi.py $PT \
  -m "not serial" tests/test_gpu_api.py > "$OUT/api4on1.log" 2>&1; echo "rc=$?"
tail -n 3 "$OUT/api4on1.log"
stamp done
