"""Training throughput, side by side in one run.

  (a)  the project's path: DiffusionModule through Lightning's Trainer with the default speed options of this
       device (on a GPU: bf16 autocast, channels_last, torch.compile; fused Adam, foreach EMA and the data on the
       device with batch flips everywhere)
  (a') the same training step in a plain PyTorch loop: Lightning's cost is (a') / (a)
  (b)  the same net with every speed option off: fp32, eager, math attention, no EMA, a CPU DataLoader with
       per-image torchvision transforms (the paper's way of working)
  (c)  diffusers' UNet2DModel of a comparable size with its DDPMScheduler, in a plain loop (fp32)

On the CPU with a tiny net (width 8) by default; on a GPU with the paper's net (width 64).

    .venv/bin/python bench/train_throughput.py [--width 8] [--batch 32] [--steps 30] [--peak-tflops X]
"""

import time

import lightning as L
import torch
import torch.nn.functional as F
from common import arguments, bench_module, device, flops, peak_tflops, record, report, reset_memory, seconds, sync
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.optim.swa_utils import get_ema_multi_avg_fn

from ddpm_lightning.callbacks import EMA, EMAModel
from ddpm_lightning.data import CIFARDataModule, random_hflip, step_seed, to_unit_range

K = 5  # classes


def fake_data(n):
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g), torch.randint(0, K, (n,), generator=g)


class Clock(L.Callback):
    def __init__(self, warmup):
        self.warmup, self.start = warmup, None

    def on_train_batch_end(self, trainer, *args):
        if trainer.global_step == self.warmup:
            sync()
            self.start = time.perf_counter()

    def on_train_end(self, trainer, *args):
        sync()
        self.seconds = time.perf_counter() - self.start


def lightning_path(width, batch, steps, warmup, gpu, images, labels):
    module = bench_module(width, gpu)
    dm = CIFARDataModule("unused", ["cat"], batch_size=batch)
    dm.train_images, dm.train_labels, dm.test_images, dm.test_labels = images, labels, images[:batch], labels[:batch]
    clock = Clock(warmup)
    trainer = L.Trainer(
        max_steps=warmup + steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        use_distributed_sampler=False,
        precision="bf16-mixed" if gpu else "32-true",
        accelerator="auto",
        devices=1,
        callbacks=[clock, EMA(0.9999)],
    )
    trainer.fit(module, datamodule=dm)
    return batch * steps / clock.seconds


def plain_loop(width, batch, steps, warmup, gpu, images, labels):
    """The same work as (a) per step, without Lightning: gather, scale, flip, loss, skip check, fused Adam, EMA."""
    dev = device()
    module = bench_module(width, gpu).to(dev)
    ema = EMAModel(module.net, multi_avg_fn=get_ema_multi_avg_fn(0.9999))
    module.fast.compile_for_training()
    module.schedule.to(dev)
    opt = torch.optim.Adam(module.net.parameters(), lr=1e-3, fused=True)
    images, labels = images.to(dev), labels.to(dev)
    n = len(labels)

    count = iter(range(10**9))

    def step():
        i = next(count)
        idx = torch.randint(0, n, (batch,), generator=torch.Generator().manual_seed(i)).to(dev)
        g = torch.Generator(dev).manual_seed(step_seed(0, i, 0))
        x = random_hflip(to_unit_range(images[idx]), generator=g)
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=gpu):
            loss = module.loss(module.fast.train, x, labels[idx], g)
        opt.found_inf = (~torch.isfinite(loss.detach())).float()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        ema.update_parameters(module.net)

    return batch / seconds({"step": step}, rounds=steps, warmup=warmup)["step"]


def all_off(width, batch, steps, warmup, images, labels):
    """fp32, eager, math attention, plain Adam, no EMA, PIL images through per-image torchvision transforms."""
    from PIL import Image
    from torchvision import transforms

    dev = device()
    module = bench_module(width).to(dev)
    opt = torch.optim.Adam(module.net.parameters(), lr=1e-3, foreach=False)
    pil = [Image.fromarray(im.permute(1, 2, 0).numpy()) for im in images]
    tf = transforms.Compose(
        [transforms.RandomHorizontalFlip(), transforms.ToTensor(), transforms.Normalize([0.5] * 3, [0.5] * 3)]
    )

    class Images(torch.utils.data.Dataset):
        def __len__(self):
            return len(pil)

        def __getitem__(self, i):
            return tf(pil[i]), labels[i]

    loader = torch.utils.data.DataLoader(
        Images(), batch_size=batch, shuffle=True, drop_last=True, num_workers=2 if dev.type == "cuda" else 0
    )
    it = iter(loader)

    def step():
        nonlocal it
        try:
            x, y = next(it)
        except StopIteration:
            it = iter(loader)
            x, y = next(it)
        with sdpa_kernel(SDPBackend.MATH):
            loss = module.loss(module.net, x.to(dev), y.to(dev))
        opt.zero_grad()
        loss.backward()
        opt.step()

    return batch / seconds({"step": step}, rounds=steps, warmup=warmup)["step"]


def diffusers_unet(width):
    from diffusers import UNet2DModel

    return UNet2DModel(
        sample_size=32,
        in_channels=3,
        out_channels=3,
        block_out_channels=(width, 2 * width, 4 * width, 5 * width),
        layers_per_block=1,
        norm_num_groups=min(32, width),
        num_class_embeds=K + 1,
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    )


def diffusers_loop(width, batch, steps, warmup, images, labels):
    from diffusers import DDPMScheduler

    dev = device()
    net = diffusers_unet(width).to(dev)
    scheduler = DDPMScheduler(num_train_timesteps=500, beta_start=1e-4, beta_end=0.02)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    images, labels = images.to(dev), labels.to(dev)

    def step():
        idx = torch.randint(0, len(labels), (batch,), device=dev)
        x0 = to_unit_range(images[idx])
        noise = torch.randn_like(x0)
        t = torch.randint(0, 500, (batch,), device=dev)
        loss = F.mse_loss(net(scheduler.add_noise(x0, noise, t), t, class_labels=labels[idx]).sample, noise)
        opt.zero_grad()
        loss.backward()
        opt.step()

    return batch / seconds({"step": step}, rounds=steps, warmup=warmup)["step"], sum(
        p.numel() for p in net.parameters()
    )


def main():
    gpu = torch.cuda.is_available()
    args = arguments(__doc__, width=(64, 8), batch=(256, 32), steps=(200, 30), warmup=(30, 5))
    torch.manual_seed(0)
    images, labels = fake_data(max(4096, 8 * args.batch))
    module = bench_module(args.width)
    x, y = to_unit_range(images[: args.batch]), labels[: args.batch]
    per_image = flops(lambda: module.loss(module.net, x, y).backward()) / args.batch  # forward + backward
    d_net = diffusers_unet(args.width)
    d_per_image = (
        flops(
            lambda: F.mse_loss(d_net(x, torch.zeros(args.batch, dtype=torch.long), class_labels=y).sample, x).backward()
        )
        / args.batch
    )
    peak = peak_tflops(args.peak_tflops)
    common = (args.width, args.batch, args.steps, args.warmup)
    rows = []
    reset_memory()
    rows.append(
        record("(a) project default, through Lightning", lightning_path(*common, gpu, images, labels), per_image, peak)
    )
    reset_memory()
    rows.append(record("(a') same step, plain PyTorch loop", plain_loop(*common, gpu, images, labels), per_image, peak))
    reset_memory()
    rows.append(
        record("(b) every speed option off (the paper's way)", all_off(*common, images, labels), per_image, peak)
    )
    reset_memory()
    ips, n_params = diffusers_loop(*common, images, labels)
    rows.append(record(f"(c) diffusers UNet2DModel ({n_params / 1e6:.2f}M) + DDPMScheduler", ips, d_per_image, peak))
    a, a_plain, b, c = (r["images_per_s"] for r in rows)
    report(
        "train_throughput",
        rows,
        out=args.out,
        width=args.width,
        batch=args.batch,
        steps=args.steps,
        params_m=round(sum(p.numel() for p in module.parameters()) / 1e6, 3),
        gflop_per_image=round(per_image / 1e9, 4),
        peak_tflops=peak,
        ratios={
            "lightning_cost": round(a_plain / a - 1, 4),
            "default_over_all_off": round(a / b, 3),
            "default_over_diffusers": round(a / c, 3),
        },
    )


if __name__ == "__main__":
    main()
