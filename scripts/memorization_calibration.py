"""Calibrates the memorization check (ddpm_lightning/metrics/memorization.py) on a labelled set built from the five
classes' CIFAR-10 images, and measures the real test split's rate.

Positives: 200 training images, each altered as a model might alter a copy (shifts of 1 and 2 pixels, a crop scaled
back up, contrast and colour changes, Gaussian noise of sd 8/255 and 20/255, blur, JPEG at quality 50; the exact
image and its mirror as sanity rows). Negatives: 1,000 test images, less those labelled by eye as the same photograph
as a training image (``near_duplicates`` in docs/results/memorization/labels.json). For every threshold on d1 / d2:
the share of each alteration caught and of the negatives flagged; then the real test split's rate at the chosen
threshold, with a grid of its flagged pairs.

    .venv/bin/python scripts/memorization_calibration.py --data DIR [--boundary]   (DIR holds cifar-10-batches-py/)

--boundary writes the grids of the negatives below d1 / d2 = 0.75 (24 pairs each, in order) and prints their
(index, ratio), for labelling by eye into labels.json.
"""

import argparse
import io
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.utils import make_grid

from ddpm_lightning.data import load_subset
from ddpm_lightning.files import save_figure, save_png, write_json, write_text
from ddpm_lightning.metrics.memorization import THRESHOLD, TrainingSet
from ddpm_lightning.metrics.stats import proportion_interval

FIVE = ["airplane", "automobile", "cat", "horse", "ship"]
OUT = Path(__file__).resolve().parents[1] / "docs" / "results" / "memorization"
THRESHOLDS = [round(0.05 * k, 2) for k in range(2, 20)]


def shifted(x: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """The image moved by (dy, dx) pixels, the uncovered border filled from the edge (as a crop of a larger photo)."""
    p = max(abs(dy), abs(dx))
    big = F.pad(x.float(), (p, p, p, p), mode="replicate")
    return big[..., p - dy : p - dy + 32, p - dx : p - dx + 32].round().to(torch.uint8)


def jpeg(x: torch.Tensor, quality: int) -> torch.Tensor:
    out = []
    for im in x:
        buf = io.BytesIO()
        Image.fromarray(im.permute(1, 2, 0).numpy()).save(buf, "JPEG", quality=quality)
        out.append(torch.from_numpy(np.array(Image.open(io.BytesIO(buf.getvalue())))).permute(2, 0, 1))
    return torch.stack(out)


def alterations(x: torch.Tensor, g: torch.Generator) -> dict[str, torch.Tensor]:
    """What a model might do to a copy, each applied to every image of ``x`` (uint8)."""
    n, xf = len(x), x.float()
    sign = lambda: torch.randint(0, 2, (n,), generator=g) * 2 - 1  # noqa: E731
    u8 = lambda t: t.round().clamp(0, 255).to(torch.uint8)  # noqa: E731
    s1y, s1x, s2y, s2x = sign(), sign(), sign(), sign()
    crops = []
    for im in xf:
        size = int(torch.randint(27, 31, (1,), generator=g))
        top, left = (int(v) for v in torch.randint(0, 33 - size, (2,), generator=g))
        crops.append(F.interpolate(im[None, :, top : top + size, left : left + size], size=32, mode="bilinear",
                                   antialias=True)[0])  # fmt: skip
    cast = 1 + 0.15 * (torch.rand(n, 3, 1, 1, generator=g) * 2 - 1), 25 * (torch.rand(n, 3, 1, 1, generator=g) * 2 - 1)
    return {
        "exact": x,
        "mirrored": x.flip(-1),
        "shifted 1 px": torch.stack(
            [
                shifted(im, int(a), int(b) * int(torch.randint(0, 2, (1,), generator=g)))
                for im, a, b in zip(x, s1y, s1x, strict=True)
            ]
        ),  # fmt: skip
        "shifted 2 px": torch.stack(
            [
                shifted(im, 2 * int(a), int(b) * int(torch.randint(0, 3, (1,), generator=g)))
                for im, a, b in zip(x, s2y, s2x, strict=True)
            ]
        ),  # fmt: skip
        "cropped 27-30 px, scaled to 32": u8(torch.stack(crops)),
        "contrast x0.85, +20 levels": u8(xf * 0.85 + 20),
        "colour cast (gain 0.85-1.15, offset +-25 per channel)": u8(xf * cast[0] + cast[1]),
        "noise sd 8/255": u8(xf + 8 * torch.randn(x.shape, generator=g)),
        "noise sd 20/255": u8(xf + 20 * torch.randn(x.shape, generator=g)),
        "blurred (16 px and back)": u8(
            F.interpolate(F.interpolate(xf, size=16, mode="bilinear", antialias=True), size=32, mode="bilinear")
        ),  # fmt: skip
        "JPEG quality 50": jpeg(x, 50),
    }


def ratios(training: TrainingSet, images: torch.Tensor, batch: int = 500) -> tuple[torch.Tensor, torch.Tensor]:
    ds, idx = zip(*(training.nearest(images[i : i + batch]) for i in range(0, len(images), batch)), strict=True)
    d, i = torch.cat(ds), torch.cat(idx)
    return d[:, 0] / d[:, 1].clamp(min=1e-12), i[:, 0]


def pair_grid(queries: torch.Tensor, nearest: torch.Tensor, nrow: int = 12) -> torch.Tensor:
    tiles = torch.stack([t for pair in zip(queries, nearest, strict=True) for t in pair])
    grid = make_grid(tiles, nrow=nrow, padding=2, pad_value=255)
    return F.interpolate(grid[None].float(), scale_factor=3, mode="nearest")[0].to(torch.uint8)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True)
    p.add_argument("--boundary", action="store_true")
    args = p.parse_args()
    folder = Path(args.data) / "cifar-10-batches-py"
    train, _ = load_subset(folder, FIVE, "train")
    test, _ = load_subset(folder, FIVE, "test")
    g = torch.Generator().manual_seed(0)
    start = time.perf_counter()
    training = TrainingSet(train)
    prepare = time.perf_counter() - start
    positives_at = torch.randperm(len(train), generator=g)[:200]
    negatives_at = torch.randperm(len(test), generator=g)[:1000]
    labels = (
        json.loads((OUT / "labels.json").read_text()) if (OUT / "labels.json").is_file() else {"near_duplicates": []}
    )
    start = time.perf_counter()
    test_ratio, test_nearest = ratios(training, test)
    per_image = (time.perf_counter() - start) / len(test)
    if args.boundary:  # the negatives below 0.75, beside their nearest training images, for labelling by eye
        r = test_ratio[negatives_at]
        order = [int(i) for i in r.argsort() if r[i] < 0.75]
        for part in range(0, len(order), 24):
            pick = negatives_at[order[part : part + 24]]
            grid = pair_grid(test[pick], train[test_nearest[pick]], nrow=8)
            save_png(grid, OUT / f"boundary_{part // 24 + 1}.png", "a boundary grid")
        print(json.dumps([[int(negatives_at[i]), round(float(r[i]), 3)] for i in order]))
        return
    near = set(labels["near_duplicates"])
    negatives = [int(i) for i in negatives_at if int(i) not in near]
    altered = alterations(train[positives_at], g)
    rows, curve = [], {}
    for name, images in altered.items():
        r, found = ratios(training, images)
        source_found = (found == positives_at).float()  # the nearest training image is the one altered
        curve[name] = [float((r < t).float().mean()) for t in THRESHOLDS]
        rows.append({"set": name, "n": len(r), "caught": float((r < THRESHOLD).float().mean()),
                     "nearest_is_the_source": float(source_found.mean())})  # fmt: skip
    neg_ratio = test_ratio[negatives]
    curve["negatives (test images, near-duplicates removed)"] = [
        float((neg_ratio < t).float().mean()) for t in THRESHOLDS
    ]
    positives = torch.cat(
        [ratios(training, im)[0] for name, im in altered.items() if name not in ("exact", "mirrored")]
    )
    caught, flagged = int((positives < THRESHOLD).sum()), int((neg_ratio < THRESHOLD).sum())
    test_flagged = (test_ratio < THRESHOLD).nonzero().flatten()
    summary = {
        "threshold": THRESHOLD,
        "positives": {
            "n": len(positives),
            "caught": caught / len(positives),
            "ci95": proportion_interval(caught, len(positives)),
        },  # fmt: skip
        "negatives": {
            "n": len(neg_ratio),
            "flagged": flagged / len(neg_ratio),
            "ci95": proportion_interval(flagged, len(neg_ratio)),
        },  # fmt: skip
        "test_split": {
            "n": len(test),
            "flagged": len(test_flagged) / len(test),
            "ci95": proportion_interval(len(test_flagged), len(test)),
            "labelled_near_duplicates_in_the_1000": len(near & {int(i) for i in negatives_at}),
        },  # fmt: skip
        "cost": {
            "prepare_training_set_s": round(prepare, 2),
            "s_per_image": round(per_image, 5),
            "train_images": len(train),
            "threads": torch.get_num_threads(),
        },  # fmt: skip
        "rows": rows,
        "thresholds": THRESHOLDS,
        "curve": curve,
        "positives_at": positives_at.tolist(),
        "negatives_at": negatives_at.tolist(),
    }
    write_json(OUT / "calibration.json", summary, "the calibration")
    order = test_flagged[test_ratio[test_flagged].argsort()]
    save_png(pair_grid(test[order[:96]], train[test_nearest[order[:96]]]), OUT / "test_flagged.png", "the flagged grid")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.figure

    fig = matplotlib.figure.Figure(figsize=(8, 5))
    ax = fig.subplots()
    for name, values in curve.items():
        ax.plot(THRESHOLDS, values, marker="o", markersize=3, label=name, lw=2.5 if name.startswith("negatives") else 1)
    ax.axvline(THRESHOLD, color="k", ls="--", lw=0.8)
    ax.set(xlabel="threshold on d1 / d2", ylabel="share flagged as a copy", title="memorization check: calibration")
    ax.legend(fontsize=6)
    save_figure(fig, OUT / "curve.png", "the calibration curve")
    lines = ["| set | n | caught at d1/d2 < %g | nearest is the source |" % THRESHOLD, "| --- | --- | --- | --- |"]
    lines += [f"| {r['set']} | {r['n']} | {r['caught']:.3f} | {r['nearest_is_the_source']:.3f} |" for r in rows]
    write_text(OUT / "table.md", "\n".join(lines) + "\n", "the calibration table")
    print(
        json.dumps(
            {k: v for k, v in summary.items() if k in ("threshold", "positives", "negatives", "test_split", "cost")}
        )
    )


if __name__ == "__main__":
    main()
