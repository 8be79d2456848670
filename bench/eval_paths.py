"""The evaluation path of issue 11 against the one before it, side by side in one run (CPU ratios).

  old: chunks of generated images -> torch-fidelity's Inception (contiguous) -> features pickled to every rank
       (all_gather_object) -> torch-fidelity's FID (statistics from the features, eigvals of S1 S2) and IS
  new: metrics.evaluate: the same chunks -> the same Inception in channels_last -> torchmetrics states (FID as float64
       sums, the rest as gathered features) -> FID, KID, IS and the 95% bootstrap intervals of FID and KID

  (1) N = 500, the whole evaluation, old and new alternating, medians; and the bootstrap's share of the new one
  (2) N = 10,000 by stages: generation and Inception per image (each path's own, timed on one chunk) and everything
      after the features (timed on 10,000 features); the whole = N x per image + after, per path
  (3) bytes each rank contributes to the collectives in one evaluation at N = 500 over 2 gloo processes

The U-Net is paper_cpu's (width 16) with DPM-Solver++ 20 steps, the Inception random (the same arithmetic as the
real one), the reference 5,000 random feature vectors.

    .venv/bin/python bench/eval_paths.py [--n 500] [--big 10000] [--repeats 2] [--out bench/results/eval_paths_cpu.json]
"""

import argparse
import math
import os
import pickle
import statistics as stats
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from common import report
from ddpm_lightning import metrics
from ddpm_lightning.module import DiffusionModule

SETTINGS = dict(kid_subsets=100, kid_subset_size=1000, bootstrap=200, seed=0, prc=False)
SAMPLER = dict(name="dpm_solver", steps=20, spacing="quadratic")


def make_module() -> DiffusionModule:
    torch.manual_seed(0)
    return DiffusionModule(net=dict(width=16, emb_dim=64, heads=4), schedule=dict(kind="linear", T=1000), class_names=["automobile"],
                           conditional=True, p_uncond=0.1, guidance_w=1.0, sampler=SAMPLER).eval()


def make_reference(n: int = 5000) -> dict:
    features = torch.randn(n, 2048, generator=torch.Generator().manual_seed(1)).abs()
    return {**metrics.statistics(features), "features": features, "name": "bench"}


def detectors() -> tuple[metrics.Inception, metrics.Inception]:
    """The old path's detector (contiguous, as before) and the new one (channels_last), the same weights."""
    new = metrics.Inception(metrics.random_inception_state(), "random").eval()
    old = metrics.Inception(metrics.random_inception_state(), "random").eval().to(memory_format=torch.contiguous_format)
    return old, new


@torch.no_grad()
def old_evaluate(module, detector, reference, n, w, seed, batch_size) -> dict:
    """The path before issue 11 (callbacks.evaluate_module + metrics.generated_features), kept here to compare with."""
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    labels = metrics.even_labels(n, len(module.hparams.class_names))
    chunks = math.ceil(n / batch_size)
    mine = {}
    for k in range(rank, chunks, world):
        start, size = k * batch_size, min(batch_size, n - k * batch_size)
        g = torch.Generator().manual_seed(seed * 1_000_003 + k)
        images = module.sample(n=size, labels=labels[start : start + size], w=w, sampler=SAMPLER, generator=g, batch_size=size)
        mine[k] = (*metrics.extract(detector, images, batch_size), images[: 64 - start].cpu() if start < 64 else None)
    if world > 1:
        gathered = [None] * world
        dist.all_gather_object(gathered, mine)
        mine = {k: v for part in gathered for k, v in part.items()}
    parts = [mine[k] for k in range(chunks)]
    pool, logits = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
    is_mean, is_std = metrics.inception_score(logits)
    return {"fid": metrics.fid(pool, reference), "is_mean": is_mean, "is_std": is_std}


def new_evaluate(module, detector, reference, n, w, seed, batch_size) -> dict:
    return metrics.evaluate(module, detector, reference, n, w, {**SETTINGS, "seed": seed}, batch_size, SAMPLER)[0]


def clock(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def after_features_old(pool, logits, reference):
    metrics.fid(pool, reference)
    metrics.inception_score(logits)


def after_features_new(pool, logits, reference, detector):
    collection = metrics.metric_collection(detector, reference, len(pool), SETTINGS)
    for lo in range(0, len(pool), 250):
        collection.update(pool=pool[lo : lo + 250], logits=logits[lo : lo + 250], index=torch.arange(lo, lo + len(pool[lo : lo + 250])))
    return collection.compute()


class Counter:
    """Bytes this rank puts into all_gather, all_reduce and all_gather_object (pickled), by collective."""

    def __init__(self):
        self.bytes = {"all_gather": 0, "all_reduce": 0, "all_gather_object": 0}
        for name in self.bytes:
            real = getattr(dist, name)
            setattr(dist, name, self._wrap(name, real))

    def _wrap(self, name, real):
        def counted(*args, **kwargs):
            payload = args[1] if name in ("all_gather", "all_gather_object") else args[0]
            self.bytes[name] += len(pickle.dumps(payload)) if name == "all_gather_object" else payload.numel() * payload.element_size()
            return real(*args, **kwargs)
        return counted


def _bytes_worker(rank, world, port, n, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    counter = Counter()
    module, (old_det, new_det), reference = make_module(), detectors(), make_reference()
    result = {}
    for name, fn, det in (("old", old_evaluate, old_det), ("new", new_evaluate, new_det)):
        before = dict(counter.bytes)
        scores = fn(module, det, reference, n, 1.0, 0, 50)
        result[name] = {"bytes": {k: counter.bytes[k] - before[k] for k in before}, "fid": scores["fid"]}
    if rank == 0:
        torch.save(result, out)
    dist.destroy_process_group()


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--n", type=int, default=500)
    p.add_argument("--big", type=int, default=10_000)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--batch", type=int, default=250)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    module, (old_det, new_det), reference = make_module(), detectors(), make_reference()

    # (1) the whole evaluation at N, alternating
    times = {"old": [], "new": []}
    scores = {}
    for _ in range(args.repeats):
        for name, fn, det in (("old", old_evaluate, old_det), ("new", new_evaluate, new_det)):
            times[name].append(clock(lambda: scores.__setitem__(name, fn(module, det, reference, args.n, 1.0, 0, args.batch))))
    pool, logits = metrics.extract(new_det, torch.randint(0, 256, (args.n, 3, 32, 32), dtype=torch.uint8), args.batch)
    counts = metrics.resample_counts(args.n, SETTINGS["bootstrap"], 0)
    bootstrap = clock(lambda: (metrics.fid_of_resamples(pool, counts, reference), metrics.kid_of_resamples(pool, counts, reference["features"])))
    old_s, new_s = stats.median(times["old"]), stats.median(times["new"])
    rows = [dict(case=f"whole evaluation, N = {args.n}", old_s=round(old_s, 1), new_s=round(new_s, 1), new_over_old=round(new_s / old_s, 3),
                 bootstrap_s=round(bootstrap, 2), bootstrap_share_of_new=round(bootstrap / new_s, 3),
                 fid_old=round(scores["old"]["fid"], 4), fid_new=round(scores["new"]["fid"], 4), runs=times)]

    # (2) N = big by stages
    images = torch.randint(0, 256, (args.batch, 3, 32, 32), dtype=torch.uint8)
    labels = torch.zeros(args.batch, dtype=torch.long)
    generate = clock(lambda: module.sample(n=args.batch, labels=labels, w=1.0, sampler=SAMPLER, generator=torch.Generator().manual_seed(0))) / args.batch
    extract = {name: stats.median([clock(lambda: det(images)) for _ in range(2)]) / args.batch for name, det in (("old", old_det), ("new", new_det))}
    big_pool = torch.randn(args.big, 2048, generator=torch.Generator().manual_seed(2)).abs()
    big_logits = torch.randn(args.big, 1008, generator=torch.Generator().manual_seed(3))
    after = {"old": clock(lambda: after_features_old(big_pool, big_logits, reference)),
             "new": clock(lambda: after_features_new(big_pool, big_logits, reference, new_det))}
    whole = {name: args.big * (generate + extract[name]) + after[name] for name in ("old", "new")}
    rows.append(dict(case=f"by stages, N = {args.big}", generate_s_per_image=round(generate, 4),
                     inception_s_per_image_old=round(extract["old"], 4), inception_s_per_image_new=round(extract["new"], 4),
                     after_features_s_old=round(after["old"], 1), after_features_s_new=round(after["new"], 1),
                     whole_s_old=round(whole["old"], 1), whole_s_new=round(whole["new"], 1), new_over_old=round(whole["new"] / whole["old"], 3)))

    # (3) bytes between 2 gloo ranks at N
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "bytes.pt")
        mp.spawn(_bytes_worker, args=(2, 29600 + os.getpid() % 1000, args.n, out), nprocs=2)
        moved = torch.load(out, weights_only=True)
    rows.append(dict(case=f"bytes per rank into collectives, N = {args.n}, 2 gloo ranks", old=moved["old"]["bytes"], new=moved["new"]["bytes"],
                     old_total_mb=round(sum(moved["old"]["bytes"].values()) / 2**20, 2), new_total_mb=round(sum(moved["new"]["bytes"].values()) / 2**20, 2),
                     fid_old=round(moved["old"]["fid"], 4), fid_new=round(moved["new"]["fid"], 4)))
    report("eval_paths", rows, out=args.out, settings=SETTINGS, sampler=SAMPLER, threads=torch.get_num_threads())


if __name__ == "__main__":
    main()
