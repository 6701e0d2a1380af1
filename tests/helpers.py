"""Shared test utilities."""

import torch


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """||actual - expected|| / ||expected||, in float64; NaN anywhere makes it infinite."""
    actual, expected = actual.detach().double(), expected.detach().double()
    if not torch.isfinite(actual).all():
        return float("inf")
    return ((actual - expected).norm() / expected.norm().clamp_min(1e-300)).item()


def fla_kernels_untuned(monkeypatch) -> int:
    """fla autotunes each of its Triton kernels over up to 24 launch configurations on first use: minutes for a
    model, more than a device command allows. A test of values needs any one of them, so every fla kernel loaded
    keeps its first. Returns how many kernels were cut."""
    import sys

    from triton.runtime.autotuner import Autotuner

    cut = 0
    for module in [m for name, m in list(sys.modules.items()) if name.startswith("fla.") and m is not None]:
        for kernel in vars(module).values():
            while not isinstance(kernel, Autotuner) and hasattr(getattr(kernel, "fn", None), "fn"):
                kernel = kernel.fn  # triton.heuristics wraps the autotuner
            if isinstance(kernel, Autotuner) and len(kernel.configs) > 1:
                monkeypatch.setattr(kernel, "configs", kernel.configs[:1])
                cut += 1
    return cut
