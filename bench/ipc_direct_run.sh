#!/bin/bash
# On a lent nvidia-h200-x4 (repository root, .whl carried): build, GPU IPC tests on 4 ranks,
# public-API device tests, the engine bench (ll small sizes; eager ce into CuPy pool buffers,
# registered, at 64/256 MiB) against NCCL, and public-API auto vs NCCL at large sizes.
set -u
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PYTHONWARNINGS=ignore::DeprecationWarning
T0=$(date +%s); stamp() { echo "== $1 at +$(( $(date +%s) - T0 ))s"; }
python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/cython*.whl
export PYTHONPATH=/tmp/site:$PWD
python3 setup.py build_ext --inplace -q > "$OUT/build.log" 2>&1 || { tail "$OUT/build.log"; exit 1; }
M="mpiexec --oversubscribe --bind-to none"
PT="-q -p no:cacheprovider -o addopts="
stamp tests4
timeout -k 5 ${T_TESTS:-170} $M -n 4 python3 -m mpi4py tests/run_mpi.py $PT tests/test_gpu_ipc.py \
  > "$OUT/test_ipc4.log" 2>&1; echo "rc=$?"; tail -n 25 "$OUT/test_ipc4.log"
stamp api4
timeout -k 5 90 $M -n 4 python3 -m mpi4py tests/run_mpi.py $PT -m "not serial" tests/test_gpu_api.py \
  > "$OUT/test_api4.log" 2>&1; echo "rc=$?"; tail -n 5 "$OUT/test_api4.log"
stamp bench
timeout -k 5 150 $M -n 4 python3 -m pya2a.tools.gpu_bench --sizes ${SIZES:-128,1024,4096,16384,65536,67108864,268435456} \
  --methods ll,ce,push_staged --out "$OUT/bench.json" > "$OUT/bench.log" 2>&1; echo "rc=$?"
grep -v "^#" "$OUT/bench.log" | head -90
stamp api
timeout -k 5 100 $M -n 4 python3 bench/ipc_direct_api.py --out "$OUT/api.json" > "$OUT/api.log" 2>&1
echo "rc=$?"; tail -n 8 "$OUT/api.log"
stamp done
