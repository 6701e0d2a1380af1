"""Triton kernel of HGRN2's decode step, registered as a torch operator that updates the state in place.

One launch per layer serves every sequence and head. A program owns one (sequence, head, V block):
it loads its fp32 state tile S [K, BV] once, and for each of the T new tokens (T = 1 when decoding)
forms the gate from the forget logits f and the layer's lower bound in registers (log lambda and
k = (1 - b) sigmoid(-f), the training scan's `_gate`), advances S <- lambda S + k^T i and writes
o = scale q S; then it stores S back where it was. Decoding is bound by memory traffic: the state is
read and written once per call, q, f and i are read once, and the gate and k are never stored.
"""

from contextlib import nullcontext
from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from kernels.library import define_op
from kernels.triton_scan import _empty, _row_stride
from kernels.triton_scan_dispatch import _cdiv, _next_power_of_2
from kernels.triton_scan_chunk import _bound, _exp, _gate


@triton.jit
def _decode_kernel(
    q, f, v, lower_bound, state, o, stride_q, stride_f, stride_v, scale, T,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, HAS_BOUND: tl.constexpr,
):
    i_nh, i_v = tl.program_id(0), tl.program_id(1)  # (batch x heads) on the axis without a 65535 limit
    i_n, i_h = i_nh // H, i_nh % H
    offs_k = tl.arange(0, BK)
    offs_v = i_v * BV + tl.arange(0, BV)
    mask_k, mask_v = offs_k < K, offs_v < V
    tile = state + i_nh.to(tl.int64) * K * V + offs_k[:, None] * V + offs_v[None, :]
    mask_kv = mask_k[:, None] & mask_v[None, :]
    b, one_minus_b = _bound(lower_bound, i_h, offs_k, mask_k, K, BK, HAS_BOUND)

    S = tl.load(tile, mask=mask_kv, other=0.0)
    for t in range(T):
        row = i_n.to(tl.int64) * T + t
        # `_gate` works on [rows, K] tiles: the one row of this step is a [1, K] tile.
        f_t = tl.load(f + row * stride_f + i_h * K + offs_k[None, :], mask=mask_k[None, :], other=0.0)
        g, k, _, _ = _gate(f_t.to(tl.float32), b[None, :], one_minus_b[None, :], mask_k[None, :])
        q_t = tl.load(q + row * stride_q + i_h * K + offs_k, mask=mask_k, other=0.0).to(tl.float32)
        v_t = tl.load(v + row * stride_v + i_h * V + offs_v, mask=mask_v, other=0.0).to(tl.float32)
        S = S * _exp(tl.reshape(g, [BK]))[:, None] + tl.reshape(k, [BK])[:, None] * v_t[None, :]
        o_t = tl.sum(q_t[:, None] * S, axis=0) * scale
        tl.store(o + (row * H + i_h) * V + offs_v, o_t.to(o.dtype.element_ty), mask=mask_v)
    tl.store(tile, S, mask=mask_kv)


def decode_step(
    q: Tensor, f: Tensor, i: Tensor, lower_bound: Optional[Tensor], state: Tensor, scale: float
) -> Tensor:
    """T steps of the recurrence from `state` [B, H, K, V] (float32, advanced in place); returns o [B, T, H, V].

    q, f: [B, T, H, K] query (already through SiLU) and forget logits; i: [B, T, H, V]; lower_bound: [H, K].
    """
    if state.dtype != torch.float32 or not state.is_contiguous():
        raise TypeError(f"the decode state must be a contiguous float32 tensor, got {state.dtype}")
    q, f, i = (_row_stride(x) for x in (q, f, i))
    B, T, H, K = q.shape
    V = i.shape[-1]
    o = _empty(B, T, H, V, dtype=q.dtype, device=q.device)
    BK = _next_power_of_2(K)
    # V blocks of 32 give B * H * 4 programs at V = 128: enough to cover the SMs already at B * H = 128,
    # and a [128, 32] fp32 tile is 32 registers a thread with four warps.
    BV = min(32, _next_power_of_2(V))
    bound = q.new_empty(0) if lower_bound is None else lower_bound.float().contiguous()
    with torch.cuda.device(q.device.index) if q.is_cuda else nullcontext():
        _decode_kernel[(B * H, _cdiv(V, BV))](
            q, f, i, bound, state, o, q.stride(1), f.stride(1), i.stride(1), scale, T,
            H=H, K=K, V=V, BK=BK, BV=BV, HAS_BOUND=lower_bound is not None,
            num_warps=4 if BK * BV >= 2048 else 1,
        )
    return o


decode_step_op = define_op(decode_step, mutates_args=("state",))


@torch.library.register_fake("hgrn2::decode_step")
def _(q, f, i, lower_bound, state, scale):
    return q.new_empty(*q.shape[:3], i.shape[-1])
