"""Cross entropy of a linear output head, computed a chunk of tokens at a time.

A language model's loss over N tokens and a vocabulary of V would otherwise hold the logits [N, V]
in the compute dtype, their fp32 copy, and the same again for their gradient: at 32768 tokens and
32000 entries about 10 GiB, more than the rest of a 370M model's activations. Here the forward pass
computes, per chunk, the logits, the loss and at once the gradient of the loss with respect to the
hidden states and the head's weight; only those gradients (the size of the inputs) are kept, and the
backward pass scales them. The result equals `F.cross_entropy(hidden @ weight.T, targets)` and its
gradients; under autocast the matmuls run in the autocast dtype, as the head's Linear would. On CUDA what
lies between the matmuls (log-sum-exp, softmax - one_hot) is one Triton kernel per chunk
(kernels/triton_cross_entropy.py), elsewhere the same in PyTorch.
"""

import torch
from torch import Tensor

from kernels.triton_cross_entropy import loss_and_grad_

# Logits of a chunk: 64M entries at most (256 MiB in fp32 on the PyTorch path; bf16 and in place on CUDA).
CHUNK_ELEMENTS = 1 << 26


def linear_cross_entropy(hidden: Tensor, weight: Tensor, targets: Tensor, ignore_index: int = -100) -> Tensor:
    """Mean cross entropy of `hidden [N, d] @ weight.T [d, V]` against `targets [N]` (entries equal to
    `ignore_index` are left out of the mean), without holding the [N, V] logits."""
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(
            f"hidden [N, d] and weight [V, d] must share d, got {tuple(hidden.shape)} and {tuple(weight.shape)}"
        )
    if targets.shape != hidden.shape[:1]:
        raise ValueError(f"targets must be [N] = [{hidden.shape[0]}], got {tuple(targets.shape)}")
    return _LinearCrossEntropy.apply(hidden, weight, targets, ignore_index)


def _uses_triton(logits: Tensor) -> bool:
    """The fused kernel works in float32: float64 logits keep the PyTorch path."""
    return logits.is_cuda and logits.dtype != torch.float64


def _chunk_loss_and_grad(logits: Tensor, targets: Tensor, ignore_index: int, want_grad: bool,
                         exact: torch.dtype) -> tuple[Tensor, Tensor | None]:
    """The sum of a chunk's losses (in `exact`) and, given `want_grad`, its gradient with respect to the logits
    (softmax - one_hot(target), zero on ignored rows) in the logits' dtype; the Triton path writes it over them."""
    if _uses_triton(logits):
        return loss_and_grad_(logits, targets, ignore_index, want_grad).sum(), logits if want_grad else None
    valid = targets != ignore_index
    safe_targets = torch.where(valid, targets, 0)
    wide = logits.to(exact)
    log_z = wide.logsumexp(dim=-1)
    loss = ((log_z - wide.gather(1, safe_targets[:, None]).squeeze(1)) * valid).sum()
    if not want_grad:
        return loss, None
    grad = wide.sub_(log_z[:, None]).exp_()
    grad[torch.arange(len(targets), device=targets.device), safe_targets] -= 1
    return loss, (grad * valid[:, None]).to(logits.dtype)


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, targets: Tensor, ignore_index: int) -> Tensor:
        device = hidden.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else hidden.dtype
        h_all, w = hidden.to(dtype), weight.to(dtype)
        exact = torch.promote_types(dtype, torch.float32)  # logits, softmax and sums: fp32 at least
        want_grad = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        grad_hidden = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        grad_weight = torch.zeros_like(weight, dtype=exact) if ctx.needs_input_grad[1] else None
        total = torch.zeros((), dtype=exact, device=hidden.device)
        chunk = max(1, CHUNK_ELEMENTS // weight.shape[0])
        for start in range(0, hidden.shape[0], chunk):
            h, t = h_all[start : start + chunk], targets[start : start + chunk]
            loss, grad_logits = _chunk_loss_and_grad(h @ w.T, t, ignore_index, want_grad, exact)
            total += loss
            if want_grad:
                if grad_hidden is not None:
                    grad_hidden[start : start + chunk] = grad_logits @ w
                if grad_weight is not None:
                    grad_weight += (grad_logits.T @ h).to(exact)
        count = (targets != ignore_index).sum()
        ctx.save_for_backward(*(g for g in (grad_hidden, grad_weight) if g is not None), count)
        ctx.has = (grad_hidden is not None, grad_weight is not None)
        ctx.weight_dtype = weight.dtype
        return total / count

    @staticmethod
    def backward(ctx, grad_loss: Tensor):
        *saved, count = ctx.saved_tensors
        factor = grad_loss / count
        grads = iter(saved)
        grad_hidden = next(grads) * factor.to(saved[0].dtype) if ctx.has[0] else None
        grad_weight = (next(grads) * factor).to(ctx.weight_dtype) if ctx.has[1] else None
        return grad_hidden, grad_weight, None, None
