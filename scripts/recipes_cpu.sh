#!/usr/bin/env bash
# The recipe study of docs/results/recipes_cpu (issue 18), on a 2-core CPU: the paper's recipe, recipe=fast, single
# levers and the peer (diffusers), each at the same budget: 3,120 training steps of batch 64 (40 epochs of the 5,000
# cars) for the recipes that share our net, the same wall time for the peer (its steps from bench/step_cost.py's
# per-step costs, measured side by side). Three processes at a time, one thread each; budgets are steps, so sharing
# the CPU changes wall times only. Along each run: FID/KID at N = 500 every 8 epochs; at the end, evaluate.py at
# N = 1,000 with the runs' sampler (DDIM 50, eta = 1), and at N = 500 with the paper's ancestral sampler (500 network
# calls per image: 10x DDIM's cost, so at the along-run N). Then scripts/recipe_report.py.
#   bash scripts/recipes_cpu.sh            (about 2 hours; a rerun skips what is done)
#   SINGLES=1 bash scripts/recipes_cpu.sh  (also the single levers: another hour)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
OUT=${OUT:-runs/recipes_cpu}
DATA=${DATA:-../shared/data/cifar10-five-class-jpeg}
WEIGHTS=${WEIGHTS:-../shared/weights/pt_inception-2015-12-05-pool3-only.pth}
PEER_STEPS=${PEER_STEPS:-1680}   # 3,120 x (0.3072 s ours / 0.5698 s the peer's per step) = 1,682: bench/results/step_cost_cpu.json
mkdir -p "$OUT"
M="metrics.inception_weights=$WEIGHTS metrics.reference_split=train metrics.batch_size=100"

# the reference statistics of the 5,000 training cars and the floors at N = 500 and 1,000, once, on both cores
$PY - "$DATA" "$WEIGHTS" <<'PY'
import sys
from pathlib import Path
from ddpm_lightning import metrics
from ddpm_lightning.data import load_subset
root = Path(sys.argv[1]) / "cifar-10-batches-py"
train, _ = load_subset(root, ["automobile"], "train")
test, _ = load_subset(root, ["automobile"], "test")
detector, reference = metrics.detector_and_reference(sys.argv[2], ["automobile"], train, "train", None, "cache/fid_stats", 100, "cpu")
for n in (500, 1000):
    f = metrics.floor(detector, reference, test, n, dict(kid_subsets=100, kid_subset_size=1000, bootstrap=200, seed=0, prc=False), "cache/fid_stats", 100)
    print(f"floor at N={n}: FID {f['fid']:.2f}, KID {f['kid_mean']:.4f}")
PY

train() {  # name, recipe overrides...
  local name=$1; shift
  OMP_NUM_THREADS=1 $PY train.py experiment=cars_cpu trainer.max_epochs=40 trainer.check_val_every_n_epoch=8 \
    callbacks.fid.every_n_epochs=8 data.root="$DATA" $M "$@" hydra.run.dir="$OUT/$name" > "$OUT/$name.log" 2>&1
}
final() {  # name, sampler tag, N, evaluate.py overrides...
  local name=$1 tag=$2 n=$3; shift 3
  [ -f "$OUT/$name/final_$tag/results.json" ] && return 0
  OMP_NUM_THREADS=1 $PY evaluate.py ckpt="$OUT/$name/checkpoints/last.ckpt" metrics.num_samples=$n data.root="$DATA" $M logger=csv \
    "$@" hydra.run.dir="$OUT/$name/final_$tag" > "$OUT/$name.final_$tag.log" 2>&1
}
peer() {
  [ -f "$OUT/peer.json" ] && grep -q "\"step\": $PEER_STEPS" "$OUT/peer.json" && return 0
  OMP_NUM_THREADS=1 $PY scripts/peer_diffusers.py --data "$DATA" --weights "$WEIGHTS" --steps "$PEER_STEPS" \
    --eval-every $((PEER_STEPS / 5)) --out "$OUT/peer.json" > "$OUT/peer.log" 2>&1
}

samplers() {  # the other samplers on a final checkpoint, at N = 500 with the along-run noise (docs/results/recipes_cpu)
  final "$1" dpm_solver 500 sampler=dpm_solver && final "$1" ddim_eta0 500 sampler=ddim
}
(train paper recipe=paper && final paper ddim 1000 && final paper ancestral 500 sampler=ancestral && samplers paper) &
(train fast recipe=fast && final fast ddim 1000 && final fast ancestral 500 sampler=ancestral && samplers fast) &
peer &
wait
if [ -n "${SINGLES:-}" ]; then
  (train min_snr recipe=paper recipe.loss_weighting=min_snr && final min_snr ddim 1000) &
  (train lr_schedule recipe=paper recipe.warmup_steps=200 recipe.lr_decay=cosine && final lr_schedule ddim 1000) &
  wait
fi
$PY scripts/recipe_report.py --runs "$OUT" --out docs/results/recipes_cpu
