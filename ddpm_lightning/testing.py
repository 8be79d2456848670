"""Helpers that tests and benchmarks share, outside the runtime path: a small DiffusionModule built from the config
groups' paper values, and a random FID Inception state dict (neither needs files or downloads)."""

import torch

PAPER_RECIPE = dict(
    loss_weighting="none",
    snr_gamma=5.0,
    warmup_steps=0,
    lr_decay="constant",
    grad_clip=None,
    dropout=0.0,
    betas=[0.9, 0.999],
    weight_decay=0.0,
    timesteps="uniform",
    timestep_center=0.0,
    timestep_width=2.0,
    immiscible=False,
)
EAGER = dict(compile=False, channels_last=False, bf16_sampling=False)


def tiny_module(
    conditional: bool = False,
    class_names: list[str] | None = None,
    net: dict | None = None,
    schedule: dict | None = None,
    sampler: dict | None = None,
    recipe: dict | None = None,
    speed: dict | None = None,
    p_uncond: float | None = None,
    w: float | None = None,
    lr: float = 1e-3,
    **kwargs,
):
    """A DiffusionModule of width 8 on T = 20 steps (each group's given keys replace these), conditional or not."""
    from ddpm_lightning.module import DiffusionModule

    guidance = {
        "p_uncond": (0.1 if conditional else 0.0) if p_uncond is None else p_uncond,
        "w": (1.0 if conditional else 0.0) if w is None else w,
    }
    return DiffusionModule(
        net={"width": 8, "emb_dim": 32, "heads": 2, **(net or {})},
        schedule={"kind": "linear", "T": 20, **(schedule or {})},
        guidance=guidance,
        recipe={**PAPER_RECIPE, **(recipe or {})},
        speed={**EAGER, **(speed or {})},
        sampler=sampler or {"name": "ddim", "steps": 2, "eta": 0.0, "spacing": "uniform"},
        class_names=class_names or (["cat", "ship"] if conditional else ["cat"]),
        conditional=conditional,
        lr=lr,
        **kwargs,
    )


def random_inception_state(seed: int = 0, classifier: bool = True) -> dict:
    """A randomly initialised FID Inception state dict in torch-fidelity's layout (He-normal convolutions, so that
    features keep their scale): for tests and throughput benchmarks, which must not need the real weights."""
    from unittest import mock

    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    with (
        mock.patch("torch_fidelity.feature_extractor_inceptionv3.torch.load", return_value={}),
        mock.patch.object(FeatureExtractorInceptionV3, "load_state_dict", lambda self, sd: None),
    ):
        arch = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"], feature_extractor_weights_path="unused")
    g = torch.Generator().manual_seed(seed)
    state = {}
    for name, value in arch.state_dict().items():
        if name.endswith("conv.weight"):
            value = torch.randn(value.shape, generator=g) * (2 / value[0].numel()) ** 0.5
        elif name == "fc.weight":
            value = torch.randn(value.shape, generator=g) * 0.05
        if classifier or not name.startswith("fc."):
            state[name] = value
    return state
