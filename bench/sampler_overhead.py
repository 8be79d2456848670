"""What the sampling loops cost beyond the network calls they make.

A tiny conditional U-Net on the CPU, batch B (16 by default) at 32x32, guided (w = 2): each sampler against the same
number of bare forward passes over 2B, timed side by side and interleaved in one run (median of repeats).
It also counts the network calls: classifier-free guidance must cost one forward pass of 2B per step.

    .venv/bin/python bench/sampler_overhead.py [--repeats 3] [--batch 16]
"""

import torch
from common import arguments, report, seconds

from ddpm_lightning.diffusion.guidance import guided
from ddpm_lightning.diffusion.samplers import ancestral, ddim, dpm_solver
from ddpm_lightning.diffusion.schedule import build_schedule
from ddpm_lightning.nets.unet import UNet


class Counted(torch.nn.Module):
    def __init__(self, net):
        super().__init__()
        self.net, self.batches = net, []

    def forward(self, x, t, y):
        self.batches.append(x.shape[0])
        return self.net(x, t, y)


def main():
    args = arguments(__doc__, repeats=3, batch=16)
    torch.manual_seed(0)
    B, T = args.batch, 500
    net = Counted(UNet(width=8, emb_dim=32, heads=2, num_classes=5).eval())
    schedule, schedule_50 = (
        build_schedule("linear", T=T),
        build_schedule("linear", T=50),
    )  # ancestral runs all T: time T = 50
    y = torch.randint(0, 5, (B,))
    x_T = torch.randn(B, 3, 32, 32)
    cases = {
        "ancestral": (
            lambda: ancestral(guided(net, y, 2.0, 5), schedule_50, x_T, torch.Generator().manual_seed(0)),
            50,
        ),
        "ddim": (lambda: ddim(guided(net, y, 2.0, 5), schedule, x_T, steps=50), 50),
        "dpm_solver": (lambda: dpm_solver(guided(net, y, 2.0, 5), schedule, x_T, steps=20), 20),
    }
    x2, t2, y2 = torch.randn(2 * B, 3, 32, 32), torch.randint(0, T, (2 * B,)), torch.cat([y, torch.full_like(y, 5)])

    def bare(n):
        with torch.no_grad():
            for _ in range(n):
                net(x2, t2, y2)

    rows = []
    with torch.no_grad():
        for name, (run, calls) in cases.items():
            net.batches.clear()
            run()  # warm-up, and the call count
            counted = list(net.batches)
            times = seconds(
                {"sampler": run, "bare": lambda calls=calls: bare(calls)}, rounds=args.repeats
            )  # interleaved
            rows.append(
                dict(
                    sampler=name,
                    steps=calls,
                    network_calls=len(counted),
                    batch_per_call=sorted(set(counted)),
                    sampler_s=times["sampler"],
                    bare_forward_s=times["bare"],
                    overhead=times["sampler"] / times["bare"] - 1,
                )
            )
    report("sampler_overhead", rows, args.out, batch=B, threads=torch.get_num_threads())
    print(
        "\n| sampler | steps | network calls (batch) | sampler s | bare forwards s | overhead |\n| --- | --- | --- | --- | --- | --- |"
    )
    for r in rows:
        print(
            f"| {r['sampler']} | {r['steps']} | {r['network_calls']} ({r['batch_per_call']}) | {r['sampler_s']:.3f} | {r['bare_forward_s']:.3f} | {r['overhead']:+.1%} |"
        )


if __name__ == "__main__":
    main()
