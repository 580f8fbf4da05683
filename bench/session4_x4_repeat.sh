#!/bin/bash
# Session 4: a second bench of record on nvidia-h200-x4 (.whl carried), small sizes only,
# best of 5 passes, to see how far the 64 KiB ratio against NCCL moves between runs.
set -u
. bench/device_env.sh
timeout -k 5 240 $M -n 4 python3 -m pya2a.tools.gpu_bench --passes 5 --methods ll \
  --sizes 128,1024,8192,65536,262144 --nccl-graph --no-staged \
  --out "$OUT/gpu_bench_h200x4_s4_repeat.json" 2>&1 | grep -aE " (nccl|ll_pdl|nccl_graph|ll_pdl_plan|ll_pdl_graph) "
