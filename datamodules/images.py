"""Images for classification: ImageNet's folder layout, CIFAR-10's python batches, and generated shapes.

- ImageNet (and any dataset in its layout): `root/train/<class>/*.JPEG` and `root/val/<class>/*.JPEG`;
  the class folders (ImageNet's wnids) sorted by name give the label numbers.
- CIFAR-10: the python version's pickled batches, `cifar-10-batches-py/data_batch_1..5` and `test_batch`.
- Shapes: a small task drawn here (circles, rings, squares, ... of random size, place, colours and
  noise), written once in the ImageNet layout to a cache folder, so the demo needs no download.
Training uses DeiT's augmentation through timm (random-resized crop, flip, RandAugment, random erasing)
and repeated augmentation; evaluation resizes and centre-crops. Mixup lives in the model's training step.
"""

import os
import pickle
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from PIL import Image, ImageDraw
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, create_transform
from torch.utils.data import Dataset

from datamodules.sampling import ShardedDataModule, resumable_loader

IMAGE_EXTENSIONS = {".jpeg", ".jpg", ".png", ".bmp", ".webp", ".ppm", ".tif", ".tiff"}
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
CIFAR10_LAYOUT = (
    "the python version of CIFAR-10 (cifar-10-python.tar.gz, extracted): a folder cifar-10-batches-py "
    "holding data_batch_1 ... data_batch_5 and test_batch"
)
IMAGENET_LAYOUT = "root/train/<class>/*.JPEG and root/val/<class>/*.JPEG (one folder per class, e.g. n01440764)"


@dataclass
class Augmentation:
    """Train-time augmentation and the evaluation crop (timm's `create_transform`); defaults are DeiT's."""

    crop_scale: tuple[float, float] = (0.08, 1.0)
    """Area range of the random-resized crop, as a fraction of the image."""
    hflip: float = 0.5
    auto_augment: str | None = "rand-m9-mstd0.5-inc1"
    """timm's policy string (RandAugment: 2 ops of magnitude 9, noise 0.5, increasing set); None: off."""
    color_jitter: float = 0.4
    """Colour jitter strength; timm applies it only when auto_augment is off. 0: off."""
    random_erasing: float = 0.25
    """Chance to erase a random rectangle with per-pixel noise."""
    interpolation: Literal["bicubic", "bilinear", "nearest"] = "bicubic"
    eval_crop_fraction: float = 0.875
    """Evaluation resizes to image_size / this, then centre-crops image_size (224 / 0.875 = 256)."""
    mean: tuple[float, float, float] = IMAGENET_DEFAULT_MEAN
    std: tuple[float, float, float] = IMAGENET_DEFAULT_STD

    def __post_init__(self) -> None:
        low, high = self.crop_scale
        if not 0 < low <= high <= 1:
            raise ValueError(f"augment.crop_scale must satisfy 0 < low <= high <= 1, got {self.crop_scale}")
        if not 0 < self.eval_crop_fraction <= 1:
            raise ValueError(f"augment.eval_crop_fraction must be in (0, 1], got {self.eval_crop_fraction}")
        if not 0 <= self.random_erasing <= 1 or not 0 <= self.hflip <= 1:
            raise ValueError("augment.random_erasing and augment.hflip are probabilities in [0, 1]")

    def transform(self, image_size: int, train: bool):
        """PIL image -> normalised float tensor [3, image_size, image_size]."""
        if not train:
            return create_transform(
                image_size, is_training=False, interpolation=self.interpolation,
                crop_pct=self.eval_crop_fraction, mean=self.mean, std=self.std,
            )
        return create_transform(
            image_size, is_training=True, scale=self.crop_scale, hflip=self.hflip,
            auto_augment=self.auto_augment, color_jitter=self.color_jitter or None,
            interpolation=self.interpolation, re_prob=self.random_erasing, re_mode="pixel", re_count=1,
            mean=self.mean, std=self.std,
        )


class ImageFiles(Dataset):
    """(transformed image, label) from a list of (path, label). Unreadable files raise, or are skipped."""

    def __init__(self, samples: list[tuple[str, int]], transform, on_bad_image: Literal["error", "skip"] = "error"):
        self.samples, self.transform, self.on_bad_image = samples, transform, on_bad_image
        self.skipped: set[str] = set()
        """Unreadable files met so far by this process (each DataLoader worker keeps its own)."""

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        # A skipped file is replaced by the next readable one, so batches keep their size.
        for offset in range(len(self.samples)):
            path, label = self.samples[(index + offset) % len(self.samples)]
            try:
                with Image.open(path) as file:
                    image = file.convert("RGB")
            except (OSError, SyntaxError, ValueError) as error:  # PIL's errors for truncated or foreign files
                if self.on_bad_image == "error":
                    # ValueError: the CLI reports a user's data error as its message alone, without a traceback.
                    raise ValueError(
                        f"cannot read image {path}: {error}. Replace or delete the file, or set "
                        f"data.on_bad_image skip to skip unreadable images with a warning"
                    ) from error
                if path not in self.skipped:
                    self.skipped.add(path)
                    warnings.warn(f"skipping unreadable image {path} ({error}); {len(self.skipped)} skipped so far")
                continue
            return self.transform(image), label
        raise ValueError(f"none of the {len(self.samples)} images could be read: check the dataset files")


class ImageArrays(Dataset):
    """(transformed image, label) from in-memory uint8 images [N, H, W, 3] (CIFAR)."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, transform):
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.transform(Image.fromarray(self.images[index])), int(self.labels[index])


class ImageClassificationData(ShardedDataModule):
    """What the image DataModules share: transforms, and loaders sharded by rank, resumable mid-epoch,
    with repeated augmentation for training. Subclasses set `classes` (names, in label order) and `num_classes`,
    and fill `datasets` in setup."""

    classes: list[str]
    num_classes: int

    def __init__(
        self,
        image_size: int,
        batch_size: int,
        eval_batch_size: int | None,
        augment: Augmentation,
        repeated_augmentation: int,
        num_workers: int,
        seed: int,
    ):
        super().__init__()
        if image_size < 1 or batch_size < 1 or (eval_batch_size is not None and eval_batch_size < 1):
            raise ValueError(
                f"data.image_size, data.batch_size and data.eval_batch_size must be positive, got "
                f"{image_size}, {batch_size} and {eval_batch_size}"
            )
        if repeated_augmentation < 1:
            raise ValueError(f"data.repeated_augmentation is a number of copies (1: off), got {repeated_augmentation}")
        self.image_size, self.batch_size = image_size, batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.augment, self.repeated_augmentation = augment, repeated_augmentation
        self.num_workers, self.seed = num_workers, seed
        self.datasets: dict[str, Dataset] = {}

    def _loader(self, split: str, train: bool):
        if split not in self.datasets:
            self.setup("fit" if train else "validate")
        return resumable_loader(
            self.datasets[split],
            batch_size=self.batch_size if train else self.eval_batch_size,
            shuffle=train,
            seed=self.seed,
            trainer=self.trainer,
            train=train,
            repeats=self.repeated_augmentation,
            num_workers=self.num_workers,
        )

    def state_dict(self) -> dict:
        """Checkpoints keep the class names in label order, so that evaluating or resuming on other data is caught."""
        return {"classes": list(self.classes)}

    def load_state_dict(self, state: dict) -> None:
        """A checkpoint trained on other classes (or the same ones in another order: label n is another class) is
        refused; the model only checks their count."""
        trained = state.get("classes")
        if trained is not None and trained != list(self.classes):
            first = next((n for n, (a, b) in enumerate(zip(trained, self.classes)) if a != b), None)
            where = (f"label {first} is {trained[first]!r} there and {self.classes[first]!r} here" if first is not None
                     else f"{len(trained)} classes there, {len(self.classes)} here")
            raise ValueError(
                f"the checkpoint was trained on other classes than the data's ({where}): evaluate or resume on the "
                f"dataset it was trained on (the same class folders)"
            )


class ImageNetDataModule(ImageClassificationData):
    """ImageNet-1k (or any dataset in its class-folder layout) with DeiT's augmentation; test = val."""

    def __init__(
        self,
        root: str,
        image_size: int = 224,
        batch_size: int = 128,
        eval_batch_size: int | None = None,
        augment: Augmentation = Augmentation(),
        repeated_augmentation: int = 3,
        on_bad_image: Literal["error", "skip"] = "error",
        num_workers: int = 8,
        seed: int = 0,
    ):
        """
        Args:
            root: the folder holding train/ and val/, each with one sub-folder of images per class.
            image_size: side of the square training crop and evaluation crop.
            batch_size: training images per batch on each device.
            eval_batch_size: evaluation images per batch on each device; None: batch_size.
            augment: the training augmentation and evaluation crop.
            repeated_augmentation: copies of each image per epoch, each augmented on its own (DeiT: 3; 1: off).
            on_bad_image: an unreadable image stops the run ("error") or is skipped with a warning ("skip").
            num_workers: DataLoader worker processes per device.
            seed: seed of the per-epoch shuffle.
        """
        super().__init__(image_size, batch_size, eval_batch_size, augment, repeated_augmentation, num_workers, seed)
        if on_bad_image not in ("error", "skip"):
            raise ValueError(f'data.on_bad_image must be "error" or "skip", got {on_bad_image!r}')
        self.save_hyperparameters()
        self.root, self.on_bad_image = Path(root).expanduser(), on_bad_image  # "~/..." from a YAML file, as LRA's
        self.classes = class_folders(self.root, "train")
        val_classes = class_folders(self.root, "val")
        if val_classes != self.classes:
            only_train = sorted(set(self.classes) - set(val_classes))
            only_val = sorted(set(val_classes) - set(self.classes))
            raise ValueError(
                f"{self.root}/train and {self.root}/val must have the same class folders; only in train: "
                f"{only_train[:5]}{'...' if len(only_train) > 5 else ''}, only in val: {only_val[:5]}"
                f"{'...' if len(only_val) > 5 else ''}"
            )
        self.num_classes = len(self.classes)

    def setup(self, stage: str | None = None) -> None:
        if self.datasets:
            return
        datasets = {}  # all or none: a setup that fails halfway must fail again when called again
        for split, train in (("train", True), ("val", False)):
            samples = list_images(self.root / split, self.classes)
            transform = self.augment.transform(self.image_size, train)
            datasets[split] = ImageFiles(samples, transform, self.on_bad_image)
        self.datasets = {**datasets, "test": datasets["val"]}


class ShapesDataModule(ImageNetDataModule):
    """The demo's task: geometric shapes drawn here, cached once in the ImageNet layout (nothing downloaded)."""

    def __init__(
        self,
        root: str | None = None,
        image_size: int = 32,
        train_per_class: int = 800,
        val_per_class: int = 100,
        generator_seed: int = 0,
        batch_size: int = 64,
        eval_batch_size: int | None = None,
        augment: Augmentation = Augmentation(
            crop_scale=(0.6, 1.0), auto_augment=None, color_jitter=0.0, random_erasing=0.0, eval_crop_fraction=1.0
        ),
        repeated_augmentation: int = 1,
        num_workers: int = 0,
        seed: int = 0,
    ):
        """
        Args:
            root: cache folder for the generated images; None: $XDG_CACHE_HOME (or ~/.cache)/hgrn2-lightning.
            image_size: side of the generated images, and of the model's input.
            train_per_class: training images per class.
            val_per_class: validation images per class.
            generator_seed: the images are a function of this seed (and the sizes above).
            batch_size, eval_batch_size, augment, repeated_augmentation, num_workers, seed: as ImageNetDataModule.
        """
        folder = make_shapes_dataset(
            Path(root) if root else default_cache_folder(), image_size, train_per_class, val_per_class, generator_seed
        )
        super().__init__(
            str(folder), image_size, batch_size, eval_batch_size, augment, repeated_augmentation, "error", num_workers,
            seed,
        )


class CIFAR10DataModule(ImageClassificationData):
    """CIFAR-10 from its python batches; validation is held out of the training batches, test is test_batch."""

    def __init__(
        self,
        root: str,
        image_size: int = 32,
        val_size: int = 5000,
        batch_size: int = 128,
        eval_batch_size: int | None = None,
        augment: Augmentation = Augmentation(mean=CIFAR10_MEAN, std=CIFAR10_STD, eval_crop_fraction=1.0),
        repeated_augmentation: int = 1,
        num_workers: int = 4,
        seed: int = 0,
    ):
        """
        Args:
            root: the cifar-10-batches-py folder, or the folder that holds it.
            image_size: side of the model's input; other than 32 resizes the images.
            val_size: training images held out for validation (a fixed random choice); 0: validate on test_batch.
            batch_size, eval_batch_size, augment, repeated_augmentation, num_workers, seed: as ImageNetDataModule.
        """
        super().__init__(image_size, batch_size, eval_batch_size, augment, repeated_augmentation, num_workers, seed)
        self.save_hyperparameters()
        self.folder = cifar10_folder(root)
        if not 0 <= val_size < 50_000:
            raise ValueError(f"data.val_size must be in [0, 50000), got {val_size}")
        self.val_size = val_size
        self.classes = cifar10_class_names(self.folder)
        self.num_classes = len(self.classes)

    def setup(self, stage: str | None = None) -> None:
        if self.datasets:
            return
        images, labels = read_cifar10(self.folder, "train")
        if self.val_size >= len(images):
            raise ValueError(
                f"data.val_size {self.val_size} holds out all {len(images)} training images of {self.folder}: lower "
                f"it, or set it to 0 to validate on test_batch"
            )
        test_images, test_labels = read_cifar10(self.folder, "test")
        # The held-out choice is fixed (seed 0), whatever data.seed shuffles: validation never changes.
        order = np.random.default_rng(0).permutation(len(images))
        val, train = order[: self.val_size], order[self.val_size :]
        train_transform = self.augment.transform(self.image_size, train=True)
        eval_transform = self.augment.transform(self.image_size, train=False)
        self.datasets["train"] = ImageArrays(images[train], labels[train], train_transform)
        self.datasets["test"] = ImageArrays(test_images, test_labels, eval_transform)
        if self.val_size:
            self.datasets["val"] = ImageArrays(images[val], labels[val], eval_transform)
        else:
            self.datasets["val"] = self.datasets["test"]


def class_folders(root: Path, split: str) -> list[str]:
    """The sorted class folder names of root/split; a missing folder or a flat one gets a how-to-fix message."""
    folder = root / split
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is not a folder: the ImageNet DataModule reads {IMAGENET_LAYOUT}")
    entries = list(folder.iterdir())
    loose = [p for p in entries if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS]
    if loose:
        raise ValueError(
            f"{folder} holds {len(loose)} images directly (e.g. {loose[0].name}) instead of one sub-folder per "
            f"class: this is the raw ILSVRC2012 validation layout. Move each image into {folder}/<wnid>/ using "
            f"the validation ground truth (ILSVRC2012_validation_ground_truth.txt of the devkit, or the widely "
            f"used valprep.sh script), so that the layout is {IMAGENET_LAYOUT}"
        )
    classes = sorted(p.name for p in entries if p.is_dir() and not p.name.startswith("."))
    archives = sorted(p.name for p in entries if p.is_file() and p.name.endswith(".tar"))
    if archives and not classes:
        # ILSVRC2012_img_train.tar unpacks into one archive per class, not into class folders.
        raise FileNotFoundError(
            f"{folder} holds {len(archives)} .tar archives (e.g. {archives[0]}) instead of class folders: extract "
            f"each into a folder of its name (cd {folder}; for f in *.tar; do mkdir \"${{f%.tar}}\" && tar xf \"$f\" "
            f"-C \"${{f%.tar}}\"; done), so that the layout is {IMAGENET_LAYOUT}"
        )
    if not classes:
        raise FileNotFoundError(f"{folder} has no class folders: the ImageNet DataModule reads {IMAGENET_LAYOUT}")
    return classes


def list_images(folder: Path, classes: list[str]) -> list[tuple[str, int]]:
    """(path, label) of every image under folder/<class>/, label = the class's index in `classes`.

    Paths are kept as plain strings, as torchvision's ImageFolder does: 1.28M Path objects would cost
    each DataLoader worker hundreds of MB more.
    """
    samples = []
    for label, name in enumerate(classes):
        files = sorted(p for p in (folder / name).iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
        if not files:
            raise FileNotFoundError(
                f"the class folder {folder / name} has no images ({', '.join(sorted(IMAGE_EXTENSIONS))}): "
                f"add its images or remove the folder (from train and val alike)"
            )
        samples += [(str(path), label) for path in files]
    return samples


def cifar10_folder(root: str | Path) -> Path:
    """The folder with CIFAR-10's batches: root itself or root/cifar-10-batches-py."""
    root = Path(root).expanduser()
    for folder in (root, root / "cifar-10-batches-py"):
        names = [f"data_batch_{n}" for n in range(1, 6)] + ["test_batch"]
        if all((folder / name).is_file() for name in names):
            return folder
    raise FileNotFoundError(
        f"no CIFAR-10 batches in {root} or {root / 'cifar-10-batches-py'}: expected {CIFAR10_LAYOUT}"
    )


def read_cifar10(folder: str | Path, split: Literal["train", "test"]) -> tuple[np.ndarray, np.ndarray]:
    """CIFAR-10's images as uint8 [N, 32, 32, 3] (RGB) and labels as int64 [N], from the python batches.

    Each batch is a pickled dict: b"data" is uint8 [N, 3072] (1024 red, then green, then blue values,
    rows of 32), b"labels" a list of N ints in 0..9. The LRA image task reads its CIFAR through this too.
    """
    folder = cifar10_folder(folder)
    names = [f"data_batch_{n}" for n in range(1, 6)] if split == "train" else ["test_batch"]
    images, labels = [], []
    for name in names:
        path = folder / name
        with open(path, "rb") as file:
            try:
                batch = pickle.load(file, encoding="bytes")  # the batches were pickled by Python 2
            except (pickle.UnpicklingError, EOFError, ValueError) as error:
                message = f"{path} is not a CIFAR-10 python batch ({error}); expected {CIFAR10_LAYOUT}"
                raise ValueError(message) from error
        if not isinstance(batch, dict) or b"data" not in batch or b"labels" not in batch:
            raise ValueError(
                f"{path} lacks the keys b'data' and b'labels' of a CIFAR-10 python batch: is it CIFAR-100?"
            )
        data = np.asarray(batch[b"data"])
        if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072 or len(batch[b"labels"]) != len(data):
            raise ValueError(
                f"{path}: data is {data.dtype} {data.shape} with {len(batch[b'labels'])} labels, expected uint8 "
                f"[N, 3072] with N labels"
            )
        images.append(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
        labels.append(np.asarray(batch[b"labels"], dtype=np.int64))
    images, labels = np.ascontiguousarray(np.concatenate(images)), np.concatenate(labels)
    if labels.min() < 0 or labels.max() >= 10:
        raise ValueError(f"CIFAR-10 labels must be in 0..9, found {labels.min()}..{labels.max()} in {folder}")
    return images, labels


def cifar10_class_names(folder: Path) -> list[str]:
    """Names from batches.meta when it is there, else the standard ten."""
    meta = folder / "batches.meta"
    if meta.is_file():
        with open(meta, "rb") as file:
            names = pickle.load(file, encoding="bytes").get(b"label_names")
        if names and len(names) == 10:
            return [n.decode() if isinstance(n, bytes) else str(n) for n in names]
    return list(CIFAR10_CLASSES)


# The generated task --------------------------------------------------------------------------------------

SHAPES = ("circle", "plus", "ring", "square", "star", "triangle")
SHAPES_VERSION = 1
"""Raise when the drawing changes, so stale caches are not reused."""


def default_cache_folder() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "hgrn2-lightning"


def make_shapes_dataset(root: Path, image_size: int, train_per_class: int, val_per_class: int, seed: int) -> Path:
    """Draw the shapes task into root/<name>/{train,val}/<shape>/<n>.png once; return that folder.

    The images depend only on the arguments. The folder is written under a temporary name and renamed
    when complete, so concurrent processes (DDP ranks) and interrupted runs never see half a dataset.
    """
    if image_size < 16 or train_per_class < 1 or val_per_class < 1:
        raise ValueError(
            f"the shapes task needs image_size >= 16 and at least one image per class and split, got "
            f"{image_size} px, {train_per_class} and {val_per_class}"
        )
    folder = root / f"shapes-v{SHAPES_VERSION}-{image_size}px-{train_per_class}x{val_per_class}-seed{seed}"
    if folder.is_dir():
        return folder
    staging = root / f".{folder.name}.{os.getpid()}.partial"
    shutil.rmtree(staging, ignore_errors=True)
    for split_id, (split, count) in enumerate((("train", train_per_class), ("val", val_per_class))):
        for label, shape in enumerate(SHAPES):
            (staging / split / shape).mkdir(parents=True)
            for n in range(count):
                rng = np.random.default_rng([seed, split_id, label, n])
                draw_shape(shape, image_size, rng).save(staging / split / shape / f"{n:05d}.png")
    try:
        staging.rename(folder)
    except OSError:  # another process finished first: its copy is identical
        shutil.rmtree(staging, ignore_errors=True)
    return folder


def draw_shape(shape: str, size: int, rng: np.random.Generator) -> Image.Image:
    """One size x size RGB image: `shape` of random extent, place, rotation and colour on a random
    background, plus Gaussian pixel noise.

    Shapes are brighter than their background in every channel: with fully random colours a small model
    first has to discover that only contrast matters, which costs the CPU demo minutes of plateau.
    """
    background = rng.integers(0, 110, 3)
    foreground = rng.integers(150, 256, 3)
    extent = rng.uniform(0.4, 0.85) * size
    radius = extent / 2
    cx, cy = rng.uniform(radius, size - radius, 2)
    angle = rng.uniform(0, 2 * np.pi)
    image = Image.new("RGB", (size, size), tuple(int(c) for c in background))
    draw = ImageDraw.Draw(image)
    fill = tuple(int(c) for c in foreground)
    box = (cx - radius, cy - radius, cx + radius, cy + radius)
    stroke = max(2, round(extent / 5))
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "ring":
        draw.ellipse(box, outline=fill, width=stroke)
    elif shape == "square":
        draw.polygon(_polygon(cx, cy, radius * 0.85, 4, angle), fill=fill)
    elif shape == "triangle":
        draw.polygon(_polygon(cx, cy, radius, 3, angle), fill=fill)
    elif shape == "star":
        outer = _polygon(cx, cy, radius, 5, angle)
        inner = _polygon(cx, cy, radius * 0.4, 5, angle + np.pi / 5)
        draw.polygon([point for pair in zip(outer, inner) for point in pair], fill=fill)
    elif shape == "plus":
        half = stroke / 2
        draw.rectangle((cx - radius, cy - half, cx + radius, cy + half), fill=fill)
        draw.rectangle((cx - half, cy - radius, cx + half, cy + radius), fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}; the shapes are {SHAPES}")
    noisy = np.asarray(image, dtype=np.float32) + rng.normal(0, 12, (size, size, 3))
    return Image.fromarray(noisy.clip(0, 255).astype(np.uint8))


def _polygon(cx: float, cy: float, radius: float, corners: int, angle: float) -> list[tuple[float, float]]:
    """Corners of a regular polygon around (cx, cy), the first at `angle`."""
    turns = angle + 2 * np.pi * np.arange(corners) / corners
    return list(zip((cx + radius * np.cos(turns)).tolist(), (cy + radius * np.sin(turns)).tolist()))
