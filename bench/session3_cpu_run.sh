#!/bin/bash
# Session 3, device call 1 (nvidia-h200-x4, 64 cores, .whl carried): the CPU sweep after the
# plan-binding fix (skewed counts used to split ranks between bound and run() paths and hang)
# and the per-phase copy lists: tune --quick at p = 64/32/16, then bench uniform and skew,
# 8 B .. 4 MiB per peer, with auto on that table; the per-call profile at p >= 32.
set -u
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT" /tmp/cpures
PS="64 32 16" PATTERNS="uniform skew" PLOT=0 BENCH_TIMEOUT=${BENCH_TIMEOUT:-110} \
  timeout 540 bash bench/results/cpu_run.sh /tmp/cpures > /tmp/cpures/cpu_run_log.txt 2>&1
echo "rc=$?"
tar czf "$OUT/cpu_results.tgz" -C /tmp/cpures .
grep -a "==\|geomean\|worst\|Terminated" /tmp/cpures/cpu_run_log.txt
