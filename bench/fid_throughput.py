"""Inception feature throughput for FID/IS, side by side in one run.

(a) the project's path: metrics.extract, uint8 images already on the device, large batches
(b) torch-fidelity's own input path: its feature extraction over a Dataset through a DataLoader (batch 64)

  .venv/bin/python bench/fid_throughput.py [--weights ../shared/weights/pt_inception-2015-12-05-pool3-only.pth] [--n 64]
"""

import torch
from common import arguments, device, flops, peak_tflops, record, report, reset_memory, seconds
from torch_fidelity.utils import get_featuresdict_from_dataset

from ddpm_lightning import metrics
from ddpm_lightning.testing import random_inception_state


class Images(torch.utils.data.Dataset):
    def __init__(self, x):
        self.x = x

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i]


def main():
    gpu = torch.cuda.is_available()
    args = arguments(__doc__, weights="random", n=(5000, 64), batch=(500, 64))
    dev = device()
    if args.weights == "random":
        detector = metrics.Inception(random_inception_state(), "random weights").to(dev)
    else:
        detector = metrics.load_inception(args.weights).to(dev)
    images = torch.randint(0, 256, (args.n, 3, 32, 32), dtype=torch.uint8)
    on_device = images.to(dev)
    per_image = flops(lambda: detector(on_device[:2])) / 2
    peak = peak_tflops(args.peak_tflops)
    rows = []
    reset_memory()
    ours = seconds({"a": lambda: metrics.extract(detector, on_device, args.batch)}, warmup=1)["a"]
    rows.append(record("(a) project (metrics.extract, on device)", args.n / ours, per_image, peak))
    reset_memory()
    theirs = seconds(
        {"b": lambda: get_featuresdict_from_dataset(Images(images), detector, 64, gpu, False, False)}, warmup=1
    )["b"]
    rows.append(record("(b) torch-fidelity's DataLoader path (batch 64)", args.n / theirs, per_image, peak))
    report(
        "fid_throughput",
        rows,
        out=args.out,
        n=args.n,
        batch=args.batch,
        gflop_per_image=round(per_image / 1e9, 3),
        ratios={"project_over_torch_fidelity": round(rows[0]["images_per_s"] / rows[1]["images_per_s"], 3)},
    )


if __name__ == "__main__":
    main()
