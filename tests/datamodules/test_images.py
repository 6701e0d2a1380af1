"""The image DataModules on fixtures in the real formats, the generated shapes, and repeated augmentation."""

import pickle
import random
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image

from datamodules.images import (
    SHAPES,
    Augmentation,
    CIFAR10DataModule,
    ImageNetDataModule,
    ShapesDataModule,
    make_shapes_dataset,
    read_cifar10,
)
from datamodules.sampling import RepeatedAugmentationSampler, ShardedSampler, resumable_loader

CLASS_COLOURS = {"n01440764": (220, 30, 30), "n01443537": (30, 220, 30), "n01484850": (30, 30, 220)}
"""One dominant channel per class, so a test can tell from the pixels which folder an image came from."""
NO_AUGMENTATION = Augmentation(
    crop_scale=(1.0, 1.0), hflip=0.0, auto_augment=None, color_jitter=0.0, random_erasing=0.0
)


def write_jpegs(folder, colour, count, rng, size=(40, 30)):
    folder.mkdir(parents=True, exist_ok=True)
    for n in range(count):
        pixels = np.clip(np.array(colour) + rng.normal(0, 15, (size[1], size[0], 3)), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"img_{n}.JPEG", quality=90)


@pytest.fixture
def imagenet(tmp_path):
    """root/train/<wnid>/*.JPEG (5 per class) and root/val/<wnid>/*.JPEG (2 per class), non-square JPEGs."""
    rng = np.random.default_rng(0)
    root = tmp_path / "imagenet"
    for wnid, colour in CLASS_COLOURS.items():
        write_jpegs(root / "train" / wnid, colour, 5, rng)
        write_jpegs(root / "val" / wnid, colour, 2, rng)
    return root


def dominant_channel(images: torch.Tensor, augment: Augmentation) -> torch.Tensor:
    mean, std = torch.tensor(augment.mean)[:, None, None], torch.tensor(augment.std)[:, None, None]
    return (images * std + mean).mean(dim=(2, 3)).argmax(dim=1)


def test_imagenet_layout_gives_labelled_batches_of_the_right_shape(imagenet):
    data = ImageNetDataModule(str(imagenet), image_size=24, batch_size=4, repeated_augmentation=1, num_workers=0)
    assert data.num_classes == 3 and data.classes == sorted(CLASS_COLOURS)
    data.setup("fit")
    assert len(data.datasets["train"]) == 15 and len(data.datasets["val"]) == 6
    images, labels = next(iter(data.train_dataloader()))
    assert images.shape == (4, 3, 24, 24) and images.dtype == torch.float32 and labels.dtype == torch.int64
    images, labels = next(iter(data.val_dataloader()))
    assert images.shape == (4, 3, 24, 24)
    # Labels follow the sorted class folders: class n's images are dominated by channel n.
    assert torch.equal(dominant_channel(images, data.augment), labels)
    mean, std = torch.tensor(data.augment.mean), torch.tensor(data.augment.std)
    assert images.min() >= (-mean / std).min() - 1e-4 and images.max() <= ((1 - mean) / std).max() + 1e-4


def test_train_transform_is_random_and_eval_transform_is_fixed(imagenet):
    augment = Augmentation()  # DeiT's: random-resized crop, flip, RandAugment, random erasing
    image = Image.open(next((imagenet / "train" / "n01440764").iterdir())).convert("RGB")
    torch.manual_seed(0)
    random.seed(0)  # RandAugment draws from Python's random: seeded, the test cannot pass or fail by chance
    train = augment.transform(32, train=True)
    a, b = train(image), train(image)
    assert a.shape == b.shape == (3, 32, 32) and not torch.equal(a, b)
    evaluation = augment.transform(32, train=False)
    assert evaluation(image).shape == (3, 32, 32) and torch.equal(evaluation(image), evaluation(image))
    # Eval resizes the short side to floor(32 / 0.875) = 36, then takes the centre 32 x 32: for a
    # 36 x 36 image that is exactly pixels [2:34, 2:34].
    pixels = np.random.default_rng(0).integers(0, 256, (36, 36, 3), dtype=np.uint8)
    mean, std = torch.tensor(augment.mean)[:, None, None], torch.tensor(augment.std)[:, None, None]
    centre = torch.from_numpy(pixels[2:34, 2:34]).permute(2, 0, 1) / 255
    torch.testing.assert_close(evaluation(Image.fromarray(pixels)), (centre - mean) / std, atol=1e-5, rtol=0)


def test_flat_val_folder_is_refused_with_instructions(imagenet):
    for wnid in CLASS_COLOURS:
        for path in (imagenet / "val" / wnid).iterdir():
            path.rename(imagenet / "val" / f"ILSVRC2012_val_{wnid}_{path.name}")
        (imagenet / "val" / wnid).rmdir()
    with pytest.raises(ValueError, match=r"raw ILSVRC2012 validation layout.*Move each image into"):
        ImageNetDataModule(str(imagenet))


def test_missing_folders_name_the_expected_layout(tmp_path, imagenet):
    with pytest.raises(FileNotFoundError, match=r"train is not a folder.*root/train/<class>/\*\.JPEG"):
        ImageNetDataModule(str(tmp_path / "nowhere"))
    (imagenet / "val" / "n01440764").rename(imagenet / "n01440764")
    with pytest.raises(ValueError, match=r"same class folders.*only in train: \['n01440764'\]"):
        ImageNetDataModule(str(imagenet))


@pytest.mark.parametrize("empty_in", [("train", "val"), ("val",)], ids=["both splits", "val only"])
def test_an_empty_class_folder_is_named(imagenet, empty_in):
    """Also after a failed setup was swallowed: Lightning's LightningDataModule.__str__ (which the CLI calls) builds
    every loader and hides their errors, and a setup that had kept its train split returned early afterwards."""
    for split in ("train", "val"):
        (imagenet / split / "n09999999").mkdir()
        if split not in empty_in:
            write_jpegs(imagenet / split / "n09999999", (0, 0, 0), 1, np.random.default_rng(0))
    data = ImageNetDataModule(str(imagenet), num_workers=0)
    assert data.num_classes == 4
    str(data)
    with pytest.raises(FileNotFoundError, match=r"n09999999 has no images"):
        data.setup("fit")


def test_unreadable_image_stops_the_run_or_is_skipped_and_counted(imagenet):
    broken = imagenet / "train" / "n01443537" / "img_1.JPEG"
    broken.write_bytes(b"not a jpeg at all")
    strict = ImageNetDataModule(str(imagenet), image_size=16, batch_size=15, num_workers=0, repeated_augmentation=1)
    with pytest.raises(ValueError, match=r"img_1\.JPEG.*data\.on_bad_image skip"):  # the CLI's user-error type
        next(iter(strict.train_dataloader()))
    lenient = ImageNetDataModule(
        str(imagenet), image_size=16, batch_size=15, num_workers=0, repeated_augmentation=1, on_bad_image="skip"
    )
    with pytest.warns(UserWarning, match=r"skipping unreadable image .*img_1\.JPEG"):
        images, _ = next(iter(lenient.train_dataloader()))
    assert images.shape[0] == 15  # the batch stays full: the next readable image stands in
    assert lenient.datasets["train"].skipped == {str(broken)}


def test_train_folder_of_per_class_archives_says_to_extract_them(imagenet):
    """ILSVRC2012_img_train.tar unpacks into one .tar per class: the message says so, not just "no class folders"."""
    for wnid in CLASS_COLOURS:
        folder = imagenet / "train" / wnid
        (imagenet / "train" / f"{wnid}.tar").write_bytes(b"")
        for path in folder.iterdir():
            path.unlink()
        folder.rmdir()
    with pytest.raises(FileNotFoundError, match=r"holds 3 \.tar archives \(e\.g\. n01440764\.tar\).*extract each"):
        ImageNetDataModule(str(imagenet))


def test_a_training_split_smaller_than_a_batch_is_refused(imagenet):
    """Training drops the incomplete last batch: with fewer images than a batch none is left, and Lightning would
    stop the fit at once, saying only "No training batches"."""
    data = ImageNetDataModule(str(imagenet), image_size=16, batch_size=32, num_workers=0)
    with pytest.raises(ValueError, match=r"training split has 15 examples, 15 per device, and data.batch_size is 32"):
        data.train_dataloader()
    assert len(data.val_dataloader()) == 1  # evaluation keeps its incomplete batch


def write_cifar_batch(path, images, labels):
    """A CIFAR-10 python batch: the real keys, uint8 rows of 3072 = 3 planes of 32 x 32."""
    data = images.transpose(0, 3, 1, 2).reshape(len(images), 3072)
    batch = {b"batch_label": b"fixture", b"labels": list(labels), b"data": data,
             b"filenames": [f"{n}.png".encode() for n in range(len(images))]}
    with open(path, "wb") as file:
        pickle.dump(batch, file, protocol=2)


@pytest.fixture
def cifar(tmp_path):
    """cifar-10-batches-py with 6 images in each of data_batch_1..5 and test_batch, and batches.meta."""
    folder = tmp_path / "cifar" / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(1)
    for n, name in enumerate([f"data_batch_{k}" for k in range(1, 6)] + ["test_batch"]):
        images = rng.integers(0, 256, (6, 32, 32, 3), dtype=np.uint8)
        write_cifar_batch(folder / name, images, [(n + k) % 10 for k in range(6)])
    with open(folder / "batches.meta", "wb") as file:
        pickle.dump({b"label_names": [f"class{k}".encode() for k in range(10)], b"num_vis": 3072}, file, protocol=2)
    return folder


def test_roots_under_the_home_folder_are_expanded(imagenet, cifar, monkeypatch):
    """A YAML file's "~/..." reaches the DataModule unexpanded (no shell in between), as the LRA DataModules take it."""
    monkeypatch.setenv("HOME", str(imagenet.parent))
    assert ImageNetDataModule("~/imagenet").num_classes == 3
    assert CIFAR10DataModule("~/cifar").folder == cifar


def test_cifar_pixels_and_labels_come_out_in_place(cifar):
    images = np.zeros((2, 32, 32, 3), np.uint8)
    images[0, 3, 5, 0] = 200  # red at row 3, column 5: byte 3 * 32 + 5 of the red plane
    images[1, 31, 0, 2] = 100  # blue at the start of the last row: byte 2048 + 31 * 32
    write_cifar_batch(cifar / "data_batch_1", images, [7, 2])
    with open(cifar / "data_batch_1", "rb") as file:
        assert pickle.load(file, encoding="bytes")[b"data"][0, 3 * 32 + 5] == 200
    train, labels = read_cifar10(cifar.parent, "train")  # the parent of cifar-10-batches-py works too
    assert train.shape == (2 + 4 * 6, 32, 32, 3) and train.dtype == np.uint8
    assert train[0, 3, 5].tolist() == [200, 0, 0] and train[1, 31, 0].tolist() == [0, 0, 100]
    assert labels[:2].tolist() == [7, 2] and labels[2:8].tolist() == [1, 2, 3, 4, 5, 6]  # batches in order
    test, test_labels = read_cifar10(cifar, "test")
    assert test.shape == (6, 32, 32, 3) and test_labels.tolist() == [5, 6, 7, 8, 9, 0]


def test_cifar_datamodule_holds_out_validation_and_tests_on_test_batch(cifar):
    data = CIFAR10DataModule(str(cifar.parent), val_size=10, batch_size=4, num_workers=0, augment=NO_AUGMENTATION)
    assert data.num_classes == 10 and data.classes[3] == "class3"
    data.setup("fit")
    train, val, test = (data.datasets[s] for s in ("train", "val", "test"))
    assert (len(train), len(val), len(test)) == (20, 10, 6)
    rows = lambda dataset: {dataset.images[n].tobytes() for n in range(len(dataset))}
    assert not rows(train) & rows(val)  # held out, not shared
    images, labels = next(iter(data.train_dataloader()))
    assert images.shape == (4, 3, 32, 32) and labels.max() < 10
    # Without augmentation the tensor is the stored image, normalised with CIFAR's statistics.
    index = int(data.train_dataloader().sampler.indices()[0])
    mean, std = torch.tensor(data.augment.mean)[:, None, None], torch.tensor(data.augment.std)[:, None, None]
    expected = (torch.from_numpy(train.images[index]).permute(2, 0, 1) / 255 - mean) / std
    torch.testing.assert_close(images[0], expected, atol=1e-5, rtol=0)


def test_cifar_errors_say_what_is_expected(tmp_path, cifar):
    with pytest.raises(FileNotFoundError, match=r"data_batch_1 \.\.\. data_batch_5 and test_batch"):
        CIFAR10DataModule(str(tmp_path / "nothing"))
    with open(cifar / "test_batch", "wb") as file:  # CIFAR-100's keys
        pickle.dump({b"data": np.zeros((2, 3072), np.uint8), b"fine_labels": [0, 1]}, file)
    with pytest.raises(ValueError, match=r"data.val_size 30 holds out all 30 training images"):
        CIFAR10DataModule(str(cifar), val_size=30).setup("fit")
    with pytest.raises(ValueError, match=r"lacks the keys b'data' and b'labels'.*CIFAR-100"):
        read_cifar10(cifar, "test")


def test_shapes_task_is_deterministic_and_written_once(tmp_path):
    first = make_shapes_dataset(tmp_path / "a", 16, 3, 2, seed=5)
    again = make_shapes_dataset(tmp_path / "b", 16, 3, 2, seed=5)
    other = make_shapes_dataset(tmp_path / "c", 16, 3, 2, seed=6)
    files = sorted(p.relative_to(first) for p in first.rglob("*.png"))
    assert len(files) == len(SHAPES) * (3 + 2)
    assert all((first / f).read_bytes() == (again / f).read_bytes() for f in files)
    assert sum((first / f).read_bytes() != (other / f).read_bytes() for f in files) == len(files)
    stamp = (first / files[0]).stat().st_mtime_ns
    assert make_shapes_dataset(tmp_path / "a", 16, 3, 2, seed=5) == first
    assert (first / files[0]).stat().st_mtime_ns == stamp  # reused, not redrawn
    assert not [p for p in (tmp_path / "a").iterdir() if p.name.startswith(".")]  # no staging left behind
    data = ShapesDataModule(root=str(tmp_path / "a"), image_size=16, train_per_class=3, val_per_class=2,
                            generator_seed=5)
    assert data.num_classes == len(SHAPES) and data.classes == sorted(SHAPES)


def test_repeated_augmentation_deals_each_drawn_image_three_times_across_ranks():
    two = [RepeatedAugmentationSampler(60, repeats=3, seed=4, rank=r, world_size=2) for r in range(2)]
    shards = [list(s) for s in two]
    assert [len(s) for s in shards] == [30, 30]  # an epoch as long as a plain one, even across ranks
    counts = Counter(shards[0] + shards[1])
    assert len(counts) == 20 and set(counts.values()) == {3}  # 60 / 3 images, each drawn 3 times overall
    three = [list(RepeatedAugmentationSampler(60, repeats=3, seed=4, rank=r, world_size=3)) for r in range(3)]
    # The copies of an image go to different ranks, side by side in the same step.
    assert three[0] == three[1] == three[2] and len(set(three[0])) == 20
    for sampler in two:
        sampler.set_epoch(1)
    assert Counter(list(two[0]) + list(two[1])).keys() != counts.keys()
    alone = list(RepeatedAugmentationSampler(7, repeats=3, seed=0))
    assert len(alone) == 7 and alone[:3] == [alone[0]] * 3 and alone[3:6] == [alone[3]] * 3


def test_repeated_augmentation_resumes_mid_epoch():
    dataset = torch.arange(48)
    make = lambda: resumable_loader(dataset, batch_size=4, shuffle=True, seed=3, repeats=3)
    full = make()
    assert isinstance(full.sampler, RepeatedAugmentationSampler)
    full.sampler.set_epoch(1)
    expected = [b.tolist() for b in full]
    interrupted = make()
    interrupted.sampler.set_epoch(1)
    iterator = iter(interrupted)
    seen = [next(iterator).tolist() for _ in range(5)]
    resumed = make()
    resumed.load_state_dict(interrupted.state_dict())
    resumed.sampler.set_epoch(1)
    assert seen + [b.tolist() for b in resumed] == expected
    evaluation = resumable_loader(dataset, batch_size=4, shuffle=False, seed=3, train=False, repeats=3)
    assert type(evaluation.sampler) is ShardedSampler and len(evaluation.sampler) == 48


def test_randaugment_at_its_largest_magnitude_does_not_crash():
    """DeiT's rand-m9-mstd0.5-inc1 draws magnitudes up to 10, where posterize keeps 0 bits (a black image):
    with a Pillow that refuses 0 bits, about 1 image in 300 would stop training in a loader worker."""
    from timm.data.auto_augment import AugmentOp

    image = Image.fromarray(np.full((8, 8, 3), 200, dtype=np.uint8))
    posterized = AugmentOp("PosterizeIncreasing", prob=1.0, magnitude=10)(image)
    assert np.asarray(posterized).max() == 0
