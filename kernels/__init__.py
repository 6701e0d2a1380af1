"""HGRN2 kernels: the training scan and the decode step, with a pure-PyTorch reference. No Lightning here."""

from kernels.reference import hgrn2_gate
from kernels.scan import hgrn2_scan, hgrn2_step

__all__ = ["hgrn2_gate", "hgrn2_scan", "hgrn2_step"]
