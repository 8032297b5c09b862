#!/bin/bash
# Task 3: bench/patchcore_bench.py at the chosen embed dim, one size per invocation so each gets its own load average.
cd /work/bench-wt
. /work/main/.venv/bin/activate
for px in 224 256; do
  for n in 50 100 200 391; do
    echo "=== $(date +%T) image-size $px n $n embed-dim 128 loadavg $(cut -d' ' -f1-3 /proc/loadavg)"
    python bench/patchcore_bench.py --sizes $n --image-size $px --n-test 20 --embed-dim 128 2>/dev/null | tail -1
  done
done
echo "=== done $(date +%T)"
