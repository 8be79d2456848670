#!/usr/bin/env bash
# issue 27, 2026-12-06: recipe=fast lost to the paper's recipe on the five classes at step 4,680 (FID 124.8 and class
# agreement 0.42 against the old paper run's 115.6 and 0.55, N = 1,000, same noise). Which lever: each alone on the
# five classes to that step (12 epochs; constant LR, so the same as a longer run's first 4,680 steps), scored there at
# N = 1,000 as the runs are. Two lanes of one thread, from the worktree /work/study5 (56b5e92), after five_class_cpu ends.
while pgrep -f "paper.py experiment=five_class_cpu" > /dev/null; do sleep 20; done
cd /work/study5
OUT=/work/main/runs/five_class_levers
mkdir -p $OUT
one() {
  local name=$1; shift
  OMP_NUM_THREADS=1 /work/main/.venv/bin/python train.py model=improved data=five_class experiment=five_class_cpu recipe=paper "$@" trainer.max_epochs=12 \
    trainer.check_val_every_n_epoch=12 callbacks.fid.every_n_epochs=12 metrics.cache_dir=/work/main/cache/fid_stats \
    hydra.run.dir=$OUT/$name >> $OUT/$name.log 2>&1
  local rc=$?
  echo "$name: done $(date -u +%H:%M), exit $rc"
}
one lr_x2 model.lr=2e-3 &
one laplace recipe.timesteps=laplace
wait
