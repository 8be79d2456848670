import copy
import traceback
from pathlib import Path

import lightning as L
import pytest
import torch
from conftest import ROOT
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torch.utils._python_dispatch import TorchDispatchMode

from ddpm_lightning.callbacks import EMA, EMAModel, ProgressBar, SampleGrid, ema_decay, ema_multi_avg_fn
from ddpm_lightning.data import CIFARDataModule
from ddpm_lightning.testing import tiny_module

NET = dict(width=8, emb_dim=32, heads=2)
SCHEDULE = dict(kind="linear", T=20)
SAMPLER = dict(name="ancestral", variance="beta")


def module(conditional=True, **kw):
    return tiny_module(conditional, net=NET, schedule=SCHEDULE, sampler=SAMPLER, **kw)


def test_sample_gives_uint8_images_reproducibly():
    m = module()
    labels = torch.tensor([0, 1, 1])
    a = m.sample(labels=labels, generator=torch.Generator().manual_seed(0), batch_size=2)
    b = m.sample(labels=labels, generator=torch.Generator().manual_seed(0), batch_size=2)
    assert a.dtype == torch.uint8 and a.shape == (3, 3, 32, 32)
    assert torch.equal(a, b)
    assert not torch.equal(a, m.sample(labels=labels, w=3.0, generator=torch.Generator().manual_seed(0)))
    u = module(conditional=False).sample(n=2)
    assert u.shape == (2, 3, 32, 32)


class RecordWeights(L.Callback):
    def on_validation_epoch_end(self, trainer, pl_module):
        if not trainer.sanity_checking:
            self.seen = copy.deepcopy(pl_module.net.state_dict())

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if batch_idx == 0:  # the EMA's first update copies the weights after the first step
            self.first_step = copy.deepcopy(pl_module.net.state_dict())

    def on_train_epoch_end(self, trainer, pl_module):
        self.training_weights = copy.deepcopy(pl_module.net.state_dict())


def test_sampling_callbacks_see_the_ema_weights(cifar_root, tmp_path, monkeypatch):
    """The callbacks that train.py builds, in its order: with decay 1 the EMA stays at the weights after the first
    step, and that is what the sample grid draws from (FID takes the same place in the list)."""
    from ddpm_lightning.schema import compose
    from ddpm_lightning.train import build_callbacks, build_module

    cfg = compose(
        "config",
        [
            "experiment=smoke",
            "model=improved",
            f"data.root={cifar_root}",
            "data.classes=[cat,ship]",
            "data.max_images=null",
            "callbacks.sample_grid.n_per_class=1",
        ],
    )
    cfg.callbacks.ema.decay, cfg.callbacks.ema.warmup = 1.0, False
    seen = {}
    draw = SampleGrid.on_validation_epoch_end

    def recording(self, trainer, pl_module):
        seen.update({k: v.clone() for k, v in pl_module.net.state_dict().items()})
        return draw(self, trainer, pl_module)

    monkeypatch.setattr(SampleGrid, "on_validation_epoch_end", recording)
    torch.manual_seed(0)
    data = CIFARDataModule(str(cifar_root), ["cat", "ship"], batch_size=8)
    data.setup("fit")
    m = build_module(cfg, data.classes)
    probe = RecordWeights()
    callbacks = build_callbacks(cfg, data, tmp_path)
    trainer = L.Trainer(
        max_epochs=1,
        logger=L.pytorch.loggers.CSVLogger(tmp_path),
        enable_progress_bar=False,
        use_distributed_sampler=False,
        limit_val_batches=1,
        default_root_dir=tmp_path,
        callbacks=[probe, *[c for c in callbacks if not isinstance(c, ProgressBar)]],
    )
    trainer.fit(m, datamodule=data)
    first = probe.first_step
    assert seen and all(torch.equal(seen[k], first[k]) for k in first)
    assert not all(torch.equal(probe.training_weights[k], first[k]) for k in first)  # training did move them
    assert (tmp_path / "samples" / "epoch_0000.png").is_file()


def test_ema_model_equals_torchs_averaged_model():
    """The same updates as torch's AveragedModel (first a copy, then lerps), bit for bit, also after a reload."""
    torch.manual_seed(0)
    net = module().net
    ours, torchs = (cls(net, multi_avg_fn=get_ema_multi_avg_fn(0.9)) for cls in (EMAModel, AveragedModel))
    for step in range(4):
        with torch.no_grad():
            for p in net.parameters():
                p.add_(torch.randn_like(p))
        ours.update_parameters(net)
        torchs.update_parameters(net)
        if step == 1:  # a resumed run: a fresh EMAModel given the saved state reads its count once
            ours = EMAModel(net, multi_avg_fn=get_ema_multi_avg_fn(0.9))
            ours.load_state_dict(torchs.state_dict())
        assert all(
            torch.equal(a, b) for a, b in zip(ours.state_dict().values(), torchs.state_dict().values(), strict=False)
        )
    assert int(ours.n_averaged) == 4


def test_ema_warmup_follows_tensorflows_num_updates_decay():
    """decay_t = min(decay, (1 + n) / (10 + n)) after n updates; the first update copies; without warm-up, fixed."""
    n = torch.arange(0, 200_000)
    d = ema_decay(n, 0.9999, warmup=True)
    assert torch.equal(d, torch.clamp((1 + n) / (10 + n), max=0.9999))
    assert (
        d[1].item() == pytest.approx(2 / 11) and d[89_990].item() < 0.9999 and d[89_991].item() == pytest.approx(0.9999)
    )
    assert ema_decay(n, 0.9999, warmup=False) == 0.9999
    net = torch.nn.Linear(1, 1, bias=False)
    ema = EMAModel(net, multi_avg_fn=ema_multi_avg_fn(0.9999, warmup=True))
    expected = None
    for k in range(1, 40):  # the k-th update sees n = k - 1 earlier ones
        with torch.no_grad():
            net.weight.fill_(float(k))
        ema.update_parameters(net)
        decay = min(0.9999, k / (9 + k))
        expected = float(k) if expected is None else decay * expected + (1 - decay) * k
        assert ema.module.weight.item() == pytest.approx(expected, rel=1e-6)
    # the weight left on the initial parameters after 3,900 steps: 68% without warm-up, nothing with it
    assert 0.9999**3900 == pytest.approx(0.677, abs=1e-3)
    assert torch.prod(ema_decay(torch.arange(1, 3900, dtype=torch.float64), 0.9999, True)).item() < 1e-20


aten = torch.ops.aten
FROM_HOST = {aten.lift_fresh.default, aten.lift_fresh_copy.default, aten.scalar_tensor.default}


class HostTraffic(TorchDispatchMode):
    """Host-device traffic, as the ops that make it: "read" (the host reads a device value: .item(), bool(), int(),
    aten._local_scalar_dense), "from host" (a tensor made from Python data: torch.tensor, new_tensor, as_tensor
    (aten.lift_fresh) and torch.scalar_tensor; on a GPU a blocking copy from pageable memory) and "copy" (a copy
    between devices). On the CPU they are the same ops as on a GPU, so the guard holds there too. Each event keeps
    the line of this project that caused it."""

    def __init__(self):
        super().__init__()
        self.events = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is aten._local_scalar_dense.default:
            kind = "read"
        elif func in FROM_HOST:
            kind = "from host"
        elif func is aten._to_copy.default and kwargs.get("device") not in (None, args[0].device):
            kind = "copy"
        elif func is aten.copy_.default and args[0].device != args[1].device:
            kind = "copy"
        else:
            return func(*args, **kwargs)
        self.events.append((kind, str(func), caller()))
        return func(*args, **kwargs)

    def count(self, kind: str) -> int:
        return sum(k == kind for k, _, _ in self.events)


def caller() -> str:
    """The innermost frame of this repository's code (not tests/) that led to the op."""
    for frame in reversed(traceback.extract_stack()):
        if str(ROOT) in frame.filename and not any(p in frame.filename for p in ("/tests/", "/.venv/")):
            return f"{Path(frame.filename).name}:{frame.lineno} {frame.line}"
    return "outside this project"


class TrafficPerStep(L.Callback):
    """Host-device traffic per training step, from on_train_batch_start of the first callback in the list to
    on_train_batch_end of ``self.stop``, the last one (so the step, the other callbacks and the optimizer are inside)."""

    def __init__(self):
        self.steps, self.mode, self.stop = {}, None, StopCounting(self)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.mode = HostTraffic()
        self.mode.__enter__()


class StopCounting(L.Callback):
    def __init__(self, probe: TrafficPerStep):
        self.probe = probe

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.probe.mode.__exit__(None, None, None)
        self.probe.steps[trainer.global_step] = self.probe.mode


# recipe.immiscible is left out: its linear assignment is a host round trip by design (diffusion/loss.py), and on the
# CPU .numpy() and torch.from_numpy make no operator this guard could see
LEVERS = dict(
    loss_weighting="min_snr",
    warmup_steps=3,
    lr_decay="cosine",
    dropout=0.1,
    weight_decay=0.01,
    betas=(0.9, 0.99),
    timesteps="laplace",
)


@pytest.mark.parametrize("levers", [{}, LEVERS], ids=["paper", "every recipe lever"])
def test_training_steps_make_no_host_device_traffic_but_the_reads_the_design_names(cifar_root, tmp_path, levers):
    """The training step (forward, loss, the non-finite skip, logging), the optimizer, the EMA update and the
    progress bar queue their work: no tensor from host data, no copy between devices, and no read of a device value
    except where the design names one: the non-finite check (every nonfinite_check_every steps), the progress bar's
    loss (every refresh_rate steps) and the first EMA update (once); also with every lever of conf/recipe on (Min-SNR
    weights, the LR schedule, dropout, AdamW, gradient clipping, the log-SNR timestep density)."""
    torch.manual_seed(0)
    probe, bar = TrafficPerStep(), ProgressBar(refresh_rate=7)
    trainer = L.Trainer(
        max_steps=12,
        logger=False,
        enable_checkpointing=False,
        use_distributed_sampler=False,
        limit_val_batches=0,
        default_root_dir=tmp_path,
        log_every_n_steps=50,
        callbacks=[probe, EMA(0.9), bar, probe.stop],
        gradient_clip_val=1.0 if levers else None,
    )
    trainer.fit(
        module(nonfinite_check_every=5, recipe=levers),
        datamodule=CIFARDataModule(str(cifar_root), ["cat", "ship"], batch_size=4),
    )
    first = [e for e in probe.steps[1].events if e[0] != "read"]
    assert all("self.log(" in e[2] for e in first), first  # Lightning's logging state, made once at the first step
    other = [(s, e) for s, mode in probe.steps.items() if s > 1 for e in mode.events if e[0] != "read"]
    assert not other, other
    reads = {step: mode.count("read") for step, mode in probe.steps.items() if mode.count("read")}
    # step 1: the EMA's count and the bar's first loss; 5, 10: the non-finite check; 7: a refresh of the bar
    assert reads == {1: 2, 5: 1, 7: 1, 10: 1}, {s: m.events for s, m in probe.steps.items()}
    assert isinstance(bar.loss, float) and len(probe.steps) == 12


@pytest.mark.parametrize("sampler", [SAMPLER, dict(name="ddim", steps=5, eta=1.0, spacing="quadratic"),
                                     dict(name="dpm_solver", steps=5, spacing="uniform"), dict(SAMPLER, clip_x0=True),
                                     dict(name="ddim", steps=5, eta=1.0, spacing="quadratic", clip_x0=True),
                                     dict(name="dpm_solver", steps=5, spacing="uniform", clip_x0=True)],
                         ids=lambda s: s["name"] + ("_clip_x0" if s.get("clip_x0") else ""))  # fmt: skip
def test_sampler_steps_make_no_host_device_traffic(sampler):
    """After the set-up of a batch (its noise, the sampler's coefficients), each step of each sampler, guidance
    included, makes no tensor from host data, copies nothing between devices and reads nothing back."""
    m, labels = module().eval(), torch.tensor([0, 1, 1])
    per_step, mode = [], HostTraffic()

    def next_step(i, x):
        per_step.append(mode.events[:])
        mode.events.clear()

    with mode:
        m.sample(labels=labels, w=2.0, sampler=sampler, generator=torch.Generator().manual_seed(0), callback=next_step)
    assert len(per_step) == sampler.get("steps", SCHEDULE["T"])
    assert not [e for events in per_step[1:] for e in events], per_step[1:]


def test_sampling_is_one_graph_with_static_shapes(monkeypatch):
    """With compile=True every step of every sampler calls one whole-net graph with the same shapes: no graph
    break (fullgraph), no recompilation from step to step (what CUDA graphs need to capture it on a GPU), and the
    samples of the eager net. Dynamo's capture is real; its "eager" backend stands in for inductor's code
    generation, which takes minutes on this CPU (the slow test in test_speed.py runs it)."""
    compiled, real_compile = [], torch.compile

    def compile_eagerly(net, backend="inductor", mode=None, fullgraph=False, dynamic=None):
        compiled.append(mode)
        return real_compile(net, backend="eager", fullgraph=fullgraph, dynamic=dynamic)

    monkeypatch.setattr(torch, "compile", compile_eagerly)
    torch._dynamo.reset()
    torch.manual_seed(0)
    m, eager = module(speed=dict(compile=True)).eval(), module().eval()
    eager.load_state_dict(m.state_dict())
    labels = torch.tensor([0, 1, 1, 0])
    with torch._dynamo.config.patch(error_on_recompile=True):
        for sampler in [
            SAMPLER,
            dict(name="ddim", steps=5, spacing="quadratic"),
            dict(name="dpm_solver", steps=5, spacing="quadratic"),
        ]:
            a = m.sample(labels=labels, w=2.0, sampler=sampler, generator=torch.Generator().manual_seed(0))
            b = eager.sample(labels=labels, w=2.0, sampler=sampler, generator=torch.Generator().manual_seed(0))
            assert torch.equal(a, b), sampler
    assert (
        compiled == [None] and m.fast.compiled["sample"] is not m.net
    )  # compiled once, no eager fallback; on a GPU in mode reduce-overhead
