"""benchmarks/step_profile.py's sorting of a step's kernels by kind (the profile itself needs a GPU)."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

from step_profile import kind_of  # noqa: E402


@pytest.mark.parametrize("name, kind", [
    ("_fwd_fused_kernel", "scan"),  # once counted as "other": the ViT's scans looked 2.4 ms a step cheaper
    ("_fwd_states_kernel", "scan"),
    ("_segment_carry_kernel", "scan"),
    ("_bwd_kernel", "scan"),
    ("_small_bwd_kernel", "scan"),
    ("_loss_and_grad_kernel", "cross-entropy"),
    ("_decode_kernel", "other"),  # generation's, not a training step's
    ("triton_poi_fused__unsafe_view_add_silu_bwd_kernel_9", "compiled (Inductor)"),
    ("nvjet_sm90_tst_192x128_64x5_1x2_h_bz_coopB_NNT", "matmul"),
    ("void at::native::multi_tensor_apply_kernel<FusedAdamMathFunctor>", "optimizer"),
])
def test_kernels_are_sorted_by_kind(name, kind):
    assert kind_of(name) == kind
