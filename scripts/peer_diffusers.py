"""The peer row of the recipe study (issue 18): what a user who did not pick this project would train, diffusers'
UNet2DModel with DDPMScheduler as in diffusers' examples/unconditional_image_generation/train_unconditional.py
(its defaults: T = 1000 linear betas, AdamW lr 1e-4 with betas 0.95/0.999 and weight decay 1e-6, 500 warm-up steps then
cosine decay, EMA with inv_gamma 1 and power 3/4 up to 0.9999, random flips), at about our net's parameter count and
our batch, for a given number of steps. Scored by this project's metrics (metrics.evaluate) at N images along the
run, with the same sampler as our rows (DDIM, eta = 1, over the peer's own schedule).

    .venv/bin/python scripts/peer_diffusers.py --data ../shared/data/cifar10-five-class-jpeg --steps S \
        --eval-every E --out docs/results/recipes_cpu/peer.json
"""

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torchvision.utils import make_grid

from ddpm_lightning import metrics
from ddpm_lightning.data import load_subset, random_hflip, to_unit_range
from ddpm_lightning.diffusion.generate import generate
from ddpm_lightning.diffusion.schedule import build_schedule
from ddpm_lightning.files import save_png, write_json

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from common import diffusers_peer  # noqa: E402


class PeerSampler:
    """What metrics.evaluate needs of a module: sample() with our samplers over the peer's schedule."""

    def __init__(self, net, sampler: dict):
        self.net, self.sampler = net, sampler
        self.schedule = build_schedule(kind="linear", T=1000, beta_1=1e-4, beta_T=0.02)  # DDPMScheduler(1000, "linear")
        self.hparams = argparse.Namespace(class_names=["automobile"], conditional=False, image_size=32)
        self.device = torch.device("cpu")

    def sample(self, n, labels=None, w=None, sampler=None, generator=None, batch_size=500):
        return generate(
            lambda x, t, y: self.net(x, t).sample,
            self.schedule,
            sampler or self.sampler,
            n,
            (3, 32, 32),
            generator=generator,
            batch_size=batch_size,
        )


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--data", required=True)
    p.add_argument("--steps", type=int, required=True)
    p.add_argument("--eval-every", type=int, required=True)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--num-samples", type=int, default=500)
    p.add_argument("--final-samples", type=int, default=1000)
    p.add_argument("--weights", default="../shared/weights/pt_inception-2015-12-05-pool3-only.pth")
    p.add_argument(
        "--cache-dir", default="cache/fid_stats"
    )  # conf/metrics/default.yaml: shared with train.py and evaluate.py
    p.add_argument("--out", required=True)
    args = p.parse_args()
    from diffusers.optimization import get_cosine_schedule_with_warmup
    from diffusers.training_utils import EMAModel

    torch.manual_seed(0)
    images, _ = load_subset(Path(args.data) / "cifar-10-batches-py", ["automobile"], "train")
    test, _ = load_subset(Path(args.data) / "cifar-10-batches-py", ["automobile"], "test")
    net, scheduler = diffusers_peer()
    ema = EMAModel(net.parameters(), decay=0.9999, use_ema_warmup=True, inv_gamma=1.0, power=3 / 4)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4, betas=(0.95, 0.999), weight_decay=1e-6, eps=1e-8)
    lr = get_cosine_schedule_with_warmup(opt, num_warmup_steps=500, num_training_steps=args.steps)
    settings = dict(
        kid_subsets=100, kid_subset_size=1000, bootstrap=200, seed=0, prc=False
    )  # conf/metrics/default.yaml
    detector, reference = metrics.detector_and_reference(
        args.weights, ["automobile"], images, "train", None, args.cache_dir, 100, "cpu"
    )
    sampler = {"name": "ddim", "steps": 50, "eta": 1.0, "spacing": "quadratic"}
    history, train_seconds, g = [], 0.0, torch.Generator().manual_seed(0)
    for step in range(1, args.steps + 1):
        start = time.perf_counter()
        idx = torch.randint(0, len(images), (args.batch,), generator=g)
        x = random_hflip(to_unit_range(images[idx]), generator=g)
        noise = torch.randn(x.shape, generator=g)
        t = torch.randint(0, 1000, (args.batch,), generator=g)
        loss = F.mse_loss(net(scheduler.add_noise(x, noise, t), t).sample, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)  # the example clips at 1.0 (accelerator.clip_grad_norm_)
        opt.step()
        lr.step()
        ema.step(net.parameters())
        train_seconds += time.perf_counter() - start
        if step % args.eval_every == 0 or step == args.steps:
            n = args.final_samples if step == args.steps else args.num_samples
            ema.store(net.parameters())
            ema.copy_to(net.parameters())
            net.eval()
            floor = metrics.floor(detector, reference, test, n, settings, args.cache_dir, 100)
            scores, preview = metrics.evaluate(PeerSampler(net, sampler), detector, reference, n, None, settings, 100)
            net.train()
            ema.restore(net.parameters())
            history.append(
                {
                    "step": step,
                    "num_samples": n,
                    "train_seconds": round(train_seconds, 1),
                    "loss": loss.item(),
                    "fid_floor": floor["fid"],
                    "kid_floor": floor["kid_mean"],
                    **metrics.loggable(scores),
                }
            )
            print(json.dumps(history[-1]), flush=True)
            write_json(
                Path(args.out),
                {
                    "peer": "diffusers UNet2DModel + DDPMScheduler",
                    "params": sum(q.numel() for q in net.parameters()),
                    "batch": args.batch,
                    "steps": args.steps,
                    "sampler": sampler,
                    "history": history,
                },
            )
            if step == args.steps:
                save_png(make_grid(preview[:64], nrow=8, padding=2), Path(args.out).with_suffix(".png"))


if __name__ == "__main__":
    main()
