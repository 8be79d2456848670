"""Speed must not change the result: the same seeds and data, a few hundred training steps with every speed option
on (torch.compile, channels_last, bf16 autocast) against every one off (fp32, eager, contiguous), side by side.
Prints both loss curves' summaries and whether they agree within noise (the test in tests/test_speed.py asserts it
on the CPU with a tiny net; on a GPU this runs the paper's net and the figures go into the suite's results file).

    .venv/bin/python bench/speed_equivalence.py [--steps 300] [--width 8] [--batch 16]
"""

import torch
from common import arguments, bench_module, device, report

from ddpm_lightning.data import random_hflip, step_seed, to_unit_range
from ddpm_lightning.nets.speed import FastNet


def loss_curve(steps: int, on: bool, width: int = 8, batch: int = 16, dev: torch.device | str = "cpu") -> torch.Tensor:
    """Per-step losses of `steps` Adam steps on two flat-colour classes; the same draws every run."""
    torch.manual_seed(0)
    m = bench_module(width, compile=on, classes=2).to(dev)
    m.fast = FastNet(m.net, compile=on, channels_last=on)
    m.loss.memory_format = m.fast.memory_format
    m.fast.compile_for_training()
    m.schedule.to(dev)
    opt = torch.optim.Adam(m.net.parameters(), lr=1e-3, fused=True)
    colours = torch.randint(0, 256, (2, 3, 1, 1), generator=torch.Generator().manual_seed(1), dtype=torch.uint8).to(dev)
    losses = []
    for step in range(steps):
        y = torch.randint(0, 2, (batch,), generator=torch.Generator().manual_seed(step)).to(dev)
        gen = torch.Generator(dev).manual_seed(step_seed(0, step, 0))
        x = random_hflip(to_unit_range(colours[y].expand(batch, 3, 32, 32)), generator=gen)
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=on):
            loss = m.loss(m.fast.train, x, y, gen)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.detach())
    return torch.stack(losses).float().cpu()


def compare(off: torch.Tensor, on: torch.Tensor) -> dict:
    """Late means within noise (two standard errors of the all-off curve's last 100 steps, plus 5%), and per-step
    losses that track each other (the same t, eps and labels each step)."""
    late_off, late_on = off[-100:], on[-100:]
    bound = 2 * late_off.std() / 10 + 0.05 * late_off.mean()
    corr = torch.corrcoef(torch.stack([off, on]))[0, 1]
    return dict(
        first20_off=round(off[:20].mean().item(), 5),
        late_mean_off=round(late_off.mean().item(), 5),
        late_mean_on=round(late_on.mean().item(), 5),
        late_difference=round((late_on.mean() - late_off.mean()).item(), 5),
        noise_bound=round(bound.item(), 5),
        per_step_correlation=round(corr.item(), 4),
        finite=bool(torch.isfinite(on).all()),
        learns=bool(late_off.mean() < 0.5 * off[:20].mean()),
        within_noise=bool(abs(late_on.mean() - late_off.mean()) < bound and corr > 0.9 and torch.isfinite(on).all()),
    )


def main():
    args = arguments(__doc__, steps=300, width=(64, 8), batch=(64, 16))
    dev = device()
    off = loss_curve(args.steps, False, args.width, args.batch, dev)
    on = loss_curve(args.steps, True, args.width, args.batch, dev)
    report(
        "speed_equivalence",
        [],
        out=args.out,
        steps=args.steps,
        width=args.width,
        batch=args.batch,
        options_on="torch.compile, channels_last, bf16 autocast",
        **compare(off, on),
    )


if __name__ == "__main__":
    main()
