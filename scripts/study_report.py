"""Issue 27's study table and figure (docs/results/recipes_cpu) from the files scripts/study_cpu.sh copies into
docs/results/recipes_cpu/runs/<run>/: the FID/KID points along each run (N = 500, its metrics.csv), its final
evaluation (N = 1,000, final_ddim.json) and the paper seeds' post-hoc EMA lengths (posthoc_<sigma_rel>.json). Wall
times are steps x the per-step cost of bench/width_cost.py (measured side by side on an idle CPU), because the runs
shared the CPU two or three at a time. Final checkpoints scored again, with the ancestral sampler (final_ancestral.json)
or with DDIM clipping its predicted x_0 (final_clipped.json), get a table each and the rank correlation of the KIDs.

A lever counts when its final KID (N = 1,000) is further from the paper seeds' mean than the seeds' spread (max - min)
and its 95% interval does not reach that mean; otherwise it is within the noise.

    .venv/bin/python scripts/study_report.py
"""

import argparse
import csv
import json
from pathlib import Path

import matplotlib
import matplotlib.figure
import scipy.stats

from ddpm_lightning.files import save_figure, write_json, write_text

matplotlib.use("Agg")
SEEDS = ["paper_s0", "paper_s1", "paper_s2"]
GROUPS = {  # runs of one recipe with the paper's seeds 0/1/2: a summary row and a band each
    "recipe=fast": ["fast_s0", "fast_s1", "fast_s2"],  # what paid alone, combined
    "model.lr=2e-3": ["lr_x2", "lr_x2_s1", "lr_x2_s2"],  # the lever that paid most, with its noise
}
LEVERS = {  # run: (what it changes, the cost case of bench/width_cost.py)
    "rescale": ("schedule.rescale=true (betas x 1000/T)", "16"),
    "cosine_schedule": ("schedule=cosine", "16"),
    "laplace": ("recipe.timesteps=laplace (centre 0, width 2)", "16"),
    "immiscible": ("recipe.immiscible=true", "16, immiscible"),
    "min_snr": ("recipe.loss_weighting=min_snr (gamma 5)", "16"),
    "warmup": ("recipe.warmup_steps=200", "16"),
    "lr_x2": ("model.lr=2e-3", "16"),
    "lr_x2_s1": ("model.lr=2e-3, seed 1", "16"),
    "lr_x2_s2": ("model.lr=2e-3, seed 2", "16"),
    "lr_x0.5": ("model.lr=5e-4", "16"),
    "dropout": ("recipe.dropout=0.1", "16"),
    "width12": ("net.width=12 (width 16's compute)", "12"),
    "width24": ("net.width=24 (width 16's compute)", "24"),
}
AGAIN = {  # final checkpoints scored again by scripts/study_cpu.sh <tag> (final_<tag>.json): title, column
    "ancestral": ("The final checkpoints with the paper's sampler", "ancestral 500 steps, N = 500"),
    "clipped": ("The final checkpoints with the predicted x_0 clipped", "the same, sampler.clip_x0=true, N = 1,000"),
}


def along(run: Path) -> tuple[list[dict], int]:
    """The FID/KID points along a run (N = 500) and the steps it took, from its CSV log."""
    rows = list(csv.DictReader(open(run / "metrics.csv")))
    return [
        dict(
            step=int(r["step"]) + 1,
            fid=float(r["val/fid"]),
            kid=float(r["val/kid_mean"]),
            kid_ci95=[float(r["val/kid_ci95_low"]), float(r["val/kid_ci95_high"])],
        )
        for r in rows
        if r.get("val/fid")
    ], max(int(r["step"]) for r in rows) + 1


def load_run(run: Path) -> dict | None:
    final = run / "final_ddim.json"
    if not final.is_file():
        return None
    posthoc = {p.stem.split("_", 1)[1]: json.loads(p.read_text()) for p in sorted(run.glob("posthoc_*.json"))}
    again = {
        tag: json.loads((run / f"final_{tag}.json").read_text())
        for tag in AGAIN
        if (run / f"final_{tag}.json").is_file()
    }
    points, steps = along(run)
    return dict(along=points, steps=steps, final=json.loads(final.read_text()), posthoc=posthoc, again=again)


def kid_ci(result: dict) -> str:
    """KID x1e3 and its 95% interval, as the tables print it."""
    lo, hi = result["kid_ci95"]
    return f"{result['kid_mean'] * 1e3:.1f} [{lo * 1e3:.1f}, {hi * 1e3:.1f}]"


def time_to(points: list[dict], kid: float, s_per_step: float) -> float | None:
    """Seconds until a KID curve first reaches ``kid``, linearly interpolated between its points (None: never)."""
    prev = None
    for r in points:
        if r["kid"] <= kid:
            if prev is None:
                return r["step"] * s_per_step
            frac = (prev["kid"] - kid) / (prev["kid"] - r["kid"])
            return (prev["step"] + frac * (r["step"] - prev["step"])) * s_per_step
        prev = r
    return None


def verdict(kid: float, ci: list[float], mean: float, spread: float) -> str:
    if abs(kid - mean) <= spread or ci[0] <= mean <= ci[1]:
        return "within the noise"
    return "pays" if kid < mean else "hurts"


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", default="docs/results/recipes_cpu")
    p.add_argument("--costs", default="bench/results/width_cost_cpu.json")
    args = p.parse_args()
    out = Path(args.out)
    costs = {str(r["width"]): r["s_per_step"] for r in json.loads(Path(args.costs).read_text())["rows"]}
    runs = {name: load_run(out / "runs" / name) for name in [*SEEDS, *LEVERS, *GROUPS["recipe=fast"]]}
    runs = {k: v for k, v in runs.items() if v is not None}
    seeds = [runs[s] for s in SEEDS if s in runs]
    if len(seeds) < 2:
        raise SystemExit("error: fewer than two paper seeds have finished; run scripts/study_cpu.sh first")
    kids = [s["final"]["kid_mean"] for s in seeds]
    mean, spread = sum(kids) / len(kids), max(kids) - min(kids)
    target = sum(s["along"][-1]["kid"] for s in seeds) / len(seeds)  # the paper recipe's final KID at N = 500
    paper_time = seeds[0]["along"][-1]["step"] * costs["16"]

    k = lambda v: f"{v * 1e3:.1f}"  # noqa: E731
    lines = [
        "| run | lever | steps | FID along the run (N = 500) | FID, N = 1,000 [95%] | KID x1e3, N = 1,000 [95%] | "
        "KID vs the seeds' mean | time to the paper's final KID (N = 500) | verdict |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    table = {}
    for name, r in runs.items():
        f = r["final"]
        seed = f"seed {name[-1]}"
        label, case = LEVERS.get(name) or (
            f"the paper's recipe, {seed}" if name in SEEDS else f"recipe=fast, {seed}",
            "16",
        )
        t = time_to(r["along"], target, costs[case])
        steps = r["steps"]
        row = dict(
            lever=label,
            steps=steps,
            fid_along=[round(a["fid"], 1) for a in r["along"]],
            fid=f["fid"],
            fid_ci95=f["fid_ci95"],
            kid=f["kid_mean"],
            kid_ci95=f["kid_ci95"],
            minutes_to_paper_kid=None if t is None else round(t / 60, 1),
            speedup=None if t is None else round(paper_time / t, 2),
            verdict="seed" if name in SEEDS else verdict(f["kid_mean"], f["kid_ci95"], mean, spread),
        )
        table[name] = row
        lines.append(
            f"| {name} | {label} | {steps:,} | {' -> '.join(str(round(v)) for v in row['fid_along'])} | "
            f"{f['fid']:.1f} [{f['fid_ci95'][0]:.1f}, {f['fid_ci95'][1]:.1f}] | {kid_ci(f)} | "
            f"{(f['kid_mean'] - mean) * 1e3:+.1f} | "
            + ("not reached" if t is None else f"{t / 60:.1f} min ({row['speedup']}x)")
            + f" | {row['verdict']} |"
        )
    lines.append(
        f"| paper, {len(seeds)} seeds | mean, spread (max - min) | | | | {k(mean)}, spread {k(spread)} | | "
        f"{paper_time / 60:.1f} min | |"
    )
    groups = {}
    for label, names in GROUPS.items():  # time to quality: the seeds' mean time to the paper's final KID
        group = [table[n] for n in names if n in table]
        if len(group) < 2:
            continue
        kf = [r["kid"] for r in group]
        times = [r["minutes_to_paper_kid"] for r in group]
        reached = None not in times
        ratio = paper_time / 60 / (sum(times) / len(times)) if reached else None
        groups[label] = dict(runs=len(group), kid_mean=sum(kf) / len(kf), kid_spread=max(kf) - min(kf), speedup=ratio)
        lines.append(
            f"| {label}, {len(group)} seeds | mean, spread (max - min) | | | | {k(sum(kf) / len(kf))}, spread "
            f"{k(max(kf) - min(kf))} | {(sum(kf) / len(kf) - mean) * 1e3:+.1f} | "
            + (f"{sum(times) / len(times):.1f} min ({ratio:.2f}x)" if reached else "not reached by every seed")
            + " | |"
        )
    posthoc_lines = [
        "| EMA | " + " | ".join(SEEDS) + " | mean | minus the checkpoint's, per seed (paired) |",
        "| --- |" + " --- |" * (len(SEEDS) + 2),
    ]
    lengths = sorted({s for r in seeds for s in r["posthoc"]}, key=float)
    posthoc = {}
    for sigma in ["checkpoint (0.9999, warm-up)", *lengths]:
        vals = [(r["final"] if sigma.startswith("checkpoint") else r["posthoc"].get(sigma)) for r in seeds]
        got = [v["kid_mean"] for v in vals if v]
        posthoc[sigma] = got
        cells = [kid_ci(v) if v else "n/a" for v in vals]
        paired = [v["kid_mean"] - r["final"]["kid_mean"] for v, r in zip(vals, seeds, strict=True) if v]
        posthoc_lines.append(
            f"| {sigma if sigma.startswith('checkpoint') else 'sigma_rel ' + sigma} | {' | '.join(cells)} | "
            f"{k(sum(got) / len(got)) if got else 'n/a'} | {', '.join(f'{d * 1e3:+.1f}' for d in paired)} |"
        )
    again_text = ""
    for tag, (title, column) in AGAIN.items():  # does the ranking by DDIM 50 eta = 1 hold with another sampler?
        both = {name: r for name, r in runs.items() if tag in r["again"]}
        if len(both) < 3:
            continue
        rho = scipy.stats.spearmanr(
            [r["final"]["kid_mean"] for r in both.values()], [r["again"][tag]["kid_mean"] for r in both.values()]
        ).statistic
        again_text += "\n".join(
            [
                f"\n{title}:\n",
                f"| run | KID x1e3, DDIM 50 eta = 1, N = 1,000 [95%] | KID x1e3, {column} [95%] |",
                "| --- | --- | --- |",
                *(f"| {name} | {kid_ci(r['final'])} | {kid_ci(r['again'][tag])} |" for name, r in both.items()),
                f"\nSpearman's rank correlation of the two columns: {rho:.2f} over {len(both)} runs.\n",
            ]
        )
        for name, r in both.items():
            table[name][f"kid_{tag}"] = r["again"][tag]["kid_mean"]
    floor = seeds[0]["final"]
    text = (
        "\n".join(lines)
        + f"\n\nKID x1e3 at N = 1,000, DDIM 50 eta = 1, against the 5,000 training cars; real-data floor FID "
        f"{floor['fid_floor']:.1f}, KID x1e3 {k(floor['kid_floor'])}. Wall times: steps x the idle per-step cost "
        "of bench/width_cost.py.\n\nPost-hoc EMA of the paper seeds (KID x1e3, N = 1,000):\n\n"
        + "\n".join(posthoc_lines)
        + "\n"
        + again_text
    )
    write_text(out / "table.md", text, "the study's table")
    write_json(
        out / "study.json",
        dict(seeds=dict(kid_mean=mean, kid_spread=spread), groups=groups, runs=table, posthoc=posthoc),
    )

    fig = matplotlib.figure.Figure(figsize=(8, 5))
    ax = fig.subplots()
    steps = [a["step"] for a in seeds[0]["along"]]
    minutes = [s * costs["16"] / 60 for s in steps]
    banded = set()  # runs drawn as a band of their seeds, not as a line each
    for label, names in {"paper": SEEDS, **GROUPS}.items():
        group = [runs[n] for n in names if n in runs]
        if len(group) < 2:
            continue
        banded |= set(names)
        band = [[r["along"][i]["kid"] * 1e3 for r in group] for i in range(len(steps))]
        ax.fill_between(
            minutes, [min(b) for b in band], [max(b) for b in band], alpha=0.3, label=f"{label}, seed range"
        )
        if label == "paper":
            ax.plot(minutes, [sum(b) / len(b) for b in band], "k-", label="paper, seed mean")
    lines = [name for name in runs if name not in banded]
    for i, name in enumerate(lines):  # tab20: a colour each, past the default cycle's ten
        cost = costs[LEVERS[name][1] if name in LEVERS else "16"]
        along = runs[name]["along"]
        ax.plot(
            [a["step"] * cost / 60 for a in along],
            [a["kid"] * 1e3 for a in along],
            ".--",
            color=matplotlib.colormaps["tab20"](i % 20),
            label=name,
        )
    ax.set(xlabel="minutes of an idle 2-core CPU", ylabel="KID x1e3 (N = 500, DDIM 50 eta 1)", yscale="log")
    ax.legend(fontsize=7, ncol=2)
    save_figure(fig, out / "study.png", "the study's figure", dpi=120)
    print(text)


if __name__ == "__main__":
    main()
