"""The paper's figures and table from a runs dir of ``make paper`` (its CSV logs and results.json files; offline).

``load(runs)`` reads everything into plain Python; each ``fig_*`` draws one of the paper's figures from that;
``write(runs, out)`` writes them all, the table (results.md) and its numbers (results.json). The notebook
notebooks/paper_figures.ipynb calls the same functions.
"""

import csv
import json
import math
from pathlib import Path

from omegaconf import OmegaConf

from ddpm_lightning.errors import ConfigError
from ddpm_lightning.files import save_figure, write_bytes, write_text

FLOOR = "real test images"
SCORES = [
    "fid",
    "kid_mean",
    "is_mean",
    "precision",
    "recall",
    "class_acc",
    "memorized",
    "nn_ratio_median",
]  # val/<key> per evaluation
FLOORED = ["fid", "kid", "class_acc", "memorized"]  # val/<key>_floor: the real test images' value
LABELS = {
    "fid": "FID",
    "kid_mean": "KID x1e3",
    "is_mean": "Inception Score",
    "precision": "precision",
    "recall": "recall",
    "class_acc": "class agreement (linear probe)",
    "memorized": "memorized fraction (d1/d2 < 1/3)",
}
SCALE = {"kid_mean": 1e3}
CI_OF = {"kid_mean": "kid_ci95"}  # the interval's name where it is not <key>_ci95


def ci_of(key: str) -> str:
    return CI_OF.get(key, f"{key}_ci95")


FLOOR_OF = {"fid": "fid_floor", "kid_mean": "kid_floor", "class_acc": "class_acc_floor", "memorized": "memorized_floor"}


def read_csv(path: Path) -> list[dict]:
    try:
        with open(path, newline="") as f:
            return list(csv.DictReader(f))
    except (UnicodeDecodeError, csv.Error) as e:
        raise ConfigError(
            f"the training log {path} is not a CSV log ({type(e).__name__}); move it away or rerun"
        ) from None


def number(value: str | None) -> float | None:
    return float(value) if value not in (None, "") else None


def load_train(run: Path) -> dict:
    """One training run: its settings, FID/IS per evaluation, the loss per step and per epoch."""
    config = OmegaConf.to_container(OmegaConf.load(run / ".hydra" / "config.yaml"))
    rows = read_csv(run / "csv" / "metrics.csv")
    evals = [
        {
            "epochs": int(r["epoch"]) + 1,
            "step": int(r["step"]) + 1,  # optimizer steps taken (the CSV's step is 0-based)
            "is_std": number(r.get("val/is_std")),
            **{key: number(r.get(f"val/{key}")) for key in SCORES + [f"{k}_floor" for k in FLOORED]},
            **{
                ci_of(key): [number(r[f"val/{ci_of(key)}_low"]), number(r[f"val/{ci_of(key)}_high"])]
                for key in SCORES
                if r.get(f"val/{ci_of(key)}_low")
            },
        }
        for r in rows
        if number(r.get("val/fid")) is not None
    ]
    epochs = [
        {"epoch": int(r["epoch"]), "step": int(r["step"]), "loss": number(r["train/loss_epoch"])}
        for r in rows
        if number(r.get("train/loss_epoch")) is not None
    ]
    steps_per_epoch = (epochs[-1]["step"] + 1) / (epochs[-1]["epoch"] + 1) if epochs else None
    steps = [
        {"step": int(r["step"]), "loss": number(r["train/loss_step"])}
        for r in rows
        if number(r.get("train/loss_step")) is not None
    ]
    done = run / "done.json"
    return {
        "name": run.name,
        "model": "improved" if config["model"]["conditional"] else "simple",
        "classes": config["data"]["classes"],
        "guidance_w": config["guidance"]["w"],
        "evals": evals,
        "epoch_loss": epochs,
        "step_loss": steps,
        "steps_per_epoch": steps_per_epoch,
        "done": json.loads(done.read_text()) if done.is_file() else None,
        "net": config["net"],
        "sampler": config["sampler"],
        "num_samples": config["metrics"]["num_samples"],
    }


def load(runs: str | Path) -> dict:
    """Everything the figures need from a runs dir: train/<name>, eval/<name>/<job>/results.json, eval/floor_<data>,
    samples/<name>, paper_log.jsonl."""
    runs = Path(runs)
    train = {d.name: load_train(d) for d in sorted((runs / "train").iterdir()) if (d / "csv" / "metrics.csv").is_file()}
    evals: dict[str, list[dict]] = {}
    for path in sorted(runs.glob("eval/*/*/results.json")):
        evals.setdefault(path.parent.parent.name, []).append(read_json(path, "an evaluation's results"))
    floors = {name[len("floor_") :]: rows[0] for name, rows in evals.items() if name.startswith("floor_")}
    sweeps = {name: sorted(rows, key=lambda r: r["w"]) for name, rows in evals.items() if not name.startswith("floor_")}
    samples = {d.name: d for d in sorted(runs.glob("samples/*")) if (d / "grid.png").is_file()}
    log_path = runs / "paper_log.jsonl"
    log = read_json(log_path, "the paper's stage log", lines=True) if log_path.is_file() else []
    if not train:
        raise FileNotFoundError(
            f"no training runs under {runs / 'train'}; run make paper first (or point runs= at its paper.dir)"
        )
    return {"runs": str(runs), "train": train, "sweeps": sweeps, "floors": floors, "samples": samples, "log": log}


def read_json(path: Path, what: str, lines: bool = False):
    """A JSON file (``lines``: one JSON value per line) of the runs dir; cut short or garbage is one line that names it."""
    try:
        text = path.read_text()
        return [json.loads(line) for line in text.splitlines() if line.strip()] if lines else json.loads(text)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(
            f"{what} {path} is not readable JSON ({type(e).__name__}: cut short or garbage); rerun the stage that "
            "writes it (make paper skips what is done) or move the file away"
        ) from None


def data_name(run: dict) -> str:
    return (
        "cars"
        if run["classes"] == ["automobile"]
        else "five_class"
        if len(run["classes"]) == 5
        else "+".join(run["classes"])
    )


def floor_of(results: dict, run: dict) -> dict | None:
    return results["floors"].get(data_name(run))


def noise(results: dict) -> dict:
    """The evaluation's own noise: each final model scored twice, by the training's last FID (metrics.seed) and by
    the evaluation at the trained w with another seed (paper.eval_seed): sd = sqrt(mean(d^2) / 2) over the pairs."""
    pairs = {}
    for name, run in results["train"].items():
        if not run["evals"]:
            continue
        last = run["evals"][-1]["fid"]
        w = run["guidance_w"] if run["model"] == "improved" else 0.0
        again = [
            r
            for r in results["sweeps"].get(name, [])
            if (r["w"] or 0.0) == (w[0] if isinstance(w, list) else w) and r["num_samples"] == run["num_samples"]
        ]  # FID's bias depends on N: only pairs at the same N
        if again:
            pairs[name] = {
                "training": last,
                "again": again[0]["fid"],
                "seed": again[0]["seed"],
                "d": again[0]["fid"] - last,
            }
    sd = math.sqrt(sum(p["d"] ** 2 for p in pairs.values()) / (2 * len(pairs))) if pairs else None
    return {"pairs": pairs, "sd": sd}


def summary(results: dict) -> dict:
    """The table's numbers: first and last FID per model, its change against the noise, the best w, the floors."""
    sd = noise(results)["sd"]
    rows = []
    for name, run in results["train"].items():
        ev = run["evals"]
        floor = floor_of(results, run)
        sweep = results["sweeps"].get(name, [])
        best = min(sweep, key=lambda r: r["fid"]) if run["model"] == "improved" and sweep else None
        rows.append(
            {
                "name": name,
                "model": run["model"],
                "data": data_name(run),
                "first_fid": ev[0]["fid"] if ev else None,
                "first_epochs": ev[0]["epochs"] if ev else None,
                "first_step": ev[0]["step"] if ev else None,
                "last_fid": ev[-1]["fid"] if ev else None,
                "last_epochs": ev[-1]["epochs"] if ev else None,
                "last_step": ev[-1]["step"] if ev else None,
                "last_is": ev[-1]["is_mean"] if ev else None,
                **{f"last_{key}": ev[-1].get(key) if ev else None for key in ("kid_mean", "class_acc", "memorized")},
                "drop_in_sd": (ev[0]["fid"] - ev[-1]["fid"]) / sd if ev and sd else None,
                "final_loss": run["epoch_loss"][-1]["loss"] if run["epoch_loss"] else None,
                "floor_fid": ev[-1]["fid_floor"]
                if ev and ev[-1].get("fid_floor") is not None
                else floor["fid"]
                if floor
                else None,
                "best_w": best["w"] if best else None,
                "best_w_fid": best["fid"] if best else None,
            }
        )
    return {"rows": rows, "noise": noise(results)}


def _plt():
    """pyplot with the backend matplotlib picks: Agg without a display, inline in a notebook (which draws the figures)."""
    import matplotlib.pyplot as plt

    return plt


def _floor_lines(ax, results: dict, datas: list[str], key: str = "fid") -> None:
    scale = SCALE.get(key, 1.0)
    for i, data in enumerate(datas):
        floor = results["floors"].get(data)
        if floor and floor.get(key) is not None:
            ax.axhline(
                floor[key] * scale,
                color="0.4",
                ls=(":", "--", "-.")[i % 3],
                lw=1,
                label=f"real test images, {data} (floor at N={floor['num_samples']})",
            )


def fig_metric_over_epochs(results: dict, key: str = "fid"):
    """Fig. 9 (FID) and Fig. 10 (IS) over epochs, and KID, class agreement and memorization the same way: each model,
    95% intervals as bands, the real test images' value as a line."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4))
    label, scale = LABELS[key], SCALE.get(key, 1.0)
    drawn = False
    for name, run in results["train"].items():
        points = [(e["epochs"], e[key] * scale) for e in run["evals"] if e.get(key) is not None]
        if points:
            (line,) = ax.plot(*zip(*points, strict=False), "o-", label=name)
            drawn = True
            bands = [
                (e["epochs"], e[ci_of(key)][0] * scale, e[ci_of(key)][1] * scale)
                for e in run["evals"]
                if e.get(ci_of(key))
            ]
            if bands:  # the 95% bootstrap interval of each evaluation
                ax.fill_between(*zip(*bands, strict=False), color=line.get_color(), alpha=0.2, lw=0)
    logged = {
        data_name(r): r["evals"][-1]
        for r in results["train"].values()
        if r["evals"] and r["evals"][-1].get(FLOOR_OF.get(key))
    }
    for i, (data, e) in enumerate(sorted(logged.items())):  # the floor the training logged, at its own N
        ax.axhline(
            e[FLOOR_OF[key]] * scale,
            color="0.4",
            ls=(":", "--", "-.")[i % 3],
            lw=1,
            label=f"real test images, {data} (floor at N={first_run(results)['num_samples']})",
        )
    if key != "is_mean" and not logged:
        _floor_lines(ax, results, sorted({data_name(r) for r in results["train"].values()}), key)
    if not drawn:
        ax.text(
            0.5,
            0.5,
            f"{label} unavailable in these runs\n{unavailable_reason(results)}",
            ha="center",
            va="center",
            wrap=True,
            fontsize=8,
            transform=ax.transAxes,
        )
    ax.set(
        xlabel="epochs trained",
        ylabel=label,
        title=f"{label.split(' (')[0]} over epochs (N = {first_run(results)['num_samples']})",
    )
    if drawn:
        ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def unavailable_reason(results: dict) -> str:
    reasons = {r.get("is_unavailable") for rows in results["sweeps"].values() for r in rows if r.get("is_unavailable")}
    text = next(iter(reasons), "no values logged")
    return text.split(";")[0].split(": ", 1)[-1][:90]


def first_run(results: dict) -> dict:
    return next(iter(results["train"].values()))


def fig_metric_vs_w(results: dict, key: str = "fid"):
    """Fig. 11 (FID) and Fig. 12 (IS) against the guidance weight w, for each improved model; KID, precision and
    recall, class agreement and memorization the same way (95% intervals as error bars, the floor as a line)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4))
    label, scale = LABELS[key], SCALE.get(key, 1.0)
    drawn, datas = False, []
    for name, rows in results["sweeps"].items():
        run = results["train"].get(name)
        if not run or run["model"] != "improved":
            continue
        points = [(r["w"], r[key] * scale) for r in rows if r.get(key) is not None]
        datas.append(data_name(run))
        ci = ci_of(key)
        if points and all(r.get(ci) for r in rows):  # 95% bootstrap intervals as error bars
            ax.errorbar(
                *zip(*points, strict=False),
                yerr=[[(r[key] - r[ci][0]) * scale for r in rows], [(r[ci][1] - r[key]) * scale for r in rows]],
                fmt="o-",
                capsize=3,
                label=f"{name} (95% interval)",
            )
            drawn = True
        elif points:
            ax.plot(*zip(*points, strict=False), "o-", label=name)
            drawn = True
    if key != "is_mean":
        _floor_lines(ax, results, datas, key)
    if not drawn:
        ax.text(
            0.5,
            0.5,
            f"{label} unavailable in these runs\n{unavailable_reason(results)}",
            ha="center",
            va="center",
            fontsize=8,
            transform=ax.transAxes,
        )
    else:
        ax.legend(fontsize=7)
    ax.set(
        xlabel="guidance weight w (eq. 10)", ylabel=label, title=f"{label.split(' (')[0]} for different guidance levels"
    )
    fig.tight_layout()
    return fig


def fig_loss(results: dict, from_epoch: float = 0):
    """Fig. 13 (from epoch 0) and Fig. 14 (from ``from_epoch``): the training loss per step (a moving average over
    about a tenth of an epoch) and its epoch means, the four models."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4))
    for i, (name, run) in enumerate(results["train"].items()):
        spe = run["steps_per_epoch"] or 1
        x = [s["step"] / spe for s in run["step_loss"]]
        y = moving_average(
            [s["loss"] for s in run["step_loss"]], max(1, round(len(x) / max(x[-1] if x else 1, 1) / 10))
        )
        keep = [k for k, v in enumerate(x) if v >= from_epoch]
        ax.plot([x[k] for k in keep], [y[k] for k in keep], color=f"C{i}", lw=0.8, alpha=0.6)
        means = [(e["epoch"] + 0.5, e["loss"]) for e in run["epoch_loss"] if e["epoch"] + 1 > from_epoch]
        if means:
            ax.plot(*zip(*means, strict=False), "o", color=f"C{i}", label=f"{name} (epoch means)")
    ax.set(
        xlabel="epoch",
        ylabel="loss ||eps - eps_theta||^2",
        title="Loss over training" + (f" (epoch {from_epoch:g} onwards)" if from_epoch else ""),
    )
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def moving_average(values: list[float], k: int) -> list[float]:
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v - (values[i - k] if i >= k else 0.0)
        out.append(total / min(i + 1, k))
    return out


def table(results: dict) -> str:
    """The markdown table: the final FID/IS per model, its change over training against the evaluation's noise,
    the real-data floor, the best w per improved model, and each sweep."""
    s = summary(results)
    sd = s["noise"]["sd"]
    fmt = lambda v, p=1: "" if v is None else f"{v:.{p}f}"  # noqa: E731
    lines = [
        "| model | data | first FID (epoch, step) | last FID (epoch, step) | drop / noise sd | last IS | floor FID | best w (FID) | final loss | "
        "last KID x1e3 | last class agreement | last memorized |",
        "|" + " --- |" * 12,
    ]
    for r in s["rows"]:
        best = "" if r["best_w"] is None else f"{r['best_w']:g} ({r['best_w_fid']:.1f})"
        kid = None if r["last_kid_mean"] is None else r["last_kid_mean"] * 1e3
        lines.append(
            f"| {r['model']} | {r['data']} | {fmt(r['first_fid'])} ({r['first_epochs']}, {r['first_step']}) | "
            f"{fmt(r['last_fid'])} ({r['last_epochs']}, {r['last_step']}) | "
            f"{fmt(r['drop_in_sd'])} | {fmt(r['last_is'], 2) or 'unavailable'} | {fmt(r['floor_fid'])} | "
            f"{best} | {fmt(r['final_loss'], 4)} | {fmt(kid)} | {fmt(r['last_class_acc'], 3)} | {fmt(r['last_memorized'], 3)} |"
        )
    lines += [
        "",
        "Evaluation noise: each final model scored twice with fresh noise and labels (the training's last FID, "
        "and evaluate.py with paper.eval_seed at the trained w):",
        "",
        "| model | FID (training seed) | FID (eval seed) | difference |",
        "| --- | --- | --- | --- |",
    ]
    for name, p in s["noise"]["pairs"].items():
        lines.append(f"| {name} | {p['training']:.1f} | {p['again']:.1f} | {p['d']:+.1f} |")
    if not s["noise"]["pairs"]:
        lines.append("| (no final model was scored again at the training's N: paper.eval_num_samples differs) | | | |")
    for name, run in results["train"].items():
        if run["evals"]:
            lines += [
                "",
                f"Along the run, {name} (N = {run['num_samples']}, the training's seed; 95% intervals):",
                "",
                "| step | epochs | FID | KID x1e3 | precision | recall | class agreement | memorized |",
                "|" + " --- |" * 8,
            ]
            lines += [
                f"| {e['step']:,} | {e['epochs']} | {with_interval(e, 'fid', 1.0, 1)} | {with_interval(e, 'kid_mean', 1e3, 1)} | "
                f"{with_interval(e, 'precision')} | {with_interval(e, 'recall')} | {with_interval(e, 'class_acc')} | "
                f"{with_interval(e, 'memorized')} |"
                for e in run["evals"]
            ]
    if sd is not None:
        lines += [
            "",
            f"Noise sd of one FID at this N: sqrt(mean(d^2) / 2) = {sd:.2f} over {len(s['noise']['pairs'])} pairs.",
        ]
    for name, rows in results["sweeps"].items():
        run = results["train"].get(name)
        if not run or run["model"] != "improved":
            continue
        lines += [
            "",
            f"Guidance sweep, {name} (N = {rows[0]['num_samples']}, {rows[0]['sampler']} {rows[0]['steps']} steps, seed {rows[0]['seed']}):",
            "",
            "| w | " + " | ".join(f"{r['w']:g}" for r in rows) + " |",
            "| --- " * (len(rows) + 1) + "|",
            "| FID | " + " | ".join(with_interval(r, "fid", 1.0, 1) for r in rows) + " |",
            "| IS | " + " | ".join(fmt(r["is_mean"], 2) or "n/a" for r in rows) + " |",
        ]
        for key, label in (
            ("kid_mean", "KID x1e3"),
            ("precision", "precision"),
            ("recall", "recall"),
            ("class_acc", "class agreement"),
            ("memorized", "memorized"),
        ):
            if any(r.get(key) is not None for r in rows):
                scale, digits = SCALE.get(key, 1.0), 1 if key == "kid_mean" else 3
                lines.append(f"| {label} | " + " | ".join(with_interval(r, key, scale, digits) for r in rows) + " |")
    return "\n".join(lines) + "\n"


def with_interval(r: dict, key: str, scale: float = 1.0, digits: int = 3) -> str:
    """A value with its 95% interval, '' when not measured."""
    if r.get(key) is None:
        return ""
    ci = r.get(ci_of(key))
    return f"{r[key] * scale:.{digits}f}" + (f" [{ci[0] * scale:.{digits}f}, {ci[1] * scale:.{digits}f}]" if ci else "")


def run_info(results: dict) -> str:
    """The command, the commit and the wall time, from paper_log.jsonl."""
    log = results["log"]
    if not log:
        return ""
    total = sum(e["seconds"] for e in log)
    commits = list(dict.fromkeys(e["commit"] for e in log))
    commands = list(dict.fromkeys(" ".join(e["args"]) for e in log))
    lines = [""] + [f'Command: `make paper ARGS="{args}"` (python paper.py {args})' for args in commands]
    lines += [
        f"Commit: {', '.join(commits)}",
        f"Wall time: {total / 60:.1f} min in all stages ({len({e['started'] for e in log})} invocation(s)):",
        "",
    ]
    lines += [
        f"- {e['stage']}: {e['seconds'] / 60:.1f} min" + ("" if e["returncode"] == 0 else f" (exit {e['returncode']})")
        for e in log
    ]
    return "\n".join(lines) + "\n"


def class_grids(npz: Path, out: Path, name: str) -> list[Path]:
    """One grid per class of an improved model's final samples (sample.py's samples.npz): samples_<name>_<class>.png."""
    import numpy as np
    import torch
    from torchvision.utils import make_grid

    from ddpm_lightning.files import save_png

    if not npz.is_file():
        return []
    data = np.load(npz)
    labels, names = data["labels"], [str(c) for c in data["class_names"]]
    if len(labels) == 0 or len(names) < 2:
        return []
    written = []
    for k, cls in enumerate(names):
        pixels = data["arr_0"] if "arr_0" in data.files else data["images"]  # the key before issue 26: images
        images = torch.from_numpy(pixels[labels == k]).permute(0, 3, 1, 2)
        if len(images):
            path = out / f"samples_{name}_{cls}.png"
            save_png(make_grid(images, nrow=min(8, len(images)), padding=2), path, "a report figure")
            written.append(path)
    return written


def write(runs: str | Path, out: str | Path, loss_from_epoch: float = 5) -> list[Path]:
    """All the figures, results.md and results.json into ``out``; returns the files written."""
    results = load(runs)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    plt = _plt()
    figures = {
        "fig09_fid_over_epochs.png": fig_metric_over_epochs(results, "fid"),
        "fig10_is_over_epochs.png": fig_metric_over_epochs(results, "is_mean"),
        "fig11_fid_vs_w.png": fig_metric_vs_w(results, "fid"),
        "fig12_is_vs_w.png": fig_metric_vs_w(results, "is_mean"),
        "fig13_loss.png": fig_loss(results, 0),
        f"fig14_loss_from_epoch_{loss_from_epoch:g}.png": fig_loss(results, loss_from_epoch),
    }
    measured = lambda key: any(e.get(key) is not None for run in results["train"].values() for e in run["evals"])  # noqa: E731
    swept = lambda key: any(r.get(key) is not None for rows in results["sweeps"].values() for r in rows)  # noqa: E731
    for key in (
        "kid_mean",
        "class_acc",
        "memorized",
        "precision",
        "recall",
    ):  # beyond the paper: where they were measured
        if measured(key):
            figures[f"{key}_over_epochs.png"] = fig_metric_over_epochs(results, key)
        if swept(key):
            figures[f"{key}_vs_w.png"] = fig_metric_vs_w(results, key)
    written = []
    for name, fig in figures.items():
        save_figure(fig, out / name, "a report figure", dpi=110)
        plt.close(fig)
        written.append(out / name)
    for name, folder in results["samples"].items():
        for src, dst in (("grid.png", f"samples_{name}.png"), ("reverse_diffusion.png", f"fig07_reverse_{name}.png")):
            if (folder / src).is_file():
                write_bytes(out / dst, (folder / src).read_bytes(), "a report figure")
                written.append(out / dst)
    for path in sorted(
        Path(results["runs"]).glob("eval/*/*/nearest.png")
    ):  # memorization: samples beside their nearest training images
        dst = out / f"nearest_{path.parent.parent.name}_{path.parent.name}.png"
        write_bytes(dst, path.read_bytes(), "a report figure")
        written.append(dst)
    for name, folder in results["samples"].items():
        written += class_grids(folder / "samples.npz", out, name)
    forward = next(
        (f / "forward_diffusion.png" for f in results["samples"].values() if (f / "forward_diffusion.png").is_file()),
        None,
    )
    if forward:
        write_bytes(out / "fig01_forward_diffusion.png", forward.read_bytes(), "a report figure")
        written.append(out / "fig01_forward_diffusion.png")
    write_text(out / "results.md", table(results) + run_info(results), "the report's table")
    write_text(
        out / "results.json",
        json.dumps(
            {
                "summary": summary(results),
                "sweeps": results["sweeps"],
                "floors": results["floors"],
                "log": results["log"],
            },
            indent=1,
            default=str,
        ),
        "the report's numbers",
    )
    return written + [out / "results.md", out / "results.json"]
