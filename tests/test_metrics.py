"""FID, IS, KID, precision/recall: closed forms, agreement with torch_fidelity.calculate_metrics, bootstrap intervals,
the floor, the cache, the ranks."""

import json
import os

import pytest
import torch
import torch.multiprocessing as mp
from conftest import SHARED, natural_images, random_detector_state
from torchmetrics import MetricCollection

from ddpm_lightning import metrics
from ddpm_lightning.errors import ConfigError
from ddpm_lightning.testing import tiny_module

SETTINGS = dict(kid_subsets=10, kid_subset_size=20, bootstrap=50, seed=0, prc=True)


def reference_of(detector, images) -> dict:
    pool = metrics.extract(detector, images)[0]
    return {**metrics.statistics(pool), "features": pool, "name": "test"}


@pytest.fixture(scope="module")
def detector(detector_file):
    return metrics.load_inception(str(detector_file))


def noisy(images, level, seed=1):
    g = torch.Generator().manual_seed(seed)
    return (images.float() + level * 255 * torch.randn(images.shape, generator=g)).clamp(0, 255).round().to(torch.uint8)


@pytest.mark.slow  # 15 s; test_fid_and_is_equal_torch_fidelity checks FID against the reference implementation
def test_fid_of_a_set_against_itself_is_zero_and_rises_with_noise(detector):
    images = natural_images(20)
    reference = metrics.statistics(metrics.extract(detector, images)[0])
    fids = [
        metrics.fid(metrics.extract(detector, noisy(images, level))[0], reference) for level in (0.0, 0.05, 0.15, 0.4)
    ]
    assert abs(fids[0]) < 1e-3
    assert all(a < b for a, b in zip(fids, fids[1:], strict=False)), fids


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

    theirs = torch_fidelity.calculate_metrics(
        input1=Images(a),
        input2=Images(b),
        fid=True,
        isc=True,
        kid=True,
        prc=True,
        cuda=False,
        batch_size=30,
        verbose=False,
        feature_extractor_weights_path=str(detector_file),
        kid_subsets=10,
        kid_subset_size=20,
        feature_extractor="inception-v3-compat",
        feature_layer_prc="2048",
    )  # prc on pool3, as ours
    ours = metrics.score_real(detector, reference_of(detector, b), a, SETTINGS, batch_size=7)
    assert ours["fid"] == pytest.approx(theirs["frechet_inception_distance"], rel=1e-3)
    assert ours["is_mean"] == pytest.approx(theirs["inception_score_mean"], rel=1e-3)
    assert ours["is_std"] == pytest.approx(theirs["inception_score_std"], rel=1e-3, abs=1e-6)
    assert ours["kid_mean"] == pytest.approx(theirs["kernel_inception_distance_mean"], rel=1e-3)
    assert ours["kid_std"] == pytest.approx(theirs["kernel_inception_distance_std"], rel=1e-3)
    for key in ("precision", "recall", "f_score"):
        assert ours[key] == pytest.approx(theirs[key], rel=1e-3)
    assert 0 < ours["precision"] < 1 and 0 < ours["recall"] < 1  # not a degenerate case


def gaussian_features(n: int, d: int = 16, shift: float = 0.3, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed)) + shift


def test_resampling_formulas_give_the_full_sample_values_for_the_sample_itself():
    reference_features = gaussian_features(400, shift=0.0, seed=9)
    reference = metrics.statistics(reference_features)
    for n in (12, 40):  # n <= d (an n x n problem) and n > d (d x d)
        features = gaussian_features(n)
        full = metrics.fid_of_resamples(features, torch.ones(1, n), reference)
        assert full.item() == pytest.approx(metrics.fid(features, reference), rel=1e-4)
    counts = torch.tensor([[2.0] + [1.0] * 38 + [0.0]])  # item 0 twice, item 39 not at all
    resample = torch.cat([features[:1], features[:39]])
    assert metrics.fid_of_resamples(features, counts, reference).item() == pytest.approx(
        metrics.fid(resample, reference), rel=1e-4
    )
    # the KID resample statistic: pairs of positions, duplicates included
    k = metrics.polynomial_kernel
    direct = (k(resample, resample).double().sum() - k(resample, resample).double().diagonal().sum()) / (
        40 * 39
    ) - 2 * k(resample, reference_features).double().mean()
    assert metrics.kid_of_resamples(features, counts, reference_features, chunk=16).item() == pytest.approx(
        direct.item(), rel=1e-6
    )


def test_bootstrap_intervals_contain_the_value_and_halve_with_four_times_n():
    reference_features = gaussian_features(4000, shift=0.0, seed=9)
    reference = {**metrics.statistics(reference_features), "features": reference_features}
    widths = {}
    for n in (200, 800):
        collection = MetricCollection(
            {"fid": metrics.FID(reference, 400, 0, dim=16), "kid": metrics.KID(reference_features, 20, 100, 400, 0)}
        )
        collection.update(pool=gaussian_features(n, seed=n), index=torch.arange(n))
        out = collection.compute()
        assert out["fid_ci95"][0] < out["fid"] < out["fid_ci95"][1]
        assert out["kid_ci95"][0] < out["kid_mean"] < out["kid_ci95"][1]
        widths[n] = (out["fid_ci95"][1] - out["fid_ci95"][0], out["kid_ci95"][1] - out["kid_ci95"][0])
    for i in range(2):
        assert 0.35 < widths[800][i] / widths[200][i] < 0.7, widths
    # the interval's width against the spread of FID over fresh samples of the same size
    fresh = torch.tensor([metrics.fid(gaussian_features(200, seed=100 + s), reference) for s in range(200)])
    assert 0.6 < widths[200][0] / 3.92 / fresh.std().item() < 1.6, (widths[200][0] / 3.92, fresh.std().item())


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
    m = tiny_module(schedule=dict(T=10))
    scores, preview = metrics.evaluate(
        m,
        detector,
        reference_of(detector, natural_images(10)),
        num_samples=4,
        w=0.0,
        settings={**SETTINGS, "kid_subset_size": 100},
        batch_size=4,
    )
    assert (
        scores["is_mean"] is None and scores["is_std"] is None and scores["fid"] > 0 and scores["kid_mean"] is not None
    )
    assert preview.shape == (4, 3, 32, 32)


def test_the_floor_is_cached_and_says_when_the_test_split_is_short(detector, tmp_path, caplog):
    reference = reference_of(detector, natural_images(12))
    calls = []
    real_score = metrics.score_real
    metrics_score = lambda *a, **k: calls.append(len(a[2])) or real_score(*a, **k)  # noqa: E731
    with pytest.MonkeyPatch.context() as mp_:
        mp_.setattr(metrics.reference, "score_real", metrics_score)
        first = metrics.floor(detector, reference, natural_images(8, seed=4), 20, SETTINGS, tmp_path, batch_size=8)
        assert (
            "the test split has 8 images of the subset that the reference did not see, fewer than metrics.num_samples=20"
            in caplog.text
        )
        again = metrics.floor(detector, reference, natural_images(8, seed=4), 20, SETTINGS, tmp_path, batch_size=8)
    assert calls == [8] and first == again and first["num_samples"] == 8
    assert first["fid"] > 0 and first["fid_ci95"][0] < first["fid"] < first["fid_ci95"][1]


def test_a_floor_beside_a_test_split_reference_is_scored_on_test_images_the_reference_did_not_see(
    detector_file, tmp_path, monkeypatch
):
    test, labels = natural_images(24, seed=6), torch.arange(24) % 2
    settings = {**SETTINGS, "prc": False}
    detector, reference = metrics.detector_and_reference(
        str(detector_file), ["a", "b"], test, "test", 12, tmp_path, 12, "cpu", labels=labels
    )
    scored, real_score = [], metrics.score_real
    monkeypatch.setattr(metrics.reference, "score_real", lambda *a, **k: scored.append(a[2]) or real_score(*a, **k))
    floor = metrics.floor(detector, reference, test, 12, settings, tmp_path, 12, test_labels=labels)
    assert len(scored) == 1 and torch.equal(scored[0], test[12:])  # the 12 after the reference's 12
    self_scored = real_score(detector, reference, test[:12], settings, 12, labels=labels[:12])
    assert self_scored["fid"] < 1e-3 < floor["fid"]  # scored on its own reference, a set looks perfect
    _, everything = metrics.detector_and_reference(
        str(detector_file), ["a", "b"], test, "test", None, tmp_path, 12, "cpu"
    )
    with pytest.raises(ConfigError, match="the floor has no test images of its own: the reference holds all 24"):
        metrics.floor(detector, everything, test, 12, settings, tmp_path, 12)


@pytest.mark.skipif(not (SHARED / "weights").is_dir(), reason="../shared weights not present")
def test_the_shared_pool3_only_weights_load():
    detector = metrics.load_inception(str(SHARED / "weights/pt_inception-2015-12-05-pool3-only.pth"))
    assert not detector.has_classifier and detector.is_unavailable


@pytest.mark.parametrize(
    "content, message",
    [
        (None, "does not exist"),
        (b"garbage", "cannot load metrics.inception_weights"),
        ("pickled callable", "cannot load metrics.inception_weights"),
        ({"fc.weight": torch.zeros(1)}, "do not fit torch-fidelity's layout"),
    ],
)
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
    progress, real_bar = [], metrics.progress_bar
    monkeypatch.setattr(
        metrics.reference,
        "extract",
        lambda d, x, bs=250, progress=None: calls.append(len(x)) or real_extract(d, x, bs, progress),
    )
    monkeypatch.setattr(
        metrics.detector,
        "progress_bar",
        lambda description, total: progress.append((description, total)) or real_bar(None, total),
    )
    images, key = natural_images(12), dict(classes=["cat"], split="train", detector="random")
    first = metrics.reference_statistics(detector, images, key, tmp_path)
    assert calls == [12]
    second = metrics.reference_statistics(detector, images, key, tmp_path)
    assert calls == [12]  # loaded from the cache
    assert (first["mu"] == second["mu"]).all() and (first["sigma"] == second["sigma"]).all()
    metrics.reference_statistics(detector, images, {**key, "classes": ["dog"]}, tmp_path)
    assert calls == [12, 12]  # another key, computed again
    assert progress == [("reference statistics, 12 real images", 12)] * 2  # a progress bar with the time left


def _rank_worker(rank, world, detector_file, out, port):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    scores = _scores(detector_file)
    if rank == 0:
        out.write_text(json.dumps(scores))
    torch.distributed.destroy_process_group()


def _scores(detector_file):
    torch.manual_seed(0)
    m = tiny_module(True, ["cat", "dog"], schedule=dict(T=10), sampler=dict(name="ddim", steps=3))
    detector = metrics.load_inception(str(detector_file))
    reference = reference_of(detector, natural_images(16))
    scores, preview = metrics.evaluate(
        m, detector, reference, num_samples=10, w=1.0, settings={**SETTINGS, "kid_subset_size": 8}, batch_size=5
    )  # two chunks: over three ranks, one rank makes none
    return {**scores, "preview_sum": preview.sum().item(), "preview_len": len(preview)}


@pytest.mark.slow  # 38 s; the two-rank test below compares every score with one process's
def test_three_ranks_give_the_single_process_scores(detector_file, tmp_path):
    out = tmp_path / "ddp.json"
    mp.spawn(_rank_worker, args=(3, detector_file, out, 29500 + os.getpid() % 1000), nprocs=3)
    single = _scores(detector_file)
    ddp = json.loads(out.read_text())
    assert set(ddp) == set(single)
    for key in ("fid", "is_mean", "is_std", "kid_mean", "kid_std", "precision", "recall"):
        assert ddp[key] == pytest.approx(single[key], rel=1e-6), key
    for key in ("fid_ci95", "kid_ci95"):
        assert ddp[key] == pytest.approx(single[key], rel=1e-5), key
    assert ddp["preview_len"] == single["preview_len"] == 10 and ddp["preview_sum"] == single["preview_sum"]


def colour_images(labels: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Images of three easily told classes: class k is noise around a colour bright in channel k."""
    base = torch.full((len(labels), 3, 1, 1), 50.0)
    base[torch.arange(len(labels)), labels % 3] = 200.0
    return (base + 30 * torch.randn(len(labels), 3, 32, 32, generator=g)).clamp(0, 255).round().to(torch.uint8)


class StubModel:
    """A 'model' for metrics.evaluate: class k's images are colour_images of class k + shift, or, with ``copies``,
    training images (half of them mirrored, all moved by a pixel and with a little noise)."""

    def __init__(self, num_classes: int = 3, shift: int = 0, copies: torch.Tensor | None = None):
        from types import SimpleNamespace

        self.hparams = SimpleNamespace(
            class_names=[f"class{k}" for k in range(num_classes)], conditional=True, image_size=32
        )
        self.device, self.shift, self.copies = torch.device("cpu"), shift, copies

    def sample(self, n, labels, w, sampler, generator, batch_size):
        if self.copies is None:
            return colour_images((labels + self.shift) % len(self.hparams.class_names), generator)
        x = self.copies[torch.randint(len(self.copies), (n,), generator=generator)]
        x = torch.where(torch.rand(n, 1, 1, 1, generator=generator) < 0.5, x.flip(-1), x)
        x = torch.cat([x[..., :1, :], x[..., :-1, :]], -2)  # down by one pixel, the top row repeated
        return (x.float() + torch.randint(-3, 4, x.shape, generator=generator)).clamp(0, 255).to(torch.uint8)


def colour_reference(detector, tmp_path, n: int = 30, train: torch.Tensor | None = None) -> dict:
    g = torch.Generator().manual_seed(5)
    labels = torch.arange(n) % 3
    images = colour_images(labels, g)
    reference = metrics.reference_statistics(
        detector, images, dict(classes=["a", "b", "c"], split="train", detector="random"), tmp_path
    )
    reference["probe"] = metrics.class_probe(reference["features"], labels, 3, reference["name"], tmp_path)
    if train is not None:
        reference["training_set"] = metrics.TrainingSet(train)
    return reference


def test_the_class_probe_learns_separable_features_and_is_cached_under_the_reference_key(tmp_path, monkeypatch):
    g = torch.Generator().manual_seed(0)
    centres = 4 * torch.randn(5, 64, generator=g)
    labels = torch.arange(500) % 5
    features = centres[labels] + torch.randn(500, 64, generator=g)
    probe = metrics.class_probe(features, labels, 5, "abc", tmp_path)
    assert (
        (tmp_path / "probe_abc.pt").is_file()
        and probe["held_out_acc"] == 1.0
        and probe["l2"] in (1e-4, 1e-3, 1e-2, 1e-1)
    )
    test = centres[labels[:100]] + torch.randn(100, 64, generator=g)
    assert (metrics.probe_classes(probe, test) == labels[:100]).float().mean() > 0.97
    monkeypatch.setattr(metrics.probe, "fit_probe", lambda *a, **k: pytest.fail("refitted a cached probe"))
    again = metrics.class_probe(features, labels, 5, "abc", tmp_path)
    assert torch.equal(again["weight"], probe["weight"])
    monkeypatch.undo()
    other = metrics.class_probe(
        features, labels.flip(0), 5, "abc", tmp_path
    )  # other labels under the same name: fitted again
    assert other["labels_sha1"] != probe["labels_sha1"]
    noise = metrics.fit_probe(
        torch.randn(500, 64, generator=g), labels, 5
    )  # nothing to learn: chance on held-out images
    assert noise["held_out_acc"] < 0.4


def test_class_agreement_is_high_for_images_of_the_asked_class_and_low_otherwise(detector, tmp_path):
    reference = colour_reference(detector, tmp_path)
    settings = {**SETTINGS, "kid_subset_size": 10}
    right = metrics.evaluate(StubModel(), detector, reference, 15, 1.0, settings, batch_size=15)[0]
    hits = round(right["class_acc"] * 15)
    assert right["class_acc"] >= 0.9 and right["class_acc_ci95"] == metrics.proportion_interval(hits, 15)
    wrong = metrics.evaluate(StubModel(shift=1), detector, reference, 15, 1.0, settings, batch_size=15)[0]
    assert wrong["class_acc"] <= 0.1
    g = torch.Generator().manual_seed(9)
    test_labels = torch.arange(15) % 3
    floor = metrics.floor(
        detector, reference, colour_images(test_labels, g), 15, settings, tmp_path, 15, test_labels=test_labels
    )
    assert floor["class_acc"] >= 0.9  # real held-out images: the probe's own accuracy at this N


def test_memorization_is_one_for_shifted_copies_and_zero_for_new_images_with_an_interval_above_zero(detector, tmp_path):
    g = torch.Generator().manual_seed(2)
    train = natural_images(100, seed=3)
    reference = colour_reference(detector, tmp_path, train=train)
    settings = {**SETTINGS, "kid_subset_size": 10}
    copies = metrics.evaluate(StubModel(copies=train), detector, reference, 10, 0.0, settings, batch_size=10)[0]
    assert copies["memorized"] == 1.0 and copies["nn_ratio_median"] < 0.2
    fresh = metrics.evaluate(StubModel(), detector, reference, 10, 0.0, settings, batch_size=10)[0]
    assert fresh["memorized"] == 0.0 and fresh["nn_ratio_median"] > 0.5
    assert fresh["memorized_ci95"] == [0.0, pytest.approx(1 - 0.025 ** (1 / 10))]  # 0 of 10: [0, 0.31], not [0, 0]
    noise = torch.randint(0, 256, (20, 3, 32, 32), dtype=torch.uint8, generator=g)
    moved = torch.cat([train[7:8, :, :, 2:], train[7:8, :, :, -2:]], -1)  # left by two pixels
    brighter = (train[9:10].flip(-1).float() * 0.8 + 30).to(torch.uint8)  # mirrored, lower contrast, brighter
    queries = torch.cat([train[7:8], moved, brighter, noise])
    d, i = metrics.nearest_training_images(queries, train)
    assert d[0, 0] < 0.01 * d[0, 1] and i[0, 0] == 7 and i[1, 0] == 7 and i[2, 0] == 9
    assert (d[:3, 0] / d[:3, 1] < 0.2).all() and (d[3:, 0] / d[3:, 1] > 0.5).all()
    assert (d[:, 0] <= d[:, 1]).all() and (i[:, 0] != i[:, 1]).all()
    with pytest.MonkeyPatch.context() as mp:  # the coarse search keeps what a search over every image finds
        mp.setattr(metrics.memorization, "CANDIDATES", len(train))
        d_all, i_all = metrics.nearest_training_images(queries, train)
    assert torch.equal(i_all[:3], i[:3]) and torch.allclose(d_all[:3], d[:3])  # the copies: the same pairs
    assert (d_all[:, 0] <= d[:, 0] + 1e-5).all()  # noise: the full search finds nothing farther


def test_exact_proportion_intervals_cover_the_true_proportion_95_percent_of_the_time():
    """Simulated counts at known proportions, 0 and 1 included: the exact interval covers at least 95% of the time
    (up to the simulation's noise); a bootstrap interval of the 0/1 hits would be [0, 0] at p = 0, covering nothing
    for any p > 0 that gives no hit."""
    n, draws = 200, 4000
    g = torch.Generator().manual_seed(0)
    intervals = torch.tensor([metrics.proportion_interval(k, n) for k in range(n + 1)])
    assert intervals[0, 0] == 0 and 0.017 < intervals[0, 1] < 0.019  # 0 of 200: [0, 1.8%]
    for p in (0.0, 0.004, 0.5, 0.996, 1.0):
        k = torch.binomial(torch.full((draws,), float(n)), torch.full((draws,), p), generator=g).long()
        covered = ((intervals[k, 0] <= p) & (p <= intervals[k, 1])).float().mean().item()
        assert covered >= 0.94, (p, covered)


def test_fid_and_kid_intervals_cover_their_expected_value_at_this_n():
    """Gaussian features against a reference of known statistics: the value to cover is the mean of FID (KID) over
    fresh samples of the same size; the 95% bootstrap intervals of 40 independent samples cover it about 95% of the
    time (an interval of zero width would cover it never)."""
    reference_features = gaussian_features(4000, shift=0.0, seed=9)
    reference = {**metrics.statistics(reference_features), "features": reference_features}
    n = 200

    def kid_of(features):
        kid = metrics.KID(reference_features, 20, 100, 0, 0)
        kid.update(pool=features, index=torch.arange(n))
        return kid.compute()["kid_mean"]

    fid_mean = torch.tensor([metrics.fid(gaussian_features(n, seed=1000 + s), reference) for s in range(400)]).mean()
    kid_mean = sum(kid_of(gaussian_features(n, seed=5000 + s)) for s in range(100)) / 100
    covered = torch.zeros(2)
    for s in range(40):
        c = MetricCollection(
            {"fid": metrics.FID(reference, 200, s, dim=16), "kid": metrics.KID(reference_features, 20, 100, 200, s)}
        )
        c.update(pool=gaussian_features(n, seed=s), index=torch.arange(n))
        out = c.compute()
        covered += torch.tensor([float(out[f"{m}_ci95"][0] <= v <= out[f"{m}_ci95"][1]) for m, v in
                                 (("fid", fid_mean), ("kid", kid_mean))])  # fmt: skip
    assert (covered / 40 >= 0.85).all(), covered / 40


def _two_rank_worker(rank, world, detector_file, cache, out, port):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    scores = _class_and_copy_scores(detector_file, cache)
    if rank == 0:
        out.write_text(json.dumps(scores))
    torch.distributed.destroy_process_group()


def _class_and_copy_scores(detector_file, cache):
    detector = metrics.load_inception(str(detector_file))
    train = natural_images(60, seed=3)
    reference = colour_reference(detector, cache, train=train)
    settings = {**SETTINGS, "kid_subset_size": 10}
    noisy_labels = metrics.evaluate(StubModel(), detector, reference, 10, 1.0, settings, batch_size=4)[
        0
    ]  # 3 chunks over 2 ranks
    copies = metrics.evaluate(StubModel(copies=train[:30]), detector, reference, 4, 1.0, settings, batch_size=4)[
        0
    ]  # rank 1 makes none
    return {"right": noisy_labels, "copies": copies}


@pytest.mark.slow  # 34 s; with evaluate.py over two ranks (test_cluster), the slow suite keeps the metrics' sync
def test_two_ranks_give_the_single_process_scores_with_class_agreement_and_memorization(detector_file, tmp_path):
    out, cache = tmp_path / "ddp.json", tmp_path / "cache"
    single = _class_and_copy_scores(detector_file, cache)  # also fills the cache the ranks read
    mp.spawn(_two_rank_worker, args=(2, detector_file, cache, out, 29500 + (os.getpid() + 7) % 1000), nprocs=2)
    ddp = json.loads(out.read_text())
    for case in ("right", "copies"):
        assert set(ddp[case]) == set(single[case])
        for key in (
            "class_acc",
            "class_acc_ci95",
            "memorized",
            "memorized_ci95",
            "nn_ratio_median",
            "fid",
            "precision",
            "recall",
        ):
            assert ddp[case][key] == pytest.approx(single[case][key], rel=1e-6), (case, key)
        for key in (
            "fid_ci95",
            "kid_mean",
            "kid_std",
            "kid_ci95",
        ):  # the ranks run Inception on one thread: features equal to ~1e-6
            assert ddp[case][key] == pytest.approx(single[case][key], rel=1e-4), (case, key)
    assert single["right"]["class_acc"] >= 0.9 and single["copies"]["memorized"] == 1.0
