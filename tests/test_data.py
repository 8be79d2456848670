import pickle

import pytest
import torch
from conftest import SHARED

from ddpm_lightning.data import CIFARDataModule, EpochBatchSampler, load_subset, random_hflip, to_unit_range
from ddpm_lightning.errors import ConfigError


def test_subset_sizes_and_label_remapping(cifar_root):
    folder = cifar_root / "cifar-10-batches-py"
    images, labels = load_subset(folder, ["ship", "airplane", "cat"], "train")
    assert images.dtype == torch.uint8 and images.shape == (60, 3, 32, 32)
    assert torch.bincount(labels).tolist() == [20, 20, 20]
    # labels follow the listed order: ship -> 0, airplane -> 1, cat -> 2
    for new, name in enumerate(["ship", "airplane", "cat"]):
        assert torch.equal(images[labels == new], load_subset(folder, [name], "train")[0])
    assert len(load_subset(folder, ["automobile"], "test")[0]) == 10


def test_data_module_holds_one_uint8_tensor_and_batches(cifar_root):
    dm = CIFARDataModule(str(cifar_root), ["automobile", "cat"], batch_size=8)
    dm.setup("fit")
    assert dm.train_images.shape == (40, 3, 32, 32) and dm.num_classes == 2
    batches = list(dm.train_dataloader())
    assert len(batches) == 5 and all(x.shape == (8, 3, 32, 32) and x.dtype == torch.uint8 for x, _ in batches)
    seen = torch.cat([y for _, y in batches])
    assert sorted(seen.tolist()) == [0] * 20 + [1] * 20  # every image once per epoch


def test_epoch_batch_sampler_shards_ranks_without_overlap():
    shards = [list(EpochBatchSampler(100, 8, seed=3, rank=r, world_size=3)) for r in range(3)]
    assert all(len(s) == 100 // 24 for s in shards)
    flat = [i for s in shards for b in s for i in b]
    assert len(flat) == len(set(flat)) == 4 * 24
    a, b = EpochBatchSampler(100, 8, seed=3), EpochBatchSampler(100, 8, seed=3)
    b.set_epoch(1)
    assert list(a) != list(b)  # a new order each epoch


def test_batch_transforms():
    x = torch.tensor([0, 255], dtype=torch.uint8).view(1, 1, 1, 2).expand(1000, 3, 1, 2).contiguous()
    u = to_unit_range(x)
    assert u.min().item() == -1 and u.max().item() == 1
    flipped = random_hflip(u, generator=torch.Generator().manual_seed(0))
    rate = (flipped[:, 0, 0, 0] == 1).float().mean().item()
    assert rate == pytest.approx(0.5, abs=0.06)


def test_unknown_class_name(cifar_root):
    with pytest.raises(ConfigError, match=r"unknown class names \['car'\]; choose from airplane"):
        CIFARDataModule(str(cifar_root), ["car"])


def test_missing_dataset_without_download(tmp_path):
    dm = CIFARDataModule(str(tmp_path), ["cat"], download=False)
    with pytest.raises(ConfigError, match="CIFAR-10 not found at .* set data.root=PATH"):
        dm.setup("fit")


def test_missing_dataset_without_network(tmp_path):
    dm = CIFARDataModule(str(tmp_path), ["cat"], url="http://127.0.0.1:9/cifar-10-python.tar.gz")
    with pytest.raises(ConfigError, match="its download failed .* set data.root=PATH"):
        dm.setup("fit")


@pytest.mark.parametrize("damage", ["truncate", "garbage", "evil"])
def test_unreadable_files(cifar_root, damage):
    path = cifar_root / "cifar-10-batches-py" / "data_batch_3"
    if damage == "truncate":
        path.write_bytes(path.read_bytes()[:100])
    elif damage == "garbage":
        path.write_bytes(b"not a pickle at all")
    else:  # a pickle that would call a function when loaded
        path.write_bytes(pickle.dumps(print))
    with pytest.raises(ConfigError, match="cannot read CIFAR-10 file .*data_batch_3"):
        CIFARDataModule(str(cifar_root), ["cat"]).setup("fit")


def test_batch_larger_than_dataset(cifar_root):
    with pytest.raises(ConfigError, match="data.batch_size=64 is larger than the 20 training images"):
        CIFARDataModule(str(cifar_root), ["cat"], batch_size=64).setup("fit")


@pytest.mark.skipif(not (SHARED / "data/cifar10-five-class-jpeg").is_dir(), reason="../shared data not present")
def test_shared_five_class_copy_reads_as_it_is():
    folder = SHARED / "data/cifar10-five-class-jpeg/cifar-10-batches-py"
    images, labels = load_subset(folder, ["airplane", "automobile", "cat", "horse", "ship"], "train")
    assert images.shape == (25_000, 3, 32, 32)
    assert torch.bincount(labels).tolist() == [5000] * 5
    assert len(load_subset(folder, ["automobile"], "test")[0]) == 1000
