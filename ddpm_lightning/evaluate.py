"""run(cfg): FID and IS of a checkpoint's samples (or of real test images), to results.json, a CSV row and W&B;
SweepSummary: the table and plot of FID and IS against the guidance weight at the end of a multirun."""

import csv
import json
import logging
import os
import time
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf
from rich.progress import Progress

from ddpm_lightning import metrics
from ddpm_lightning.callbacks import evaluate_module, save_tensor
from ddpm_lightning.cli import writable_dir
from ddpm_lightning.data import ensure_cifar10, load_subset
from ddpm_lightning.errors import ConfigError
from ddpm_lightning.module import load_checkpoint

log = logging.getLogger(__name__)
FIELDS = ["model", "classes", "sampler", "steps", "w", "num_samples", "seed", "fid", "is_mean", "is_std", "seconds", "ckpt"]


def write_json(path: Path, value) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(value, indent=1))
    tmp.replace(path)


def write_csv(path: Path, rows: list[dict]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, FIELDS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    tmp.replace(path)


def job_key(cfg: DictConfig) -> dict:
    """What an evaluation's result depends on: the checkpoint file (path, size, time) and the settings."""
    stat = Path(cfg.ckpt).stat()
    return {"ckpt": str(cfg.ckpt), "ckpt_size": stat.st_size, "ckpt_mtime_ns": stat.st_mtime_ns, "real": cfg.real,
            "w": cfg.guidance.w, "sampler": OmegaConf.to_container(cfg.sampler, resolve=True) if cfg.get("sampler") else None,
            "metrics": {k: v for k, v in OmegaConf.to_container(cfg.metrics, resolve=True).items() if k not in ("cache_dir", "batch_size")}}


def run(cfg: DictConfig) -> None:
    done = Path(HydraConfig.get().runtime.output_dir) / "results.json"
    if done.is_file() and Path(cfg.ckpt).is_file():  # a rerun: nothing to load when this evaluation was made already
        key = job_key(cfg)
        if json.loads(done.read_text()).get("key") == key:
            log.info(f"{done} already holds this evaluation (same checkpoint and settings); nothing to do")
            return
    m = cfg.metrics
    module = load_checkpoint(cfg.ckpt, cfg.device, **cfg.speed)
    hp = module.hparams
    if not hp.conditional and cfg.guidance.w not in (None, 0):
        raise ConfigError(f"guidance.w={cfg.guidance.w} given to the unconditional model (model=simple); drop guidance.w")
    run_dir = writable_dir(HydraConfig.get().runtime.output_dir)
    sampler = OmegaConf.to_container(cfg.sampler, resolve=True) if cfg.get("sampler") else dict(hp.sampler)
    w = (hp.guidance_w if cfg.guidance.w is None else float(cfg.guidance.w)) if hp.conditional else 0.0
    folder = ensure_cifar10(cfg.data.root, download=True)
    detector, reference = metrics.detector_and_reference(
        m.num_samples, m.inception_weights, hp.class_names, load_subset(folder, hp.class_names, m.reference_split)[0],
        m.reference_split, m.reference_images, m.cache_dir, m.batch_size, module.device)

    start = time.perf_counter()
    if cfg.real:  # the floor: real held-out images of the subset against the same statistics
        real = load_subset(folder, hp.class_names, "test")[0][: m.num_samples]
        pool, logits = metrics.extract(detector, real, m.batch_size)
        scores = {"fid": metrics.fid(pool, reference), "is_mean": None, "is_std": None}
        if not metrics.is_unavailable(detector, len(real)):
            scores["is_mean"], scores["is_std"] = metrics.inception_score(logits)
        sampler, num_samples, preview = {"name": "real test images"}, len(real), None
        if reference.get("features") is not None:  # the real features KID and intervals compare against
            save_tensor(reference["features"], run_dir / "reference_features.pt")
    else:
        with Progress() as bar:
            task = bar.add_task(f"{m.num_samples} samples, {sampler['name']}", total=m.num_samples)
            scores, preview, pool = evaluate_module(module, detector, reference, m.num_samples, w, m.seed, m.batch_size, sampler,
                                        progress=lambda done, chunks: bar.update(task, completed=min(done / chunks, 1) * m.num_samples))
        num_samples = m.num_samples
    results = dict(model="improved" if hp.conditional else "simple", classes=list(hp.class_names), sampler=sampler["name"],
                   steps=sampler.get("steps", hp.schedule["T"] if sampler["name"] == "ancestral" else None), w=None if cfg.real else w,
                   num_samples=num_samples, seed=None if cfg.real else m.seed, **scores,
                   is_unavailable=metrics.is_unavailable(detector, num_samples), seconds=round(time.perf_counter() - start, 2),
                   ckpt=str(cfg.ckpt), key=job_key(cfg))
    save_tensor(pool, run_dir / "features.pt")  # for metrics computed later (KID, intervals)
    write_json(run_dir / "results.json", results)
    write_csv(run_dir / "results.csv", [results])
    log.info(f"FID {scores['fid']:.3f}" + (f", IS {scores['is_mean']:.3f} ± {scores['is_std']:.3f}" if scores["is_mean"] else
                                         f"; {results['is_unavailable']}") + f" -> {run_dir / 'results.json'}")
    log_to_wandb(cfg, run_dir, results, preview, hp.class_names if hp.conditional else None)


def log_to_wandb(cfg: DictConfig, run_dir: Path, results: dict, images=None, class_names: list[str] | None = None) -> None:
    """One W&B run per evaluation, job_type eval, with guidance_w and the trained run's name (train_run) in its config,
    so that sweeps plot against w; the scores in its summary; the first samples as a table of image, class and w."""
    if cfg.logger.wandb is None:
        return
    import wandb

    from ddpm_lightning.metrics import even_labels

    os.environ.setdefault("WANDB_SILENT", "true")
    w = cfg.logger.wandb
    hc = HydraConfig.get()
    multirun = hc.mode == RunMode.MULTIRUN
    group = w.group or (Path(hc.sweep.dir).name if multirun else None)
    train_run = Path(cfg.ckpt).resolve().parents[1].name
    config = {**OmegaConf.to_container(cfg, resolve=True), "guidance_w": results["w"], "train_run": train_run}
    name = w.name or (f"{Path(hc.sweep.dir).name}/{run_dir.name}" if multirun else run_dir.name)
    run = wandb.init(project=w.project, entity=w.entity, group=group, name=name, dir=str(run_dir),
                     mode="online" if w.online else "offline", config=config, job_type="eval")
    run.summary.update({k: v for k, v in results.items() if isinstance(v, (int, float)) and v is not None})
    if images is not None:
        labels = even_labels(len(images), len(class_names)).tolist() if class_names else [None] * len(images)
        table = wandb.Table(columns=["image", "class", "w"])
        for image, label in zip(images.permute(0, 2, 3, 1).cpu().numpy(), labels):
            table.add_data(wandb.Image(image), class_names[label] if class_names else "unconditional", results["w"])
        run.log({"samples": table})
    run.finish()


class SweepSummary(Callback):
    """At the end of ``evaluate.py -m``: summary.csv, summary.md and fid_is_vs_w.png (paper Fig. 11-12) in the sweep dir."""

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        sweep = Path(config.hydra.sweep.dir)
        rows = sorted((json.loads(p.read_text()) for p in sweep.glob("*/results.json")), key=lambda r: (r["w"] is None, r["w"] or 0.0, r["sampler"]))
        if not rows:
            return
        write_csv(sweep / "summary.csv", rows)
        lines = ["| w | sampler | steps | samples | FID | IS |", "| --- | --- | --- | --- | --- | --- |"]
        for r in rows:
            is_text = f"{r['is_mean']:.3f} ± {r['is_std']:.3f}" if r["is_mean"] is not None else "unavailable"
            lines.append(f"| {r['w']} | {r['sampler']} | {r['steps']} | {r['num_samples']} | {r['fid']:.3f} | {is_text} |")
        (sweep / "summary.md").write_text("\n".join(lines) + "\n")
        plot_against_w(rows, sweep / "fid_is_vs_w.png")
        log.info(f"sweep summary: {sweep / 'summary.md'}, {sweep / 'fid_is_vs_w.png'}")


def plot_against_w(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ws = [r["w"] for r in rows]
    has_is = all(r["is_mean"] is not None for r in rows)
    fig, axes = plt.subplots(1, 2 if has_is else 1, figsize=(9 if has_is else 4.5, 3.5), squeeze=False)
    axes[0, 0].plot(ws, [r["fid"] for r in rows], "o-")
    axes[0, 0].set(xlabel="guidance weight w", ylabel="FID", title="FID for different guidance levels")
    if has_is:
        axes[0, 1].errorbar(ws, [r["is_mean"] for r in rows], yerr=[r["is_std"] for r in rows], fmt="o-")
        axes[0, 1].set(xlabel="guidance weight w", ylabel="Inception Score", title="IS for different guidance levels")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
