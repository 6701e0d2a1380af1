"""LightningDataModules for the three workloads; they read local files in their standard formats."""

from datamodules.images import Augmentation, CIFAR10DataModule, ImageNetDataModule, ShapesDataModule, read_cifar10
from datamodules.listops import ListOpsRecipe, make_listops
from datamodules.lra import AANDataModule, IMDBDataModule, ListOpsDataModule
from datamodules.lra_images import PathfinderDataModule, SequentialCIFAR10DataModule
from datamodules.text import TextDataModule

__all__ = [
    "AANDataModule",
    "IMDBDataModule",
    "ListOpsDataModule",
    "ListOpsRecipe",
    "PathfinderDataModule",
    "SequentialCIFAR10DataModule",
    "make_listops",
    "Augmentation",
    "CIFAR10DataModule",
    "ImageNetDataModule",
    "ShapesDataModule",
    "TextDataModule",
    "read_cifar10",
]
