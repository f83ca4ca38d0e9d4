#!/bin/bash
# GPU check of the sweeps: 50 and 1,000 attacks, then cost per attack at B = 1..1024 (experiments/results/bench_sweep_h100.md).
# Run from the repository root. Where the machine lacks packages (no network), jaxopt and dm-pix travel as wheels
# in .whl/ and are installed to /tmp/site; elsewhere `pip install -e .` first. Compiles into a fresh persistent
# cache, so the wall times include compilation.
if [ -d .whl ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
fi
D=${1:?usage: experiments/gpu_sweeps.sh CIFAR100_NPZ (OUT: results folder, default runs/gpu)}
OUT=${OUT:-runs/gpu}; mkdir -p $OUT
WORK=$(mktemp -d)  # sweep directories: fresh, or a rerun would resume the last run's rows instead of timing new ones
export PYTHONPATH=/tmp/site:. PYTHONUNBUFFERED=1 DLG_JAX_CACHE_DIR=$WORK/xla
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; git log -1 --format=%H 2>/dev/null; python3 -c "import jax, importlib.metadata as m; print({p: m.version(p) for p in ('jax', 'jaxlib', 'flax', 'jaxopt')}, jax.devices())"; } > $OUT/env.txt 2>&1

sweep() {  # NAME TIMEOUT SWEEP-FLAGS...: one sweep, its wall time, summary and rows
    local name=$1 limit=$2; shift 2
    local t0=$(date +%s.%N)
    timeout $limit python3 -m dlg_jax.sweep --data $D --out $WORK/$name --quiet "$@" > $OUT/$name.log 2>&1
    echo "wall $(python3 -c "print($(date +%s.%N) - $t0)")" >> $OUT/$name.log
    cp $WORK/$name/summary.md $OUT/${name}_summary.md; cp $WORK/$name/results.jsonl $OUT/${name}_results.jsonl
}
sweep s50 120 --indices 0:50 --batch 64
sweep s1000 200 --indices 0:50 --seeds 0:20 --batch 256
timeout 170 python3 experiments/bench_sweep.py --data $D --batches 1 16 64 256 1024 --iterations 300 --attacks-per-lane 1 \
    --repeats 2 --engines sequential flat --sequential-tasks 4 > $OUT/bench.log 2>&1
echo done >> $OUT/bench.log
