#!/bin/bash
# Re-timing on the quieter machine, run after scaling.sh, one at a time.
cd /work/bench-wt
while pgrep -f /tmp/scaling.sh > /dev/null; do sleep 5; done
. /work/main/.venv/bin/activate
echo "=== $(date +%T) sweep rerun loadavg $(cut -d' ' -f1-3 /proc/loadavg)"
TQDM_DISABLE=1 python bench/embed_dim_sweep.py --json bench/results/embed_dim_sweep_rerun.json > bench/results/embed_dim_sweep_rerun.txt 2> bench/results/embed_dim_sweep_rerun.log
echo "=== $(date +%T) compare n50 loadavg $(cut -d' ' -f1-3 /proc/loadavg)"
TQDM_DISABLE=1 /work/anomalib-venv/bin/python bench/compare_anomalib.py --n-train 50 --ours-dims 128 1024 --json bench/results/compare_n50.json > bench/results/compare_n50.txt 2> bench/results/compare_n50.log
for n in 50 100 200; do
  echo "=== $(date +%T) rerun image-size 224 n $n embed-dim 128 loadavg $(cut -d' ' -f1-3 /proc/loadavg)"
  python bench/patchcore_bench.py --sizes $n --image-size 224 --n-test 20 --embed-dim 128 2>/dev/null | tail -1
done
echo "=== done $(date +%T)"
