"""The PyTorch reference scan: the naive loop against the equations, the chunked form against the loop."""

import math

import pytest
import torch

from kernels import hgrn2_gate, hgrn2_scan, hgrn2_step
from tests.helpers import relative_error


def random_inputs(B=2, T=37, H=3, K=8, V=None, dtype=torch.float64, gate_scale=3.0, seed=None):
    generator = torch.Generator().manual_seed(seed if seed is not None else torch.seed() % 2**31)
    V = V or K
    q = torch.randn(B, T, H, K, dtype=dtype, generator=generator)
    f = torch.randn(B, T, H, K, dtype=dtype, generator=generator) * gate_scale
    i = torch.randn(B, T, H, V, dtype=dtype, generator=generator)
    lower_bound = torch.rand(H, K, dtype=dtype, generator=generator) * 0.95
    h0 = torch.randn(B, H, K, V, dtype=dtype, generator=generator)
    return q, f, i, lower_bound, h0


def test_naive_loop_follows_the_equations():
    """Two steps by hand: S1 = k1 i1, S2 = lambda2 S1 + k2 i2, o = scale q S (one head, K = V = 1)."""
    q = torch.tensor([0.5, -1.5], dtype=torch.float64).view(1, 2, 1, 1)
    f = torch.tensor([0.3, -2.0], dtype=torch.float64).view(1, 2, 1, 1)
    i = torch.tensor([2.0, 0.7], dtype=torch.float64).view(1, 2, 1, 1)
    b = 0.25
    lam = [b + (1 - b) / (1 + math.exp(-x)) for x in (0.3, -2.0)]
    s1 = (1 - lam[0]) * 2.0
    s2 = lam[1] * s1 + (1 - lam[1]) * 0.7
    o, state = hgrn2_scan(
        q, f, i, torch.tensor([[b]], dtype=torch.float64), scale=2.0, output_final_state=True, backend="naive"
    )
    assert o.flatten().tolist() == pytest.approx([2.0 * 0.5 * s1, 2.0 * -1.5 * s2], rel=1e-12)
    assert state.item() == pytest.approx(s2, rel=1e-12)


def test_gate_matches_linear_space_and_never_underflows():
    f = torch.linspace(-30, 30, 101, dtype=torch.float64)
    b = torch.tensor(0.3, dtype=torch.float64)
    log_lambda, k = hgrn2_gate(f, b)
    lam = b + (1 - b) * torch.sigmoid(f)
    assert relative_error(log_lambda, lam.log()) < 1e-12
    assert relative_error(k, 1 - lam) < 1e-12
    # No bound (layer 0), gate far below float32's smallest normal: log(lambda) stays exact and finite.
    log_lambda, k = hgrn2_gate(torch.tensor([-200.0]))
    assert log_lambda.item() == pytest.approx(-200.0, rel=1e-6)
    assert k.item() == 1.0


@pytest.mark.parametrize("T", [1, 15, 16, 17, 50])
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("bounded", [False, True])
def test_chunked_equals_naive_with_gradients(T, reverse, bounded):
    q, f, i, lower_bound, h0 = random_inputs(T=T, gate_scale=6.0)
    inputs = [q, f, i, lower_bound, h0]
    for x in inputs:
        x.requires_grad_(True)
    do = torch.randn(q.shape[:3] + (i.shape[-1],), dtype=torch.float64)
    dstate = torch.randn_like(h0)
    results = {}
    for backend in ("naive", "chunked"):
        o, state = hgrn2_scan(
            q, f, i, lower_bound if bounded else None,
            initial_state=h0, output_final_state=True, reverse=reverse, backend=backend,
        )
        grads = torch.autograd.grad((o * do).sum() + (state * dstate).sum(), inputs, allow_unused=True)
        results[backend] = (o, state, grads)
    (o_ref, s_ref, g_ref), (o, s, g) = results["naive"], results["chunked"]
    assert relative_error(o, o_ref) < 1e-12
    assert relative_error(s, s_ref) < 1e-12
    for name, a, b in zip(("dq", "df", "di", "dlower_bound", "dh0"), g, g_ref):
        if name == "dlower_bound" and not bounded:
            assert a is None and b is None
            continue
        assert relative_error(a, b) < 1e-10, name


def test_gates_near_zero_stay_finite_and_exact():
    """Layer 0 has no bound: log(lambda) of -20 per step must neither overflow nor lose the current token."""
    q, f, i, _, h0 = random_inputs(T=40, gate_scale=0.0)
    f = f - 20.0
    o_ref, s_ref = hgrn2_scan(q, f, i, initial_state=h0, output_final_state=True, backend="naive")
    o, s = hgrn2_scan(q.float(), f.float(), i.float(), initial_state=h0.float(), output_final_state=True,
                      backend="chunked")
    assert torch.isfinite(o).all() and torch.isfinite(s).all()
    assert relative_error(o, o_ref) < 1e-5 and relative_error(s, s_ref) < 1e-5
    # With lambda ~ e^-20 the state is almost exactly this step's k^T i: o_t ~ scale * (q_t . k_t) i_t.
    expected = (q * (1 - torch.exp(f))).sum(-1, keepdim=True) * i * q.shape[-1] ** -0.5
    assert relative_error(o_ref[:, 1:], expected[:, 1:]) < 1e-6


@pytest.mark.parametrize("reverse", [False, True])
def test_packed_sequences_never_share_state(reverse):
    lengths = [5, 1, 23, 9]
    q, f, i, lower_bound, _ = random_inputs(B=1, T=sum(lengths))
    h0 = torch.randn(len(lengths), *lower_bound.shape, i.shape[-1], dtype=torch.float64)
    cu_seqlens = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()])
    o, state = hgrn2_scan(q, f, i, lower_bound, initial_state=h0, output_final_state=True,
                          cu_seqlens=cu_seqlens, reverse=reverse)
    for n, (start, end) in enumerate(zip(cu_seqlens[:-1].tolist(), cu_seqlens[1:].tolist())):
        o_n, s_n = hgrn2_scan(q[:, start:end], f[:, start:end], i[:, start:end], lower_bound,
                              initial_state=h0[n : n + 1], output_final_state=True, reverse=reverse, backend="naive")
        assert relative_error(o[:, start:end], o_n) < 1e-12
        assert relative_error(state[n : n + 1], s_n) < 1e-12


def test_decode_step_advances_state_in_place_like_the_scan():
    q, f, i, lower_bound, h0 = random_inputs(B=3, T=12)
    o_ref, s_ref = hgrn2_scan(q, f, i, lower_bound, initial_state=h0, output_final_state=True)
    state = h0.clone()
    outputs = [hgrn2_step(q[:, t : t + 1], f[:, t : t + 1], i[:, t : t + 1], state, lower_bound) for t in range(12)]
    assert relative_error(torch.cat(outputs, 1), o_ref) < 1e-12
    assert relative_error(state, s_ref) < 1e-12


def test_float32_inputs_match_the_float64_oracle():
    q, f, i, lower_bound, h0 = random_inputs(T=100)
    o_ref, s_ref = hgrn2_scan(q, f, i, lower_bound, initial_state=h0, output_final_state=True, backend="naive")
    o, s = hgrn2_scan(q.float(), f.float(), i.float(), lower_bound.float(), initial_state=h0.float(),
                      output_final_state=True)
    assert o.dtype == torch.float32 and s.dtype == torch.float32
    assert relative_error(o, o_ref) < 1e-5 and relative_error(s, s_ref) < 1e-5


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda a: a.update(q=a["q"][0]), "must be \\[batch, time, heads, head_dim\\]"),
        (lambda a: a.update(f=a["f"][:, :-1]), "f must have the shape of q"),
        (lambda a: a.update(q=a["q"].long()), "floating-point"),
        (lambda a: a.update(lower_bound=a["lower_bound"] + 1.0), "lower_bound must lie in \\[0, 1\\)"),
        (lambda a: a.update(lower_bound=a["lower_bound"][:1]), "lower_bound must have"),
        (lambda a: a.update(initial_state=a["initial_state"][:1]), "initial_state must be"),
        (lambda a: a.update(cu_seqlens=torch.tensor([0, 10, 37])), "batch must be 1"),
    ],
)
def test_bad_inputs_fail_clearly(change, message):
    q, f, i, lower_bound, h0 = random_inputs()
    args = dict(q=q, f=f, i=i, lower_bound=lower_bound, initial_state=h0)
    change(args)
    with pytest.raises((ValueError, TypeError), match=message):
        hgrn2_scan(**args)


@pytest.mark.parametrize("cu_seqlens", [[0, 20, 10, 37], [1, 37], [0, 20, 36], [0, 20, 20, 37]])
def test_bad_cu_seqlens_fail_clearly(cu_seqlens):
    q, f, i, _, _ = random_inputs(B=1)
    with pytest.raises(ValueError, match="cu_seqlens must start at 0"):
        hgrn2_scan(q, f, i, cu_seqlens=torch.tensor(cu_seqlens))
