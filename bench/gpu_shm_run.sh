#!/bin/bash
# Device run for the `shm` algorithm (issue 5: node-shared pinned staging) on a lent
# nvidia-h200-x4, from the repository root, with .whl carried (Cython + MPICH wheels):
#   bash bench/gpu_shm_run.sh
# 1. build; a probe of the shared window (page-locked? which file backs it?) per MPI;
# 2. GPU tests of shm (+ the public API suite) at 4 ranks x 1 GPU and 4 ranks sharing GPU 0;
# 3. `python -m pya2a bench --device cuda` (NCCL, ipc, staged MPI, shm, auto, pinned bound)
#    at 1M..256M per pair with Open MPI 4.1.6 and with the MPICH wheel as host MPI, and a
#    shm/staged sweep with 4 ranks sharing GPU 0.
# Everything lands in $OUT: bench_*.json, env.txt, logs.tar.gz (at most 8 files come back).
# Budget about 6 minutes; every step runs under timeout. Env: SIZES, SKIP_MPICH=1.
set -u
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"; LOG=/tmp/shm_logs; rm -rf "$LOG"; mkdir -p "$LOG"
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PYTHONWARNINGS=ignore::DeprecationWarning
SIZES=${SIZES:-"-b 1M -e 256M -f 4"}  # 1M 4M 16M 64M 256M per pair
SITE=/tmp/shm_site
T0=$(date +%s)
stamp() { echo "== $1 at +$(( $(date +%s) - T0 ))s" | tee -a "$LOG/steps.txt"; }
finish() {
  stamp done
  tar -C "$LOG" -czf "$OUT/logs.tar.gz" . 2>/dev/null
  ls -la "$OUT"
}
trap finish EXIT

stamp build
python3 -m pip install -q --no-index --no-deps --no-compile --target $SITE .whl/cython*.whl
python3 -c "import glob, zipfile; zipfile.ZipFile(glob.glob('.whl/mpich*.whl')[0]).extractall('$SITE/whl')" \
  && mkdir -p $SITE/mpich && cp -r $SITE/whl/mpich-*.data/data/* $SITE/mpich/ && chmod +x $SITE/mpich/bin/*
export PYTHONPATH=$SITE:$PWD
python3 setup.py build_ext --inplace -q > "$LOG/build.log" 2>&1 || { tail "$LOG/build.log"; exit 1; }
OMPI="mpiexec --allow-run-as-root --oversubscribe --bind-to none"
MPICH="env MPI4PY_LIBMPI=$SITE/mpich/lib/libmpi.so.12 $SITE/mpich/bin/mpiexec"
PT="-q -p no:cacheprovider -o addopts="
{ nvidia-smi -L; nvidia-smi topo -m; df -h /dev/shm /tmp; uname -r; ulimit -l
  python3 -c "import pya2a.gpu.device as d, json; print(json.dumps(d.info()))"; } > "$OUT/env.txt" 2>&1

PROBE='
import json, cupy as cp
from mpi4py import MPI
from pya2a.gpu import device as d, shm
c = MPI.COMM_WORLD
cp.cuda.Device(c.rank % cp.cuda.runtime.getDeviceCount()).use()
w = shm.ShmWindow(c, 256 << 20, d.backend())
r = {"rank": c.rank, "mpi": MPI.Get_library_version().splitlines()[0], "pinned": w.pinned,
     "backing": w.backing, "capacity": w.capacity, "available": shm.comm_available(c)}
w.free()
print(json.dumps(r)) if c.rank < 2 else None
'
stamp probe
for m in OMPI MPICH; do
  timeout -k 5 40 ${!m} -n 4 python3 -c "$PROBE" 2>&1 | tail -4 | tee -a "$LOG/probe.txt"
done

stamp "tests 4x1"
timeout -k 5 90 $OMPI -n 4 python3 -m mpi4py tests/run_mpi.py $PT -m "not serial" \
  tests/test_gpu_shm.py tests/test_gpu_api.py > "$LOG/tests_4x1.log" 2>&1
echo "rc=$?" >> "$LOG/tests_4x1.log"; tail -n 3 "$LOG/tests_4x1.log"
stamp "tests 4 ranks on GPU 0"
CUDA_VISIBLE_DEVICES=0 timeout -k 5 90 $OMPI -n 4 python3 -m mpi4py tests/run_mpi.py $PT \
  -m "not serial" tests/test_gpu_shm.py tests/test_gpu_api.py > "$LOG/tests_4on1.log" 2>&1
echo "rc=$?" >> "$LOG/tests_4on1.log"; tail -n 3 "$LOG/tests_4on1.log"

stamp "bench Open MPI"
timeout -k 5 ${BENCH_TIMEOUT:-90} $OMPI -n 4 python3 -m pya2a bench --device cuda $SIZES \
  --json "$OUT/bench_shm_h200x4_ompi.json" > "$LOG/bench_ompi.log" 2>&1
echo "rc=$?" >> "$LOG/bench_ompi.log"; grep -E "api:|pinned_bound|rc=" "$LOG/bench_ompi.log"
if [ -z "${SKIP_MPICH:-}" ]; then
  stamp "bench MPICH wheel"
  timeout -k 5 90 $MPICH -n 4 python3 -m pya2a bench --device cuda $SIZES \
    --json "$OUT/bench_shm_h200x4_mpich.json" > "$LOG/bench_mpich.log" 2>&1
  echo "rc=$?" >> "$LOG/bench_mpich.log"; grep -E "api:|pinned_bound|rc=" "$LOG/bench_mpich.log"
fi
stamp "bench 4 ranks on GPU 0 (Open MPI; no NCCL, no ipc)"
CUDA_VISIBLE_DEVICES=0 timeout -k 5 60 $OMPI -n 4 python3 -m pya2a.tools.gpu_bench --no-nccl \
  --methods "" --sizes 1048576,16777216,67108864 --out "$OUT/bench_shm_4on1gpu_ompi.json" \
  > "$LOG/bench_4on1.log" 2>&1
echo "rc=$?" >> "$LOG/bench_4on1.log"; grep -E "api:|pinned_bound|rc=" "$LOG/bench_4on1.log"
