#!/bin/bash
# GPU checks and measurements on a machine with NVIDIA GPUs, from the repository root:
#
#   bash bench/device_run.sh suites N [N ...]  the GPU test suites at N ranks each
#   bash bench/device_run.sh sanitize N        compute-sanitizer memcheck and racecheck, small cases
#   bash bench/device_run.sh bench N           the GPU bench of record against NCCL
#   bash bench/device_run.sh latency N         bench/gpu_ll_latency.py: launch costs, ll with/without PDL
#   bash bench/device_run.sh registered N      bench/gpu_registered_buffers.py: auto into CuPy pool arrays
#   bash bench/device_run.sh staged N          bench/gpu_staged.py: Open MPI, the MPICH wheel
#   bash bench/device_run.sh shm N             the shm window under both MPIs, bench --device cuda
#   bash bench/device_run.sh moe N             bench/moe_dispatch_combine.py
#   bash bench/device_run.sh share N           ranks sharing a GPU: SMs each sees, MPS detection
#   bash bench/device_run.sh shared N          ranks sharing a GPU: ipc methods vs shm vs staged
#   bash bench/device_run.sh cpu               bench/cpu_sweep.sh (MPICH wheel, p = 64 32 16)
#   bash bench/device_run.sh pfft N            bench/pfft_bench.py: parallel FFT, pya2a's Alltoallw
#                                              vs the MPI's own, host (both MPIs) and device arrays,
#                                              32^3-512^3 (PFFT_PARTS: which of ompi mpich gpu)
#
# Ranks take GPU rank % (visible GPUs), so N above the GPU count shares GPUs. Results (JSON,
# PNG) go to $OUT named <what>_<machine>, e.g. gpu_alltoallv_h200x4.json; every log goes to
# $LOGS and is packed into $OUT/logs.tgz after each subcommand. Environment:
#   ONE_GPU=1   suites: every rank on GPU 0 (CUDA_VISIBLE_DEVICES=0)
#   MPS=1       suites, sanitize, moe, share, shared: start the MPS daemon (as root) for
#               ranks sharing a GPU; stopped on exit
#   MPS_PCT     with MPS=1: CUDA_MPS_ACTIVE_THREAD_PERCENTAGE for each rank: "split" (default,
#               100/N), "none" (no limit: the engine sizes its grids itself) or a number
#   MOE_ARGS    extra arguments of bench/moe_dispatch_combine.py (e.g. --no-baseline --staged)
#   SANITIZE_TOOLS, SANITIZE_TIMEOUT  sanitize: which of memcheck racecheck registration
#               (default all three), seconds each (default 300); SANITIZE_TESTS: test names
#               of tests/test_gpu_ipc.py for memcheck and racecheck (default: seven small ones)
#   M           the launcher (default: Open MPI's mpiexec, as root, oversubscribed)
#   MACHINE     the <machine> part of names (default from nvidia-smi: h200x4; h200 for one GPU)
#   PFFT_PARTS  pfft: the parts to run, of "ompi mpich gpu" (default all three)
# Needs Open MPI's `mpiexec` on PATH (called by name); `staged`, `shm` and `cpu` also need
# the MPICH wheel in .whl/ (mpich-*.whl), and a Cython older than 3 wants .whl/cython*.whl.
set -u
OUT=${OUT:-/tmp/out}
LOGS=${LOGS:-/tmp/device_logs}
SITE=${SITE:-/tmp/site}
mkdir -p "$OUT" "$LOGS"
# NVLink multicast stays off (a program using it can take the host's GPUs out of service)
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
export PYTHONWARNINGS=ignore::DeprecationWarning PYTHONUNBUFFERED=1
M=${M:-"mpiexec --allow-run-as-root --oversubscribe --bind-to none"}
PT="-q -p no:cacheprovider -o addopts="
GPU_SUITES=${GPU_SUITES:-"tests/test_gpu_api.py tests/test_gpu_shm.py tests/test_gpu_ipc.py tests/test_gpu_device.py tests/test_moe.py tests/test_moe_torch.py"}
T0=$SECONDS

stamp() { echo "== $1 at +$((SECONDS - T0))s"; }

# Cython from the image (or .whl/ when the image's is older than 3), the extensions built
# in place; exits if the build fails.
build() {
  if ! python3 -c "import Cython, sys; sys.exit(int(Cython.__version__.split('.')[0]) < 3)" \
      2>/dev/null && ! [ -d "$SITE/Cython" ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --target "$SITE" .whl/cython*.whl
  fi
  export PYTHONPATH=$SITE:$PWD
  # a setuptools older than 77 rejects pyproject.toml's license field: build without it
  python3 setup.py build_ext --inplace -q > "$LOGS/build.log" 2>&1 || {
    mv pyproject.toml "$LOGS/pyproject.toml.aside"
    python3 setup.py build_ext --inplace -q >> "$LOGS/build.log" 2>&1
    local rc=$?
    mv "$LOGS/pyproject.toml.aside" pyproject.toml
    [ $rc = 0 ] || { tail "$LOGS/build.log"; exit 1; }
  }
}

# The MPICH wheel unpacked into $SITE/mpich (pip --target drops the wheel's data files,
# lib/libmpi.so.12, which mpi4py must load); sets $MPICH, its mpiexec line.
mpich() {
  if ! [ -x "$SITE/mpich/bin/mpiexec" ]; then
    python3 -c "import glob, zipfile; zipfile.ZipFile(glob.glob('.whl/mpich*.whl')[0]).extractall('$SITE/whl')" \
      || { echo "no MPICH wheel in .whl/"; exit 1; }
    mkdir -p "$SITE/mpich" && cp -r "$SITE"/whl/mpich-*.data/data/* "$SITE/mpich/" \
      && chmod +x "$SITE"/mpich/bin/*
  fi
  MPICH="env MPI4PY_LIBMPI=$SITE/mpich/lib/libmpi.so.12 $SITE/mpich/bin/mpiexec"
}

# $MACHINE: h200x4 for 4 x H200, h200 for one, the host name without GPUs.
machine() {
  local n name
  [ -n "${MACHINE:-}" ] && return
  n=$(nvidia-smi -L 2>/dev/null | wc -l)
  if [ "$n" = 0 ]; then MACHINE=$(hostname -s); return; fi
  name=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1 | awk '{print tolower($NF)}')
  MACHINE=$name$([ "$n" -gt 1 ] && echo "x$n")
}

# MPS daemon for ranks sharing a GPU (their spinning kernels must be resident together);
# the ranks find it through the two directories, which Open MPI passes on with -x.
start_mps() {
  [ -n "${MPS_ON:-}" ] && return
  MPS_ON=1
  export CUDA_MPS_PIPE_DIRECTORY=${CUDA_MPS_PIPE_DIRECTORY:-/tmp/mps_pipe}
  export CUDA_MPS_LOG_DIRECTORY=${CUDA_MPS_LOG_DIRECTORY:-/tmp/mps_log}
  mkdir -p "$CUDA_MPS_PIPE_DIRECTORY" "$CUDA_MPS_LOG_DIRECTORY"
  nvidia-cuda-mps-control -d || { echo "MPS daemon did not start"; exit 1; }
  trap stop_mps EXIT
  M="$M -x CUDA_MPS_PIPE_DIRECTORY -x CUDA_MPS_LOG_DIRECTORY"
}

stop_mps() { echo quit | nvidia-cuda-mps-control; sleep 1; }

# A run killed by its timeout can leave the MPS server unusable for new clients
# (cudaErrorDevicesUnavailable): start a fresh one.
restart_mps() {
  [ -n "${MPS_ON:-}" ] || return
  stop_mps
  nvidia-cuda-mps-control -d || echo "MPS daemon did not restart"
}

# $RUN_ENV / $RUN_TAG for N ranks: the environment each rank gets (ONE_GPU, MPS with its
# thread percentage) and the name part that says so; starts MPS when asked.
run_env() {
  local n=$1 pct
  RUN_ENV="" RUN_TAG=p$n
  [ "${ONE_GPU:-0}" = 1 ] && RUN_ENV="CUDA_VISIBLE_DEVICES=0" RUN_TAG=${RUN_TAG}_one_gpu
  if [ "${MPS:-0}" = 1 ]; then
    start_mps
    pct=${MPS_PCT:-split}
    [ "$pct" = split ] && pct=$((100 / n))
    RUN_TAG=${RUN_TAG}_mps
    if [ "$pct" != none ]; then
      RUN_ENV="$RUN_ENV CUDA_MPS_ACTIVE_THREAD_PERCENTAGE=$pct" RUN_TAG=${RUN_TAG}$pct
    fi
  fi
  # the launcher with $RUN_ENV set and exported to the ranks
  RUN_M="env $RUN_ENV $M $(for v in $RUN_ENV; do echo "-x ${v%%=*}"; done)"
}

# suites N [N ...]: the GPU suites on N ranks each; prints exit code, summary, failures.
suites() {
  local n log rc
  for n in "$@"; do
    run_env "$n"
    log=$LOGS/gpu_suites_${RUN_TAG}_$MACHINE.log
    stamp "GPU suites, $n ranks${RUN_ENV:+ ($RUN_ENV)}"
    # shellcheck disable=SC2086
    timeout -k 5 "${SUITE_TIMEOUT:-300}" $RUN_M -n "$n" \
      python3 -m mpi4py tests/run_mpi.py $PT -m "not serial" $GPU_SUITES > "$log" 2>&1
    rc=$?
    echo "rc=$rc"; tail -n 1 "$log"
    grep -aE "^(FAILED|ERROR)" "$log" | head
    [ $rc = 124 ] && restart_mps
  done
}

# sanitize N: memcheck and racecheck on small cases of every ipc method (graphs and PDL
# included), then memcheck on the registration tests (user buffers peers write into).
sanitize() {
  local n=$1 tool log t=tests/test_gpu_ipc.py
  run_env "$n"
  local M=$RUN_M
  local small="$t::test_ll $t::test_push_staged $t::test_pull_symmetric_send $t::test_copy_engine
    $t::test_mixed_methods_in_sequence $t::test_cuda_graph_capture $t::test_programmatic_dependent_launch"
  [ -n "${SANITIZE_TESTS:-}" ] && small=$(for x in $SANITIZE_TESTS; do echo "$t::$x"; done)
  local reg="registered or registration or buffers_change or many_distinct or stream_ordered or large_blocks_direct or copy_engine_plan"
  for tool in ${SANITIZE_TOOLS:-memcheck racecheck registration}; do
    log=$LOGS/gpu_${tool}_${RUN_TAG}_$MACHINE.log
    stamp "compute-sanitizer $tool, $n ranks"
    if [ $tool = registration ]; then
      log=$LOGS/gpu_memcheck_registration_${RUN_TAG}_$MACHINE.log
      # shellcheck disable=SC2086
      timeout -k 5 "${SANITIZE_TIMEOUT:-300}" $M -n "$n" compute-sanitizer --tool memcheck \
        --print-limit 20 python3 -m mpi4py tests/run_mpi.py $PT $t -k "$reg" > "$log" 2>&1
    else
      # shellcheck disable=SC2086
      timeout -k 5 "${SANITIZE_TIMEOUT:-300}" $M -n "$n" compute-sanitizer --tool $tool \
        --print-limit 20 python3 -m mpi4py tests/run_mpi.py $PT $small > "$log" 2>&1
    fi
    echo "rc=$?"; sed 's/\x1b\[[0-9;]*m//g' "$log" | \
      grep -a "ERROR SUMMARY\|RACECHECK SUMMARY\|passed\|failed\|FAILED" | sort | uniq -c | head
  done
}

# bench N: every row (NCCL's too) the best of 3 passes, NCCL also in a CUDA graph.
bench() {
  local n=$1 name=gpu_alltoallv_$MACHINE
  stamp "GPU bench, $n ranks"
  # shellcheck disable=SC2086
  timeout -k 5 400 $M -n "$n" python3 -m pya2a bench --device cuda --rounds 3 \
    --sizes 128,1K,8K,64K,256K,1M,16M,256M --nccl-graph --no-progress \
    --json "$OUT/$name.json" --plot "$OUT/$name.png" > "$LOGS/$name.log" 2>&1
  echo "rc=$?"
  grep -aE "^#|  (nccl|nccl graph|auto->[a-z]+|ipc\.ll pdl|ipc\.ll pdl plan|ipc\.ll pdl graph|ipc\.push_inplace|ipc\.ce_inplace plan) " \
    "$LOGS/$name.log" | head -80
}

# latency N: host and GPU cost of a launch, ll with and without PDL, NCCL, best of 3 passes.
latency() {
  local n=$1 name=gpu_ll_latency_$MACHINE
  stamp "ll latency, $n ranks"
  # shellcheck disable=SC2086
  timeout -k 5 300 $M -n "$n" python3 bench/gpu_ll_latency.py --chunks 2048 \
    --out "$OUT/$name.json" > "$LOGS/$name.log" 2>&1
  echo "rc=$?"; grep -a "^launch\|^ll\|^nccl" "$LOGS/$name.log"
}

# registered N: public-API auto into CuPy pool arrays (registered, written in place) vs NCCL.
registered() {
  local n=$1 name=gpu_registered_buffers_$MACHINE
  stamp "registered receive buffers, $n ranks"
  # shellcheck disable=SC2086
  timeout -k 5 300 $M -n "$n" python3 bench/gpu_registered_buffers.py --out "$OUT/$name.json" \
    > "$LOGS/$name.log" 2>&1
  echo "rc=$?"; tail -n 8 "$LOGS/$name.log" | cut -c1-300
}

# staged N: the staged sweep (every algorithm, chunk sizes) with Open MPI, then pairwise and
# native with Open MPI and with the MPICH wheel as host MPI, in one call.
staged() {
  local n=$1 sz="--sizes 1048576,16777216,67108864 --algorithms pairwise,native" m
  mpich
  stamp "staged sweep, Open MPI, $n ranks"
  # shellcheck disable=SC2086
  timeout -k 5 300 $M -n "$n" python3 bench/gpu_staged.py \
    --out "$OUT/gpu_staged_$MACHINE.json" > "$LOGS/gpu_staged_$MACHINE.log" 2>&1
  echo "rc=$?"; tail -n 4 "$LOGS/gpu_staged_$MACHINE.log"
  for m in ompi mpich; do
    stamp "staged pairwise and native, $m"
    # shellcheck disable=SC2086
    timeout -k 5 200 $([ $m = ompi ] && echo "$M" || echo "$MPICH") -n "$n" \
      python3 bench/gpu_staged.py $sz --out "$OUT/gpu_staged_${m}_$MACHINE.json" \
      > "$LOGS/gpu_staged_${m}_$MACHINE.log" 2>&1
    echo "rc=$?"; tail -n 25 "$LOGS/gpu_staged_${m}_$MACHINE.log" | cut -c1-170
  done
  stamp "Open MPI single-copy mechanism at 16 MiB, small-call profiles"
  {
    for m in cma none; do
      echo "-- btl_vader_single_copy_mechanism=$m"
      # shellcheck disable=SC2086
      OMPI_MCA_btl_vader_single_copy_mechanism=$m timeout -k 5 60 $M -n "$n" python3 \
        bench/gpu_staged.py --sizes 16777216 --algorithms pairwise --chunks "" 2>&1 | \
        grep -E "host_mpi|pairwise|rror"
    done
    for m in native pairwise; do
      # shellcheck disable=SC2086
      timeout -k 5 60 $M -n "$n" python3 bench/gpu_staged.py --profile $m:4096 2>&1 | head -45
    done
  } > "$OUT/gpu_staged_extras_$MACHINE.log"
  grep -a "^--\|host_mpi" "$OUT/gpu_staged_extras_$MACHINE.log" | cut -c1-120
}

# shm N: the shared window (page-locked? which file backs it?) under Open MPI and the
# MPICH wheel, python -m pya2a bench --device cuda 128 B .. 256 MiB per peer with one GPU
# per rank, and the shm / staged sweep with every rank on GPU 0.
shm() {
  local n=$1 m probe
  mpich
  probe='
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
  stamp "shm window probe"
  for m in "$M" "$MPICH"; do
    # shellcheck disable=SC2086
    timeout -k 5 60 $m -n "$n" python3 -c "$probe" 2>&1 | tail -n 4
  done | tee "$OUT/gpu_shm_window_$MACHINE.txt"
  stamp "bench --device cuda, $n ranks"
  # shellcheck disable=SC2086
  timeout -k 5 300 $M -n "$n" python3 -m pya2a bench --device cuda -b 128 -e 256M -f 8 \
    --no-progress --json "$OUT/gpu_shm_$MACHINE.json" > "$LOGS/gpu_shm_$MACHINE.log" 2>&1
  echo "rc=$?"; grep -avE "  (nccl|ipc\.)" "$LOGS/gpu_shm_$MACHINE.log"
  stamp "shm and staged, $n ranks on GPU 0"
  # shellcheck disable=SC2086
  CUDA_VISIBLE_DEVICES=0 timeout -k 5 120 $M -x CUDA_VISIBLE_DEVICES -n "$n" \
    python3 -m pya2a bench --device cuda --no-nccl --methods "" --sizes 1M,16M,64M --no-progress \
    --json "$OUT/gpu_shm_one_gpu_$MACHINE.json" > "$LOGS/gpu_shm_one_gpu_$MACHINE.log" 2>&1
  echo "rc=$?"; cat "$LOGS/gpu_shm_one_gpu_$MACHINE.log"
}

# moe N: fused MoE dispatch + expert op + combine against the same step over NCCL.
moe() {
  local n=$1 name
  run_env "$n"
  name=moe_$MACHINE
  [ "$RUN_TAG" != "p$n" ] && name=moe_${n}on1_${RUN_TAG#p"$n"_}_$MACHINE
  stamp "MoE step, $n ranks${RUN_ENV:+ ($RUN_ENV)}"
  # shellcheck disable=SC2086
  timeout -k 5 300 $RUN_M -n "$n" python3 bench/moe_dispatch_combine.py --iters 100 \
    ${MOE_ARGS:-} --out "$OUT/$name.json" > "$LOGS/$name.log" 2>&1
  echo "rc=$?"; tail -n 12 "$LOGS/$name.log"
}

# share N: what N ranks sharing this machine's GPU see: multiprocessors per rank (under an
# MPS thread limit the driver reports the client's share), MPS detected and agreed, the
# grid budget of the ipc engine, and whether auto takes ipc.
share() {
  local n=$1
  run_env "$n"
  stamp "ranks sharing a GPU, $n ranks${RUN_ENV:+ ($RUN_ENV)}"
  # shellcheck disable=SC2086
  timeout -k 5 120 $RUN_M -n "$n" python3 -c '
import cupy as cp
from mpi4py import MPI
from pya2a.gpu import ipc
from pya2a.gpu.ipc_alltoallv import IpcAlltoallv
c = MPI.COMM_WORLD
cp.cuda.Device(c.rank % cp.cuda.runtime.getDeviceCount()).use()
d = cp.cuda.Device().id
e = IpcAlltoallv(c, 1 << 20)
r = dict(rank=c.rank, sms=ipc.client_sms(d), mps=ipc.mps_client(d), share=e.share,
         grid_max=e.grid_max, max_chunks=e.max_chunks, pdl=e.pdl)
e.free()
print(r) if c.rank < 2 else None
' 2>&1 | tail -n 4
}

# shared N: N ranks on one GPU: every ipc method, shm, the staged path (pairwise, native) and
# one-shot auto, 128 B - 64 MiB per peer; NCCL refuses two ranks on one GPU. Written as
# gpu_alltoallv_<N>on1_<mps...>_<machine>.json / .png.
shared() {
  local n=$1 name
  run_env "$n"
  name=gpu_alltoallv_${n}on1_${RUN_TAG#p"$n"_}_$MACHINE
  [ "$RUN_TAG" = "p$n" ] && name=gpu_alltoallv_${n}on1_timesliced_$MACHINE
  stamp "ranks sharing a GPU, bench, $n ranks${RUN_ENV:+ ($RUN_ENV)}"
  # shellcheck disable=SC2086
  timeout -k 5 "${SHARED_TIMEOUT:-400}" $RUN_M -n "$n" python3 -m pya2a bench --device cuda \
    --no-nccl --rounds "${SHARED_PASSES:-2}" --no-progress \
    --sizes "${SHARED_SIZES:-128,1K,8K,64K,256K,1M,4M,16M,64M}" \
    --json "$OUT/$name.json" --plot "$OUT/$name.png" > "$LOGS/$name.log" 2>&1
  echo "rc=$?"; grep -av "^$" "$LOGS/$name.log" | head -120
}

# cpu: the CPU sweep on this machine's cores with the MPICH wheel, results packed into
# $OUT/cpu_$MACHINE.tgz (more files than $OUT brings back one by one).
cpu() {
  local res=/tmp/cpu_results
  mpich
  mkdir -p "$res"
  stamp "CPU sweep"
  MPI4PY_LIBMPI=$SITE/mpich/lib/libmpi.so.12 MPIEXEC=$SITE/mpich/bin/mpiexec PY=python3 \
    BENCH_TIMEOUT=200 TAG=$MACHINE timeout 570 bash bench/cpu_sweep.sh "$res" 2>&1 | tee "$res/cpu_sweep_$MACHINE.log" \
    | grep -a "==\|geomean\|worst\|Terminated"
  tar czf "$OUT/cpu_$MACHINE.tgz" -C "$res" .
}

# pfft N: parallel FFT forward + backward per call, pya2a's Alltoallw against the MPI's own:
# N host ranks with Open MPI and the MPICH wheel (mpi4py-fft when .whl/ holds a wheel of it
# that imports here, else the pencil FFT of examples/pfft.py), 32^3 to 512^3 in one run per
# MPI (--max-seconds keeps the large sizes to a few samples; a size that would not fit in
# memory is skipped), then device arrays (CuPy FFT; pya2a against copying to the host around
# the MPI's own Alltoallw). PFFT_PARTS picks the parts (default "ompi mpich gpu"), so that
# each fits in one command's time: e.g. PFFT_PARTS=mpich, then PFFT_PARTS="ompi gpu".
pfft() {
  local n=$1 m name part
  mpich
  if ls .whl/mpi4py_fft*.whl > /dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --target "$SITE" .whl/mpi4py_fft*.whl
  fi
  for part in ${PFFT_PARTS:-ompi mpich gpu}; do
    case $part in
      ompi|mpich)
        m=$part
        name=pfft_cpu_p${n}_${m}_$MACHINE
        stamp "pfft host, $m, $n ranks"
        # shellcheck disable=SC2086
        timeout -k 5 280 $([ $m = ompi ] && echo "$M" || echo "$MPICH") -n "$n" python3 \
          bench/pfft_bench.py --sizes 32 64 128 256 512 --repeat 10 --warmup 2 \
          --max-seconds 12 --json "$OUT/$name.json" > "$LOGS/$name.log" 2>&1
        echo "rc=$?"; grep -a "fwd+bwd\|skipped\|rror" "$LOGS/$name.log" | head -20 ;;
      gpu)
        name=pfft_gpu_p${n}_$MACHINE
        stamp "pfft device arrays, $n ranks"
        # shellcheck disable=SC2086
        timeout -k 5 280 $M -n "$n" python3 bench/pfft_bench.py --device cuda \
          --sizes 64 128 256 512 --grids pencil slab --repeat 10 --max-seconds 12 \
          --json "$OUT/$name.json" > "$LOGS/$name.log" 2>&1
        echo "rc=$?"; grep -a "fwd+bwd\|skipped\|rror" "$LOGS/$name.log" | head -20 ;;
      *) echo "PFFT_PARTS: unknown part $part (ompi, mpich, gpu)" ;;
    esac
  done
}

cmd=${1:-}
case "$cmd" in
  suites|sanitize|bench|latency|registered|staged|shm|moe|share|shared|pfft)
    [ $# -ge 2 ] || { echo "usage: bash bench/device_run.sh $cmd N"; exit 2; } ;;
  cpu) ;;
  *) awk 'NR > 1 && !/^#/ {exit} NR > 1 {sub(/^# ?/, ""); print}' "$0"; exit 2 ;;
esac
shift
build
machine
"$cmd" "$@"
tar czf "$OUT/logs.tgz" -C "$LOGS" .
stamp done
