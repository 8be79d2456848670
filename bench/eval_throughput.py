"""FID evaluation end to end, as the training callback and evaluate.py run it (metrics.evaluate): N guided samples
(w = 2, DPM-Solver++ 20 steps, the project's default speed options for this device), their Inception features, FID,
KID, IS and the 95% bootstrap intervals of FID and KID (the default metrics settings). The
issue's H200 target: 50,000 samples in under 60 seconds. The U-Net is untrained and the Inception random (the same
arithmetic as trained ones, so the same time); a warm-up evaluation of one batch compiles first and is reported apart.

    .venv/bin/python bench/eval_throughput.py [--n 64] [--batch 32] [--width 8]
"""

import argparse
import time

import torch

from common import device, peak_tflops, record, report, reset_memory, sync
from ddpm_lightning import metrics
from train_throughput import make_module


def main():
    gpu = torch.cuda.is_available()
    p = argparse.ArgumentParser()
    p.add_argument("--n", type=int, default=50_000 if gpu else 64)
    p.add_argument("--batch", type=int, default=1000 if gpu else 32)
    p.add_argument("--width", type=int, default=64 if gpu else 8)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--peak-tflops", type=float, default=None)
    p.add_argument("--out", default=None, help="also write the JSON here")
    args = p.parse_args()
    dev = device()
    torch.manual_seed(0)
    module = make_module(args.width, gpu=gpu).to(dev).eval()
    detector = metrics.Inception(metrics.random_inception_state(), "random weights").to(dev)
    features = torch.randn(5000, 2048, generator=torch.Generator().manual_seed(1)).abs()  # a reference of 5,000 images' features
    reference = {**metrics.statistics(features), "features": features.to(dev), "name": "bench"}
    settings = dict(kid_subsets=100, kid_subset_size=1000, bootstrap=200, seed=0, prc=False)
    sampler = dict(name="dpm_solver", steps=args.steps, spacing="quadratic")

    def evaluate(n):
        sync()
        start = time.perf_counter()
        scores, _ = metrics.evaluate(module, detector, reference, n, 2.0, settings, args.batch, sampler)
        sync()
        return time.perf_counter() - start, scores

    warmup, _ = evaluate(args.batch)
    reset_memory()
    seconds, scores = evaluate(args.n)
    report("eval_throughput", [record(f"{args.n} guided samples + Inception features, FID, KID, IS and intervals", args.n / seconds, None,
                                      peak_tflops(args.peak_tflops))],
           out=args.out, width=args.width, batch=args.batch, steps=args.steps, n=args.n, seconds=round(seconds, 2),
           seconds_per_50k=round(seconds * 50_000 / args.n, 1), warmup_seconds=round(warmup, 2), compile=module.hparams.speed["compile"],
           bf16_sampling=module.hparams.speed["bf16_sampling"], scores_are_finite=all(v == v for v in metrics.loggable(scores).values()))


if __name__ == "__main__":
    main()
