"""A short real training run: model=improved on the five-class images, the paper's net and batch, through the
project's Lightning path with this device's default speed options; reports steady-state images/s (after a warm-up
epoch that includes compilation) and the extrapolated time of the paper's 500-epoch recipe.

    .venv/bin/python bench/real_training.py --data ../shared/data/cifar10-five-class-jpeg [--batch 64] [--epochs 2]
"""

from pathlib import Path

import torch
from common import arguments, bench_module, flops, peak_tflops, record, report, reset_memory
from train_throughput import lightning_path

from ddpm_lightning.data import load_subset, to_unit_range

FIVE = ["airplane", "automobile", "cat", "horse", "ship"]


def main():
    gpu = torch.cuda.is_available()
    args = arguments(
        __doc__, data="data", width=(64, 8), batch=64, epochs=2.0
    )  # data: the folder holding cifar-10-batches-py/
    images, labels = load_subset(Path(args.data) / "cifar-10-batches-py", FIVE, "train")
    per_epoch = len(labels) // args.batch
    module = bench_module(args.width)
    x, y = to_unit_range(images[: args.batch]), labels[: args.batch]
    per_image = flops(lambda: module.loss(module.net, x, y).backward()) / args.batch
    reset_memory()
    ips = lightning_path(args.width, args.batch, int(args.epochs * per_epoch), per_epoch, gpu, images, labels)
    recipe_images = 500 * len(labels)
    report(
        "real_training",
        [record(f"model=improved data=five_class, batch {args.batch}", ips, per_image, peak_tflops(args.peak_tflops))],
        out=args.out,
        width=args.width,
        batch=args.batch,
        images=len(labels),
        paper_recipe_minutes=round(recipe_images / ips / 60, 2),
        note="500 epochs x 25,000 images at the measured rate, without FID",
    )


if __name__ == "__main__":
    main()
