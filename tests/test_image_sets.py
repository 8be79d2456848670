"""Any model's images for evaluate.py images=PATH: an .npz in OpenAI's convention or a folder of PNG/JPEG files, and
one line for each kind of bad set."""

import subprocess

import numpy as np
import pytest
import torch
from conftest import ROOT, natural_images
from PIL import Image

from ddpm_lightning.errors import ConfigError
from ddpm_lightning.image_sets import load_image_set

CLASSES = ["automobile", "cat"]


def nhwc(n: int = 4, side: int = 32) -> np.ndarray:
    return natural_images(n).permute(0, 2, 3, 1).numpy()[:, :side, :side]


def test_an_npz_with_labels_and_a_folder_with_class_subfolders_give_the_same_images_and_labels(tmp_path):
    images, labels = nhwc(4), np.array([1, 0, 1, 1])
    np.savez(tmp_path / "openai.npz", images, labels)  # arr_0, arr_1, as guided-diffusion writes them
    x, y = load_image_set(tmp_path / "openai.npz", CLASSES)
    assert x.dtype == torch.uint8 and x.shape == (4, 3, 32, 32) and torch.equal(x, natural_images(4))
    assert y.tolist() == [1, 0, 1, 1]
    np.savez(tmp_path / "ours.npz", arr_0=images, labels=labels, class_names=np.array(CLASSES))  # sample.py's
    assert torch.equal(load_image_set(tmp_path / "ours.npz", CLASSES)[1], y)
    for i, (image, label) in enumerate(zip(images, labels, strict=True)):
        (tmp_path / "folder" / CLASSES[label]).mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(tmp_path / "folder" / CLASSES[label] / f"{i}.png")
    fx, fy = load_image_set(tmp_path / "folder", CLASSES)
    order = [1, 0, 2, 3]  # automobile/ first, then cat/ in name order
    assert torch.equal(fx, x[order]) and fy.tolist() == [0, 1, 1, 1]
    (tmp_path / "flat").mkdir()
    for i, image in enumerate(images):
        Image.fromarray(image).save(tmp_path / "flat" / f"{i}.jpg", quality=95)
    fx, fy = load_image_set(tmp_path / "flat", CLASSES)
    assert fy is None and fx.shape == (4, 3, 32, 32) and (fx.float() - x.float()).abs().mean() < 3  # JPEG, close


def write(tmp_path, case: str):
    """A bad image set of the kind ``case``; returns its path."""
    path = tmp_path / f"{case}.npz"
    if case == "float":
        np.savez(path, nhwc().astype(np.float32) / 255)
    elif case == "nchw":
        np.savez(path, nhwc().transpose(0, 3, 1, 2))
    elif case == "grey":
        np.savez(path, nhwc()[..., 0])
    elif case == "no arr_0":
        np.savez(path, images=nhwc())
    elif case == "big":
        np.savez(path, np.zeros((2, 64, 64, 3), np.uint8))
    elif case == "labels outside":
        np.savez(path, nhwc(), np.array([0, 1, 2, 7]))
    elif case == "labels of another subset":
        np.savez(path, arr_0=nhwc(), labels=np.array([0, 1, 0, 1]), class_names=np.array(["cat", "automobile"]))
    elif case == "not an npz":
        path.write_bytes(b"garbage")
    elif case == "empty":
        np.savez(path, np.zeros((0, 32, 32, 3), np.uint8))
    else:
        path = tmp_path / case
        path.mkdir()
        if case == "mixed sizes":
            Image.fromarray(nhwc(1)[0]).save(path / "a.png")
            Image.fromarray(np.zeros((28, 28, 3), np.uint8)).save(path / "b.png")
        elif case == "unknown class folder":
            (path / "dog").mkdir()
            Image.fromarray(nhwc(1)[0]).save(path / "dog" / "a.png")
        elif case == "broken file":
            (path / "a.png").write_bytes(b"not a png")
    return path


CASES = {
    "float": "arr_0 is float32, not uint8; convert images in [0, 1] with (x * 255).round()",
    "nchw": "arr_0 has shape (4, 3, 32, 32), not N x H x W x 3 (channels first: pass x.transpose(0, 2, 3, 1))",
    "grey": "arr_0 has shape (4, 32, 32), not N x H x W x 3",
    "no arr_0": "has no arr_0 (it has images); save the images with np.savez(path, images)",
    "big": "are 64x64, the subset's are 32x32: resize them first",
    "labels outside": "has labels [2, 7] outside the subset: they index data.classes (automobile, cat), 0..1",
    "labels of another subset": "its labels index the classes ['cat', 'automobile'], not data.classes",
    "not an npz": "is not a readable .npz",
    "empty": "arr_0 holds no images",
    "empty folder": "holds no PNG or JPEG files",
    "mixed sizes": "b.png is 28x28 but a.png is 32x32; every image must have the same size",
    "unknown class folder": "subfolders ['dog'] are not classes of the subset (automobile, cat)",
    "broken file": "a.png is not a readable image",
}


@pytest.mark.parametrize("case", CASES)
def test_a_bad_image_set_is_one_line_that_names_the_problem(tmp_path, case):
    with pytest.raises(ConfigError) as e:
        load_image_set(write(tmp_path, case), CLASSES)
    assert CASES[case] in str(e.value) and "\n" not in str(e.value)


def test_evaluate_py_refuses_a_bad_image_set_in_one_line_before_any_work(python, tmp_path):
    p = subprocess.run(
        [python, str(ROOT / "evaluate.py"), f"images={write(tmp_path, 'float')}", "data=cars", "logger=csv",
         f"hydra.run.dir={tmp_path / 'e'}"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 2 and len(lines) == 1 and "arr_0 is float32, not uint8" in lines[0], p.stderr[-2000:]
    assert not (tmp_path / "e" / "results.json").exists()
