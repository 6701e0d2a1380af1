"""hgrn2-lightning: train and serve HGRN2 models (Qin et al. 2024) with PyTorch Lightning."""

from hgrn2_lightning.lm import CausalLM, LanguageModel
from hgrn2_lightning.lra import LRAModel, SequenceClassifier
from hgrn2_lightning.model import HGRN2, HGRN2Config
from hgrn2_lightning.optim import OptimConfig
from hgrn2_lightning.vision import ImageClassifier, MixupConfig, PatchClassifier

__all__ = [
    "HGRN2",
    "HGRN2Config",
    "CausalLM",
    "LanguageModel",
    "LRAModel",
    "SequenceClassifier",
    "OptimConfig",
    "ImageClassifier",
    "MixupConfig",
    "PatchClassifier",
]
