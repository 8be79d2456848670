"""run(cfg): FID, KID and IS of a checkpoint's samples (or of real test images), with 95% intervals and the real-data
floor, to results.json, a CSV row and W&B; SweepSummary: the table and plot against the guidance weight at the end of
a multirun."""

import hashlib
import json
import logging
import os
import time
from pathlib import Path

import torch
from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf
from rich.progress import Progress
from torchvision.utils import make_grid

from ddpm_lightning import cluster, files, metrics
from ddpm_lightning.data import ensure_cifar10, load_subset
from ddpm_lightning.errors import ConfigError
from ddpm_lightning.files import save_figure, save_png, write_csv, write_json, write_text
from ddpm_lightning.image_sets import load_image_set
from ddpm_lightning.module import load_checkpoint, pick_device

log = logging.getLogger(__name__)
FIELDS = [
    "model",
    "classes",
    "sampler",
    "steps",
    "w",
    "ema_length",
    "num_samples",
    "seed",
    "fid",
    "fid_ci95",
    "kid_mean",
    "kid_std",
    "kid_ci95",
    "fid_floor",
    "kid_floor",
    "is_mean",
    "is_std",
    "precision",
    "recall",
    "class_acc",
    "class_acc_ci95",
    "class_acc_floor",
    "memorized",
    "memorized_ci95",
    "memorized_floor",
    "nn_ratio_median",
    "seconds",
    "ckpt",
    "images",
]


def job_key(cfg: DictConfig, images_sha1: str | None = None) -> dict:
    """What an evaluation's result depends on: the checkpoint file (path, size, time) or the images (path and the
    digest of their pixels and labels), and the settings."""
    source = {"images": str(cfg.images), "images_sha1": images_sha1}
    if cfg.ckpt is not None:
        stat = Path(cfg.ckpt).stat()
        source = {"ckpt": str(cfg.ckpt), "ckpt_size": stat.st_size, "ckpt_mtime_ns": stat.st_mtime_ns}
    return {
        **source,
        "real": cfg.real,
        "w": cfg.guidance.w,
        "ema_length": cfg.ema_length,
        "sampler": OmegaConf.to_container(cfg.sampler, resolve=True) if cfg.get("sampler") else None,
        "metrics": {
            k: v
            for k, v in OmegaConf.to_container(cfg.metrics, resolve=True).items()
            if k not in ("cache_dir", "batch_size")
        },
    }


def done_before(cfg: DictConfig, key: dict) -> bool:
    """Whether the run dir's results.json already holds this evaluation (a rerun of a sweep: nothing to do)."""
    done = Path(HydraConfig.get().runtime.output_dir) / "results.json"
    if not done.is_file():
        return False
    previous = files.load_or_none(done, lambda p: json.loads(p.read_text()), "the earlier results file")
    if previous is None or previous.get("key") != key:
        return False
    log.info(f"{done} already holds this evaluation (same source and settings); nothing to do")
    return True


def run(cfg: DictConfig) -> None:
    """Score one source against the subset's reference: a checkpoint's samples, its subset's real test images
    (real=true: the floor itself), or a set of images (images=PATH, data=<group>)."""
    m = cfg.metrics
    given, module = None, None
    if cfg.images is not None:  # any model's images, labelled or not
        given = load_image_set(cfg.images, list(cfg.data.classes))
        digest = hashlib.sha1(given[0].numpy().tobytes() + (b"" if given[1] is None else given[1].numpy().tobytes()))
        key = job_key(cfg, digest.hexdigest())
        if done_before(cfg, key):
            return
        class_names, device = list(cfg.data.classes), pick_device(cluster.rank_device(cfg.device))
    else:
        if done_before(cfg, job_key(cfg)):
            return  # nothing loaded for an evaluation made already
        module = load_checkpoint(cfg.ckpt, cluster.rank_device(cfg.device), cfg.ema_length, **cfg.speed)
        hp = module.hparams
        class_names, device, key = list(hp.class_names), module.device, job_key(cfg)
        if cfg.data.classes is not None and list(cfg.data.classes) != class_names:
            raise ConfigError(
                f"data.classes {list(cfg.data.classes)} are not the checkpoint's subset {class_names}; drop the data "
                "group (a checkpoint is scored on its own subset)"
            )
        if not hp.conditional and cfg.guidance.w not in (None, 0):
            raise ConfigError(
                f"guidance.w={cfg.guidance.w} given to the unconditional model (model=simple); drop guidance.w"
            )
    run_dir = files.writable_dir(HydraConfig.get().runtime.output_dir)
    if cluster.global_rank() == 0:
        files.remove_leftovers(run_dir)  # temp files of an evaluation killed while writing here
    folder = ensure_cifar10(cfg.data.root, download=True)
    splits = {
        split: load_subset(folder, class_names, split) for split in {"train", "test", m.reference_split}
    }  # each read once
    train_images = splits["train"][0][: cfg.data.max_images]  # what the model trained on
    reference_images, reference_labels = splits[m.reference_split]
    detector, reference = metrics.detector_and_reference(
        m.inception_weights,
        class_names,
        reference_images,
        m.reference_split,
        m.reference_images,
        m.cache_dir,
        m.batch_size,
        device,
        labels=reference_labels,
        train_images=train_images,
    )
    settings = metrics.settings_of(m)
    test_images, test_labels = splits["test"]
    num_samples = m.num_samples if given is None else len(given[0])  # the floor at the N of the scored set
    start = time.perf_counter()
    floor = metrics.floor(
        detector, reference, test_images, num_samples, settings, m.cache_dir, m.batch_size, test_labels=test_labels
    )
    sampler, w = None, None
    if given is not None:
        images, labels = given
        scores = metrics.score_real(
            detector, reference, images, settings, m.batch_size, f"{len(images)} images of {cfg.images}", labels
        )
        preview = images[:64]
    elif cfg.real:  # the floor itself: real held-out images of the subset against the same reference
        scores, sampler, preview = floor, {"name": "real test images"}, None
        num_samples = floor["num_samples"]
    else:
        sampler = OmegaConf.to_container(cfg.sampler, resolve=True) if cfg.get("sampler") else dict(hp.sampler)
        w = (hp.guidance["w"] if cfg.guidance.w is None else float(cfg.guidance.w)) if hp.conditional else 0.0
        scores, preview = generated(cfg, module, detector, reference, settings, sampler, w)
        if scores is None:  # not rank 0: the same numbers as rank 0's (the metric states are synced); rank 0 writes
            return
    scores = {k: v for k, v in scores.items() if k != "num_samples"}
    results = dict(
        model="images" if module is None else "improved" if hp.conditional else "simple",
        classes=class_names,
        sampler=None if sampler is None else sampler["name"] + (" (x_0 clipped)" if sampler.get("clip_x0") else ""),
        steps=None
        if sampler is None
        else sampler.get("steps", hp.schedule["T"] if sampler["name"] == "ancestral" else None),
        w=w,
        ema_length=cfg.ema_length,
        num_samples=num_samples,
        seed=None if sampler is None or cfg.real else m.seed,
        **scores,
        fid_floor=floor["fid"],
        kid_floor=floor["kid_mean"],
        class_acc_floor=floor.get("class_acc"),
        memorized_floor=floor.get("memorized"),
        seconds=round(time.perf_counter() - start, 2),
        ckpt=cfg.ckpt,
        images=cfg.images,
        key=key,
    )
    if preview is not None and len(preview):
        save_png(
            nearest_grid(preview, reference["training_set"]), run_dir / "nearest.png", "the nearest-training-image grid"
        )
    write_json(run_dir / "results.json", results, "the evaluation results")
    write_csv(run_dir / "results.csv", [results], FIELDS, "the evaluation results")
    log.info(f"{describe(results)} -> {run_dir / 'results.json'}")
    class_names = class_names if module is None or hp.conditional else None
    log_to_wandb(cfg, run_dir, results, preview, class_names, None if given is None else given[1])


def generated(cfg, module, detector, reference, settings, sampler, w) -> tuple[dict | None, torch.Tensor | None]:
    """The metrics of metrics.num_samples images of the checkpoint, split over the ranks under srun or torchrun; and
    the first 64 images. Ranks other than 0 get (None, None)."""
    m = cfg.metrics
    rank, world = cluster.start_ranks(module.device)
    try:
        with Progress(disable=rank > 0) as bar:
            task = bar.add_task(
                f"{m.num_samples} samples, {sampler['name']}" + (f", {world} ranks" if world > 1 else ""),
                total=m.num_samples,
            )
            scores, preview = metrics.evaluate(
                module,
                detector,
                reference,
                m.num_samples,
                w,
                settings,
                m.batch_size,
                sampler,
                progress=lambda done, chunks: bar.update(task, completed=done / chunks * m.num_samples),
            )
    finally:
        if world > 1:
            torch.distributed.destroy_process_group()
    return (scores, preview) if rank == 0 else (None, None)


def nearest_grid(images: torch.Tensor, training_set: metrics.TrainingSet, rows: int = 16) -> torch.Tensor:
    """Memorization, to look at: of the preview's images, the ``rows`` with the smallest d1/d2, each followed by its
    nearest and second-nearest training image (two such triples per row, the most copy-like first)."""
    d, i = training_set.nearest(images)
    order = (d[:, 0] / d[:, 1]).argsort()[:rows].cpu()
    i, train = i.cpu(), training_set.images
    triples = torch.stack([images.cpu()[order], train[i[order, 0]], train[i[order, 1]]], 1).flatten(0, 1)
    return make_grid(triples, nrow=6, padding=2)


def ci(r: dict, name: str, scale: float = 1.0) -> str:
    """' [low, high]' of a result's 95% interval of ``name`` (fid, kid), scaled, or '' when it has none."""
    low_high = r.get(f"{name}_ci95")
    digits = 3 if name in ("class_acc", "memorized") else 2
    return f" [{low_high[0] * scale:.{digits}f}, {low_high[1] * scale:.{digits}f}]" if low_high else ""


def describe(r: dict) -> str:
    """One line of an evaluation's numbers: FID and KID with their 95% intervals, the floor, IS, precision/recall."""
    text = (
        f"FID {r['fid']:.2f}{ci(r, 'fid')}, KID x1e3 {r['kid_mean'] * 1e3:.2f} ± {r['kid_std'] * 1e3:.2f}{ci(r, 'kid', 1e3)} "
        f"(N={r['num_samples']}; real-data floor FID {r['fid_floor']:.2f}, KID x1e3 {r['kid_floor'] * 1e3:.2f})"
    )
    if r.get("precision") is not None:
        text += f", precision {r['precision']:.3f}, recall {r['recall']:.3f}"
    if r.get("class_acc") is not None:
        text += f", class agreement {r['class_acc']:.3f}{ci(r, 'class_acc')} (real {r['class_acc_floor']:.3f})"
    if r.get("memorized") is not None:
        text += f", memorized {r['memorized']:.3f}{ci(r, 'memorized')} (real {r['memorized_floor']:.3f})"
    return text + (
        f", IS {r['is_mean']:.3f} ± {r['is_std']:.3f}" if r["is_mean"] is not None else f"; {r['is_unavailable']}"
    )


def log_to_wandb(
    cfg: DictConfig,
    run_dir: Path,
    results: dict,
    images=None,
    class_names: list[str] | None = None,
    labels: torch.Tensor | None = None,
) -> None:
    """One W&B run per evaluation, job_type eval, with guidance_w and the trained run's name (train_run; for images=PATH
    its name) in its config, so that sweeps plot against w; the scores in its summary; the first images as a table of
    image, class and w (a checkpoint's classes are drawn evenly; an image set's are its ``labels``, when it has them)."""
    if cfg.logger.wandb is None:
        return
    import wandb

    from ddpm_lightning.metrics import even_labels

    os.environ.setdefault("WANDB_SILENT", "true")
    w = cfg.logger.wandb
    hc = HydraConfig.get()
    multirun = hc.mode == RunMode.MULTIRUN
    group = w.group or (Path(hc.sweep.dir).name if multirun else None)
    train_run = Path(cfg.ckpt).resolve().parents[1].name if cfg.ckpt else Path(cfg.images).name
    config = {**OmegaConf.to_container(cfg, resolve=True), "guidance_w": results["w"], "train_run": train_run}
    name = w.name or (f"{Path(hc.sweep.dir).name}/{run_dir.name}" if multirun else run_dir.name)
    run = wandb.init(
        project=w.project,
        entity=w.entity,
        group=group,
        name=name,
        dir=str(run_dir),
        mode="online" if w.online else "offline",
        config=config,
        job_type="eval",
    )
    run.summary.update({k: v for k, v in results.items() if isinstance(v, (int, float)) and v is not None})
    if images is not None:
        if labels is None and cfg.ckpt and class_names:
            labels = even_labels(len(images), len(class_names))
        names = [class_names[k] for k in labels[: len(images)].tolist()] if labels is not None else None
        names = names or ["unconditional" if cfg.ckpt else "unlabelled"] * len(images)
        table = wandb.Table(columns=["image", "class", "w"])
        for image, name in zip(images.permute(0, 2, 3, 1).cpu().numpy(), names, strict=True):
            table.add_data(wandb.Image(image), name, results["w"])
        run.log({"samples": table})
    run.finish()


class SweepSummary(Callback):
    """At the end of ``evaluate.py -m``: summary.csv, summary.md and fid_is_vs_w.png (paper Fig. 11-12, with 95%
    intervals as error bars and the real-data floor as a line) in the sweep dir."""

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        sweep = Path(config.hydra.sweep.dir)
        rows = sorted(
            (json.loads(p.read_text()) for p in sweep.glob("*/results.json")),
            key=lambda r: (r["w"] is None, r["w"] or 0.0, r["sampler"] or "", r.get("images") or ""),
        )
        if not rows:
            return
        write_csv(sweep / "summary.csv", rows, FIELDS, "the sweep summary")
        write_text(sweep / "summary.md", summary_table(rows), "the sweep summary")
        plot_against_w(rows, sweep / "fid_is_vs_w.png")
        log.info(f"sweep summary: {sweep / 'summary.md'}, {sweep / 'fid_is_vs_w.png'}")


def summary_table(rows: list[dict]) -> str:
    """Markdown: per row w, sampler, N, FID and KID (x1e3) with their 95% intervals, the floor, IS, precision/recall,
    class agreement and memorization (with the real test images' values) when they were measured."""
    prc = any(r.get("precision") is not None for r in rows)
    acc = any(r.get("class_acc") is not None for r in rows)
    mem = any(r.get("memorized") is not None for r in rows)
    head = "| w | sampler | steps | N | FID [95% CI] | KID x1e3 [95% CI] | floor FID / KID x1e3 | IS |"
    head += (" precision | recall |" if prc else "") + (" class agreement [95% CI] (real) |" if acc else "")
    head += " memorized [95% CI] (real) |" if mem else ""
    lines = [head, "|" + " --- |" * head.count(" |")]
    for r in rows:
        is_text = f"{r['is_mean']:.3f} ± {r['is_std']:.3f}" if r["is_mean"] is not None else "unavailable"
        line = (
            f"| {r['w']} | {r['sampler']} | {r['steps']} | {r['num_samples']} | {r['fid']:.2f}{ci(r, 'fid')} | "
            f"{r['kid_mean'] * 1e3:.2f}{ci(r, 'kid', 1e3)} | {r['fid_floor']:.2f} / {r['kid_floor'] * 1e3:.2f} | {is_text} |"
        )
        if prc:
            line += f" {r['precision']:.3f} | {r['recall']:.3f} |" if r.get("precision") is not None else " | |"
        for key in ("class_acc",) * acc + ("memorized",) * mem:
            line += f" {r[key]:.3f}{ci(r, key)} ({r[key + '_floor']:.3f}) |" if r.get(key) is not None else " |"
        lines.append(line)
    return "\n".join(lines) + "\n"


def plot_against_w(rows: list[dict], path: Path) -> None:
    """FID, KID (and IS, precision/recall when there) against w: 95% intervals as error bars, the floor as a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ws = [r["w"] for r in rows]
    panels = [("fid", "FID", 1.0), ("kid_mean", "KID x1e3", 1e3)]
    if all(r["is_mean"] is not None for r in rows):
        panels.append(("is_mean", "Inception Score", 1.0))
    if all(r.get("precision") is not None for r in rows):
        panels.append(("precision", "precision / recall", 1.0))
    if all(r.get("class_acc") is not None for r in rows):
        panels.append(("class_acc", "class agreement (linear probe)", 1.0))
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.5), squeeze=False)
    for ax, (key, label, scale) in zip(axes[0], panels, strict=False):
        values = [r[key] * scale for r in rows]
        ci_key = {"fid": "fid_ci95", "kid_mean": "kid_ci95", "class_acc": "class_acc_ci95"}.get(key)
        if ci_key and all(r.get(ci_key) for r in rows):
            errors = [
                [v - r[ci_key][0] * scale for v, r in zip(values, rows, strict=False)],
                [r[ci_key][1] * scale - v for v, r in zip(values, rows, strict=False)],
            ]
            ax.errorbar(ws, values, yerr=errors, fmt="o-", capsize=3, label="95% bootstrap interval")
        elif key == "is_mean":
            ax.errorbar(ws, values, yerr=[r["is_std"] for r in rows], fmt="o-", capsize=3, label="± sd over 10 splits")
        else:
            ax.plot(ws, values, "o-", label="precision")
        if key == "precision":
            ax.plot(ws, [r["recall"] for r in rows], "s--", label="recall")
        floor_key = {"fid": "fid_floor", "kid_mean": "kid_floor", "class_acc": "class_acc_floor"}.get(key)
        if floor_key and rows[0].get(floor_key) is not None:
            ax.axhline(
                rows[0][floor_key] * scale,
                color="0.4",
                ls=":",
                label=f"real test images (floor, N={rows[0]['num_samples']})",
            )
        ax.set(xlabel="guidance weight w", ylabel=label, title=f"{label} for different guidance levels")
        ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, path, "the sweep plot", dpi=120)
    plt.close(fig)
