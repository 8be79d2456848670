"""CIFAR-10 in its standard python format, class subsets held as one uint8 tensor, batch-level transforms."""

import pickle
from pathlib import Path

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from ddpm_lightning.errors import ConfigError

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_MD5 = "c58f30108f718f92721af3b95e74349a"
FOLDER = "cifar-10-batches-py"
SPLIT_FILES = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """CIFAR-10's batches are pickles of numpy arrays and lists: refuse any other global."""

    ALLOWED = {
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
    }

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"unexpected object {module}.{name}")
        return super().find_class(module, name)


def _load_batch(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            return _NumpyOnlyUnpickler(f, encoding="latin1").load()
    except FileNotFoundError:
        raise ConfigError(
            f"CIFAR-10 file {path} is missing; restore it or delete {path.parent} so it is downloaded again"
        ) from None
    except Exception as e:  # truncated, corrupt or not a CIFAR pickle at all
        raise ConfigError(
            f"cannot read CIFAR-10 file {path} ({type(e).__name__}: {e}); replace it, or delete {path.parent} so it is downloaded again"
        ) from None


def ensure_cifar10(root: str | Path, download: bool = True, url: str = CIFAR10_URL) -> Path:
    """The ``cifar-10-batches-py`` folder under root; downloads and checks the official archive if absent.

    An existing copy is read as it is (copies made elsewhere have other checksums).
    """
    folder = Path(root) / FOLDER
    if folder.is_dir():
        return folder
    hint = f"put CIFAR-10 in its python format at {folder} or set data.root=PATH to an existing copy"
    if not download:
        raise ConfigError(f"CIFAR-10 not found at {folder} and data.download=false; {hint}")
    from torchvision.datasets.utils import download_and_extract_archive

    try:
        download_and_extract_archive(url, download_root=str(root), md5=CIFAR10_MD5)
    except Exception as e:  # no network, refused connection, bad checksum
        raise ConfigError(
            f"CIFAR-10 not found at {folder} and its download failed ({type(e).__name__}: {e}); {hint}"
        ) from None
    if not folder.is_dir():
        raise ConfigError(f"the archive from {url} did not contain {FOLDER}/; {hint}")
    return folder


def class_indices(classes: list[str]) -> list[int]:
    """CIFAR-10 label numbers of the named classes, in the listed order."""
    unknown = [c for c in classes if c not in CIFAR10_CLASSES]
    if unknown or not classes:
        raise ConfigError(
            f"data.classes has unknown class names {unknown or classes}; choose from {', '.join(CIFAR10_CLASSES)}"
        )
    if len(set(classes)) != len(classes):
        raise ConfigError(f"data.classes lists a class twice ({list(classes)}); list each class once")
    return [CIFAR10_CLASSES.index(c) for c in classes]


def load_subset(folder: Path, classes: list[str], split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Images (N, 3, 32, 32) uint8 and labels remapped to 0..K-1 in the order of ``classes``."""
    wanted = class_indices(classes)
    meta = _load_batch(folder / "batches.meta")
    names = list(meta.get("label_names", []))
    if names[: len(CIFAR10_CLASSES)] != list(CIFAR10_CLASSES):
        raise ConfigError(
            f"{folder / 'batches.meta'} lists classes {names}, not CIFAR-10's; point data.root at a CIFAR-10 copy"
        )
    remap = np.full(len(CIFAR10_CLASSES), -1, dtype=np.int64)
    remap[wanted] = np.arange(len(wanted))
    images, labels = [], []
    for name in SPLIT_FILES[split]:
        batch = _load_batch(folder / name)
        try:
            data = np.asarray(batch["data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
            y = remap[np.asarray(batch["labels"], dtype=np.int64)]
        except (KeyError, ValueError, IndexError) as e:
            raise ConfigError(
                f"CIFAR-10 file {folder / name} is malformed ({e}); replace it or delete {folder} to download again"
            ) from None
        keep = y >= 0
        images.append(data[keep])
        labels.append(y[keep])
    counts = np.bincount(np.concatenate(labels), minlength=len(wanted))
    missing = [c for c, n in zip(classes, counts, strict=True) if n == 0]
    if missing:
        raise ConfigError(
            f"{folder} has no {split} images of {', '.join(missing)} (data.classes: {', '.join(classes)}); point "
            "data.root at a CIFAR-10 copy that holds them, or leave them out of data.classes"
        )
    return torch.from_numpy(np.concatenate(images)), torch.from_numpy(np.concatenate(labels))


def step_seed(seed: int, step: int, rank: int, stream: int = 0, micro: int = 0) -> int:
    """A seed for one training step on one rank: the randomness of a step (noise, t, label drops, flips) is a
    function of (seed, step, rank, stream) and, under trainer.accumulate_grad_batches, the batch's place ``micro`` in
    the update, so a resumed run draws what the uninterrupted one would and ranks draw differently, with no
    generator state to checkpoint."""
    return hash((seed, step, rank, stream) + ((micro,) if micro else ())) & (2**63 - 1)


def to_unit_range(x: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] -> float [-1, 1]."""
    return x.float() / 127.5 - 1


def random_hflip(x: torch.Tensor, p: float = 0.5, generator: torch.Generator | None = None) -> torch.Tensor:
    """Flip each image of the batch horizontally with probability p, in one batched op."""
    flip = torch.rand(x.shape[0], device=x.device, generator=generator) < p
    return torch.where(flip[:, None, None, None], x.flip(-1), x)


class _IndexBatches(Dataset):
    """Indexed with a whole list of indices at once: one gather per batch, no per-image Python."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor):
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, idx: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.as_tensor(idx).to(self.images.device, non_blocking=True)
        return self.images[idx], self.labels[idx]


class EpochBatchSampler(Sampler):
    """A fresh permutation every epoch (seed + epoch, the same on every rank), cut into global batches of
    batch_size x world_size; each rank takes its slice. Incomplete batches are dropped. ``resume_at`` makes the
    next pass over that epoch start after the batches already trained on."""

    def __init__(self, n: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1):
        self.n, self.batch_size, self.seed, self.rank, self.world_size = n, batch_size, seed, rank, world_size
        self.epoch = 0
        self._resume = None

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def resume_at(self, epoch: int, batches_done: int) -> None:
        self._resume = (epoch, batches_done)

    def __len__(self) -> int:
        return self.n // (self.batch_size * self.world_size)

    def __iter__(self):
        perm = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + self.epoch))
        global_batch = self.batch_size * self.world_size
        skip = self._resume[1] if self._resume and self._resume[0] == self.epoch else 0
        self._resume = None
        for start in range(skip * global_batch, len(self) * global_batch, global_batch):
            yield perm[start + self.rank * self.batch_size : start + (self.rank + 1) * self.batch_size].tolist()


class ResumableLoader(DataLoader):
    """The training loader, with its place in the epoch in every checkpoint (Lightning's state_dict protocol for
    loaders), so that a mid-epoch resume neither repeats nor skips a batch."""

    def __init__(self, dataset: Dataset, sampler: EpochBatchSampler, batches_done):
        super().__init__(dataset, sampler=sampler, batch_size=None)
        self.batches_done = batches_done

    def state_dict(self) -> dict:
        return {"epoch": self.sampler.epoch, "batches_done": self.batches_done()}

    def load_state_dict(self, state: dict) -> None:
        self.sampler.resume_at(state["epoch"], state["batches_done"])


class CIFARDataModule(L.LightningDataModule):
    """A CIFAR-10 class subset: train split for training, test split for the validation loss."""

    def __init__(
        self,
        root: str,
        classes: list[str],
        batch_size: int = 64,
        flip: bool = True,
        download: bool = True,
        url: str = CIFAR10_URL,
        max_images: int | None = None,
        seed: int = 0,
    ):
        super().__init__()
        class_indices(list(classes))
        if batch_size < 1:
            raise ConfigError(f"data.batch_size={batch_size} must be at least 1")
        self.root, self.classes, self.batch_size, self.flip = root, list(classes), batch_size, flip
        self.download, self.url, self.max_images, self.seed = download, url, max_images, seed
        self.train_images = None

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def prepare_data(self) -> None:
        if self.train_images is None:  # already read: nothing to fetch
            ensure_cifar10(self.root, self.download, self.url)

    def setup(self, stage: str | None = None) -> None:
        if self.train_images is not None:
            return
        folder = ensure_cifar10(self.root, self.download, self.url)
        self.train_images, self.train_labels = load_subset(folder, self.classes, "train")
        self.test_images, self.test_labels = load_subset(folder, self.classes, "test")
        if self.max_images is not None:
            self.train_images, self.train_labels = (
                self.train_images[: self.max_images],
                self.train_labels[: self.max_images],
            )
            self.test_images, self.test_labels = (
                self.test_images[: self.max_images],
                self.test_labels[: self.max_images],
            )
        n = len(self.train_labels)
        if self.batch_size > n:
            raise ConfigError(
                f"data.batch_size={self.batch_size} is larger than the {n} training images of {self.classes}; lower data.batch_size"
            )

    def _rank_world(self) -> tuple[int, int]:
        return (self.trainer.global_rank, self.trainer.world_size) if self.trainer is not None else (0, 1)

    def _resident(self, images: torch.Tensor, labels: torch.Tensor) -> _IndexBatches:
        """The subset on the training device (a GPU holds CIFAR-10 whole), gathered a batch at a time there."""
        device = self.trainer.strategy.root_device if self.trainer is not None else torch.device("cpu")
        return _IndexBatches(images.to(device), labels.to(device))

    def train_dataloader(self) -> DataLoader:
        rank, world = self._rank_world()
        sampler = EpochBatchSampler(len(self.train_labels), self.batch_size, self.seed, rank, world)
        return ResumableLoader(
            self._resident(self.train_images, self.train_labels),
            sampler,
            batches_done=lambda: self.trainer.fit_loop.epoch_loop.batch_progress.current.processed,
        )

    def val_dataloader(self) -> DataLoader:
        rank, world = self._rank_world()  # every rank its own contiguous share, whole batches in order
        share = torch.arange(len(self.test_labels)).tensor_split(world)[rank]
        batches = [b.tolist() for b in share.split(self.batch_size)]
        return DataLoader(self._resident(self.test_images, self.test_labels), sampler=batches, batch_size=None)

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        """Scaling to [-1, 1] and random flips (p = 0.5) on the whole batch, on the training device."""
        x, y = batch
        x = to_unit_range(x)
        trainer = self.trainer
        if self.flip and trainer is not None and trainer.training:
            micro = (
                trainer.fit_loop.epoch_loop.batch_idx + 1
            ) % trainer.accumulate_grad_batches  # this batch's, before ready
            seed = step_seed(self.seed, trainer.global_step, trainer.global_rank, stream=1, micro=micro)
            g = torch.Generator(x.device).manual_seed(seed)
            x = random_hflip(x, generator=g)
        return x, y
