"""Speed options must not change the result: the same seeds give the same loss curve within noise, and compiled
sampling the images of the eager net."""

import sys

import pytest
import torch
from conftest import ROOT

sys.path.insert(0, str(ROOT / "bench"))
from speed_equivalence import compare, loss_curve  # noqa: E402


@pytest.mark.slow
def test_speed_options_give_the_loss_curve_of_the_all_off_path():
    result = compare(loss_curve(300, on=False), loss_curve(300, on=True))  # compile + channels_last + bf16 autocast
    assert result["learns"] and result["finite"], result
    assert result["within_noise"], result


@pytest.mark.slow
def test_compiled_sampling_gives_the_images_of_the_eager_net():
    """torch.compile with inductor (on a GPU: plus CUDA graphs) changes the float rounding only: at most one uint8 level."""
    from test_module import module

    torch.manual_seed(0)
    compiled, eager = module(speed=dict(compile=True)).eval(), module().eval()
    eager.load_state_dict(compiled.state_dict())
    labels = torch.tensor([0, 1] * 8)
    sampler = dict(name="dpm_solver", steps=10, spacing="quadratic")
    a, b = (
        m.sample(labels=labels, w=2.0, sampler=sampler, generator=torch.Generator().manual_seed(0))
        for m in (compiled, eager)
    )
    assert compiled.fast.compiled["sample"] is not compiled.net  # compiled, no eager fallback
    diff = (a.int() - b.int()).abs()
    assert diff.max() <= 1 and (diff == 0).float().mean() > 0.99
