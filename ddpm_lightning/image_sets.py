"""Any model's images, as evaluate.py scores them: a folder of PNG/JPEG files, or an .npz as OpenAI's evaluation suite
(guided-diffusion's evaluations/evaluator.py) and sample.py write it: arr_0 uint8 N x H x W x 3, labels under arr_1 or
labels (indices into the subset's classes; an npz that names its class_names is checked against them). In a folder,
labels come from class subfolders (images/<class>/*.png); files at the top level have none."""

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ddpm_lightning.errors import ConfigError

SUFFIXES = (".png", ".jpg", ".jpeg")


def load_image_set(
    path: str | Path, class_names: list[str], side: int = 32
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """uint8 (N, 3, side, side) images and their labels (N,) as indices into ``class_names``, or None without labels;
    a bad set is one ConfigError that names the problem and the fix."""
    path = Path(path)
    if path.is_dir():
        images, labels = read_folder(path, class_names)
    elif path.suffix == ".npz":
        images, labels = read_npz(path, class_names)
    else:
        raise ConfigError(f"images={path} is neither a folder nor an .npz; pass a folder of PNG/JPEG files or an .npz")
    if images.shape[1:3] != (side, side):
        raise ConfigError(
            f"images={path} are {images.shape[1]}x{images.shape[2]}, the subset's are {side}x{side}: resize them first "
            "(FID compares images at the reference's size)"
        )
    if labels is not None and len(labels) and not (0 <= labels.min() and labels.max() < len(class_names)):
        raise ConfigError(
            f"images={path} has labels {sorted(set(labels.tolist()) - set(range(len(class_names))))[:5]} outside the "
            f"subset: they index data.classes ({', '.join(class_names)}), 0..{len(class_names) - 1}"
        )
    return torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2))), (
        None if labels is None else torch.from_numpy(labels.astype(np.int64))
    )


def read_npz(path: Path, class_names: list[str]) -> tuple[np.ndarray, np.ndarray | None]:
    try:
        data = np.load(path, allow_pickle=False)
        keys = set(data.files)
    except Exception as e:
        raise ConfigError(f"images={path} is not a readable .npz ({type(e).__name__}: {e})") from None
    if "arr_0" not in keys:
        raise ConfigError(
            f"images={path} has no arr_0 (it has {', '.join(sorted(keys)) or 'nothing'}); save the images with "
            "np.savez(path, images) as uint8 N x H x W x 3"
        )
    images = data["arr_0"]
    if images.dtype != np.uint8:
        raise ConfigError(
            f"images={path}: arr_0 is {images.dtype}, not uint8; convert images in [0, 1] with "
            "(x * 255).round().clip(0, 255).astype(np.uint8)"
        )
    if images.ndim != 4 or images.shape[-1] != 3:
        hint = " (channels first: pass x.transpose(0, 2, 3, 1))" if images.ndim == 4 and images.shape[1] == 3 else ""
        raise ConfigError(f"images={path}: arr_0 has shape {images.shape}, not N x H x W x 3{hint}")
    if not len(images):
        raise ConfigError(f"images={path}: arr_0 holds no images")
    labels = data["arr_1"] if "arr_1" in keys else data["labels"] if "labels" in keys else None
    if labels is not None and labels.size == 0:  # sample.py's unconditional model
        labels = None
    if labels is not None and (labels.shape != (len(images),) or labels.dtype.kind not in "iu"):
        raise ConfigError(
            f"images={path}: the labels are {labels.dtype} of shape {labels.shape}, not {len(images)} integers"
        )
    if labels is not None and "class_names" in keys and [str(c) for c in data["class_names"]] != list(class_names):
        raise ConfigError(
            f"images={path}: its labels index the classes {[str(c) for c in data['class_names']]}, not data.classes "
            f"{list(class_names)}; pass the data group of its subset"
        )
    return images, labels


def read_folder(path: Path, class_names: list[str]) -> tuple[np.ndarray, np.ndarray | None]:
    folders = sorted(p for p in path.iterdir() if p.is_dir())
    top = sorted(p for p in path.iterdir() if p.suffix.lower() in SUFFIXES)
    if folders and top:
        raise ConfigError(
            f"images={path} has image files beside subfolders; put every image in its class's subfolder (labels), "
            "or all of them at the top (no labels)"
        )
    if not folders:
        return read_files(path, top), None
    unknown = [p.name for p in folders if p.name not in class_names]
    if unknown:
        raise ConfigError(
            f"images={path}: subfolders {unknown} are not classes of the subset ({', '.join(class_names)}); labels "
            "come from subfolders named after the classes"
        )
    files = [
        (p, class_names.index(d.name)) for d in folders for p in sorted(d.iterdir()) if p.suffix.lower() in SUFFIXES
    ]
    images = read_files(path, [p for p, _ in files])
    return images, np.array([k for _, k in files], dtype=np.int64)


def read_files(folder: Path, paths: list[Path]) -> np.ndarray:
    if not paths:
        raise ConfigError(f"images={folder} holds no PNG or JPEG files")
    arrays = []
    for p in paths:
        try:
            with Image.open(p) as image:
                arrays.append(np.asarray(image.convert("RGB")))
        except Exception as e:
            raise ConfigError(f"images={folder}: {p.name} is not a readable image ({type(e).__name__})") from None
        if arrays[-1].shape != arrays[0].shape:
            raise ConfigError(
                f"images={folder}: {p.name} is {arrays[-1].shape[1]}x{arrays[-1].shape[0]} but {paths[0].name} is "
                f"{arrays[0].shape[1]}x{arrays[0].shape[0]}; every image must have the same size"
            )
    return np.stack(arrays)
