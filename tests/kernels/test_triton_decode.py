"""The fused Triton decode step against the float64 per-step loop: on the CPU through Triton's interpreter
(small shapes, in `make test`), and compiled on a GPU (`make test-gpu`)."""

import pytest
import torch

import kernels.triton_scan as triton_scan
from kernels import hgrn2_step
from kernels.triton_decode import decode_step, decode_step_op
from tests.helpers import relative_error

GPU = torch.cuda.is_available()
DEVICE = "cuda" if GPU else "cpu"
TOLERANCE = {torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 1e-2}


@pytest.fixture(autouse=True)
def poisoned_outputs(monkeypatch):
    monkeypatch.setattr(triton_scan, "POISON_OUTPUTS", True)


def compare_with_oracle(B=2, T=1, H=2, K=16, V=None, dtype=torch.float32, gate_shift=0.0, bounded=True,
                        fused_projection=False, seed=0):
    """Relative errors of o and of the advanced state, the kernel against the float64 loop."""
    V = V or K
    generator = torch.Generator(DEVICE).manual_seed(seed)
    randn = lambda *shape: torch.randn(*shape, dtype=torch.float64, device=DEVICE, generator=generator)
    # Both sides see the same values: the inputs rounded to the tested dtype, the state and bound to float32.
    q, f, i = (randn(B, T, H, D).to(dtype).double() for D in (K, K, V))
    f = f + gate_shift
    b = (torch.rand(H, K, dtype=torch.float64, device=DEVICE, generator=generator) * 0.95).float().double()
    h0 = randn(B, H, K, V).float()

    state = h0.clone()
    inputs = [x.to(dtype) for x in (q, f, i)]
    if fused_projection:  # q, f, i as views into one [B, T, 3, H, D] tensor, as the model's in_proj gives them
        inputs = list(torch.stack(inputs, 2).unbind(2))
    o = decode_step(*inputs, b.float() if bounded else None, state, K**-0.5)
    expected_state = h0.double()
    expected = hgrn2_step(q, f, i, expected_state, b if bounded else None, scale=K**-0.5, backend="naive")
    assert o.dtype == dtype and o.shape == (B, T, H, V)
    return {"o": relative_error(o, expected), "state": relative_error(state, expected_state)}


def assert_close(errors, dtype):
    worst = max(errors, key=errors.get)
    assert errors[worst] < TOLERANCE[dtype], f"{worst}: relative error {errors[worst]:.2e} ({errors})"


CASES = {
    "one token": dict(),
    "three tokens": dict(T=3),
    "no lower bound": dict(bounded=False),
    "gates near 0, no bound": dict(T=2, gate_shift=-20.0, bounded=False),
    "gates near 1": dict(T=2, gate_shift=8.0),
    "head dims not powers of two": dict(K=12, V=20, H=3),
    "head dim 1": dict(K=1, H=4),
    "head dim 128, two V blocks and more": dict(B=1, H=1, K=128),
    "views of a fused projection": dict(B=3, fused_projection=True),
}


@pytest.mark.parametrize("case", CASES, ids=list(CASES))
def test_decode_step_matches_the_oracle(case):
    assert_close(compare_with_oracle(**CASES[case]), torch.float32)


def test_decode_step_in_float16():
    assert_close(compare_with_oracle(T=2, dtype=torch.float16), torch.float16)


def test_state_is_advanced_in_place_and_steps_compose():
    """Two calls of one token each equal one call of two tokens, on the same state tensor."""
    q, f, i = (torch.randn(2, 2, 2, 16, device=DEVICE) for _ in range(3))
    b = torch.rand(2, 16, device=DEVICE) * 0.9
    h0 = torch.randn(2, 2, 16, 16, device=DEVICE)
    state = h0.clone()
    one_by_one = [decode_step(q[:, t : t + 1], f[:, t : t + 1], i[:, t : t + 1], b, state, 0.25) for t in range(2)]
    both = h0.clone()
    together = decode_step(q, f, i, b, both, 0.25)
    assert relative_error(torch.cat(one_by_one, 1), together) < 1e-6 and relative_error(state, both) < 1e-6
    assert not torch.equal(state, h0)
    with pytest.raises(TypeError, match="float32"):
        decode_step(q, f, i, b, h0.double(), 0.25)


def test_hgrn2_step_dispatches_by_device():
    """`hgrn2_step` runs the kernel on CUDA and the reference elsewhere; both advance the state alike."""
    q, f, i = (torch.randn(1, 1, 2, 8, device=DEVICE) for _ in range(3))
    h0 = torch.randn(1, 2, 8, 8, device=DEVICE)
    auto, triton_state, reference = h0.clone(), h0.clone(), h0.clone()
    o_auto = hgrn2_step(q, f, i, auto)
    o_triton = hgrn2_step(q, f, i, triton_state, backend="triton")
    o_reference = hgrn2_step(q, f, i, reference, backend="naive")
    for o, state in ((o_auto, auto), (o_triton, triton_state)):
        assert relative_error(o, o_reference) < 1e-5 and relative_error(state, reference) < 1e-5
    with pytest.raises(ValueError, match="unknown decode backend"):
        hgrn2_step(q, f, i, h0, backend="chunked")


@pytest.mark.gpu
@pytest.mark.skipif(not GPU, reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("shape", [dict(B=16, H=8, K=128), dict(B=1, H=16, K=128, T=4), dict(B=3, H=5, K=64, V=96)],
                         ids=["B16 H8 K128", "B1 H16 T4", "K64 V96"])
def test_gpu_decode_step_matches_the_oracle(shape, dtype):
    fused = shape.get("V", shape["K"]) == shape["K"]  # the model's fused projection has K == V
    assert_close(compare_with_oracle(**shape, dtype=dtype, fused_projection=fused), dtype)


def test_operator_passes_opcheck():
    """The in-place operator's schema (it mutates `state` alone) and fake kernel agree with the launcher."""
    q, f, i = (torch.randn(2, 1, 2, 16, device=DEVICE) for _ in range(3))
    state = torch.randn(2, 2, 16, 16, device=DEVICE)
    torch.library.opcheck(decode_step_op, (q, f, i, torch.rand(2, 16, device=DEVICE) * 0.9, state, 0.25))
