"""The LRA's image-like tasks, read pixel by pixel: Image (sequential CIFAR-10), Pathfinder and Path-X.

See datamodules/lra.py for the batch layout they share with the token tasks: (pixels [B, L, channels],
lengths [B], labels [B]), with L the image's pixels in row-major order.
"""

import os
from pathlib import Path

import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_warn
from PIL import Image
from torch.utils.data import Dataset

from datamodules.images import CIFAR10_MEAN, CIFAR10_STD, read_cifar10
from datamodules.lra import SPLITS, LRADataModule, parse_label

SPLIT_SEED = 42
"""Seed of the random splits where the release has none (CIFAR-10 validation, Pathfinder), as in S4."""


class PixelSequences(Dataset):
    """Images [N, H, W, C] uint8 read as pixel sequences [H * W, C] of (value / 255 - mean) / std.

    `augment` (training only) is the S4 CIFAR augmentation the HGRN2 image runs used: a random 32 x 32
    crop of the image padded by 4 (mirrored) pixels, and a horizontal flip half of the time.
    """

    def __init__(self, images: np.ndarray, labels: np.ndarray, mean: tuple[float, ...], std: tuple[float, ...],
                 augment: bool = False):
        self.images, self.labels, self.augment = images, labels, augment
        self.mean, self.std = torch.tensor(mean), torch.tensor(std)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, int]:
        image = torch.from_numpy(np.ascontiguousarray(self.images[index]))
        if self.augment:
            image = random_crop_and_flip(image, padding=4)
        return pixels_as_sequence(image, self.mean, self.std), image.shape[0] * image.shape[1], int(self.labels[index])


class PathfinderImages(Dataset):
    """Pathfinder PNGs, decoded when read, as pixel sequences [resolution^2, 1] with values in [0, 1]."""

    def __init__(self, paths: list[Path], labels: np.ndarray, resolution: int):
        self.paths, self.labels, self.resolution = paths, labels, resolution

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, int]:
        try:
            with Image.open(self.paths[index]) as file:
                image = np.asarray(file.convert("L"))
        except (OSError, SyntaxError, ValueError) as error:  # PIL's errors for truncated or foreign files
            raise ValueError(
                f"cannot read image {self.paths[index]}: {error}. Replace the file, or delete it and its line in "
                f"the metadata file"
            ) from error
        if image.shape != (self.resolution, self.resolution):
            raise ValueError(
                f"{self.paths[index]} is {image.shape[1]} x {image.shape[0]} px but data.resolution is "
                f"{self.resolution}: point data.root at the pathfinder{image.shape[0]} folder or set data.resolution"
            )
        pixels = pixels_as_sequence(torch.from_numpy(image.copy())[..., None], torch.zeros(1), torch.ones(1))
        return pixels, self.resolution**2, int(self.labels[index])


def pixels_as_sequence(image: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """[H, W, C] uint8 -> [H * W, C] float32, row by row."""
    return ((image.float() / 255 - mean) / std).flatten(0, 1)


def random_crop_and_flip(image: torch.Tensor, padding: int) -> torch.Tensor:
    """[H, W, C] -> a random H x W window of the image mirror-padded by `padding`, flipped left-right at random."""
    H, W, _ = image.shape
    padded = np.pad(image.numpy(), ((padding, padding), (padding, padding), (0, 0)), mode="symmetric")
    top, left = torch.randint(0, 2 * padding + 1, (2,)).tolist()
    window = torch.from_numpy(padded[top : top + H, left : left + W].copy())
    return window.flip(1) if torch.rand(()) < 0.5 else window


class SequentialCIFAR10DataModule(LRADataModule):
    """Image: CIFAR-10 classes from the 1024 pixels of an image, read row by row.

    LRA's task is grayscale (ITU-R 601 luma, as PIL computes it); the HGRN2
    image runs used RGB and augmentation. Validation is 10% of the training set, drawn with a fixed seed.
    """

    num_classes = 10
    grid = (32, 32)
    GRAY_MEAN, GRAY_STD = (122.6 / 255,), (61.0 / 255,)  # S4's

    def __init__(self, root: str, grayscale: bool = True, augment: bool = False, batch_size: int = 50,
                 num_workers: int = 0, seed: int = 0):
        """
        Args:
            root: the cifar-10-batches-py folder.
            grayscale: one gray value per pixel (LRA); False gives the three colour values.
            augment: random crops and flips of the training images.
            batch_size: images per batch on each device.
            num_workers: DataLoader worker processes.
            seed: seed of the per-epoch shuffle.
        """
        super().__init__(root, batch_size, num_workers, seed)
        self.grayscale, self.augment = grayscale, augment
        self.input_channels = 1 if grayscale else 3

    def load_splits(self) -> dict[str, Dataset]:
        train_images, train_labels = read_cifar10(self.root, "train")
        test_images, test_labels = read_cifar10(self.root, "test")
        if self.grayscale:
            train_images, test_images = to_grayscale(train_images), to_grayscale(test_images)
        order = np.random.default_rng(SPLIT_SEED).permutation(len(train_labels))
        train, val = order[: len(order) * 9 // 10], order[len(order) * 9 // 10 :]
        mean, std = (self.GRAY_MEAN, self.GRAY_STD) if self.grayscale else (CIFAR10_MEAN, CIFAR10_STD)
        sequences = lambda images, labels, augment=False: PixelSequences(images, labels, mean, std, augment)
        return {
            "train": sequences(train_images[train], train_labels[train], self.augment),
            "val": sequences(train_images[val], train_labels[val]),
            "test": sequences(test_images, test_labels),
        }


def to_grayscale(images: np.ndarray) -> np.ndarray:
    """RGB [..., 3] uint8 -> luma [..., 1] uint8, exactly as PIL's convert("L") (which torchvision's Grayscale,
    and so S4, uses): ITU-R 601's 0.299 R + 0.587 G + 0.114 B in 16-bit fixed point, rounded."""
    r, g, b = (images[..., c].astype(np.int32) for c in range(3))
    return ((r * 19595 + g * 38470 + b * 7471 + 0x8000) >> 16).astype(np.uint8)[..., None]


class PathfinderDataModule(LRADataModule):
    """Pathfinder (32 x 32) and Path-X (128 x 128): are the two dots joined by one of the dashed paths?

    Every line of `metadata/<n>.npy` (text, despite the name) describes one image: its folder, file
    name, index and label among other fields. The examples are split 80/10/10 with a fixed seed.
    Empty image files (the release has one) are left out, as LRA does.
    """

    num_classes = 2
    input_channels = 1

    def __init__(self, root: str, resolution: int = 32, difficulty: str = "curv_contour_length_14",
                 batch_size: int = 64, num_workers: int = 0, seed: int = 0):
        """
        Args:
            root: the pathfinder<resolution> folder of the release (pathfinder128 for Path-X).
            resolution: image side in pixels: 32 for Pathfinder, 128 for Path-X.
            difficulty: curv_contour_length_14 (hard, LRA's), curv_contour_length_9 or curv_baseline.
            batch_size: images per batch on each device.
            num_workers: DataLoader worker processes.
            seed: seed of the per-epoch shuffle.
        """
        super().__init__(root, batch_size, num_workers, seed)
        self.resolution, self.difficulty = resolution, difficulty
        self.grid = (resolution, resolution)
        self.layout = (
            f"{difficulty}/metadata/<n>.npy (text lines: folder, file name, index, label, ...) and "
            f"{difficulty}/imgs/<n>/sample_<k>.png (the release's pathfinder{resolution} folder)"
        )

    def load_splits(self) -> dict[str, Dataset]:
        paths, labels = self.read_metadata()
        order = np.random.default_rng(SPLIT_SEED).permutation(len(labels))
        cuts = [0, len(order) * 8 // 10, len(order) * 9 // 10, len(order)]
        return {
            split: PathfinderImages([paths[n] for n in order[a:b]], labels[order[a:b]], self.resolution)
            for split, a, b in zip(SPLITS, cuts[:-1], cuts[1:])
        }

    def read_metadata(self) -> tuple[list[Path], np.ndarray]:
        """Image paths and labels, in the order of the metadata files (by number) and their lines."""
        base = self.root / self.difficulty
        files = sorted(self.require(base / "metadata").glob("*.npy"), key=lambda p: (len(p.stem), p.stem))
        if not files:
            raise FileNotFoundError(f"{base / 'metadata'} holds no .npy files; expected {self.layout}")
        sizes: dict[Path, dict[str, int]] = {}  # folder -> file name -> bytes, one directory scan per folder
        paths, labels, empty = [], [], 0
        for file in files:
            for line, text in enumerate(file.read_text().splitlines(), start=1):
                fields = text.split()
                if not fields:
                    continue
                if len(fields) < 4:
                    raise ValueError(f"{file}, line {line}: expected at least 4 fields (folder, file, index, label)")
                folder = base / fields[0]
                if folder not in sizes:
                    sizes[folder] = {e.name: e.stat().st_size for e in os.scandir(folder)} if folder.is_dir() else {}
                if fields[1] not in sizes[folder]:
                    raise FileNotFoundError(f"{file}, line {line} names {folder / fields[1]}, which does not exist")
                if sizes[folder][fields[1]] == 0:
                    empty += 1
                    continue
                paths.append(folder / fields[1])
                labels.append(parse_label(fields[3].encode(), file, line, self.num_classes))
        if empty:
            rank_zero_warn(f"{base}: left out {empty} empty image file(s)")
        return paths, np.array(labels, dtype=np.int64)
