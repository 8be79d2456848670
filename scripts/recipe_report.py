"""The recipe study's table and figure (docs/results/recipes_cpu) from the runs of scripts/recipes_cpu.sh: each run's
FID/KID along the run (N = 500, from its CSV log), its final evaluations at N = 1,000 (results.json of evaluate.py with
the runs' sampler and with the ancestral sampler), the peer's JSON, and the per-step costs of bench/step_cost.py, which
turn steps into the wall time of an idle 2-core CPU (the runs shared the CPU two at a time, so their own clocks are not
timings).

    .venv/bin/python scripts/recipe_report.py --runs runs/recipes_cpu --out docs/results/recipes_cpu
"""

import argparse
import csv
import json
import subprocess
from pathlib import Path

import matplotlib
import matplotlib.figure

from ddpm_lightning.files import save_figure, write_json, write_text

matplotlib.use("Agg")
RECIPES = {  # run dir: (label, the step_cost.py case whose cost per step it pays)
    "paper": ("paper recipe (recipe=paper)", "width 16, attention 8, 4"),
    "fast": (
        "recipe=fast (Min-SNR-5 + warm-up/cosine + clip 1)",
        "width 16, attention 8, 4, recipe=fast (Min-SNR weights, clipping)",
    ),
    "min_snr": ("paper + Min-SNR-5 only", "width 16, attention 8, 4, recipe=fast (Min-SNR weights, clipping)"),
    "lr_schedule": ("paper + warm-up 200 / cosine only", "width 16, attention 8, 4"),
    "peer": ("peer: diffusers UNet2DModel + DDPMScheduler", "peer: diffusers UNet2DModel + DDPMScheduler"),
}


def curve(run: Path) -> list[dict]:
    """The FID/KID evaluations along a run, from its CSV log: step, fid, kid and their intervals."""
    rows = [r for r in csv.DictReader(open(run / "csv" / "metrics.csv")) if r.get("val/fid")]
    f = lambda r, k: float(r[k]) if r.get(k) not in (None, "") else None
    return [
        dict(
            step=int(r["step"]) + 1,
            fid=f(r, "val/fid"),
            fid_low=f(r, "val/fid_ci95_low"),
            fid_high=f(r, "val/fid_ci95_high"),
            kid=f(r, "val/kid_mean"),
            kid_low=f(r, "val/kid_ci95_low"),
            kid_high=f(r, "val/kid_ci95_high"),
            fid_floor=f(r, "val/fid_floor"),
            kid_floor=f(r, "val/kid_floor"),
        )
        for r in rows
    ]


def peer_curve(path: Path) -> tuple[list[dict], dict | None]:
    h = json.loads(path.read_text())["history"]
    rows = [
        dict(
            step=r["step"],
            fid=r["fid"],
            fid_low=r["fid_ci95_low"],
            fid_high=r["fid_ci95_high"],
            kid=r["kid_mean"],
            kid_low=r["kid_ci95_low"],
            kid_high=r["kid_ci95_high"],
            fid_floor=r["fid_floor"],
            kid_floor=r["kid_floor"],
            num_samples=r["num_samples"],
        )
        for r in h
    ]
    along = [r for r in rows if r["num_samples"] == h[0]["num_samples"]]
    final = rows[-1] if rows[-1]["num_samples"] != h[0]["num_samples"] else None
    return along, final


def final_of(run: Path, tag: str) -> dict | None:
    path = run / f"final_{tag}" / "results.json"
    return json.loads(path.read_text()) if path.is_file() else None


def time_to(curve_: list[dict], kid: float, seconds_per_step: float) -> float | None:
    """The wall time (s) at which a KID curve first reaches ``kid``, linearly interpolated between its points (from step
    0 at KID = inf, so a curve already below at its first point gives at most that point's time)."""
    prev = None
    for r in curve_:
        if r["kid"] <= kid:
            if prev is None:
                return r["step"] * seconds_per_step
            frac = (prev["kid"] - kid) / (prev["kid"] - r["kid"])
            return (prev["step"] + frac * (r["step"] - prev["step"])) * seconds_per_step
        prev = r
    return None


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--runs", default="runs/recipes_cpu")
    p.add_argument("--out", default="docs/results/recipes_cpu")
    p.add_argument("--costs", default="bench/results/step_cost_cpu.json")
    args = p.parse_args()
    runs, out = Path(args.runs), Path(args.out)
    costs = {r["case"]: r["s_per_step"] for r in json.loads(Path(args.costs).read_text())["rows"] if r["width"] == 16}
    data = {}
    for name, (label, case) in RECIPES.items():
        if name == "peer":
            if not (runs / "peer.json").is_file():
                continue
            along, final = peer_curve(runs / "peer.json")
            finals = {"ddim": final, "ancestral": None}
        else:
            if not (runs / name / "csv" / "metrics.csv").is_file():
                continue
            along = curve(runs / name)
            finals = {tag: final_of(runs / name, tag) for tag in ("ddim", "ancestral")}
        if along:
            data[name] = dict(label=label, s_per_step=costs[case], along=along, finals=finals)

    lines = [
        "| recipe | steps | wall time (idle 2-core CPU) | FID, N = 500, along the run | KID x1e3 at the end, N = 500 | "
        "FID, N = 1,000, DDIM 50 eta 1 | KID x1e3, N = 1,000, DDIM 50 eta 1 | FID, N = 1,000, ancestral 500 | KID x1e3, ancestral |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    iv = lambda v, lo, hi, s=1.0: f"{v * s:.1f} [{lo * s:.1f}, {hi * s:.1f}]" if v is not None else "n/a"
    fin = lambda r, k, s=1.0: iv(r[k if k == "fid" else "kid_mean"], *r[f"{k}_ci95"], s) if r else "not run"
    for name, d in data.items():
        last = d["along"][-1]
        f_ddim = d["finals"]["ddim"]
        if name == "peer" and f_ddim:
            f_ddim = dict(
                fid=f_ddim["fid"],
                fid_ci95=[f_ddim["fid_low"], f_ddim["fid_high"]],
                kid_mean=f_ddim["kid"],
                kid_ci95=[f_ddim["kid_low"], f_ddim["kid_high"]],
            )
        f_anc = d["finals"]["ancestral"]
        steps = (
            d["finals"]["ddim"]["step"] if name == "peer" and d["finals"]["ddim"] else last["step"]
        )  # the peer's final point
        lines.append(
            f"| {d['label']} | {steps:,} | {steps * d['s_per_step'] / 60:.1f} min | "
            f"{' -> '.join(str(round(r['fid'])) for r in d['along'])} | {iv(last['kid'], last['kid_low'], last['kid_high'], 1e3)} | "
            f"{fin(f_ddim, 'fid')} | {fin(f_ddim, 'kid', 1e3)} | {fin(f_anc, 'fid')} | {fin(f_anc, 'kid', 1e3)} |"
        )
    any_final = next((d["finals"]["ddim"] for n, d in data.items() if n != "peer" and d["finals"]["ddim"]), None)
    first = next(iter(data.values()))["along"][-1]
    floor = (
        f"Real-data floor (held-out test cars against the 5,000 training cars): FID {first['fid_floor']:.1f}, KID x1e3 "
        f"{first['kid_floor'] * 1e3:.1f} at N = 500"
        + (
            f"; FID {any_final['fid_floor']:.1f}, KID x1e3 {any_final['kid_floor'] * 1e3:.1f} at N = 1,000"
            if any_final
            else ""
        )
        + "."
    )
    ttq = {}
    if "paper" in data:
        target = data["paper"]["along"][-1]["kid"]
        paper_time = data["paper"]["along"][-1]["step"] * data["paper"]["s_per_step"]
        for name, d in data.items():
            t = time_to(d["along"], target, d["s_per_step"])
            ttq[name] = dict(
                seconds=None if t is None else round(t, 1),
                speedup=None if t is None else round(paper_time / t, 2),
                first_point_already_below=d["along"][0]["kid"] <= target,
            )
        ttq_lines = [
            "| recipe | wall time to the paper recipe's final KID (N = 500) | speed-up |",
            "| --- | --- | --- |",
        ]
        for name, r in ttq.items():
            bound = "at most " if r["first_point_already_below"] and name != "paper" else ""
            ttq_lines.append(
                f"| {data[name]['label']} | {bound}{r['seconds'] / 60:.1f} min | {'at least ' if bound else ''}{r['speedup']}x |"
                if r["seconds"] is not None
                else f"| {data[name]['label']} | not reached | < 1x |"
            )
    sampler_lines = [
        "| checkpoint | sampler (N = 500, the same noise) | FID [95%] | KID x1e3 [95%] |",
        "| --- | --- | --- | --- |",
    ]
    samplers = {}
    for name in ("paper", "fast"):
        if name not in data:
            continue
        last = data[name]["along"][-1]
        rows = {
            "DDIM 50, eta = 1 (along-run point)": dict(
                fid=last["fid"],
                fid_ci95=[last["fid_low"], last["fid_high"]],
                kid_mean=last["kid"],
                kid_ci95=[last["kid_low"], last["kid_high"]],
            )
        }
        for tag, label in (
            ("ancestral", "ancestral, all 500 steps (Algorithm 2)"),
            ("ddim_eta0", "DDIM 50, eta = 0"),
            ("dpm_solver", "DPM-Solver++ 20"),
        ):
            r = final_of(runs / name, tag)
            if r and r["num_samples"] == 500:
                rows[label] = r
        samplers[name] = rows
        for label, r in rows.items():
            sampler_lines.append(
                f"| {data[name]['label']}, step {last['step']:,} | {label} | {fin(r, 'fid')} | {fin(r, 'kid', 1e3)} |"
            )
    fig = matplotlib.figure.Figure(figsize=(11, 4.2))
    axes = fig.subplots(1, 2)
    for ax, key, scale, title in ((axes[0], "kid", 1e3, "KID x1e3"), (axes[1], "fid", 1.0, "FID")):
        for d in data.values():
            x = [r["step"] * d["s_per_step"] / 60 for r in d["along"]]
            ax.plot(x, [r[key] * scale for r in d["along"]], marker="o", label=d["label"])
            ax.fill_between(
                x,
                [r[f"{key}_low"] * scale for r in d["along"]],
                [r[f"{key}_high"] * scale for r in d["along"]],
                alpha=0.2,
            )
        ax.axhline(first[f"{key}_floor"] * scale, color="0.4", ls=":", label="real-data floor (N = 500)")
        ax.set_xlabel("training wall time on an idle 2-core CPU (min)")
        ax.set_ylabel(f"{title} (N = 500, DDIM 50, eta = 1)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle("Cars, width-16 U-Net (attention at 8x8 and 4x4), equal budget: 95% bootstrap intervals as bands")
    fig.tight_layout()
    save_figure(fig, out / "recipes_cpu.png", "the recipe study's figure", dpi=110)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    write_json(
        out / "recipes_cpu.json",
        {
            "runs": {n: {k: v for k, v in d.items()} for n, d in data.items()},
            "time_to_quality": ttq,
            "samplers": samplers,
            "commit": commit,
        },
        "the recipe study's numbers",
    )
    text = (
        "\n".join(lines)
        + "\n\n"
        + floor
        + ("\n\n" + "\n".join(ttq_lines) if ttq else "")
        + "\n\n"
        + "\n".join(sampler_lines)
        + "\n"
    )
    write_text(out / "table.md", text, "the recipe study's table")
    print(text)


if __name__ == "__main__":
    main()
