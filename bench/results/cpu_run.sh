#!/bin/bash
# Reproduces bench/results/cpu_*: MPICH wheel, one node, p = 16, 32, 64 ranks.
#   tune --quick at each p (merged into cpu_tune.json), then bench uniform and skew,
#   8 B .. 4 MiB per peer, factor 4, with auto using that table; plus cpu_profile.py.
# Run from the repository root on the lent nvidia-h200-x4 machine (64 cores), with the
# MPICH 5.0.2 and Cython wheels in .whl/:  bash bench/results/cpu_run.sh [RESULT_DIR]
# Env: PS="16 32 64", PATTERNS="uniform skew", SIZES="-b 8 -e 4M -f 4", BENCH_TIMEOUT=150 (s
# per bench run), MAX_TIME=0.3 (s per point and row), ROUNDS=5 (interleaved passes, best),
# ITERS=50 (timed calls per pass at most),
# PLOT=1 (0: JSON only; `python -m pya2a bench --replot JSON --plot PNG` later).
set -u
SITE=${SITE:-/tmp/pya2a_site}
RES=${1:-/tmp/res}
mkdir -p "$RES"
PS=${PS:-"64 32 16"}
TUNE_PS=${TUNE_PS:-$PS}
PATTERNS=${PATTERNS:-"uniform skew"}
SIZES=${SIZES:-"-b 8 -e 4M -f 4"}
if [ -z "${SKIP_INSTALL:-}" ] && [ -d .whl ] && ! [ -x ${SITE}/mpich/bin/mpiexec ]; then
  # Cython for the build through pip; MPICH unpacked as is: pip --target drops the
  # wheel's data files (lib/libmpi.so.12), which mpi4py must load
  python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target ${SITE} \
    .whl/cython*.whl || exit 1
  python3 -c "import glob, zipfile; zipfile.ZipFile(glob.glob('.whl/mpich*.whl')[0]).extractall('${SITE}/whl')" || exit 1
  mkdir -p ${SITE}/mpich && cp -r ${SITE}/whl/mpich-*.data/data/* ${SITE}/mpich/ && chmod +x ${SITE}/mpich/bin/*
fi
export PYTHONPATH=${SITE}:$PWD${PYTHONPATH:+:$PYTHONPATH}
[ -n "${SKIP_INSTALL:-}" ] || export MPI4PY_LIBMPI=${MPI4PY_LIBMPI:-${SITE}/mpich/lib/libmpi.so.12}
[ -n "${SKIP_INSTALL:-}" ] || MPIEXEC=${MPIEXEC:-${SITE}/mpich/bin/mpiexec}
MPIEXEC=${MPIEXEC:-${SITE}/bin/mpiexec}
PY=${PY:-python3}
python3 setup.py build_ext --inplace > "$RES/build.log" 2>&1 || { tail -20 "$RES/build.log"; exit 1; }
$MPIEXEC -n 2 $PY -c "from mpi4py import MPI; import pya2a, sys; c = MPI.COMM_WORLD; c.rank or print(c.size, MPI.Get_library_version().splitlines()[0], pya2a.available_algorithms()); sys.exit(0 if c.size == 2 else 3)" || { echo "MPI launch check failed"; exit 1; }
T0=$SECONDS
PMAX=$(echo $PS | tr " " "\n" | sort -n | tail -1)
$MPIEXEC -n "$PMAX" $PY -m pya2a info > "$RES/cpu_info_p${PMAX}.txt" 2>&1
for p in $TUNE_PS; do
  timeout 90 $MPIEXEC -n "$p" $PY -m pya2a tune --quick --merge -o "$RES/cpu_tune.json" \
    --no-progress 2>&1 | tail -9
done
echo "== tune done at $((SECONDS - T0)) s"
export PYA2A_TUNING=$RES/cpu_tune.json
for p in $PS; do
  for pat in $PATTERNS; do
    plot=""
    [ "${PLOT:-1}" = 1 ] && plot="--plot $RES/cpu_p${p}_${pat}.png"
    timeout ${BENCH_TIMEOUT:-150} $MPIEXEC -n "$p" $PY -m pya2a bench $SIZES -w 3 -n ${ITERS:-50} \
      --max-time ${MAX_TIME:-0.3} --rounds ${ROUNDS:-5} --pattern "$pat" --oneshot --no-progress \
      --json "$RES/cpu_p${p}_${pat}.json" $plot 2>&1 | grep -av "^#.*wrote"
    echo "== bench p=$p $pat done at $((SECONDS - T0)) s"
  done
done
for p in $PS; do
  if [ "$p" -ge "${PROFILE_MIN_P:-32}" ]; then
    timeout 60 $MPIEXEC -n "$p" $PY bench/results/cpu_profile.py 8 > "$RES/cpu_profile_p${p}.txt" 2>&1
  fi
done
echo "== all done at $((SECONDS - T0)) s"
