#!/bin/bash
# GPU check of the sweeps: 50 and 1,000 attacks, then cost per attack at B = 1..1024 (experiments/results/bench_sweep_h100.md).
# Run from the repository root. Where the machine lacks packages (no network), jaxopt and dm-pix travel as wheels
# in .whl/ and are installed to /tmp/site; elsewhere `pip install -e .` first.
if [ -d .whl ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
fi
export PYTHONPATH=/tmp/site:. PYTHONUNBUFFERED=1 DLG_JAX_CACHE_DIR=/tmp/xla
D=${1:?usage: experiments/gpu_sweeps.sh CIFAR100_NPZ (OUT: results folder, default runs/gpu)}
OUT=${OUT:-runs/gpu}; mkdir -p $OUT
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; git log -1 --format=%H 2>/dev/null; python3 -c "import jax, importlib.metadata as m; print({p: m.version(p) for p in ('jax', 'jaxlib', 'flax', 'jaxopt')}, jax.devices())"; } > $OUT/env.txt 2>&1
t0=$(date +%s.%N)
timeout 120 python3 -m dlg_jax.sweep --data $D --indices 0:50 --batch 64 --out /tmp/s50 --quiet > $OUT/s50.log 2>&1
t1=$(date +%s.%N); echo "wall $(python3 -c "print($t1 - $t0)")" >> $OUT/s50.log
cp /tmp/s50/summary.md $OUT/s50_summary.md; cp /tmp/s50/results.jsonl $OUT/s50_results.jsonl
t0=$(date +%s.%N)
timeout 200 python3 -m dlg_jax.sweep --data $D --indices 0:50 --seeds 0:20 --batch 256 --out /tmp/s1000 --quiet > $OUT/s1000.log 2>&1
t1=$(date +%s.%N); echo "wall $(python3 -c "print($t1 - $t0)")" >> $OUT/s1000.log
cp /tmp/s1000/summary.md $OUT/s1000_summary.md; cp /tmp/s1000/results.jsonl $OUT/s1000_results.jsonl
timeout 170 python3 experiments/bench_sweep.py --data $D --batches 1 16 64 256 1024 --iterations 300 --attacks-per-lane 1 \
    --repeats 2 --engines sequential flat --sequential-tasks 4 > $OUT/bench.log 2>&1
echo done >> $OUT/bench.log
