"""How close each sampler comes to the true data distribution, by number of steps.

Data: a 2-D mixture of 8 Gaussians, whose optimal noise predictor E[eps | x_t] is known in closed form, so
the only error left is the sampler's discretisation. Distance: sliced Wasserstein-2 between 50,000 samples
and 50,000 fresh draws from the data (the floor row is data against data). Sampling starts from the exact
q(x_T), so the gap between q(x_T) and N(0, I) does not blur the comparison.

    .venv/bin/python bench/sampler_accuracy.py [--T 500] [--schedule linear]
"""

import math

import torch
from common import arguments, report

from ddpm_lightning.diffusion.samplers import ancestral, ddim, dpm_solver
from ddpm_lightning.diffusion.schedule import build_schedule

K, RADIUS, STD = 8, 0.8, 0.1
MEANS = torch.stack(
    [torch.tensor([math.cos(2 * math.pi * k / K), math.sin(2 * math.pi * k / K)]) * RADIUS for k in range(K)]
)


def draw_data(n, g):
    return MEANS[torch.randint(0, K, (n,), generator=g)] + STD * torch.randn(n, 2, generator=g)


def exact_eps(schedule):
    """E[eps | x_t] for the mixture: sum_k w_k(x_t) b (x_t - a mu_k) / v_k, v_k = a^2 s^2 + b^2."""

    def eps_fn(x, t):
        ab = schedule.alpha_bar[t][:, None]
        a, b2 = ab.sqrt(), 1 - ab
        v = ab * STD**2 + b2  # (n, 1)
        d = x[:, None, :] - a[:, None, :] * MEANS[None]  # (n, K, 2)
        w = torch.softmax(-(d**2).sum(-1) / (2 * v), dim=1)  # equal weights, equal variances per component
        return b2.sqrt() * (w[:, :, None] * d).sum(1) / v

    return eps_fn


def sliced_w2(x, y, g, projections=512):
    dirs = torch.randn(2, projections, generator=g, dtype=x.dtype)
    dirs = dirs / dirs.norm(dim=0, keepdim=True)
    px, py = (x @ dirs).sort(0).values, (y @ dirs).sort(0).values
    return ((px - py) ** 2).mean().sqrt().item()


def main():
    args = arguments(__doc__, T=500, schedule="linear", n=50_000)
    torch.set_default_dtype(torch.float64)
    schedule = build_schedule(args.schedule, T=args.T).to("cpu", torch.float64)
    eps_fn = exact_eps(schedule)
    g = torch.Generator().manual_seed(0)
    reference = draw_data(args.n, g)
    ab_T = schedule.alpha_bar[-1]
    x_T = ab_T.sqrt() * draw_data(args.n, g) + (1 - ab_T).sqrt() * torch.randn(args.n, 2, generator=g)  # exact q(x_T)
    runs = [("ancestral", "all", args.T, lambda: ancestral(eps_fn, schedule, x_T, torch.Generator().manual_seed(1)))]
    for spacing in ("uniform", "quadratic"):
        runs += [
            ("ddim", spacing, s, lambda s=s, sp=spacing: ddim(eps_fn, schedule, x_T, steps=s, spacing=sp))
            for s in (10, 20, 50, 100)
        ]
    for spacing, steps in (("quadratic", (10, 15, 20, 30, 50)), ("uniform", (10, 20, 50))):
        runs += [
            ("dpm_solver", spacing, s, lambda s=s, sp=spacing: dpm_solver(eps_fn, schedule, x_T, steps=s, spacing=sp))
            for s in steps
        ]
    floor = sliced_w2(draw_data(args.n, g), reference, torch.Generator().manual_seed(2))
    rows = [dict(sampler="floor (data vs data)", spacing="", steps=0, network_calls=0, sliced_w2=floor)]
    for name, spacing, steps, run in runs:
        distance = sliced_w2(run(), reference, torch.Generator().manual_seed(2))
        rows.append(dict(sampler=name, spacing=spacing, steps=steps, network_calls=steps, sliced_w2=distance))
    dpm20 = next(
        r["sliced_w2"] for r in rows if (r["sampler"], r["spacing"], r["steps"]) == ("dpm_solver", "quadratic", 20)
    )
    ddim50 = min(r["sliced_w2"] for r in rows if (r["sampler"], r["steps"]) == ("ddim", 50))
    report(
        "sampler_accuracy",
        rows,
        args.out,
        schedule=args.schedule,
        T=args.T,
        n=args.n,
        dpm_solver_20_at_least_as_close_as_ddim_50=dpm20 <= ddim50,
    )
    print("\n| sampler | spacing | steps = network calls | sliced W2 |\n| --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['sampler']} | {r['spacing']} | {r['steps']} | {r['sliced_w2']:.4f} |")
    print(f"\nDPM-Solver++ (quadratic) at 20 steps: {dpm20:.4f}; best DDIM at 50 steps: {ddim50:.4f}")


if __name__ == "__main__":
    main()
