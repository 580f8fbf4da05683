# Sourced by the device scripts (sessions 3 and 4), from the repository root on a lent GPU machine
# with .whl carried: $OUT, Open MPI allowed as root, NCCL without NVLink SHARP, Cython from
# .whl into /tmp/site, the extension built in place (exits the caller if the build fails),
# and $M, the mpiexec command line.
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 NCCL_NVLS_ENABLE=0
export PYTHONWARNINGS=ignore::DeprecationWarning
python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/cython*.whl
export PYTHONPATH=/tmp/site:$PWD
python3 setup.py build_ext --inplace -q > "$OUT/build.log" 2>&1 || { tail "$OUT/build.log"; exit 1; }
M="mpiexec --allow-run-as-root --oversubscribe --bind-to none"
# Shared by the device scripts: timing stamps, unbuffered Python, a log folder, pytest
# options, the GPU suites, and gpu_suites N LOG [mpiexec args...], which runs them on N ranks
# into /tmp/logs/LOG.log and prints the exit code, the summary and any failures.
T0=${T0:-$SECONDS}
stamp() { echo "== $1 at +$((SECONDS - T0))s"; }
export PYTHONUNBUFFERED=1
mkdir -p /tmp/logs
PT="-q -p no:cacheprovider -o addopts="
SUITES="tests/test_gpu_api.py tests/test_gpu_shm.py tests/test_gpu_ipc.py tests/test_gpu_device.py tests/test_moe.py"
gpu_suites() {
  local n=$1 log=/tmp/logs/$2.log
  shift 2
  timeout -k 5 240 $M -n "$n" "$@" python3 -m mpi4py tests/run_mpi.py $PT -m "not serial" \
    $SUITES > "$log" 2>&1
  echo "rc=$?"; tail -n 1 "$log"
  grep -aE "^(FAILED|ERROR)" "$log" | head
}
# sanitize TOOL N LOG TEST...: compute-sanitizer TOOL on N ranks over the given tests, into
# /tmp/logs/LOG.log; prints the exit code, the tool's summaries and the pytest outcome.
sanitize() {
  local tool=$1 n=$2 log=/tmp/logs/$3.log
  shift 3
  stamp "compute-sanitizer $tool, $n ranks"
  timeout -k 5 200 $M -n "$n" compute-sanitizer --tool "$tool" --print-limit 20 \
    python3 -m mpi4py tests/run_mpi.py $PT "$@" > "$log" 2>&1
  echo "rc=$?"; sed 's/\x1b\[[0-9;]*m//g' "$log" | \
    grep -a "ERROR SUMMARY\|RACECHECK SUMMARY\|passed\|failed\|FAILED\|assert .* ==" | sort | uniq -c | head
}
# gpu_bench N NAME [ARGS...]: the bench of record on N ranks (best of 3 passes, NCCL in
# graphs too) into $OUT/NAME.json and /tmp/logs/NAME.log; prints the rows the README quotes.
gpu_bench() {
  local n=$1 name=$2
  shift 2
  stamp "bench"
  timeout -k 5 300 $M -n "$n" python3 -m pya2a.tools.gpu_bench --passes 3 \
    --sizes 128,1024,8192,65536,262144,1048576,16777216,268435456 --nccl-graph "$@" \
    --out "$OUT/$name.json" > "/tmp/logs/$name.log" 2>&1
  echo "rc=$?"; grep -aE " (nccl|ll_pdl|api:auto|push_inplace|ce_inplace_plan|nccl_graph|ll_pdl_plan|ll_pdl_graph) " \
    "/tmp/logs/$name.log" | head -80
}
