#!/usr/bin/env bash
# Issue 27's study (docs/results/recipes_cpu): each lever alone against the paper's recipe at equal steps, on the shared
# cars, the width-16 net with attention at [8, 4], 3,120 steps of batch 64 (40 epochs), the paper recipe with three
# seeds for the seed-to-seed spread, then recipe=fast (what paid alone, combined; the last override of recipe wins)
# with the same seeds, and the lever that paid most (model.lr=2e-3) with seeds 1 and 2 too. Along each run FID/KID at
# N = 500 every 10 epochs (four points); at the end evaluate.py at N = 1,000; all with DDIM 50, eta = 1 and the same
# noise. The paper seeds keep post-hoc EMA snapshots.
# LANES processes at a time, one thread each: budgets are steps, so sharing the CPU changes wall times only (they are
# converted from steps by the side-by-side per-step costs of bench/step_cost.py, not read off the clocks).
# A rerun skips what is done; each finished run's log, CSV and final results are copied to docs/results/recipes_cpu/runs.
#   bash scripts/study_cpu.sh                 (all runs, in the order below)
#   bash scripts/study_cpu.sh paper_s0 rescale  (only these; "posthoc": the post-hoc EMA lengths of the paper seeds)
#   bash scripts/study_cpu.sh ancestral paper_s0 rescale  (those final checkpoints with the paper's sampler, N = 500)
#   bash scripts/study_cpu.sh clipped paper_s0 rescale    (with DDIM 50 eta = 1 clipping its predicted x_0, N = 1,000)
# The study ran from a git worktree of a fixed commit (PY, OUT, DOCS and CACHE pointing back), so that edits made
# while it ran could not enter a run that started later.
set -euo pipefail
cd "$(dirname "$0")/.."
export PY=${PY:-.venv/bin/python}
export OUT=${OUT:-runs/study_cpu}
export DOCS=${DOCS:-docs/results/recipes_cpu/runs}
export DATA=${DATA:-../shared/data/cifar10-five-class-jpeg}
export WEIGHTS=${WEIGHTS:-../shared/weights/pt_inception-2015-12-05-pool3-only.pth}
export CACHE=${CACHE:-$PWD/cache/fid_stats}  # reference statistics and floors, computed once (give it from a worktree)
LANES=${LANES:-3}
mkdir -p "$OUT" "$DOCS"

RUNS='paper_s0 seed=0 callbacks.posthoc_ema.every_n_steps=312
paper_s1 seed=1 callbacks.posthoc_ema.every_n_steps=312
paper_s2 seed=2 callbacks.posthoc_ema.every_n_steps=312
rescale schedule.rescale=true
laplace recipe.timesteps=laplace
immiscible recipe.immiscible=true
min_snr recipe.loss_weighting=min_snr
warmup recipe.warmup_steps=200
lr_x2 model.lr=2e-3
lr_x0.5 model.lr=5e-4
cosine_schedule schedule=cosine
dropout recipe.dropout=0.1
width12 net.width=12 net.emb_dim=48 trainer.max_epochs=60 trainer.max_steps=3711
width24 net.width=24 net.emb_dim=96 net.heads=4 trainer.max_epochs=60 trainer.max_steps=1595
fast_s0 recipe=fast seed=0
fast_s1 recipe=fast seed=1
fast_s2 recipe=fast seed=2
lr_x2_s1 model.lr=2e-3 seed=1
lr_x2_s2 model.lr=2e-3 seed=2'
# widths at width 16's compute: steps x its cost per step over theirs, side by side on an idle CPU (bench/width_cost.py)
POSTHOC='0.05 0.10 0.20'  # EMA lengths (sigma_rel) reconstructed from the paper seeds' snapshots, scored at N = 1,000

one() {  # name, overrides...: train, then the final evaluation, then copy the small files into the docs
  local name=$1; shift
  [ -f "$DOCS/$name/final_ddim.json" ] && { echo "$name: done before ($DOCS/$name)"; return 0; }
  local m="metrics.inception_weights=$WEIGHTS metrics.reference_split=train metrics.batch_size=100 metrics.cache_dir=$CACHE data.root=$DATA"
  OMP_NUM_THREADS=1 $PY train.py experiment=cars_cpu recipe=paper trainer.max_epochs=40 \
    trainer.check_val_every_n_epoch=10 callbacks.fid.every_n_epochs=10 $m "$@" hydra.run.dir="$OUT/$name" \
    >> "$OUT/$name.log" 2>&1 || { echo "$name: train.py failed, see $OUT/$name.log"; return 1; }
  OMP_NUM_THREADS=1 $PY evaluate.py ckpt="$OUT/$name/checkpoints/last.ckpt" metrics.num_samples=1000 logger=csv $m \
    hydra.run.dir="$OUT/$name/final_ddim" >> "$OUT/$name.final_ddim.log" 2>&1 \
    || { echo "$name: evaluate.py failed, see $OUT/$name.final_ddim.log"; return 1; }
  mkdir -p "$DOCS/$name"
  cp "$OUT/$name.log" "$OUT/$name.final_ddim.log" "$OUT/$name/csv/metrics.csv" "$DOCS/$name/"
  cp "$OUT/$name/.hydra/overrides.yaml" "$DOCS/$name/overrides.yaml"
  cp "$OUT/$name/final_ddim/results.json" "$DOCS/$name/final_ddim.json"
  cp "$(ls "$OUT/$name"/samples/epoch_*.png | tail -1)" "$DOCS/$name/grid.png"  # the last validation grid
  echo "$name: done $(date -u +%H:%M)"
}
posthoc() {  # name sigma_rel: the final checkpoint with the post-hoc EMA of that length, at N = 1,000
  local name=$1 sigma=$2
  local m="metrics.inception_weights=$WEIGHTS metrics.reference_split=train metrics.batch_size=100 metrics.cache_dir=$CACHE data.root=$DATA"
  [ -f "$DOCS/$name/posthoc_$sigma.json" ] && return 0
  OMP_NUM_THREADS=1 $PY evaluate.py ckpt="$OUT/$name/checkpoints/last.ckpt" ema_length=$sigma metrics.num_samples=1000 \
    logger=csv $m hydra.run.dir="$OUT/$name/posthoc_$sigma" >> "$OUT/$name.posthoc_$sigma.log" 2>&1 \
    || { echo "$name: evaluate.py ema_length=$sigma failed, see $OUT/$name.posthoc_$sigma.log"; return 1; }
  cp "$OUT/$name/posthoc_$sigma/results.json" "$DOCS/$name/posthoc_$sigma.json"
  cp "$OUT/$name.posthoc_$sigma.log" "$DOCS/$name/"
  echo "$name: ema_length=$sigma done $(date -u +%H:%M)"
}
again() {  # tag name: the final checkpoint scored again, ancestral: the paper's sampler (Algorithm 2 over all T = 500
  # steps), N = 500; clipped: DDIM 50 eta = 1 with each step's predicted x_0 clipped to [-1, 1], N = 1,000
  local tag=$1 name=$2 s
  local m="metrics.inception_weights=$WEIGHTS metrics.reference_split=train metrics.batch_size=100 metrics.cache_dir=$CACHE data.root=$DATA"
  case $tag in
    ancestral) s="sampler=ancestral metrics.num_samples=500" ;;
    clipped) s="sampler=ddim_eta1 sampler.clip_x0=true metrics.num_samples=1000" ;;
  esac
  [ -f "$DOCS/$name/final_$tag.json" ] && return 0
  OMP_NUM_THREADS=1 $PY evaluate.py ckpt="$OUT/$name/checkpoints/last.ckpt" $s logger=csv $m \
    hydra.run.dir="$OUT/$name/final_$tag" >> "$OUT/$name.final_$tag.log" 2>&1 \
    || { echo "$name: evaluate.py ($tag) failed, see $OUT/$name.final_$tag.log"; return 1; }
  cp "$OUT/$name/final_$tag/results.json" "$DOCS/$name/final_$tag.json"
  cp "$OUT/$name.final_$tag.log" "$DOCS/$name/"
  echo "$name: $tag done $(date -u +%H:%M)"
}
export -f one posthoc again

if [ "${1:-}" = ancestral ] || [ "${1:-}" = clipped ]; then  # only the runs named (ancestral: 5x a DDIM final's cost)
  tag=$1; shift; printf '%s\n' "$@" | xargs -P "$LANES" -L 1 bash -c 'again "$@"' _ "$tag"; exit
fi
if [ $# -gt 0 ]; then RUNS=$(printf '%s\n' "$RUNS" | grep -E "^($(IFS='|'; echo "$*")) " || true); fi
echo "study start $(date -u +%F' '%H:%M) at $(git rev-parse --short HEAD), $LANES lanes"
[ -z "$RUNS" ] || printf '%s\n' "$RUNS" | xargs -P "$LANES" -L 1 bash -c 'one "$@"' _
if [ $# -eq 0 ] || [[ " $* " == *" posthoc "* ]]; then  # the paper seeds' snapshots, at each length
  for seed in 0 1 2; do for sigma in $POSTHOC; do echo "paper_s$seed $sigma"; done; done \
    | xargs -P "$LANES" -L 1 bash -c '[ -d "$OUT/$1/posthoc_ema" ] && posthoc "$@" || echo "$1: no snapshots in $OUT"' _
fi
echo "study end $(date -u +%F' '%H:%M)"
