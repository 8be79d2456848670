"""FID and IS: closed-form properties, agreement with torch_fidelity.calculate_metrics, the cache, the ranks."""

import json
import os

import pytest
import torch
import torch.multiprocessing as mp

from conftest import SHARED, natural_images, random_detector_state
from ddpm_lightning import metrics
from ddpm_lightning.callbacks import evaluate_module
from ddpm_lightning.errors import ConfigError
from ddpm_lightning.module import DiffusionModule


@pytest.fixture(scope="module")
def detector(detector_file):
    return metrics.load_inception(str(detector_file))


def noisy(images, level, seed=1):
    g = torch.Generator().manual_seed(seed)
    return (images.float() + level * 255 * torch.randn(images.shape, generator=g)).clamp(0, 255).round().to(torch.uint8)


def test_fid_of_a_set_against_itself_is_zero_and_rises_with_noise(detector):
    images = natural_images(30)
    reference = metrics.statistics(metrics.extract(detector, images)[0])
    fids = [metrics.fid(metrics.extract(detector, noisy(images, level))[0], reference) for level in (0.0, 0.05, 0.15, 0.4)]
    assert abs(fids[0]) < 1e-3
    assert all(a < b for a, b in zip(fids, fids[1:])), fids


def test_fid_and_is_equal_torch_fidelity(detector, detector_file):
    torch_fidelity = pytest.importorskip("torch_fidelity")
    a, b = natural_images(30, seed=2), noisy(natural_images(30, seed=3), 0.1)

    class Images(torch.utils.data.Dataset):
        def __init__(self, x):
            self.x = x

        def __len__(self):
            return len(self.x)

        def __getitem__(self, i):
            return self.x[i]

    theirs = torch_fidelity.calculate_metrics(input1=Images(a), input2=Images(b), fid=True, isc=True, cuda=False,
                                              batch_size=30, verbose=False, feature_extractor_weights_path=str(detector_file))
    pool_a, logits_a = metrics.extract(detector, a, batch_size=30)
    pool_b, _ = metrics.extract(detector, b, batch_size=30)
    ours_fid = metrics.fid(pool_a, metrics.statistics(pool_b))
    ours_is = metrics.inception_score(logits_a)
    assert ours_fid == pytest.approx(theirs["frechet_inception_distance"], rel=1e-3)
    assert ours_is[0] == pytest.approx(theirs["inception_score_mean"], rel=1e-3)
    assert ours_is[1] == pytest.approx(theirs["inception_score_std"], rel=1e-3, abs=1e-6)


def test_constant_logits_give_an_inception_score_of_one():
    state = random_detector_state()
    state["fc.weight"] = torch.zeros_like(state["fc.weight"])  # logits_unbiased = pool3 @ 0 = 0 for every image
    detector = metrics.Inception(state, "constant logits")
    _, logits = metrics.extract(detector, natural_images(20))
    assert metrics.inception_score(logits) == (pytest.approx(1.0), pytest.approx(0.0))


def test_weights_without_classifier_give_fid_and_no_is(tmp_path):
    path = tmp_path / "pool3_only.pth"
    torch.save(random_detector_state(classifier=False), path)
    detector = metrics.load_inception(str(path))
    assert detector.is_unavailable.startswith("Inception Score unavailable: the detector weights")
    m = DiffusionModule(net=dict(width=8, emb_dim=32, heads=2), schedule=dict(kind="linear", T=10), class_names=["cat"],
                        conditional=False, p_uncond=0.0, guidance_w=0.0, sampler=dict(name="ddim", steps=2))
    reference = metrics.statistics(metrics.extract(detector, natural_images(10))[0])
    scores, preview, _ = evaluate_module(m, detector, reference, num_samples=4, w=0.0, seed=0, batch_size=4)
    assert scores["is_mean"] is None and scores["is_std"] is None and scores["fid"] > 0
    assert preview.shape == (4, 3, 32, 32)


@pytest.mark.skipif(not (SHARED / "weights").is_dir(), reason="../shared weights not present")
def test_the_shared_pool3_only_weights_load():
    detector = metrics.load_inception(str(SHARED / "weights/pt_inception-2015-12-05-pool3-only.pth"))
    assert not detector.has_classifier and detector.is_unavailable


@pytest.mark.parametrize("content, message", [
    (None, "does not exist"),
    (b"garbage", "cannot load metrics.inception_weights"),
    ("pickled callable", "cannot load metrics.inception_weights"),
    ({"fc.weight": torch.zeros(1)}, "do not fit torch-fidelity's layout"),
])
def test_bad_detector_weights(tmp_path, content, message):
    path = tmp_path / "w.pth"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content == "pickled callable":
        torch.save({"x": print}, path)
    elif content is not None:
        torch.save(content, path)
    with pytest.raises(ConfigError, match=message):
        metrics.load_inception(str(path))


def test_second_evaluation_computes_no_reference_features(detector, tmp_path, monkeypatch):
    calls = []
    real_extract = metrics.extract
    monkeypatch.setattr(metrics, "extract", lambda d, x, bs=250: calls.append(len(x)) or real_extract(d, x, bs))
    images, key = natural_images(12), dict(classes=["cat"], split="train", detector="random")
    first = metrics.reference_statistics(detector, images, key, tmp_path)
    assert calls == [12]
    second = metrics.reference_statistics(detector, images, key, tmp_path)
    assert calls == [12]  # loaded from the cache
    assert (first["mu"] == second["mu"]).all() and (first["sigma"] == second["sigma"]).all()
    metrics.reference_statistics(detector, images, {**key, "classes": ["dog"]}, tmp_path)
    assert calls == [12, 12]  # another key, computed again


def _rank_worker(rank, world, detector_file, out, port):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    scores = _scores(detector_file)
    if rank == 0:
        out.write_text(json.dumps(scores))
    torch.distributed.destroy_process_group()


def _scores(detector_file):
    torch.manual_seed(0)
    m = DiffusionModule(net=dict(width=8, emb_dim=32, heads=2), schedule=dict(kind="linear", T=10), class_names=["cat", "dog"],
                        conditional=True, p_uncond=0.1, guidance_w=1.0, sampler=dict(name="ddim", steps=3))
    detector = metrics.load_inception(str(detector_file))
    reference = metrics.statistics(metrics.extract(detector, natural_images(10))[0])
    return evaluate_module(m, detector, reference, num_samples=10, w=1.0, seed=5, batch_size=3)[0]


def test_two_ranks_give_the_single_process_scores(detector_file, tmp_path):
    out = tmp_path / "ddp.json"
    mp.spawn(_rank_worker, args=(2, detector_file, out, 29500 + os.getpid() % 1000), nprocs=2)
    single = _scores(detector_file)
    ddp = json.loads(out.read_text())
    assert ddp["fid"] == pytest.approx(single["fid"], rel=1e-6)
    assert ddp["is_mean"] == pytest.approx(single["is_mean"], rel=1e-6)
