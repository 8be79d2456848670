import copy

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import WeightAveraging
from torch.optim.swa_utils import get_ema_multi_avg_fn

from ddpm_lightning.callbacks import SampleGrid
from ddpm_lightning.data import CIFARDataModule
from ddpm_lightning.errors import ConfigError
from ddpm_lightning.module import DiffusionModule

NET = dict(width=8, emb_dim=32, heads=2)
SCHEDULE = dict(kind="linear", T=20)
SAMPLER = dict(name="ancestral", variance="beta")


def module(conditional=True, **kw):
    args = dict(net=NET, schedule=SCHEDULE, class_names=["cat", "ship"], conditional=conditional,
                p_uncond=0.1 if conditional else 0.0, guidance_w=1.0 if conditional else 0.0, sampler=SAMPLER)
    return DiffusionModule(**{**args, **kw})


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


@pytest.mark.parametrize("kw, match", [
    (dict(conditional=False, guidance_w=2.0, p_uncond=0.0), "unconditional model"),
    (dict(p_uncond=1.5), "guidance.p_uncond=1.5"),
    (dict(sampler=dict(name="euler")), "sampler='euler'"),
])
def test_bad_module_settings(kw, match):
    with pytest.raises(ConfigError, match=match):
        module(**kw)


def test_sample_argument_errors():
    with pytest.raises(ConfigError, match="needs the labels"):
        module().sample(n=2)
    with pytest.raises(ConfigError, match="takes no labels"):
        module(conditional=False).sample(n=2, w=1.0)


class RecordWeights(L.Callback):
    def on_validation_epoch_end(self, trainer, pl_module):
        if not trainer.sanity_checking:
            self.seen = copy.deepcopy(pl_module.net.state_dict())

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if batch_idx == 0:  # the EMA's first update copies the weights after the first step
            self.first_step = copy.deepcopy(pl_module.net.state_dict())

    def on_train_epoch_end(self, trainer, pl_module):
        self.training_weights = copy.deepcopy(pl_module.net.state_dict())


def test_sampling_callbacks_see_the_ema_weights(cifar_root, tmp_path):
    """With decay 1 the EMA stays at the weights after the first step: that is what the sampling callbacks see."""
    torch.manual_seed(0)
    m = module()
    probe = RecordWeights()
    trainer = L.Trainer(max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        use_distributed_sampler=False, limit_val_batches=1, default_root_dir=tmp_path,
                        callbacks=[probe, SampleGrid(n_per_class=1), WeightAveraging(multi_avg_fn=get_ema_multi_avg_fn(1.0))])
    trainer.fit(m, datamodule=CIFARDataModule(str(cifar_root), ["cat", "ship"], batch_size=8))
    first = probe.first_step
    assert all(torch.equal(probe.seen[k], first[k]) for k in first)
    assert not all(torch.equal(probe.training_weights[k], first[k]) for k in first)  # training did move them
    assert (tmp_path / "samples" / "epoch_0000.png").is_file()
