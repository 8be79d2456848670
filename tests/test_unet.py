import pytest
import torch

from ddpm_lightning.nets.unet import UNet


def n_params(m):
    return sum(p.numel() for p in m.parameters())


def test_paper_width_has_about_23_3M_parameters():
    assert n_params(UNet()) == pytest.approx(23.3e6, rel=0.01)
    # the class embedding adds (K + 1) x emb_dim for K classes plus the null class
    assert n_params(UNet(num_classes=5)) - n_params(UNet()) == 6 * 256


@pytest.mark.parametrize("size", [32, 64])
@pytest.mark.parametrize("num_classes", [None, 5])
def test_output_shape_equals_input_shape(size, num_classes):
    net = UNet(width=8, emb_dim=32, heads=2, num_classes=num_classes)
    x = torch.randn(2, 3, size, size)
    y = None if num_classes is None else torch.tensor([0, 5])  # 5 = null class
    assert net(x, torch.tensor([0, 499]), y).shape == x.shape


def test_labels_change_the_conditional_output_and_are_refused_by_the_unconditional():
    torch.manual_seed(0)
    net = UNet(width=8, emb_dim=32, heads=2, num_classes=3)
    x, t = torch.randn(1, 3, 32, 32), torch.tensor([10])
    assert not torch.allclose(net(x, t, torch.tensor([0])), net(x, t, torch.tensor([3])))
    with pytest.raises(ValueError, match="needs labels"):
        net(x, t)
    with pytest.raises(ValueError, match="takes no labels"):
        UNet(width=8, emb_dim=32, heads=2)(x, t, torch.tensor([0]))
