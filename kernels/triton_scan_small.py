"""Triton kernels of the HGRN2 scan for small heads (the LRA's expand ratios: K and V of a few values), launched by
kernels/triton_scan.py in place of the chunked kernels, whose 16-wide tiles would be mostly padding there.

Every entry S[k, v] of every head is its own scalar recurrence, S_t = lambda_t S_{t-1} + k_t i_t. One program
walks the chunks of one sequence for one head, all steps of a chunk at once by an associative scan over time of
the (lambda, k i) pairs, in [C, K, V] tiles; o = scale q S and the gradients are sums over K or V within the tile.
The backward reads each chunk's starting state, kept by the forward (or walks forward once to store them: with
recompute_states), then walks backwards with the state's gradient
D_t = scale q_t do_t + lambda_{t+1} D_{t+1} (a reverse scan), from which dq = scale sum_v S_t do_t,
dk = sum_v D_t i_t, di = sum_k D_t k_t and d lambda = sum_v D_t S_{t-1}.
"""

import triton
import triton.language as tl

from kernels.triton_scan_chunk import _sigmoids
from kernels.triton_scan_kernels import _chunk_rows, _sequence


@triton.jit
def _combine(a1, b1, a2, b2):
    """Two steps of x <- a x + b, the first then the second, as one."""
    return a1 * a2, b1 * a2 + b2


@triton.jit
def _program(T, cu_seqlens, state_offsets, lower_bound, H: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
             KP: tl.constexpr, VP: tl.constexpr, C: tl.constexpr, HAS_BOUND: tl.constexpr, IS_VARLEN: tl.constexpr):
    """What a program owns: head i_h of sequence i_n, all of K and V (padded to KP, VP). Its sequence's bounds and
    chunk-state offset, the key and value offsets and masks, the offsets of its [KP, VP] tile in an [N, H, K, V]
    state, and b and 1 - b ([KP])."""
    i_n, i_h = tl.program_id(0) // H, tl.program_id(0) % H
    bos, eos, state_off = _sequence(i_n, T, C, cu_seqlens, state_offsets, IS_VARLEN)
    offs_k, offs_v = tl.arange(0, KP), tl.arange(0, VP)
    mask_k, mask_v = offs_k < K, offs_v < V
    state_tile = (i_h * K + offs_k[:, None]) * V + offs_v[None, :]
    b = tl.zeros([KP], dtype=tl.float32)
    if HAS_BOUND:
        b += tl.load(lower_bound + i_h * K + offs_k, mask=mask_k, other=0.0)
    return i_n, i_h, bos, eos, state_off, offs_k, offs_v, mask_k, mask_v, state_tile, b, 1 - b


@triton.jit
def _rows_tile(x, rows, stride, i_h, offs, D: tl.constexpr, valid, mask):
    """The [C, len(offs)] tile of head i_h of a [rows, H, D] tensor (row stride `stride`) at the given rows, as
    float32."""
    pointers = x + rows[:, None] * stride + i_h * D + offs[None, :]
    return tl.load(pointers, mask=valid[:, None] & mask[None, :], other=0.0).to(tl.float32)


@triton.jit
def _store_rows(x, value, rows, stride, i_h, offs, D: tl.constexpr, valid, mask):
    pointers = x + rows[:, None] * stride + i_h * D + offs[None, :]
    tl.store(pointers, value.to(x.dtype.element_ty), mask=valid[:, None] & mask[None, :])


@triton.jit
def _steps(f, v, rows, valid, stride_f, stride_v, i_h, offs_k, offs_v, mask_k, mask_v, b, one_minus_b,
           K: tl.constexpr, V: tl.constexpr):
    """lambda and k ([C, KP]) of the given rows, with sigmoid(+-f), and their inputs i ([C, VP]). Rows not
    `valid` are steps that change nothing: lambda 1, k and i 0."""
    sig, sig_neg = _sigmoids(_rows_tile(f, rows, stride_f, i_h, offs_k, K, valid, mask_k))
    on = valid[:, None] & mask_k[None, :]
    lam = tl.where(on, b[None, :] + one_minus_b[None, :] * sig, 1.0)
    k = tl.where(on, one_minus_b[None, :] * sig_neg, 0.0)
    return lam, k, sig, sig_neg, _rows_tile(v, rows, stride_v, i_h, offs_v, V, valid, mask_v)


@triton.jit
def _states(S, lam, k, i):
    """The state after each step of a chunk ([C, KP, VP]) from the state S before it."""
    a = tl.broadcast_to(lam[:, :, None], [lam.shape[0], lam.shape[1], i.shape[1]])
    A, B = tl.associative_scan((a, k[:, :, None] * i[:, None, :]), 0, _combine)
    return A * S[None, :, :] + B


@triton.jit
def _at(x, offs_c, position):
    """Position `position` of a [C, ...] tile, summed out of the first axis."""
    return tl.sum(tl.where((offs_c == position)[:, None, None], x, 0.0), axis=0)


@triton.jit
def _small_fwd_kernel(
    q, f, v, lower_bound, h0, o, final_state, states, cu_seqlens, state_offsets, stride_q, stride_f, stride_v, scale,
    T, H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, KP: tl.constexpr, VP: tl.constexpr, C: tl.constexpr,
    HAS_BOUND: tl.constexpr, HAS_H0: tl.constexpr, OUTPUT_FINAL: tl.constexpr, STORE_STATES: tl.constexpr,
    IS_VARLEN: tl.constexpr, REVERSE: tl.constexpr,
):
    """With STORE_STATES, each chunk's starting state goes to `states` ([chunk states, H, K, V] float32, laid out
    as the chunked kernels' chunk states) for the backward."""
    (i_n, i_h, bos, eos, state_off, offs_k, offs_v, mask_k, mask_v, state_tile, b,
     one_minus_b) = _program(T, cu_seqlens, state_offsets, lower_bound, H, K, V, KP, VP, C, HAS_BOUND, IS_VARLEN)
    mask_kv = mask_k[:, None] & mask_v[None, :]
    length = eos - bos
    offs_c = tl.arange(0, C)
    S = tl.zeros([KP, VP], dtype=tl.float32)
    if HAS_H0:
        S += tl.load(h0 + i_n.to(tl.int64) * H * K * V + state_tile, mask=mask_kv, other=0.0)
    for i_t in range(0, tl.cdiv(length, C)):
        if STORE_STATES:
            tl.store(states + (state_off + i_t) * H * K * V + state_tile, S, mask=mask_kv)
        valid, rows = _chunk_rows(i_t, offs_c, length, bos, eos, C, REVERSE)
        lam, k, sig, sig_neg, i = _steps(f, v, rows, valid, stride_f, stride_v, i_h, offs_k, offs_v, mask_k,
                                         mask_v, b, one_minus_b, K, V)
        S_all = _states(S, lam, k, i)
        q_t = _rows_tile(q, rows, stride_q, i_h, offs_k, K, valid, mask_k)
        _store_rows(o, scale * tl.sum(q_t[:, :, None] * S_all, axis=1), rows, H * V, i_h, offs_v, V, valid,
                    mask_v)
        S = _at(S_all, offs_c, C - 1)  # rows past the sequence's end change nothing
    if OUTPUT_FINAL:
        tl.store(final_state + i_n.to(tl.int64) * H * K * V + state_tile, S, mask=mask_kv)


@triton.jit
def _small_bwd_kernel(
    q, f, v, do, lower_bound, h0, d_final, states, dq, df, dv, db, dh0, cu_seqlens, state_offsets, stride_q,
    stride_f, stride_v, scale, T,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, KP: tl.constexpr, VP: tl.constexpr, C: tl.constexpr,
    HAS_BOUND: tl.constexpr, HAS_H0: tl.constexpr, HAS_DFINAL: tl.constexpr, WRITE_DH0: tl.constexpr,
    STATES_KEPT: tl.constexpr, IS_VARLEN: tl.constexpr, REVERSE: tl.constexpr,
):
    """`states` ([chunk states, H, K, V] float32, as the chunked kernels lay them out) holds each chunk's starting
    state: the forward's (STATES_KEPT), or scratch that this program's first walk fills. db gets one [H, K] sum per
    sequence."""
    (i_n, i_h, bos, eos, state_off, offs_k, offs_v, mask_k, mask_v, state_tile, b,
     one_minus_b) = _program(T, cu_seqlens, state_offsets, lower_bound, H, K, V, KP, VP, C, HAS_BOUND, IS_VARLEN)
    mask_kv = mask_k[:, None] & mask_v[None, :]
    length = eos - bos
    offs_c = tl.arange(0, C)
    n_chunks = tl.cdiv(length, C)
    if not STATES_KEPT:
        S = tl.zeros([KP, VP], dtype=tl.float32)
        if HAS_H0:
            S += tl.load(h0 + i_n.to(tl.int64) * H * K * V + state_tile, mask=mask_kv, other=0.0)
        for i_t in range(0, n_chunks):
            tl.store(states + (state_off + i_t) * H * K * V + state_tile, S, mask=mask_kv)
            valid, rows = _chunk_rows(i_t, offs_c, length, bos, eos, C, REVERSE)
            lam, k, sig, sig_neg, i = _steps(f, v, rows, valid, stride_f, stride_v, i_h, offs_k, offs_v, mask_k,
                                             mask_v, b, one_minus_b, K, V)
            S = _at(_states(S, lam, k, i), offs_c, C - 1)

    # carry: lambda_{t+1} D_{t+1} for the chunk's last row t (the final state's gradient after the last chunk)
    carry = tl.zeros([KP, VP], dtype=tl.float32)
    if HAS_DFINAL:
        carry += tl.load(d_final + i_n.to(tl.int64) * H * K * V + state_tile, mask=mask_kv, other=0.0)
    db_sum = tl.zeros([KP], dtype=tl.float32)
    for j in range(0, n_chunks):
        i_t = n_chunks - 1 - j
        S_start = tl.load(states + (state_off + i_t) * H * K * V + state_tile, mask=mask_kv, other=0.0)
        valid, rows = _chunk_rows(i_t, offs_c, length, bos, eos, C, REVERSE)
        # S_{t-1}: the scan of each row's previous step, the chunk's first row starting from S_start
        before, rows_before = _chunk_rows(i_t, offs_c - 1, length, bos, eos, C, REVERSE)
        lam_b, k_b, sig_b, sig_neg_b, i_b = _steps(f, v, rows_before, before & (offs_c >= 1), stride_f, stride_v,
                                                   i_h, offs_k, offs_v, mask_k, mask_v, b, one_minus_b, K, V)
        S_prev = _states(S_start, lam_b, k_b, i_b)
        lam, k, sig, sig_neg, i = _steps(f, v, rows, valid, stride_f, stride_v, i_h, offs_k, offs_v, mask_k,
                                         mask_v, b, one_minus_b, K, V)
        S_t = lam[:, :, None] * S_prev + k[:, :, None] * i[:, None, :]
        # D_t = scale q_t do_t + lambda_{t+1} D_{t+1}: lambda_{t+1} of the next row in the chunk (1 past the
        # sequence's end, through which the final state's gradient comes), the carry at the chunk's last row
        after, rows_after = _chunk_rows(i_t, offs_c + 1, length, bos, eos, C, REVERSE)
        lam_a, k_a, sig_a, sig_neg_a, i_a = _steps(f, v, rows_after, after & (offs_c + 1 < C), stride_f, stride_v,
                                                   i_h, offs_k, offs_v, mask_k, mask_v, b, one_minus_b, K, V)
        a = tl.broadcast_to(tl.where((offs_c < C - 1)[:, None], lam_a, 0.0)[:, :, None], [C, KP, VP])
        q_t = _rows_tile(q, rows, stride_q, i_h, offs_k, K, valid, mask_k)
        do_t = _rows_tile(do, rows, H * V, i_h, offs_v, V, valid, mask_v)
        inputs = scale * q_t[:, :, None] * do_t[:, None, :] + tl.where(
            (offs_c == C - 1)[:, None, None], carry[None, :, :], 0.0)
        decays, D = tl.associative_scan((a, inputs), 0, _combine, reverse=True)

        _store_rows(dq, scale * tl.sum(S_t * do_t[:, None, :], axis=2), rows, H * K, i_h, offs_k, K, valid, mask_k)
        _store_rows(dv, tl.sum(D * k[:, :, None], axis=1), rows, H * V, i_h, offs_v, V, valid, mask_v)
        # lambda = b + (1 - b) sigmoid(f), k = (1 - b) sigmoid(-f): both move by (1 - b) sigmoid(f) sigmoid(-f) per
        # unit of f, in opposite directions, and by sigmoid(-f) per unit of b
        d_gate = tl.sum(D * S_prev, axis=2) - tl.sum(D * i[:, None, :], axis=2)
        on = valid[:, None] & mask_k[None, :]
        _store_rows(df, one_minus_b[None, :] * sig * sig_neg * d_gate, rows, H * K, i_h, offs_k, K, valid, mask_k)
        db_sum += tl.sum(tl.where(on, sig_neg * d_gate, 0.0), axis=0)
        carry = _at(lam[:, :, None] * D, offs_c, 0)
    if WRITE_DH0:
        tl.store(dh0 + i_n.to(tl.int64) * H * K * V + state_tile, carry, mask=mask_kv)
    if HAS_BOUND:
        tl.store(db + tl.program_id(0).to(tl.int64) * K + offs_k, db_sum, mask=mask_k)
