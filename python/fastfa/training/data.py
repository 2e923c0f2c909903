"""Data for ``fastfa train``: scikit-learn's digits (no download), CIFAR-10's python batches, an ImageFolder.

Every epoch's order is a permutation drawn from (seed, epoch) alone, cut into global
batches of ``batch_size``; process ``rank`` of ``world`` takes its contiguous slice of each
global batch. So a run on N processes sees, step for step, the batches that one process
would see on the combined batch, and a run restarted at (epoch, step) continues exactly.
Random augmentation is keyed the same way (by seed, epoch, step or sample), never by a
generator whose state depends on what came before.
"""

from __future__ import annotations

import os
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

__all__ = ["Dataset", "load", "epoch_order", "steps_per_epoch"]

# Keys of the per-epoch generators: distinct odd multipliers keep (seed, epoch, step) apart.
_EPOCH_KEY = 1_000_003
_STEP_KEY = 7_919


def _key(*parts: int) -> int:
    value = 0
    for part in parts:
        value = (value * _EPOCH_KEY + int(part) + 1) % (2**62)
    return value


def _generator(*parts: int) -> torch.Generator:
    return torch.Generator().manual_seed(_key(*parts))


def epoch_order(size: int, seed: int, epoch: int) -> torch.Tensor:
    """The permutation of ``size`` training samples that epoch ``epoch`` visits."""
    return torch.randperm(size, generator=_generator(seed, epoch))


def steps_per_epoch(size: int, batch_size: int) -> int:
    # The last incomplete global batch is dropped: every step has the same batch size on every rank.
    return size // batch_size


@dataclass
class Dataset:
    """What the training loop needs to know about a dataset, and how to draw its batches."""

    name: str
    num_classes: int
    channels: int
    image_size: int
    train_size: int
    test_size: int
    source: object  # _InMemory or _Folder

    def train_batches(self, *, seed: int, epoch: int, start_step: int, batch_size: int, rank: int, world: int,
                      device, dtype, channels_last: bool):
        """(step, inputs, targets) of this rank from ``start_step`` to the end of the epoch."""
        return self.source.train_batches(seed=seed, epoch=epoch, start_step=start_step, batch_size=batch_size,
                                         rank=rank, world=world, device=device, dtype=dtype,
                                         channels_last=channels_last)

    def test_batches(self, *, batch_size: int, rank: int, world: int, device, dtype, channels_last: bool):
        """(inputs, targets) of this rank's share of the test set (every sample on exactly one rank)."""
        return self.source.test_batches(batch_size=batch_size, rank=rank, world=world, device=device, dtype=dtype,
                                        channels_last=channels_last)


def _to_device(inputs, targets, device, dtype, channels_last):
    inputs = inputs.to(device=device, dtype=dtype, non_blocking=True)
    if channels_last:
        inputs = inputs.contiguous(memory_format=torch.channels_last)
    return inputs, targets.to(device=device, non_blocking=True)


def _rank_slice(batch_size: int, rank: int, world: int) -> slice:
    local = batch_size // world
    return slice(rank * local, (rank + 1) * local)


class _InMemory:
    """Images held as one tensor (digits, CIFAR-10): batches are index gathers, no worker processes.

    ``images`` are uint8 (CIFAR) or float (digits) N x C x H x W; they are normalised per
    channel with the training set's mean and std when a batch is made. ``augment`` pads by
    4 and crops back at a random offset and flips half of the images (the usual CIFAR
    augmentation), with offsets and flips drawn for the whole global batch from
    (seed, epoch, step), so every rank uses the draws of its own slice.
    """

    def __init__(self, train_images, train_labels, test_images, test_labels, augment: bool, image_size: int):
        self.train_images, self.train_labels = train_images, train_labels
        self.test_images, self.test_labels = test_images, test_labels
        self.augment = augment
        self.image_size = image_size
        pixels = train_images.double()
        self.mean = pixels.mean(dim=(0, 2, 3), keepdim=True).float()
        self.std = pixels.std(dim=(0, 2, 3), keepdim=True).float().clamp_min(1e-6)

    def _prepare(self, images):
        images = (images.float() - self.mean) / self.std
        if images.shape[-1] != self.image_size:
            images = torch.nn.functional.interpolate(images, size=(self.image_size, self.image_size),
                                                     mode="bilinear", align_corners=False)
        return images

    def _augmented(self, images, generator):
        count, _, height, width = images.shape
        padded = torch.nn.functional.pad(images, (4, 4, 4, 4))
        rows = torch.randint(0, 9, (count,), generator=generator)
        cols = torch.randint(0, 9, (count,), generator=generator)
        flips = torch.rand(count, generator=generator) < 0.5
        out = torch.empty_like(images)
        for i in range(count):
            crop = padded[i, :, rows[i]:rows[i] + height, cols[i]:cols[i] + width]
            out[i] = crop.flip(-1) if flips[i] else crop
        return out

    def train_batches(self, *, seed, epoch, start_step, batch_size, rank, world, device, dtype, channels_last):
        order = epoch_order(len(self.train_labels), seed, epoch)
        part = _rank_slice(batch_size, rank, world)
        for step in range(start_step, steps_per_epoch(len(self.train_labels), batch_size)):
            indices = order[step * batch_size:(step + 1) * batch_size]
            images = self.train_images[indices]
            if self.augment:
                images = self._augmented(images, _generator(seed, epoch, _STEP_KEY, step))
            inputs = self._prepare(images[part])
            yield (step, *_to_device(inputs, self.train_labels[indices][part], device, dtype, channels_last))

    def test_batches(self, *, batch_size, rank, world, device, dtype, channels_last):
        indices = torch.arange(rank, len(self.test_labels), world)
        for start in range(0, len(indices), max(1, batch_size // world)):
            chosen = indices[start:start + max(1, batch_size // world)]
            yield _to_device(self._prepare(self.test_images[chosen]), self.test_labels[chosen], device, dtype,
                             channels_last)


def _digits(image_size: Optional[int]):
    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ImportError as error:
        raise RuntimeError("the default dataset (digits) needs scikit-learn: pip install scikit-learn "
                           "(or pip install 'fastfa[train]'), or pass --data DIR") from error
    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0  # 1797 x 1 x 8 x 8, 0..1
    labels = torch.tensor(digits.target, dtype=torch.int64)
    # One fixed, stratified split (not drawn from --seed): every run is tested on the same 450 images.
    train, test = train_test_split(torch.arange(len(labels)).numpy(), test_size=0.25, random_state=0,
                                   stratify=labels.numpy())
    train, test = torch.as_tensor(train), torch.as_tensor(test)
    size = image_size or 8
    source = _InMemory(images[train], labels[train], images[test], labels[test], augment=False, image_size=size)
    return Dataset("digits", 10, 1, size, len(train), len(test), source)


def _cifar_folder(path: Path) -> Optional[Path]:
    for candidate in (path, path / "cifar-10-batches-py"):
        if (candidate / "data_batch_1").is_file() and (candidate / "test_batch").is_file():
            return candidate
    return None


def _cifar(folder: Path, image_size: Optional[int]):
    def read(name):
        with open(folder / name, "rb") as f:
            batch = pickle.load(f, encoding="bytes")
        if b"data" not in batch or b"labels" not in batch:
            raise ValueError(f"--data: {folder / name} is not a CIFAR-10 python batch (no data / labels)")
        data = torch.as_tensor(batch[b"data"], dtype=torch.uint8).reshape(-1, 3, 32, 32)
        return data, torch.as_tensor(batch[b"labels"], dtype=torch.int64)

    names = sorted(p.name for p in folder.glob("data_batch_*"))
    parts = [read(name) for name in names]
    train_images = torch.cat([p[0] for p in parts])
    train_labels = torch.cat([p[1] for p in parts])
    test_images, test_labels = read("test_batch")
    size = image_size or 32
    source = _InMemory(train_images, train_labels, test_images, test_labels, augment=True, image_size=size)
    return Dataset("cifar10", 10, 3, size, len(train_labels), len(test_labels), source)


class _KeyedImages(torch.utils.data.Dataset):
    """An ImageFolder whose random transform is seeded per sample from (seed, epoch, index).

    Items are requested as (index, epoch) pairs; the draw of a sample then does not depend
    on which worker loads it or on what that worker loaded before, so a run restarted
    mid-way, or spread over other processes, transforms every image as the original did.
    """

    def __init__(self, folder, transform, seed: int):
        from torchvision.datasets import ImageFolder

        self.images = ImageFolder(str(folder))
        self.transform = transform
        self.seed = seed

    def __len__(self):
        return len(self.images)

    def __getitem__(self, key):
        index, epoch = key
        image, label = self.images[index]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(_key(self.seed, epoch, index))
            return self.transform(image), label


class _Folder:
    """ImageNet layout: DIR/train/<class>/*.jpg and DIR/val/<class>/*.jpg, decoded by DataLoader workers."""

    MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)

    def __init__(self, root: Path, image_size: int, seed: int, workers: int):
        from torchvision import transforms

        normalize = transforms.Normalize(self.MEAN, self.STD)
        train = transforms.Compose([transforms.RandomResizedCrop(image_size), transforms.RandomHorizontalFlip(),
                                    transforms.ToTensor(), normalize])
        test = transforms.Compose([transforms.Resize(round(image_size * 8 / 7)), transforms.CenterCrop(image_size),
                                   transforms.ToTensor(), normalize])
        self.train = _KeyedImages(root / "train", train, seed)
        self.test = _KeyedImages(root / "val", test, seed)
        if self.train.images.classes != self.test.images.classes:
            raise ValueError(f"--data: {root / 'train'} and {root / 'val'} must hold the same class folders")
        self.workers = workers

    def _loader(self, batches):
        return torch.utils.data.DataLoader(self.train if batches.train else self.test, batch_sampler=batches,
                                           num_workers=self.workers, pin_memory=torch.cuda.is_available())

    def train_batches(self, *, seed, epoch, start_step, batch_size, rank, world, device, dtype, channels_last):
        order = epoch_order(len(self.train), seed, epoch)
        part = _rank_slice(batch_size, rank, world)
        steps = range(start_step, steps_per_epoch(len(self.train), batch_size))
        plan = _Plan([[(int(i), epoch) for i in order[s * batch_size:(s + 1) * batch_size][part]] for s in steps],
                     train=True)
        for step, (inputs, targets) in zip(steps, self._loader(plan)):
            yield (step, *_to_device(inputs, targets, device, dtype, channels_last))

    def test_batches(self, *, batch_size, rank, world, device, dtype, channels_last):
        indices = list(range(rank, len(self.test), world))
        local = max(1, batch_size // world)
        plan = _Plan([[(i, 0) for i in indices[s:s + local]] for s in range(0, len(indices), local)], train=False)
        for inputs, targets in self._loader(plan):
            yield _to_device(inputs, targets, device, dtype, channels_last)


class _Plan:
    """A batch sampler that is just a list of batches (of (index, epoch) keys)."""

    def __init__(self, batches, train: bool):
        self.batches, self.train = batches, train

    def __iter__(self):
        return iter(self.batches)

    def __len__(self):
        return len(self.batches)


def load(data: Optional[str], *, image_size: Optional[int] = None, seed: int = 0, workers: int = 4) -> Dataset:
    """The dataset ``fastfa train`` uses: digits when ``data`` is None, else what DIR holds.

    DIR may hold CIFAR-10's python batches (data_batch_1..5 and test_batch, directly or
    in cifar-10-batches-py/) or an ImageFolder in ImageNet's layout (train/ and val/, one
    subfolder per class). ``image_size`` resizes (default: 8 for digits, 32 for CIFAR-10,
    224 for an ImageFolder).
    """
    if data is None:
        return _digits(image_size)
    root = Path(os.path.expanduser(data))
    if not root.is_dir():
        raise ValueError(f"--data: {data!r} is not a folder")
    cifar = _cifar_folder(root)
    if cifar is not None:
        return _cifar(cifar, image_size)
    if (root / "train").is_dir() and (root / "val").is_dir():
        size = image_size or 224
        source = _Folder(root, size, seed, workers)
        return Dataset(root.name, len(source.train.images.classes), 3, size, len(source.train), len(source.test),
                       source)
    raise ValueError(f"--data: {data!r} holds neither CIFAR-10's python batches (data_batch_1 ... and "
                     "test_batch) nor an ImageFolder (train/<class>/... and val/<class>/...)")
