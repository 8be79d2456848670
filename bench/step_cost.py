"""Training cost per step, side by side in one run (issue 18): the U-Net with self-attention at each placement of
``net.attention``, at two widths; at the study's width, also the first study's fast recipe's step (Min-SNR weights
and gradient clipping) and the peer's step (diffusers' UNet2DModel with DDPMScheduler, as its train_unconditional example).

Each case is a plain training step (noise, loss, backward, Adam); the cases take turns in rounds, and each case's
figure is the median of its rounds, so a slow spell of the shared machine hits them all alike.

    .venv/bin/python bench/step_cost.py --out bench/results/step_cost_cpu.json      # about 6 minutes on 2 cores
"""

import torch
import torch.nn.functional as F
from common import arguments, diffusers_peer, report, seconds

from ddpm_lightning.testing import tiny_module

PLACEMENTS = {
    "paper: 32, 16, 8, 4": [32, 16, 8, 4],
    "16, 8, 4 (no 32x32)": [16, 8, 4],
    "16, 8 (ADM)": [16, 8],
    "16 (DDPM)": [16],
    "8, 4": [8, 4],
    "none": [],
}


def our_step(width: int, attention: list[int], batch: int, recipe: dict | None = None):
    """One training step of the simple model at ``width`` (emb_dim 4 width, as paper_cpu), with the recipe's levers."""
    recipe = recipe or {}
    m = tiny_module(
        net=dict(width=width, emb_dim=4 * width, heads=2 if width <= 16 else 4, attention=attention),
        schedule=dict(T=500),
        recipe=dict(loss_weighting=recipe.get("loss_weighting", "none"), immiscible=recipe.get("immiscible", False)),
    )
    opt = torch.optim.Adam(m.net.parameters(), lr=1e-3, fused=True)
    x = torch.rand(batch, 3, 32, 32) * 2 - 1
    clip = recipe.get("grad_clip")

    def step():
        loss = m.loss(m.net, x, None)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(m.net.parameters(), clip)
        opt.step()

    return step, sum(p.numel() for p in m.net.parameters())


def peer_step(batch: int):
    """diffusers' unconditional training step: DDPMScheduler(1000, linear).add_noise, UNet2DModel, MSE on the noise,
    AdamW (the example's betas 0.95/0.999, weight decay 1e-6)."""
    net, scheduler = diffusers_peer()
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4, betas=(0.95, 0.999), weight_decay=1e-6)
    x = torch.rand(batch, 3, 32, 32) * 2 - 1

    def step():
        noise = torch.randn_like(x)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (batch,))
        loss = F.mse_loss(net(scheduler.add_noise(x, noise, t), t).sample, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step, sum(p.numel() for p in net.parameters())


def measure(cases: dict, steps: int, rounds: int, batch: int) -> list[dict]:
    built = {name: make() for name, make in cases.items()}
    times = seconds({name: step for name, (step, _) in built.items()}, rounds=rounds, warmup=1, calls=steps)
    return [
        dict(case=name, params=built[name][1], s_per_step=round(t, 5), images_per_s=round(batch / t, 2))
        for name, t in times.items()
    ]


def main():
    args = arguments(
        __doc__, batch=64, steps=5, rounds=5, wide=64, wide_batch=16
    )  # steps: per case per round at width 16
    torch.manual_seed(0)
    rows = []
    fast = dict(loss_weighting="min_snr", grad_clip=1.0)
    cases16 = {f"width 16, attention {k}": (lambda a=a: our_step(16, a, args.batch)) for k, a in PLACEMENTS.items()}
    cases16["width 16, attention 8, 4, Min-SNR weights and clipping (the first study's recipe=fast)"] = lambda: (
        our_step(16, [8, 4], args.batch, fast)
    )
    cases16["peer: diffusers UNet2DModel + DDPMScheduler"] = lambda: peer_step(args.batch)
    for row in measure(cases16, args.steps, args.rounds, args.batch):
        rows.append(dict(width=16, batch=args.batch, **row))
    wide = {
        f"width {args.wide}, attention {k}": (lambda a=a: our_step(args.wide, a, args.wide_batch))
        for k, a in PLACEMENTS.items()
    }
    for row in measure(wide, 1, 3, args.wide_batch):
        rows.append(dict(width=args.wide, batch=args.wide_batch, **row))
    for width in (16, args.wide):
        base = next(r for r in rows if r["width"] == width and "paper" in r["case"])
        for r in rows:
            if r["width"] == width:
                r["ratio_to_paper"] = round(r["images_per_s"] / base["images_per_s"], 3)
    report("step_cost", rows, args.out)
    print(
        "\n| width | case | parameters | images/s | ratio to the paper's placement |\n| --- | --- | --- | --- | --- |"
    )
    for r in rows:
        print(
            f"| {r['width']} | {r['case']} | {r['params'] / 1e6:.2f}M | {r['images_per_s']} | {r['ratio_to_paper']} |"
        )


if __name__ == "__main__":
    main()
