"""benchmarks/scan.py's bandwidth model against the scan's dispatch (the timing itself needs a GPU)."""

import sys
from pathlib import Path

import pytest
import torch

import kernels.triton_scan as triton_scan
from kernels import triton_scan_dispatch as dispatch
from tests.kernels.sm90_launches import record_launches

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import scan  # noqa: E402


@pytest.mark.parametrize("T", [1024, 2048, 4096, 8192, 16384])
def test_the_bandwidth_model_names_every_kernel_the_card_launches(T, monkeypatch):
    """`kernel_bytes` must count each kernel the dispatch runs at the card's shape, or the card's table stops at
    that length (it did at T 8K once training went through the cut one-pass forward). The dispatch runs here on
    the CPU at the card's full shape, as on the H100's 132 SMs, with launches recorded and not run: those
    launched, less the carry pass (whose bytes the model leaves out), are the model's, with grad and without, and
    then through the Gluon forward as a Hopper GPU runs it."""
    monkeypatch.setattr(dispatch, "_sm_count", lambda device: 132)
    B = 32768 // T
    q, f, i = (torch.empty(B, T, scan.H, scan.D, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    bound = torch.full((scan.H, scan.D), 0.5)

    def launched_by(run) -> set[str]:
        return {kernel.__name__ for kernel, *_ in record_launches(run)} - {"_segment_carry_kernel"}

    def forward_backward():
        o, _ = triton_scan.triton_scan(q, f, i, bound, scan.D**-0.5, None, None, False, False)
        o.backward(torch.zeros_like(o))

    def forward():
        with torch.no_grad():
            triton_scan.triton_scan(q, f, i, bound, scan.D**-0.5, None, None, False, False)

    assert launched_by(forward_backward) == set(scan.kernel_bytes(T, B))
    chunk = scan._dispatch(B, "_forward_chunk", False)
    assert launched_by(forward) == set(scan.kernel_bytes(T, B, chunk, backward=False))
    monkeypatch.setattr(triton_scan.gluon_scan_forward, "_is_hopper", lambda device: True)  # the H100's forward
    launched = launched_by(forward)
    assert "_forward_kernel" in launched and launched == set(scan.kernel_bytes(T, B, chunk, backward=False))
    launched = launched_by(forward_backward)
    assert "_forward_kernel" in launched and launched == set(scan.kernel_bytes(T, B))
