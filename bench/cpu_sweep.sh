#!/bin/bash
# The CPU sweep quoted in the README (bench/results/cpu_*_h200x4.*), one node, host buffers:
#   tune --quick at each p (merged into cpu_tune_TAG.json), then bench uniform and skew,
#   8 B .. 4 MiB per peer, factor 4, with auto on that table, every row the best of 5
#   interleaved passes; then bench/cpu_profile.py at 8 B per peer for p >= 32.
# Usage, from the repository root with pya2a built:  bash bench/cpu_sweep.sh [RESULT_DIR]
# (`make bench-cpu`; on a GPU machine `bash bench/device_run.sh cpu`, with the MPICH wheel).
# Writes RESULT_DIR/cpu_tune_TAG.json, cpu_pP_PATTERN_TAG.json (and .png),
# cpu_profile_pP_TAG.txt. Env: MPIEXEC (mpiexec), PY (python3), TAG (local),
# PS="64 32 16", TUNE_PS=$PS, PATTERNS="uniform skew", SIZES="-b 8 -e 4M -f 4",
# BENCH_TIMEOUT=150 (s per bench run), MAX_TIME=0.3 (s per point and row), ROUNDS=5
# (interleaved passes, best), ITERS=50 (timed calls per pass at most), PROFILE_MIN_P=32,
# PLOT=1 (0: JSON only; `python -m pya2a bench --replot JSON --plot PNG` later).
set -u
RES=${1:-bench/results}
mkdir -p "$RES"
MPIEXEC=${MPIEXEC:-mpiexec}
PY=${PY:-python3}
TAG=${TAG:-local}
PS=${PS:-"64 32 16"}
TUNE_PS=${TUNE_PS:-$PS}
PATTERNS=${PATTERNS:-"uniform skew"}
SIZES=${SIZES:-"-b 8 -e 4M -f 4"}
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
$MPIEXEC -n 2 $PY -c "from mpi4py import MPI; import pya2a, sys; c = MPI.COMM_WORLD; c.rank or print(c.size, MPI.Get_library_version().splitlines()[0], pya2a.available_algorithms()); sys.exit(0 if c.size == 2 else 3)" \
  || { echo "MPI launch check failed"; exit 1; }
T0=$SECONDS
TABLE=$RES/cpu_tune_$TAG.json
for p in $TUNE_PS; do
  timeout 90 $MPIEXEC -n "$p" $PY -m pya2a tune --quick --merge -o "$TABLE" --no-progress 2>&1 | tail -9
done
echo "== tune done at $((SECONDS - T0)) s"
[ -f "$TABLE" ] && export PYA2A_TUNING=$TABLE
for p in $PS; do
  for pat in $PATTERNS; do
    name=$RES/cpu_p${p}_${pat}_$TAG
    plot=""
    [ "${PLOT:-1}" = 1 ] && plot="--plot $name.png"
    # shellcheck disable=SC2086  # $SIZES and $plot are option lists
    timeout "${BENCH_TIMEOUT:-150}" $MPIEXEC -n "$p" $PY -m pya2a bench $SIZES -w 3 -n "${ITERS:-50}" \
      --max-time "${MAX_TIME:-0.3}" --rounds "${ROUNDS:-5}" --pattern "$pat" --oneshot --no-progress \
      --json "$name.json" $plot 2>&1 | grep -av "^#.*wrote"
    echo "== bench p=$p $pat done at $((SECONDS - T0)) s"
  done
done
for p in $PS; do
  if [ "$p" -ge "${PROFILE_MIN_P:-32}" ]; then
    timeout 60 $MPIEXEC -n "$p" $PY bench/cpu_profile.py 8 > "$RES/cpu_profile_p${p}_$TAG.txt" 2>&1
  fi
done
echo "== all done at $((SECONDS - T0)) s"
