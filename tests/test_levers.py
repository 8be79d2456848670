"""The study's levers (issue 27): the rescaled schedule, the log-SNR timestep density, immiscible noise and post-hoc
EMA, each against a closed form or a brute force, and followed from the config through train.py's builders."""

import itertools
import json
import subprocess

import pytest
import torch
from conftest import ROOT

from ddpm_lightning import schema, train
from ddpm_lightning.diffusion.loss import assign_noise
from ddpm_lightning.diffusion.posthoc_ema import (
    PowerEMA,
    gamma_to_sigma_rel,
    posthoc_coefficients,
    reconstruct,
    sigma_rel_to_gamma,
)
from ddpm_lightning.diffusion.schedule import build_schedule, linear_betas
from ddpm_lightning.module import load_checkpoint

TINY = ["experiment=smoke", "net.width=4", "net.emb_dim=16", "net.heads=2", "net.attention=[4]"]


def test_the_rescaled_schedule_ends_where_ddpms_thousand_steps_end():
    """betas x 1000 / T: at T = 1000 the paper's own; at T = 500, 2e-4 .. 0.04, and sqrt(alpha_bar_T) falls from
    0.080 to 0.006 (issue 27's figures), close to DDPM's 1,000 steps (0.0064)."""
    assert torch.equal(linear_betas(1000, rescale=True), linear_betas(1000))
    betas = linear_betas(500, rescale=True)
    assert betas[0].item() == pytest.approx(2e-4) and betas[-1].item() == pytest.approx(0.04)
    assert build_schedule("linear", 500).prior_gap == pytest.approx(0.0797, abs=1e-4)
    assert build_schedule("linear", 500, rescale=True).prior_gap == pytest.approx(0.0061, abs=1e-4)
    assert build_schedule("linear", 500, rescale=True).prior_gap == pytest.approx(
        build_schedule("linear", 1000).prior_gap, abs=3e-4
    )


def test_the_laplace_density_puts_each_steps_log_snr_mass_on_it():
    """p(t) is the Laplace mass of the log-SNR interval of step t: it sums to 1, peaks at the step whose SNR is closest
    to the centre, and the mass between two log-SNR values is the Laplace CDF's difference (to the steps' resolution)."""
    s = build_schedule("linear", 500)
    lam = s.snr.double().log()
    for center, width in ((0.0, 2.0), (-2.0, 0.5)):
        p = s.timestep_probs("laplace", center, width).double()
        assert p.sum().item() == pytest.approx(1.0, abs=1e-6)
        assert p.argmax().item() == (lam - center).abs().argmin().item()
        inside = (lam > center - width) & (lam < center + width)  # within one scale of the centre: 1 - e^-1
        assert p[inside].sum().item() == pytest.approx(1 - torch.e**-1, abs=0.03)
    assert torch.equal(s.timestep_probs("uniform"), torch.full((500,), 1 / 500))


def test_the_training_draws_t_from_the_density_train_py_configures():
    """Through train.py's builder: recipe.timesteps=laplace makes the loss draw t with the schedule's p(t)
    (a chi-square test over 20,000 draws); uniform keeps the paper's torch.randint draw, the same numbers as before."""
    cfg = schema.compose("config", [*TINY, "recipe.timesteps=laplace", "recipe.timestep_width=1.0"])
    module = train.build_module(cfg, ["cat"])
    p = module.schedule.timestep_probs("laplace", 0.0, 1.0)
    t = module.loss.draw_t(20000, torch.device("cpu"), torch.Generator().manual_seed(0))
    counts = torch.bincount(t, minlength=p.numel()).double()
    expected = 20000 * p.double()
    keep = expected > 5  # the chi-square test's cells
    chi2 = ((counts[keep] - expected[keep]) ** 2 / expected[keep]).sum().item()
    assert chi2 < keep.sum().item() + 4 * (2 * keep.sum().item()) ** 0.5  # mean dof, sd sqrt(2 dof)
    uniform = train.build_module(schema.compose("config", TINY), ["cat"]).loss
    g = torch.Generator().manual_seed(1)
    assert torch.equal(
        uniform.draw_t(64, torch.device("cpu"), g),
        torch.randint(0, uniform.schedule.T, (64,), generator=g.manual_seed(1)),
    )


def test_immiscible_assignment_is_the_optimal_permutation():
    """assign_noise minimises the sum of image-noise distances over all permutations (brute force on 6 images)."""
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.rand(6, 3, 4, 4, generator=g) * 2 - 1, torch.randn(6, 3, 4, 4, generator=g)
    d = torch.cdist(x0.flatten(1), eps.flatten(1))
    best = min(itertools.permutations(range(6)), key=lambda perm: sum(d[i, j].item() for i, j in enumerate(perm)))
    assert assign_noise(x0, eps).tolist() == list(best)


def test_immiscible_noise_reaches_the_loss_as_a_permutation_of_the_draw():
    """With recipe.immiscible (through train.py's builder) the noise the net sees is the step's draw, reassigned:
    the same set of noise images, each paired with the image the assignment gives it."""
    cfg = schema.compose("config", [*TINY, "recipe.immiscible=true"])
    loss = train.build_module(cfg, ["cat"]).loss
    x0 = torch.rand(8, 3, 32, 32) * 2 - 1
    seen = {}

    def net(x_t, t, y):
        seen["x_t"], seen["t"] = x_t, t
        return torch.zeros_like(x_t)

    loss(net, x0, None, torch.Generator().manual_seed(3))
    g = torch.Generator().manual_seed(3)
    t = torch.randint(0, loss.schedule.T, (8,), generator=g)
    eps = torch.randn(x0.shape, generator=g)
    expected = loss.schedule.q_sample(x0, t, eps[assign_noise(x0, eps)])
    assert torch.equal(seen["t"], t) and torch.allclose(seen["x_t"], expected)
    assert not torch.allclose(seen["x_t"], loss.schedule.q_sample(x0, t, eps))  # the plain pairing differs


def test_sigma_rel_and_the_power_functions_exponent_are_inverse():
    """EDM2's two lengths: sigma_rel 0.05 is gamma 16.97, 0.10 is gamma 6.94 (eq. 123 and 126)."""
    assert sigma_rel_to_gamma(0.05) == pytest.approx(16.97, abs=0.01)
    assert sigma_rel_to_gamma(0.10) == pytest.approx(6.94, abs=0.01)
    for s in (0.02, 0.08, 0.2):
        assert gamma_to_sigma_rel(sigma_rel_to_gamma(s)) == pytest.approx(s, rel=1e-9)
    x = posthoc_coefficients([100, 200], [0.05, 0.05], 200, 0.05)  # a length that was trained is itself
    assert x == pytest.approx([0.0, 1.0], abs=1e-9)


def trajectory_and_emas(steps=2000, every=100):
    """A synthetic weight trajectory (drift that changes speed, plus noise), power EMAs at EDM2's two lengths with
    snapshots every ``every`` steps, and one at 0.08 run directly."""
    g = torch.Generator().manual_seed(0)
    theta = torch.zeros(400, dtype=torch.float64)
    drift = torch.randn(400, dtype=torch.float64, generator=g)
    trained, direct, snapshots = PowerEMA([theta], [0.05, 0.10]), PowerEMA([theta], [0.08]), []
    for t in range(1, steps + 1):
        theta = theta + 0.01 * drift * (1 + torch.tensor(t / 150.0).sin())
        theta = theta + 0.05 * torch.randn(400, dtype=torch.float64, generator=g)
        trained.update([theta], t)
        direct.update([theta], t)
        if t % every == 0:
            weights = [{"w": a[0].clone()} for a in trained.averages]
            snapshots.append({"step": t, "sigma_rels": trained.sigma_rels, "weights": weights})
    return trained, direct, snapshots


def test_posthoc_ema_reconstructs_a_length_that_was_not_trained():
    """The least-squares combination of 20 snapshots at 0.05 and 0.10 is the EMA at 0.08 run directly, to 0.1% of the
    distance between the two trained EMAs (each of them alone is 40-60% of it away)."""
    trained, direct, snapshots = trajectory_and_emas()
    target = direct.averages[0][0]
    spread = (trained.averages[0][0] - trained.averages[1][0]).norm()
    error = (reconstruct(snapshots, 2000, 0.08)["w"] - target).norm()
    assert error < 1e-3 * spread
    assert min((a[0] - target).norm() for a in trained.averages) > 0.3 * spread


@pytest.fixture(scope="module")
def posthoc_run(tmp_path_factory, python):
    """A tiny training with post-hoc EMA snapshots every 10 steps (30 steps)."""
    from conftest import make_cifar

    tmp = tmp_path_factory.mktemp("posthoc")
    root = make_cifar(tmp / "cifar", n_train=40)
    cmd = [python, str(ROOT / "train.py"), *TINY, f"data.root={root}", "data.classes=[cat,ship]",
           "data.max_images=null", "data.batch_size=8", "trainer.max_epochs=3", "logger=csv",
           "callbacks.posthoc_ema.every_n_steps=10", f"hydra.run.dir={tmp / 'run'}"]  # fmt: skip
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    return tmp / "run", root


def test_post_hoc_ema_snapshots_are_written_and_evaluate_py_scores_a_chosen_length(
    posthoc_run, python, detector_file, tmp_path
):
    """Training writes the snapshots (steps 10, 20, 30); load_checkpoint(ema_length=...) gives the reconstruction from
    them, not the checkpoint's EMA; evaluate.py ema_length=0.08 scores those weights and records the length."""
    run_dir, root = posthoc_run
    snapshots = sorted((run_dir / "posthoc_ema").glob("step_*.pt"))
    assert [p.name for p in snapshots] == ["step_0000010.pt", "step_0000020.pt", "step_0000030.pt"]
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    loaded = [torch.load(p, weights_only=True) for p in snapshots]
    expected = reconstruct(loaded, 30, 0.08)
    module, plain = load_checkpoint(str(ckpt), "cpu", 0.08), load_checkpoint(str(ckpt), "cpu")
    params = dict(module.net.named_parameters())
    assert all(torch.equal(params[k], v) for k, v in expected.items())
    assert any(not torch.equal(params[k], p) for k, p in plain.net.named_parameters())
    p = subprocess.run(
        [
            python,
            str(ROOT / "evaluate.py"),
            f"ckpt={ckpt}",
            "ema_length=0.08",
            f"data.root={root}",
            "logger=csv",
            f"metrics.inception_weights={detector_file}",
            "metrics.num_samples=10",
            "metrics.batch_size=10",
            "metrics.reference_images=20",
            f"metrics.cache_dir={tmp_path / 'cache'}",
            "sampler=ddim",
            "sampler.steps=2",
            f"hydra.run.dir={tmp_path / 'eval'}",
        ],  # fmt: skip
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert p.returncode == 0, p.stderr[-3000:]
    assert "post-hoc EMA: sigma_rel=0.08 at step 30 from 3 snapshots" in p.stdout + p.stderr
    assert json.loads((tmp_path / "eval" / "results.json").read_text())["ema_length"] == 0.08


def test_ema_length_without_snapshots_is_one_line(posthoc_run, tmp_path):
    """A checkpoint whose run kept no snapshots: one line that names the setting that would have kept them."""
    from ddpm_lightning.errors import ConfigError

    run_dir, _ = posthoc_run
    (tmp_path / "checkpoints").mkdir()
    ckpt = tmp_path / "checkpoints" / "last.ckpt"
    ckpt.write_bytes((run_dir / "checkpoints" / "last.ckpt").read_bytes())
    with pytest.raises(ConfigError, match="train with callbacks.posthoc_ema.every_n_steps=N"):
        load_checkpoint(str(ckpt), "cpu", 0.08)
