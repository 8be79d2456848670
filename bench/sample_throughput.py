"""Guided sampling throughput, side by side in one run: B images, classifier-free guidance (w = 2, one forward pass
over 2B per step), DPM-Solver++ with 20 steps.

  (a) the project's path: DiffusionModule.sample with this device's defaults (on a GPU: the U-Net compiled and
      replayed as CUDA graphs, bf16 autocast, channels_last; on the CPU eager fp32; --compile/--bf16 override)
  (b) the same net and sampler with every speed option off: fp32, eager, math attention, contiguous layout
  (c) diffusers' UNet2DModel of a comparable size with its DPMSolverMultistepScheduler (dpmsolver++, order 2)
"agreement" compares the images of (a) and (b), drawn from the same noise: speed must not change them.

    .venv/bin/python bench/sample_throughput.py [--width 8] [--batch 32] [--steps 20] [--compile] [--bf16]
"""

import torch
from common import arguments, bench_module, device, flops, peak_tflops, record, report, reset_memory, seconds
from torch.nn.attention import SDPBackend, sdpa_kernel
from train_throughput import K, diffusers_unet


def main():
    gpu = torch.cuda.is_available()
    args = arguments(
        __doc__, width=(64, 8), batch=(1000, 32), steps=20, repeats=(3, 2), compile=(True, False), bf16=(True, False)
    )
    dev = device()
    torch.manual_seed(0)
    module = bench_module(args.width, gpu, args.compile, args.bf16).to(dev).eval()
    labels = torch.arange(args.batch, device=dev) % K
    sampler = dict(name="dpm_solver", steps=args.steps, spacing="quadratic")

    def ours():
        return module.sample(
            labels=labels, w=2.0, sampler=sampler, generator=torch.Generator(dev).manual_seed(0), batch_size=args.batch
        )

    plain = bench_module(args.width).to(dev).eval()
    plain.load_state_dict(module.state_dict())

    def all_off():
        with sdpa_kernel(SDPBackend.MATH):
            return plain.sample(
                labels=labels,
                w=2.0,
                sampler=sampler,
                generator=torch.Generator(dev).manual_seed(0),
                batch_size=args.batch,
            )

    from diffusers import DPMSolverMultistepScheduler

    d_net = diffusers_unet(args.width).to(dev).eval()
    scheduler = DPMSolverMultistepScheduler(
        num_train_timesteps=500, beta_start=1e-4, beta_end=0.02, algorithm_type="dpmsolver++", solver_order=2
    )
    y2 = torch.cat([labels, torch.full_like(labels, K)])

    @torch.no_grad()
    def diffusers_sampling():
        scheduler.set_timesteps(args.steps)
        x = torch.randn(args.batch, 3, 32, 32, device=dev)
        for t in scheduler.timesteps:
            eps_c, eps_u = d_net(torch.cat([x, x]), t, class_labels=y2).sample.chunk(2)
            x = scheduler.step(eps_u + 3.0 * (eps_c - eps_u), t, x).prev_sample

    x2 = torch.randn(2 * args.batch, 3, 32, 32, device=dev)
    t2 = torch.zeros(2 * args.batch, dtype=torch.long, device=dev)
    per_image = args.steps * flops(lambda: module.net(x2, t2, y2)) / args.batch
    d_per_image = args.steps * flops(lambda: d_net(x2, t2, class_labels=y2)) / args.batch
    peak = peak_tflops(args.peak_tflops)
    rows = []
    for name, fn, f in [
        ("(a) project default (DiffusionModule.sample)", ours, per_image),
        ("(b) every speed option off", all_off, per_image),
        ("(c) diffusers UNet2DModel + DPMSolverMultistepScheduler", diffusers_sampling, d_per_image),
    ]:
        reset_memory()
        with torch.no_grad():
            s = seconds({name: fn}, rounds=args.repeats, warmup=1)[name]
        rows.append(record(name, args.batch / s, f, peak))
    a, b, c = (r["images_per_s"] for r in rows)
    diff = (
        ours().int() - all_off().int()
    ).abs()  # uint8 levels; an untrained net's images are noise-like, the hardest case
    report(
        "sample_throughput",
        rows,
        out=args.out,
        width=args.width,
        batch=args.batch,
        steps=args.steps,
        guided=True,
        compile=args.compile,
        bf16=args.bf16,
        ratios={"default_over_all_off": round(a / b, 3), "default_over_diffusers": round(a / c, 3)},
        agreement={
            "mean_abs_uint8": round(diff.float().mean().item(), 4),
            "max_abs_uint8": diff.max().item(),
            "share_equal": round((diff == 0).float().mean().item(), 4),
        },
    )


if __name__ == "__main__":
    main()
