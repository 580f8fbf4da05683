#!/bin/bash
# Session 3, device call 4 (nvidia-h200-x4, .whl carried): the CPU sweep with interleaved
# timing passes (bench --rounds 5, best pass per row), p = 64/32/16, uniform and skew.
set -u
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT" /tmp/cpures
PS="64 32 16" PATTERNS="uniform skew" PLOT=0 BENCH_TIMEOUT=200 ROUNDS=5 MAX_TIME=0.3 ITERS=50 \
  timeout 560 bash bench/results/cpu_run.sh /tmp/cpures > /tmp/cpures/cpu_run_log.txt 2>&1
echo "cpu rc=$?"
tar czf "$OUT/cpu_results.tgz" -C /tmp/cpures .
grep -a "==\|geomean\|worst\|Terminated" /tmp/cpures/cpu_run_log.txt
