"""benchmarks/scan_shapes.py's `--tiles` parsing (the timing itself needs a GPU)."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from scan_shapes import tile_overrides  # noqa: E402


def test_tile_overrides_group_options_by_kernel_as_literals():
    overrides = tile_overrides(["dh:num_stages=3", "dh:BK=64", "grads:OWN_MMA_LOADS=True", "states:num_warps=2"])
    assert overrides == {"dh": {"num_stages": 3, "BK": 64}, "grads": {"OWN_MMA_LOADS": True},
                         "states": {"num_warps": 2}}


@pytest.mark.parametrize("item", ["dh", "dh:num_stages", "dh:num_stages=three", ":num_stages=3", "dh:=3"])
def test_tile_overrides_refuse_malformed_items(item):
    with pytest.raises(ValueError, match="KERNEL:NAME=VALUE"):
        tile_overrides([item])
