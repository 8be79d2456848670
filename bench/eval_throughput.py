"""FID evaluation end to end, as the training callback and evaluate.py run it (metrics.evaluate): N guided samples
(w = 2, DPM-Solver++ 20 steps, the project's default speed options for this device), their Inception features, FID,
KID, IS and the 95% bootstrap intervals of FID and KID (the default metrics settings). The
issue's H200 target: 50,000 samples in under 60 seconds. The U-Net is untrained and the Inception random (the same
arithmetic as trained ones, so the same time); a warm-up evaluation of one batch compiles first and is reported apart.

    .venv/bin/python bench/eval_throughput.py [--n 64] [--batch 32] [--width 8]
"""

import torch
from common import arguments, bench_module, device, peak_tflops, record, report, reset_memory, seconds

from ddpm_lightning import metrics
from ddpm_lightning.testing import random_inception_state


def main():
    gpu = torch.cuda.is_available()
    args = arguments(__doc__, n=(50_000, 64), batch=(1000, 32), width=(64, 8), steps=20)
    dev = device()
    torch.manual_seed(0)
    module = bench_module(args.width, gpu).to(dev).eval()
    detector = metrics.Inception(random_inception_state(), "random weights").to(dev)
    features = torch.randn(
        5000, 2048, generator=torch.Generator().manual_seed(1)
    ).abs()  # a reference of 5,000 images' features
    reference = {**metrics.statistics(features), "features": features.to(dev), "name": "bench"}
    settings = dict(kid_subsets=100, kid_subset_size=1000, bootstrap=200, seed=0, prc=False)
    sampler = dict(name="dpm_solver", steps=args.steps, spacing="quadratic")

    scores = {}

    def evaluate(n):
        scores.update(metrics.evaluate(module, detector, reference, n, 2.0, settings, args.batch, sampler)[0])

    warmup = seconds({"warm-up": lambda: evaluate(args.batch)})["warm-up"]
    reset_memory()
    s = seconds({"evaluation": lambda: evaluate(args.n)})["evaluation"]
    report(
        "eval_throughput",
        [
            record(
                f"{args.n} guided samples + Inception features, FID, KID, IS and intervals",
                args.n / s,
                None,
                peak_tflops(args.peak_tflops),
            )
        ],
        out=args.out,
        width=args.width,
        batch=args.batch,
        steps=args.steps,
        n=args.n,
        seconds=round(s, 2),
        seconds_per_50k=round(s * 50_000 / args.n, 1),
        warmup_seconds=round(warmup, 2),
        compile=module.hparams.speed["compile"],
        bf16_sampling=module.hparams.speed["bf16_sampling"],
        scores_are_finite=all(v == v for v in metrics.loggable(scores).values()),
    )


if __name__ == "__main__":
    main()
