"""The public HGRN2 scan and decode step: input checks, then dispatch to a backend by device."""

from typing import Callable, Literal

import torch
from torch import Tensor

from kernels.reference import chunked_recurrence, hgrn2_gate, naive_recurrence

Backend = Literal["auto", "triton", "chunked", "naive"]


def hgrn2_scan(
    q: Tensor,
    f: Tensor,
    i: Tensor,
    lower_bound: Tensor | None = None,
    *,
    scale: float | None = None,
    initial_state: Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: Tensor | None = None,
    reverse: bool = False,
    recompute_states: bool = False,
    backend: Backend = "auto",
    check_bound: bool = True,
) -> tuple[Tensor, Tensor | None]:
    """HGRN2's gated linear recurrence over a whole sequence.

    S_t = Diag(lambda_t) S_{t-1} + (1 - lambda_t)^T i_t and o_t = scale * q_t S_t per head, with
    lambda_t = b + (1 - b) * sigmoid(f_t) formed from the forget logits f inside the scan.

    Args:
        q, f: [B, T, H, K] output gate (the query) and forget-gate logits.
        i: [B, T, H, V] input (the value).
        lower_bound: the layer's lower bound b in [0, 1), [H, K] or [H * K]; None for no bound.
        scale: factor on q; None means K ** -0.5.
        initial_state: [N, H, K, V], N = B, or the number of sequences when cu_seqlens is given.
        output_final_state: also return the state after the last step, [N, H, K, V] in float32.
        cu_seqlens: int tensor [N + 1] of packed sequence boundaries (B must be 1): no state crosses them.
        reverse: scan from the end of each sequence to its start (the backward half of a
            bidirectional layer).
        recompute_states: Triton backend: keep no chunk states (K * V / 32 values per token and head) for
            the backward, which rebuilds them with one more pass over f and i. Less memory, a little more
            time; the PyTorch backends keep what autograd keeps.
        backend: "auto" picks Triton on CUDA and the chunked PyTorch form elsewhere.
        check_bound: check that lower_bound lies in [0, 1). On a GPU the verdict is read after the scan's
            kernels are queued, so the host waits only for the work queued before them (not for the scan);
            pass False where the bound is in range by construction.

    Returns:
        o [B, T, H, V] in the dtype of q, and the final state or None.
    """
    _check_scan_inputs(q, f, i, lower_bound, initial_state, cu_seqlens)
    bound_verdict = _bound_range_verdict(lower_bound) if check_bound and lower_bound is not None else None
    H, K = q.shape[2:]
    if lower_bound is not None:
        lower_bound = lower_bound.reshape(H, K)
    scale = K**-0.5 if scale is None else scale
    if backend == "auto":
        backend = "triton" if q.is_cuda else "chunked"
    if backend == "triton":
        from kernels.triton_scan import triton_scan

        o, state = triton_scan(q, f, i, lower_bound, scale, initial_state, cu_seqlens, reverse, output_final_state,
                               recompute_states)
    elif backend in ("chunked", "naive"):
        recurrence = chunked_recurrence if backend == "chunked" else naive_recurrence
        o, state = _reference_scan(recurrence, q, f, i, lower_bound, scale, initial_state, cu_seqlens, reverse)
    else:
        raise ValueError(f"unknown scan backend {backend!r}: use 'auto', 'triton', 'chunked' or 'naive'")
    if bound_verdict is not None:
        bound_verdict()
    return o, (state if output_final_state else None)


def hgrn2_step(
    q: Tensor,
    f: Tensor,
    i: Tensor,
    state: Tensor,
    lower_bound: Tensor | None = None,
    *,
    scale: float | None = None,
    backend: Literal["auto", "triton", "naive"] = "auto",
) -> Tensor:
    """A few decode steps: advances `state` [B, H, K, V] (float32) in place and returns o [B, T, H, V].

    q, f and i are [B, T, H, K|V] with a short T (1 when decoding one token at a time). "auto" runs the
    fused Triton step on CUDA (one launch for all heads) and the per-step reference loop elsewhere.
    """
    if state.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"the decode state must be float32 (or float64), got {state.dtype}")
    # Shapes only: a value check would wait on the GPU at every token (and cannot run in a CUDA graph).
    _check_scan_inputs(q, f, i, lower_bound, state, None)
    H, K = q.shape[2:]
    if lower_bound is not None:
        lower_bound = lower_bound.reshape(H, K)
    scale = K**-0.5 if scale is None else scale
    if backend == "auto":
        backend = "triton" if q.is_cuda and state.dtype == torch.float32 else "naive"
    if backend == "triton":
        from kernels.triton_decode import decode_step_op

        return decode_step_op(q, f, i, lower_bound, state, float(scale))
    if backend != "naive":
        raise ValueError(f"unknown decode backend {backend!r}: use 'auto', 'triton' or 'naive'")
    o, final_state = _reference_scan(naive_recurrence, q, f, i, lower_bound, scale, state, None, False)
    state.copy_(final_state)
    return o


def _reference_scan(recurrence, q, f, i, lower_bound, scale, initial_state, cu_seqlens, reverse):
    g, k = hgrn2_gate(f, lower_bound)
    if cu_seqlens is None:
        segments = [(slice(None), initial_state)]
    else:
        bounds = cu_seqlens.tolist()
        segments = [
            (slice(start, end), None if initial_state is None else initial_state[n : n + 1])
            for n, (start, end) in enumerate(zip(bounds[:-1], bounds[1:]))
        ]
    outputs, states = [], []
    for span, h0 in segments:
        xs = [x[:, span] for x in (q, k, i, g)]
        if reverse:
            xs = [x.flip(1) for x in xs]
        o, state = recurrence(*xs, scale, h0)
        outputs.append(o.flip(1) if reverse else o)
        states.append(state)
    state = torch.cat(states, 0)
    return torch.cat(outputs, 1).to(q.dtype), state.to(torch.promote_types(state.dtype, torch.float32))


def _check_scan_inputs(q, f, i, lower_bound, initial_state, cu_seqlens) -> None:
    """Fail with a message that says what is wrong; a silent wrong answer is the worst outcome."""
    for name, x in (("q", q), ("f", f), ("i", i)):
        if x.dim() != 4:
            raise ValueError(f"{name} must be [batch, time, heads, head_dim], got shape {tuple(x.shape)}")
        if not x.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {x.dtype}")
        if x.device != q.device:
            raise ValueError(f"{name} is on {x.device} but q is on {q.device}: put all inputs on one device")
    B, T, H, K = q.shape
    if f.shape != q.shape:
        raise ValueError(f"f must have the shape of q {tuple(q.shape)}, got {tuple(f.shape)}")
    if i.shape[:3] != q.shape[:3]:
        raise ValueError(f"i must be [{B}, {T}, {H}, V] like q in its first three dims, got {tuple(i.shape)}")
    if lower_bound is not None:
        if lower_bound.numel() != H * K:
            raise ValueError(
                f"lower_bound must have heads * head_dim = {H * K} values ([H, K] or [H * K]), "
                f"got shape {tuple(lower_bound.shape)}"
            )
        if lower_bound.device != q.device:
            raise ValueError(f"lower_bound is on {lower_bound.device} but q is on {q.device}")
    n_states = B
    if cu_seqlens is not None:
        if B != 1:
            raise ValueError(f"with cu_seqlens the sequences are packed along time, so batch must be 1, got {B}")
        if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2 or cu_seqlens.is_floating_point():
            raise ValueError("cu_seqlens must be a 1-D integer tensor [0, end_1, ..., T] of sequence boundaries")
        bounds = cu_seqlens.tolist()
        if bounds[0] != 0 or bounds[-1] != T or any(b >= e for b, e in zip(bounds[:-1], bounds[1:])):
            raise ValueError(f"cu_seqlens must start at 0, increase strictly and end at T = {T}, got {bounds[:8]}...")
        n_states = len(bounds) - 1
    if initial_state is not None:
        expected = (n_states, H, K, i.shape[-1])
        if tuple(initial_state.shape) != expected:
            raise ValueError(
                f"initial_state must be {list(expected)} ([sequences, H, K, V]), got {list(initial_state.shape)}"
            )
        if initial_state.device != q.device:
            raise ValueError(f"initial_state is on {initial_state.device} but q is on {q.device}")


def _bound_range_verdict(lower_bound: Tensor) -> Callable[[], None]:
    """Starts reading lower_bound's extremes and returns what raises if they leave [0, 1). Called before the
    scan's kernels are queued and the result after, so on a GPU the host waits for the small copy only, while
    the scan runs. Waiting up front left the GPU idle while the host launched the scan: the forward at the record
    shape took 1.28 / 1.59 ms with it at T 2K / 16K, 1.11 / 1.45 now, 1.10 / 1.43 unchecked (H100). An
    out-of-range bound cannot make the kernels read out of bounds, only compute nonsense, which the
    error then discards. NaN passes, as in q, f and i: a diverged model should fail at its loss, with advice.
    Skipped where reading device memory is not allowed (compile, graph capture)."""
    if not _may_sync():
        return lambda: None
    extremes = torch.stack(torch.aminmax(lower_bound.detach().float()))
    if extremes.is_cuda:
        extremes = extremes.to("cpu", non_blocking=True)
        copied = torch.cuda.Event()
        copied.record(torch.cuda.current_stream(lower_bound.device))  # the copy's stream, whichever GPU is current
    else:
        copied = None

    def raise_if_out_of_range() -> None:
        if copied is not None:
            copied.synchronize()
        low, high = extremes.tolist()
        if low < 0 or high >= 1:
            raise ValueError(
                f"lower_bound must lie in [0, 1) (it is a forget-gate floor), got values in [{low:.4g}, {high:.4g}]"
            )

    return raise_if_out_of_range


def _may_sync() -> bool:
    """Value checks read device memory; skip them where a sync is not allowed (compile, graph capture)."""
    if torch.compiler.is_compiling():
        return False
    return not (torch.cuda.is_available() and torch.cuda.is_current_stream_capturing())
