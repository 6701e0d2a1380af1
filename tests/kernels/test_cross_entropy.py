"""The chunked head + cross entropy against the plain one: loss and gradients, chunks that do not divide
the tokens, ignored targets, and autocast."""

import pytest
import torch
import torch.nn.functional as F

import kernels.cross_entropy as ce
import kernels.triton_cross_entropy as triton_ce
from kernels.cross_entropy import linear_cross_entropy
from tests.helpers import relative_error

GPU = torch.cuda.is_available()
# The fused kernel: interpreted on the CPU (CI), compiled on a GPU (`make test-gpu`).
DEVICES = [
    pytest.param("cpu", marks=pytest.mark.skipif(GPU, reason="the GPU run covers it compiled")),
    pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not GPU, reason="needs a CUDA GPU")]),
]


def plain(hidden, weight, targets):
    return F.cross_entropy(hidden @ weight.T, targets)


def inputs(n=37, d=16, vocab=29, dtype=torch.float64, seed=0):
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, d, dtype=dtype, generator=generator).requires_grad_()
    weight = torch.randn(vocab, d, dtype=dtype, generator=generator).requires_grad_()
    targets = torch.randint(0, vocab, (n,), generator=generator)
    return hidden, weight, targets


def assert_matches_the_plain_head(hidden, weight, targets, tolerance):
    """Loss and both gradients against F.cross_entropy of the full logits; ignored rows get no gradient."""
    ours = linear_cross_entropy(hidden, weight, targets)
    grads = torch.autograd.grad(ours * 3.0, (hidden, weight))
    reference = plain(hidden, weight, targets)
    expected = torch.autograd.grad(reference * 3.0, (hidden, weight))
    assert relative_error(ours, reference) < tolerance
    for got, want in zip(grads, expected):
        assert relative_error(got, want) < tolerance
    assert not grads[0][targets == -100].any()


@pytest.mark.parametrize("chunk_tokens", [1, 5, 37, 1000])
def test_loss_and_gradients_equal_the_plain_head(monkeypatch, chunk_tokens):
    monkeypatch.setattr(ce, "CHUNK_ELEMENTS", chunk_tokens * 29)
    hidden, weight, targets = inputs()
    targets[3] = targets[20] = -100  # ignored: out of the loss and the mean
    assert_matches_the_plain_head(hidden, weight, targets, tolerance=1e-12)


def test_under_autocast_the_matmuls_run_in_the_autocast_dtype():
    hidden, weight, targets = (x.detach().float() if x.is_floating_point() else x for x in inputs(n=64, d=32, vocab=50))
    hidden.requires_grad_(), weight.requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = linear_cross_entropy(hidden, weight, targets)
        reference = F.cross_entropy(F.linear(hidden, weight).float(), targets)
    grads = torch.autograd.grad(ours, (hidden, weight))
    expected = torch.autograd.grad(reference, (hidden, weight))
    assert ours.dtype == torch.float32 and relative_error(ours, reference) < 1e-3
    assert grads[0].dtype == hidden.dtype and grads[1].dtype == weight.dtype
    for got, want in zip(grads, expected):
        assert relative_error(got, want) < 2e-2  # bf16 matmuls on both sides, rounded differently


def test_shapes_that_do_not_fit_are_refused():
    hidden, weight, targets = inputs()
    with pytest.raises(ValueError, match="share d"):
        linear_cross_entropy(hidden, weight[:, :8], targets)
    with pytest.raises(ValueError, match="targets must be"):
        linear_cross_entropy(hidden, weight, targets[:5])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_the_fused_kernel_gives_each_rows_loss_and_overwrites_it_with_its_gradient(monkeypatch, dtype, device):
    """Rows longer than the kernel's block (50 entries in blocks of 16: the last one partial), one ignored row,
    logits large enough that an unshifted exponential would overflow float32."""
    monkeypatch.setattr(triton_ce, "BLOCK", 16)
    generator = torch.Generator().manual_seed(1)
    logits = (torch.randn(6, 50, generator=generator) * 40).to(dtype).to(device)
    targets = torch.randint(0, 50, (6,), generator=generator).to(device)
    targets[2] = -100
    exact = logits.double()
    expected_losses = F.cross_entropy(exact, targets, reduction="none")
    expected_grad = torch.softmax(exact, -1) - F.one_hot(targets.clamp(min=0), 50).to(exact)
    expected_grad[2] = 0

    untouched = logits.clone()
    losses = triton_ce.loss_and_grad_(logits, targets, -100, write_grad=False)
    assert torch.equal(logits, untouched)
    assert losses.dtype == torch.float32 and losses[2] == 0
    assert relative_error(losses, expected_losses) < 1e-6
    triton_ce.loss_and_grad_(logits, targets, -100, write_grad=True)
    assert logits.dtype == dtype and not logits[2].any()
    assert relative_error(logits, expected_grad) < (1e-5 if dtype == torch.float32 else 1e-2)


@pytest.mark.parametrize("device", DEVICES)
def test_the_chunked_loss_through_the_fused_kernel_equals_the_plain_head(monkeypatch, device):
    """The CUDA path (the fused kernel between the matmuls), in float32."""
    monkeypatch.setattr(ce, "_uses_triton", lambda logits: True)
    monkeypatch.setattr(ce, "CHUNK_ELEMENTS", 5 * 29)
    hidden, weight, targets = (x.detach().float() if x.is_floating_point() else x for x in inputs())
    hidden, weight, targets = (x.to(device) for x in (hidden, weight, targets))
    hidden.requires_grad_(), weight.requires_grad_()
    targets[3] = -100
    assert_matches_the_plain_head(hidden, weight, targets, tolerance=1e-5)
