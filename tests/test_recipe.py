"""The training levers beyond the paper (conf/recipe, net.attention): each one's mechanics, checked against its
closed form, and the paper's presets leaving every one off."""

import subprocess

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from conftest import ROOT
from lightning.pytorch.callbacks import LearningRateMonitor

from ddpm_lightning import schema
from ddpm_lightning.data import CIFARDataModule
from ddpm_lightning.diffusion.schedule import build_schedule
from ddpm_lightning.errors import ConfigError
from ddpm_lightning.module import LRSchedule, lr_factor
from ddpm_lightning.nets.unet import SelfAttention, UNet
from ddpm_lightning.testing import tiny_module

NET = dict(width=8, emb_dim=32, heads=2)


def module(lr=1e-3, **recipe):
    return tiny_module(net=NET, schedule=dict(T=50), sampler=dict(name="ddim", steps=5), recipe=recipe, lr=lr)


def attention_resolutions_of(net: UNet) -> list[int]:
    """The resolutions at which the net's blocks run self-attention, read off a forward pass on 32x32 inputs."""
    seen = []
    hooks = [
        m.register_forward_hook(lambda m, i, o: seen.append(i[0].shape[-1]))
        for m in net.modules()
        if isinstance(m, SelfAttention)
    ]
    net(torch.randn(1, 3, 32, 32), torch.tensor([3]))
    for h in hooks:
        h.remove()
    return seen


@pytest.mark.parametrize(
    "attention, expected", [((32, 16, 8, 4), [16, 8, 4, 8, 16, 32]), ((8, 4), [8, 4, 8]), ((16,), [16, 16]), ((), [])]
)
def test_attention_runs_only_at_the_named_resolutions(attention, expected):
    assert attention_resolutions_of(UNet(**NET, attention=attention)) == expected


def test_attention_at_a_resolution_the_net_lacks_is_refused():
    with pytest.raises(ValueError, match=r"attention at \[2\]: .* work at \[32, 16, 8, 4\]"):
        UNet(**NET, attention=(8, 2))


def test_min_snr_weights_are_min_snr_gamma_over_snr():
    s = build_schedule(kind="linear", T=500)
    snr = s.alpha_bar.double() / (1 - s.alpha_bar.double())
    w = s.loss_weights("min_snr", 5.0)
    assert torch.allclose(w.double(), torch.minimum(snr, torch.tensor(5.0, dtype=torch.float64)) / snr, rtol=1e-3)
    low_noise = snr > 5  # small t: SNR above gamma, so those steps count less (eq. 10 of Hang et al.)
    assert low_noise[0] and not low_noise[-1]
    assert torch.all(w[low_noise] < 1) and torch.all(w[~low_noise] == 1)
    assert torch.all(w[:-1][low_noise[:-1]] <= w[1:][low_noise[:-1]])  # rising with t up to the point SNR = gamma
    assert torch.equal(s.loss_weights("none"), torch.ones(500))


def test_the_weighted_loss_is_the_per_image_mse_times_w_t():
    torch.manual_seed(0)
    m = module(loss_weighting="min_snr", snr_gamma=2.0)
    x0 = torch.rand(6, 3, 32, 32) * 2 - 1
    got = m.loss(m.net, x0, None, torch.Generator().manual_seed(1))
    g = torch.Generator().manual_seed(1)  # the same draws by hand
    t = torch.randint(0, 50, (6,), generator=g)
    eps = torch.randn(x0.shape, generator=g)
    per_image = (m.net(m.sched.q_sample(x0, t, eps), t) - eps).square().mean(dim=(1, 2, 3))
    assert torch.allclose(got, (m.sched.loss_weights("min_snr", 2.0)[t] * per_image).mean())
    plain = m.paper_loss(m.net, x0, None, torch.Generator().manual_seed(1))
    assert torch.allclose(plain, F.mse_loss(m.net(m.sched.q_sample(x0, t, eps), t), eps))


def test_lr_factor_warms_up_linearly_then_decays_by_a_cosine_to_zero():
    assert [lr_factor(s, 4, "constant", 20) for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert lr_factor(4, 4, "cosine", 20) == 1.0
    assert lr_factor(12, 4, "cosine", 20) == pytest.approx(0.5)  # halfway through the 16 steps after the warm-up
    assert lr_factor(20, 4, "cosine", 20) == pytest.approx(0.0, abs=1e-12)


class GradNorm(L.Callback):
    """The global gradient norm that the optimizer used at each step (read after the step; grads stay until the next)."""

    def __init__(self):
        self.norms = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        grads = [p.grad for p in pl_module.net.parameters() if p.grad is not None]
        self.norms.append(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])).item())


def fit(tmp_path, cifar_root, steps=12, clip=None, **kw):
    torch.manual_seed(0)
    norms, lrs = GradNorm(), LearningRateMonitor(logging_interval="step")
    logger = L.pytorch.loggers.CSVLogger(tmp_path, name="csv", version="")
    trainer = L.Trainer(
        max_steps=steps,
        logger=logger,
        enable_checkpointing=False,
        use_distributed_sampler=False,
        limit_val_batches=0,
        default_root_dir=tmp_path,
        log_every_n_steps=1,
        callbacks=[norms, lrs],
        gradient_clip_val=clip,
        enable_progress_bar=False,
        max_epochs=-1,
    )
    m = module(**kw)
    trainer.fit(m, datamodule=CIFARDataModule(str(cifar_root), ["cat", "ship"], batch_size=4))
    return trainer, norms.norms, logger


def test_the_lr_schedule_goes_through_lightning_and_is_logged_per_step(tmp_path, cifar_root):
    import csv

    trainer, _, logger = fit(tmp_path, cifar_root, steps=10, warmup_steps=3, lr_decay="cosine", lr=1e-2)
    rows = [r for r in csv.DictReader(open(logger.log_dir + "/metrics.csv")) if r.get("lr-Adam")]
    logged = [float(r["lr-Adam"]) for r in rows]
    total = trainer.estimated_stepping_batches
    assert logged == pytest.approx([1e-2 * lr_factor(s, 3, "cosine", total) for s in range(len(logged))])
    assert len(logged) == 10 and logged[0] == pytest.approx(1e-2 / 3) and logged[-1] < 1e-3


def test_the_cosine_keeps_its_length_on_resume_and_a_longer_run_decays_on_from_where_it_was(caplog):
    """The length is read once and kept in the checkpoint (the plan): a resume with the same settings draws the same
    rates; one with more steps (trainer.max_epochs raised to train on) goes on from the rate reached, without a jump
    back up, to 0 at the new last step, and says so in one line."""
    first = LRSchedule(3, "cosine", lambda: 20)
    rates = [first(s) for s in range(12)]
    assert rates == pytest.approx([lr_factor(s, 3, "cosine", 20) for s in range(12)])
    same = LRSchedule(3, "cosine", lambda: 20)  # resumed at update 11
    same.plan = dict(first.plan)
    assert [same(s) for s in range(11, 21)] == pytest.approx([lr_factor(s, 3, "cosine", 20) for s in range(11, 21)])
    longer = LRSchedule(3, "cosine", lambda: 40)
    longer.plan = dict(first.plan)
    with caplog.at_level("INFO", logger="ddpm_lightning.module"):
        after = [longer(s) for s in range(11, 41)]
    assert after[0] == pytest.approx(rates[11]) and all(a > b for a, b in zip(after[:-1], after[1:], strict=False))
    assert after[-1] == pytest.approx(0.0, abs=1e-12) and longer.plan["total"] == 40
    assert "the run's length changed from 20 to 40 optimizer steps" in caplog.text


def test_resuming_with_another_recipe_is_refused_in_one_line(tmp_path):
    """A paper-recipe checkpoint resumed with the first study's bundle would change its loss weighting and restart the
    LR warm-up mid-run; it is refused before anything is written, naming the first setting that differs."""
    from ddpm_lightning import schema, train

    overrides = [
        "experiment=smoke",
        "model=improved",
        "net.width=4",
        "net.emb_dim=16",
        "net.heads=2",
        "net.attention=[4]",
    ]
    paper = train.build_module(schema.compose("config", overrides), ["cat", "ship"])
    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    ckpt.parent.mkdir(parents=True)
    torch.save({"hyper_parameters": dict(paper.hparams), "global_step": 7}, ckpt)
    cfg = schema.compose("config", overrides)
    assert train.resume_from(cfg, tmp_path / "run", paper) == (str(ckpt), 7)
    bundle = ["recipe.loss_weighting=min_snr", "recipe.warmup_steps=200", "recipe.lr_decay=cosine"]
    fast = train.build_module(schema.compose("config", [*overrides, *bundle]), ["cat", "ship"])
    with pytest.raises(
        ConfigError, match=r"was trained with recipe.loss_weighting=none, this run asks recipe.loss_weig"
    ):
        train.resume_from(cfg, tmp_path / "run", fast)


TINY = ["experiment=smoke", "model=improved", "net.width=4", "net.emb_dim=16", "net.heads=2", "net.attention=[4]"]


def test_min_snr_weights_reach_the_loss_that_train_py_s_training_step_minimises(cifar_root, tmp_path):
    """Through train.py's own builder: the first step's loss is the Min-SNR-weighted loss of that step's noise, not
    the paper's (each lever's wire is followed from the config, not from a loss called by hand)."""
    from ddpm_lightning import train
    from ddpm_lightning.data import step_seed
    from ddpm_lightning.diffusion.loss import DiffusionLoss

    cfg = schema.compose("config", [*TINY, "recipe.loss_weighting=min_snr", "recipe.snr_gamma=0.5"])
    m, seen = train.build_module(cfg, ["cat", "ship"]), {}

    class Expected(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            x0, y = batch
            for weighting in ("min_snr", "none"):
                loss = DiffusionLoss(pl_module.schedule, weighting, 0.5, 0.1, pl_module.net.null_class)
                g = torch.Generator().manual_seed(step_seed(cfg.seed, 0, 0, micro=0))
                seen[weighting] = loss(pl_module.net, x0, y, g).item()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            seen["training_step"] = outputs["loss"].item()

    L.Trainer(max_steps=1, logger=False, enable_checkpointing=False, limit_val_batches=0, callbacks=[Expected()],
              default_root_dir=tmp_path, enable_progress_bar=False).fit(
        m, datamodule=CIFARDataModule(str(cifar_root), ["cat", "ship"], batch_size=4))  # fmt: skip
    assert seen["training_step"] == pytest.approx(seen["min_snr"], rel=1e-6)
    assert seen["min_snr"] != pytest.approx(seen["none"], rel=1e-3)


def test_grad_clip_betas_and_weight_decay_reach_the_trainer_and_optimizer_train_py_builds(tmp_path):
    from ddpm_lightning import train

    cfg = schema.compose(
        "config", [*TINY, "recipe.grad_clip=0.25", "recipe.betas=[0.8,0.95]", "recipe.weight_decay=0.03"]
    )
    trainer = train.build_trainer(cfg, tmp_path, [], False)
    assert trainer.gradient_clip_val == 0.25 and trainer.gradient_clip_algorithm == "norm"
    optimizer = train.build_module(cfg, ["cat", "ship"]).configure_optimizers()
    optimizer = optimizer["optimizer"] if isinstance(optimizer, dict) else optimizer
    group = optimizer.param_groups[0]
    assert isinstance(optimizer, torch.optim.AdamW) and group["betas"] == (0.8, 0.95) and group["weight_decay"] == 0.03
    assert group["fused"] is True


def test_gradient_clipping_caps_the_norm_the_optimizer_sees(tmp_path, cifar_root):
    _, free, _ = fit(tmp_path / "a", cifar_root, steps=5)
    _, clipped, _ = fit(tmp_path / "b", cifar_root, steps=5, clip=0.05)
    assert min(free) > 0.05  # without clipping the norm is larger, so clipping has work to do
    assert max(clipped) == pytest.approx(0.05, rel=1e-3)


def test_dropout_sits_in_the_residual_blocks_and_only_acts_in_training():
    net = UNet(**NET, dropout=0.5)
    drops = [name for name, m in net.named_modules() if isinstance(m, torch.nn.Dropout)]
    assert len(drops) == 6 and all(
        ".conv.0.double_conv" in n or ".conv.1.double_conv" in n for n in drops
    )  # each Down/Up's residual DoubleConv
    x, t = torch.randn(2, 3, 32, 32), torch.tensor([5, 9])
    net.train()
    assert not torch.equal(net(x, t), net(x, t))
    net.eval()
    assert torch.equal(net(x, t), net(x, t))
    assert not any(isinstance(m, torch.nn.Dropout) for m in UNet(**NET).modules())


def test_adam_betas_and_weight_decay_reach_the_optimizer():
    m = module(betas=(0.8, 0.95), weight_decay=0.01)
    m.trainer = type("T", (), {"estimated_stepping_batches": 10})()
    opt = m.configure_optimizers()
    assert (
        isinstance(opt, torch.optim.AdamW)
        and opt.defaults["betas"] == (0.8, 0.95)
        and opt.defaults["weight_decay"] == 0.01
    )
    paper = module().configure_optimizers()
    assert (
        type(paper) is torch.optim.Adam
        and paper.defaults["betas"] == (0.9, 0.999)
        and paper.defaults["weight_decay"] == 0
    )


def compose(*overrides):
    return schema.compose("config", overrides)


@pytest.mark.parametrize("model", ["simple", "improved"])
def test_the_paper_presets_leave_every_lever_off(model):
    cfg = compose(f"model={model}")
    r = cfg.recipe
    assert (r.loss_weighting, r.warmup_steps, r.lr_decay, r.grad_clip, r.dropout, list(r.betas), r.weight_decay) == (
        "none",
        0,
        "constant",
        None,
        0.0,
        [0.9, 0.999],
        0.0,
    )
    assert list(cfg.net.attention) == [32, 16, 8, 4] and cfg.model.lr == 1e-3


def test_the_cpu_presets_take_the_fast_attention_and_the_honest_sampler():
    for experiment in ("smoke", "paper_cpu", "cars_cpu"):
        cfg = compose(f"experiment={experiment}")
        assert list(cfg.net.attention) == [8, 4], experiment
        assert (cfg.sampler.name, cfg.sampler.eta) == ("ddim", 1.0), experiment
    assert compose("experiment=paper_cpu").recipe.loss_weighting == "none"  # paper_cpu keeps the paper's recipe
    assert compose("experiment=cars_cpu").recipe.timesteps == "uniform"  # the study's baseline: the paper's recipe
    five = compose("experiment=five_class_cpu")  # recipe=fast lost on the five classes (docs/results/five_class_cpu)
    assert (five.model.lr, five.recipe.timesteps) == (1e-3, "uniform")


def test_recipe_fast_is_what_paid_in_the_second_study_not_the_bundle_that_lost():
    """docs/results/recipes_cpu: twice the paper's learning rate and the log-SNR Laplace density paid alone; Min-SNR
    weights, the warm-up with cosine decay and clipping (the first study's bundle) did not."""
    fast, paper = compose("recipe=fast"), compose("recipe=paper")
    assert (fast.model.lr, fast.recipe.timesteps) == (2 * paper.model.lr, "laplace")
    assert dict(fast.recipe, timesteps="uniform") == dict(paper.recipe)  # nothing else changes
    assert compose("model=improved", "recipe=fast").model.lr == 2e-3  # the recipe comes after the model
    assert compose("recipe=fast", "model.lr=3e-3").model.lr == 3e-3  # and the command line after both


@pytest.mark.parametrize(
    "attention, runs_at",
    [
        pytest.param("[8,4]", [8, 4, 8], marks=pytest.mark.slow),  # 37 s each; test_golden rebuilds checkpoints
        pytest.param("[32,16,8,4]", [16, 8, 4, 8, 16, 32], marks=pytest.mark.slow),
    ],
    ids=["fast", "paper"],
)
def test_checkpoints_record_the_attention_and_the_levers(
    python, tmp_path, cifar_root, detector_file, attention, runs_at
):
    """A checkpoint of either placement rebuilds its own net in load_checkpoint, sample.py and evaluate.py."""
    from ddpm_lightning.module import load_checkpoint

    run_dir = tmp_path / "run"
    p = subprocess.run(
        [
            python,
            str(ROOT / "train.py"),
            "experiment=smoke",
            f"data.root={cifar_root}",
            "data.classes=[cat,ship]",
            "data.max_images=null",
            "data.batch_size=8",
            "trainer.max_epochs=1",
            "logger=csv",
            "recipe=fast",
            "recipe.dropout=0.1",
            f"net.attention={attention}",
            f"hydra.run.dir={run_dir}",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert p.returncode == 0, p.stderr[-3000:]
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    m = load_checkpoint(str(ckpt), device="cpu")
    assert attention_resolutions_of(m.net) == runs_at
    assert tuple(m.hparams.recipe[k] for k in ("loss_weighting", "lr_decay", "dropout")) == ("min_snr", "cosine", 0.1)
    p = subprocess.run(
        [
            python,
            str(ROOT / "sample.py"),
            f"ckpt={ckpt}",
            "n=2",
            f"out={tmp_path / 'samples'}",
            "sampler=ddim",
            "sampler.steps=2",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert p.returncode == 0 and (tmp_path / "samples" / "grid.png").is_file(), p.stderr[-3000:]
    p = subprocess.run(
        [
            python,
            str(ROOT / "evaluate.py"),
            f"ckpt={ckpt}",
            f"data.root={cifar_root}",
            f"metrics.inception_weights={detector_file}",
            "metrics.num_samples=10",
            "metrics.batch_size=10",
            "metrics.reference_images=20",
            f"metrics.cache_dir={tmp_path / 'cache'}",
            "logger=csv",
            "sampler=ddim",
            "sampler.steps=2",
            f"hydra.run.dir={tmp_path / 'eval'}",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert p.returncode == 0 and (tmp_path / "eval" / "results.json").is_file(), p.stderr[-3000:]


@pytest.mark.parametrize(
    "override, message",
    [
        (
            "net.attention=[8,3]",
            "net.attention=[8, 3] must be distinct resolutions of the net's blocks; choose from 32, 16, 8, 4",
        ),
        ("recipe.loss_weighting=snr", "recipe.loss_weighting=snr is not one of none, min_snr"),
        ("recipe.lr_decay=step", "recipe.lr_decay=step is not one of constant, cosine"),
        ("recipe.grad_clip=0", "recipe.grad_clip=0.0 must be > 0"),
        ("recipe.betas=[0.9]", "recipe.betas=[0.9] must be two numbers in [0, 1)"),
        ("recipe.dropout=1.0", "recipe.dropout=1.0 must be in [0, 1)"),
    ],
)
def test_bad_lever_settings_are_one_line(override, message):
    from ddpm_lightning import schema
    from ddpm_lightning.errors import ConfigError

    with pytest.raises(
        ConfigError, match=message.replace("[", r"\[").replace("]", r"\]").replace("(", r"\(").replace(")", r"\)")
    ):
        schema.check(compose(override), "config")


def test_old_checkpoints_without_the_settings_rebuild_the_paper_net():
    """A checkpoint written before net.attention existed has no such key: the net is the paper's, all six attentions."""
    m = module()
    assert "attention" not in m.hparams.net and attention_resolutions_of(m.net) == [16, 8, 4, 8, 16, 32]
