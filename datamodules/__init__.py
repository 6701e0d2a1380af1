"""LightningDataModules for the three workloads; they read local files in their standard formats."""

from datamodules.text import TextDataModule

__all__ = ["TextDataModule"]
