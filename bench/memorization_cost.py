"""The cost of the memorization metric (issue 19), side by side with the rest of an evaluation, in one run: the
nearest and second-nearest training image (l2 in pixel space, mirrors counted) of N = 1,000 generated images among
25,000 training images, against the Inception features of the same images (what every FID/KID/class agreement pays).

The training images are the shared five classes when ../shared is there (else random images of the same shape); the
"generated" images are random. The cases take turns in rounds; each figure is the median of its rounds.

    .venv/bin/python bench/memorization_cost.py --out bench/results/memorization_cost_cpu.json   # about 5 minutes on 2 cores
"""

from pathlib import Path

import torch
from common import arguments, device, report, seconds

from ddpm_lightning import metrics
from ddpm_lightning.data import load_subset

SHARED = Path(__file__).resolve().parents[2] / "shared"
FIVE = ["airplane", "automobile", "cat", "horse", "ship"]


def main() -> None:
    args = arguments(
        __doc__, n=1000, train=25000, inception_images=200, rounds=3
    )  # Inception timed on inception_images, scaled
    dev = device()
    folder = SHARED / "data" / "cifar10-five-class-jpeg" / "cifar-10-batches-py"
    g = torch.Generator().manual_seed(0)
    if folder.is_dir():
        train, source = load_subset(folder, FIVE, "train")[0][: args.train], "the shared five classes"
    else:
        train, source = torch.randint(0, 256, (args.train, 3, 32, 32), dtype=torch.uint8, generator=g), "random images"
    generated = torch.randint(0, 256, (args.n, 3, 32, 32), dtype=torch.uint8, generator=g).to(dev)
    weights = SHARED / "weights" / "pt_inception-2015-12-05-pool3-only.pth"
    detector = metrics.load_inception(str(weights) if weights.is_file() else None).to(dev)
    cases = {
        "memorization (d1, d2 of N images)": lambda: metrics.nearest_training_images(generated, train),
        "Inception features of N images": lambda: metrics.extract(detector, generated[: args.inception_images], 100),
    }
    times = seconds(cases, rounds=args.rounds)
    memo = times["memorization (d1, d2 of N images)"]
    incep = times["Inception features of N images"] * args.n / args.inception_images
    rows = [
        {
            "case": "memorization (d1, d2 of N images)",
            "n": args.n,
            "train_images": len(train),
            "seconds": round(memo, 3),
        },
        {
            "case": "Inception features of N images",
            "n": args.n,
            "seconds": round(incep, 3),
            "note": f"timed on {args.inception_images} images, scaled to N",
        },
        {"case": "memorization / Inception", "ratio": round(memo / incep, 4)},
    ]
    report("memorization_cost", rows, args.out, train_source=source, rounds=args.rounds)


if __name__ == "__main__":
    main()
