#!/usr/bin/env bash
# The engine redesign side by side with the commit before it (issue 14's benchmark), in one run on this machine.
#   OLD=/path/to/old/checkout bash experiments/bench_redesign.sh > experiments/results/bench_redesign.log
# ONLY=sweep|one|batch: one section; N=20: the one-attack section on the first N images only;
# BATCH_INDICES=0:16 BATCH_STEPS=150: a shorter batch section (default: the 12 batches of images 0-47, 600 steps);
# BATCH_SIDES=new: its new side alone (the old vmap engine takes ~12 minutes).
# Needs ../shared/data. Each measurement alternates old and new so that machine noise hits both alike.
set -euo pipefail
NEW=$(cd "$(dirname "$0")/.." && pwd)
OLD=${OLD:?set OLD to a checkout of the commit before the redesign}
D=$NEW/../shared/data/cifar100_train_0-49.npz
T=$(mktemp -d)
if [ "${ONLY:-all}" = all ] || [ "${ONLY:-}" = sweep ]; then
echo "# 50-image sweep, --processes 2 (attacks/hour of attack time, from summary.json)"
for run in 1 2; do
  for side in old new; do
    root=$OLD; [ $side = new ] && root=$NEW
    (cd "$T" && PYTHONPATH=$root python -m dlg_jax.sweep --data "$D" --indices 0:50 --batch 64 --processes 2 --quiet \
      --out "$T/sweep-$side-$run" | tail -1 | sed "s/^/$side run $run: /")
  done
done
fi
if [ "${ONLY:-all}" = all ] || [ "${ONLY:-}" = one ]; then
echo "# One attack at a time (the 50 images one by one, default attack): seconds per attack"
ONE_OLD='
import os, sys, time, numpy as np
from dlg_jax.attack import AttackConfig
from dlg_jax.cli import enable_compilation_cache
from dlg_jax.run import attack_images
enable_compilation_cache()
d = np.load(sys.argv[1]); secs = []; ok = 0; N = int(os.environ.get("N", 50))
for i in range(N):
    o = attack_images(d["images"][i:i+1], d["labels"][i:i+1], 100, AttackConfig())
    secs.append(o["seconds"]); ok += o["status"] == "converged"
print(f"old: median {np.median(secs):.3f} s, min {np.min(secs):.3f} s, total {np.sum(secs):.1f} s, {ok}/{N} converged")
'
ONE_NEW='
import os, sys, numpy as np
from dlg_jax.cli.common import enable_compilation_cache
from dlg_jax.config import get_config
from dlg_jax.engine.attack import make_case
from dlg_jax.engine.single import attack_one
enable_compilation_cache()
N = int(os.environ.get("N", 50)); d = np.load(sys.argv[1]); case = make_case("lenet", 100, (32, 32, 3), 1234)
config = get_config("dlg").override(optimizer=sys.argv[2])
secs = []; ok = 0
for i in range(N):
    o, _ = attack_one(case, config, d["images"][i:i+1], d["labels"][i:i+1], 1234)
    secs.append(o.seconds); ok += o.status == "converged"
print(f"new {sys.argv[2]}: median {np.median(secs):.3f} s, min {np.min(secs):.3f} s, total {np.sum(secs):.1f} s, {ok}/{N} converged")
'
(cd "$T" && PYTHONPATH=$OLD python -c "$ONE_OLD" "$D")
(cd "$T" && PYTHONPATH=$NEW python -c "$ONE_NEW" "$D" lbfgs)
(cd "$T" && PYTHONPATH=$NEW python -c "$ONE_NEW" "$D" jaxopt-lbfgs)
fi
if [ "${ONLY:-all}" = all ] || [ "${ONLY:-}" = batch ]; then
BI=${BATCH_INDICES:-0:48}; BS=${BATCH_STEPS:-600}
echo "# Batch recipe (N = 4, idlg, sigmoid, TV 1e-5 in 4 stages), images $BI, $BS steps, --processes 2"
for side in ${BATCH_SIDES:-old new}; do
  root=$OLD; [ $side = new ] && root=$NEW
  start=$(date +%s.%N)
  (cd "$T" && PYTHONPATH=$root python -m dlg_jax.sweep --data "$D" --indices "$BI" --batch-size 4 --label-strategy idlg \
     --pixel-range sigmoid --tv-weight 1e-5 --tv-stages 4 --steps "$BS" --batch 6 --processes 2 --quiet \
     --out "$T/batch-$side" | tail -1 | sed "s/^/$side: /")
  python - "$T/batch-$side" "$start" <<'PY'
import json, sys, time, glob
rows = [json.loads(l) for f in glob.glob(sys.argv[1] + "/results*.jsonl") for l in open(f)]
print(f"  wall {time.time() - float(sys.argv[2]):.0f} s, evaluations {sum(r['evaluations'] for r in rows)}, "
      f"attack seconds (slowest worker) {json.load(open(sys.argv[1] + '/summary.json'))['summary']['attack_seconds']:.1f}, "
      f"mean matched PSNR {sum(r['psnr'] for r in rows) / len(rows):.2f} dB")
PY
done
fi
rm -rf "$T"
