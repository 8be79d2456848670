"""The cost of a training step at each width of issue 27's study (attention at 8x8 and 4x4, emb_dim 4 x width, batch
64), side by side in one run, and the steps each width gets for the compute of width 16's 3,120: steps x (s per step
of width 16) / (s per step of the width). FLOPs per step from torch.utils.flop_counter, for the record. Also width 16
with recipe.immiscible, whose linear assignment is the one lever of the study with a cost per step.

    .venv/bin/python bench/width_cost.py --out bench/results/width_cost_cpu.json      # about 5 minutes on 2 cores
"""

import torch
from common import arguments, flops, report, seconds
from step_cost import our_step

WIDTHS = (12, 16, 24, 32)


def main():
    args = arguments(__doc__, batch=64, steps=3, rounds=5, budget=3120)
    torch.manual_seed(0)
    built = {w: our_step(w, [8, 4], args.batch) for w in WIDTHS}
    built["16, immiscible"] = our_step(16, [8, 4], args.batch, dict(immiscible=True))
    times = seconds({w: step for w, (step, _) in built.items()}, rounds=args.rounds, warmup=1, calls=args.steps)
    rows = [
        dict(
            width=w,
            batch=args.batch,
            params=built[w][1],
            gflop_per_step=round(flops(built[w][0]) / 1e9, 2),
            s_per_step=round(times[w], 5),
            steps_at_equal_compute=round(args.budget * times[16] / times[w]),
        )
        for w in built
    ]
    report("width_cost", rows, args.out)
    print(
        "\n| width | parameters | GFLOP per step | s per step | steps for width 16's 3,120 |\n| --- | --- | --- | --- | --- |"
    )
    for r in rows:
        print(
            f"| {r['width']} | {r['params'] / 1e6:.2f}M | {r['gflop_per_step']} | {r['s_per_step']} | "
            f"{r['steps_at_equal_compute']:,} |"
        )


if __name__ == "__main__":
    main()
