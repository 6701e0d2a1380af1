"""Triton kernels of the HGRN2 training scan (forward and backward), registered as torch custom ops.

The gate is fused: the kernels read the forget logits f and the layer's lower bound b and form
log(lambda) and k = (1 - b) sigmoid(-f) in registers; k is never stored. Time is cut into chunks of
C tokens. The forward and the backward are each a light sequential pass over the chunks followed by
one fully parallel over them:

  states    one program per (sequence, head, K block, V block) walks its chunks in order and only
            advances the state, S <- exp(G_C) S + (k exp(G_C - G))^T v, storing it at every chunk
            start (and the final state): K V / C values per token. It reads f and v, never q.
  outputs   one program per (chunk, head), all chunks in parallel: o = scale (q exp(G)) S + (A masked) v
            with A = (q . k exp(G_t - G_s)) and S the stored state at the chunk's start.
  dh        one program per (sequence, head, K block, V block) walks the chunks backwards and stores
            the gradient of the state at each chunk end: dS <- exp(G_C) dS + scale (q exp(G))^T do.
  grads     one program per (chunk, head), all chunks in parallel: dq, dk, dv, the gate gradient
            dG = q dq - k dk (reverse-cumulated within the chunk, plus the chunk-end state term
            sum_v S dS), and from it df and the lower bound's gradient, per chunk.
With few (sequence, head) walks the two sequential passes cut each walk into segments run at once, joined
by a short carry pass (`_segments`, `_Walks`).

Intra-chunk scores A[t, s] = sum_k q_tk k_sk exp(G_tk - G_sk) are a matmul after anchoring at the
chunk's middle row m: (q exp(G - G_m)) (k exp(G_m - G))^T. That is exact as long as no exponent
leaves float range, which the kernel checks per chunk (|G - G_m| <= 40); a chunk with a wider gate
range (gates near 0 without a lower bound) takes an exact elementwise path instead.
"""

import functools
import os
from contextlib import nullcontext
from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor
from triton.language.extra import libdevice

CHUNK = 32
POISON_OUTPUTS = False
"""Tests set this: outputs then start as NaN, so an element a kernel forgot to write shows."""
FLOAT32_TINY = tl.constexpr(1.1754944e-38)
"""Smallest normal float32: GPUs flush what lies below it to 0."""
ANCHOR_RANGE = tl.constexpr(40.0)
"""Largest |G - G_m| of the matmul path: exp(+-2 * 40) stays far inside float32 and bfloat16 range."""
LOG2_E = tl.constexpr(1.4426950408889634)
FAST_LOG = tl.constexpr(os.environ.get("TRITON_INTERPRET", "0") != "1")
"""The GPU's approximate logarithm (the interpreter has no libdevice fast_logf; the GPU tests cover it)."""


@triton.jit
def _exp(x):
    """e^x as a multiply and one ex2.approx.ftz. tl.exp adds two instructions per element to keep subnormal
    results (below 1.2e-38), which nothing here needs: such a decay is 0 for every sum it enters."""
    return tl.exp2(x * LOG2_E)


@triton.jit
def _log(x):
    """log(x) for normal x: lg2.approx and a multiply on the GPU, instead of libdevice's ~20-instruction
    polynomial (tl.log). The gate is the only logarithm: every kernel evaluates it per element it touches."""
    if FAST_LOG:
        return libdevice.fast_logf(x)
    return tl.log(x)


@triton.jit
def _gate(f, b, one_minus_b, mask):
    """g = log(lambda) and k = 1 - lambda from fp32 logits f, with sigmoid(f) and sigmoid(-f) for the backward;
    zero where masked. lambda = b + (1 - b) sigmoid(f), k = (1 - b) sigmoid(-f), b = 0 without a bound.

    Three special-function operations per element (an exponential, a reciprocal, a logarithm), which is
    what bounds the kernels' arithmetic: each computes the gate of every element it touches. lambda is a
    sum of positive terms, never a difference, so g is right to about 1e-7 of its size. Where b is 0,
    lambda = sigmoid(f) underflows below f = -87; it is held at float32's smallest normal there, a decay
    to 0 within one step either way (the backward's chain rule does not go through lambda there)."""
    e = _exp(-tl.abs(f))
    r = 1 / (1 + e)  # sigmoid(|f|)
    sig = tl.where(f >= 0, r, e * r)
    sig_neg = tl.where(f >= 0, e * r, r)
    k = one_minus_b[None, :] * sig_neg
    g = _log(tl.maximum(b[None, :] + one_minus_b[None, :] * sig, FLOAT32_TINY))
    return tl.where(mask, g, 0.0), tl.where(mask, k, 0.0), sig, sig_neg


@triton.jit
def _bound(lower_bound, i_h, offs_k, mask_k, K: tl.constexpr, BK: tl.constexpr, HAS_BOUND: tl.constexpr):
    """b and 1 - b of the head's K channels (0 and 1 when there is no bound)."""
    b = tl.zeros([BK], dtype=tl.float32)
    if HAS_BOUND:
        b += tl.load(lower_bound + i_h * K + offs_k, mask=mask_k, other=0.0).to(tl.float32)
    return b, 1 - b


@triton.jit
def _sequence(i_n, T, C: tl.constexpr, cu_seqlens, state_offsets, IS_VARLEN: tl.constexpr):
    """First row, end row and the offset of its chunk states, for sequence i_n."""
    if IS_VARLEN:
        bos = tl.load(cu_seqlens + i_n).to(tl.int64)
        eos = tl.load(cu_seqlens + i_n + 1).to(tl.int64)
        state_off = tl.load(state_offsets + i_n).to(tl.int64)
    else:
        bos = i_n.to(tl.int64) * T
        eos = bos + T
        state_off = i_n.to(tl.int64) * (tl.cdiv(T, C) + 1)
    return bos, eos, state_off


@triton.jit
def _chunk_of_program(i_c, T, C: tl.constexpr, chunk_table, IS_VARLEN: tl.constexpr):
    """Sequence and chunk index of program i_c of a chunk-parallel kernel. A packed batch's chunk count is only
    bounded in advance: its table marks the programs past the last chunk with sequence -1."""
    if IS_VARLEN:
        i_n = tl.load(chunk_table + 2 * i_c)
        i_t = tl.load(chunk_table + 2 * i_c + 1)
    else:
        n_chunks_per_sequence = tl.cdiv(T, C)
        i_n = i_c // n_chunks_per_sequence
        i_t = i_c % n_chunks_per_sequence
    return i_n, i_t


@triton.jit
def _chunk_rows(i_t, offs_c, length, bos, eos, C: tl.constexpr, REVERSE: tl.constexpr):
    """Which positions of chunk i_t are inside the sequence, and their memory rows: a reverse scan walks each
    sequence from its end."""
    p = i_t * C + offs_c
    if REVERSE:
        return p < length, eos - 1 - p
    return p < length, bos + p


@triton.jit
def _chunk_gate(f, rows, mask_ck, stride_f, i_h, offs_k, offs_c, b, one_minus_b, K: tl.constexpr, C: tl.constexpr):
    """The gate of one chunk from its forget logits: `_gate`'s g, k, sigmoid(+-f), then the cumulative gate G
    from the chunk's start and its last row G_last, the decay across the whole chunk."""
    f_t = tl.load(f + rows[:, None] * stride_f + i_h * K + offs_k[None, :], mask=mask_ck, other=0.0)
    g, k, sig, sig_neg = _gate(f_t.to(tl.float32), b, one_minus_b, mask_ck)
    G = tl.cumsum(g, axis=0)
    return g, k, sig, sig_neg, G, _row_of(G, offs_c, C - 1)


@triton.jit
def _row_of(x, offs_c, m):
    """Row m of a [C, D] register tile, as a [D] vector."""
    return tl.sum(tl.where((offs_c == m)[:, None], x, 0.0), axis=0)


@triton.jit
def _anchor(G, offs_c, valid, C: tl.constexpr):
    """The anchor row G_m and whether every |G - G_m| of the chunk is within the matmul path's range."""
    G_mid = _row_of(G, offs_c, C // 2 - 1)
    spread = tl.max(tl.max(tl.where(valid[:, None], tl.abs(G - G_mid[None, :]), 0.0), axis=1), axis=0)
    return G_mid, spread <= ANCHOR_RANGE


@triton.jit
def _scores_exact(q, k, G, offs_c, C: tl.constexpr, BK: tl.constexpr):
    """A[t, s] = sum_k q_tk k_sk exp(G_tk - G_sk), one key at a time: no exponent is ever positive."""
    A = tl.zeros([C, C], dtype=tl.float32)
    for s in range(C):
        k_s = _row_of(k, offs_c, s)
        G_s = _row_of(G, offs_c, s)
        column = tl.sum(q * k_s[None, :] * _exp(tl.minimum(G - G_s[None, :], 0.0)), axis=1)
        A = tl.where(offs_c[None, :] == s, column[:, None], A)
    return A


@triton.jit
def _anchored_operands(q, k, G, offs_c, valid, C: tl.constexpr, OPERAND_DT: tl.constexpr):
    """Whether the chunk's gate range allows the anchored matmul, its anchor row G_m and the anchored operands
    q exp(G - G_m) and k exp(G_m - G) in OPERAND_DT (q and k themselves where it does not)."""
    G_mid, anchored = _anchor(G, offs_c, valid, C)
    if anchored:
        q_mid = (q * _exp(G - G_mid[None, :])).to(OPERAND_DT)
        k_mid = (k * _exp(G_mid[None, :] - G)).to(OPERAND_DT)
    else:
        q_mid = q.to(OPERAND_DT)
        k_mid = k.to(OPERAND_DT)
    return anchored, G_mid, q_mid, k_mid


@triton.jit
def _scores(q, k, G, offs_c, anchored, q_mid, k_mid, C: tl.constexpr, BK: tl.constexpr, PRECISION: tl.constexpr):
    """A[t, s] = sum_k q_tk k_sk exp(G_tk - G_sk) for every (t, s) of a chunk (the caller masks), from float32 q, k
    and `_anchored_operands`: one matmul when the chunk is anchored, else elementwise."""
    if anchored:
        A = tl.dot(q_mid, tl.trans(k_mid), input_precision=PRECISION)
    else:
        A = _scores_exact(q, k, G, offs_c, C, BK)
    return A


@triton.jit
def _intra_grads_exact(q, k, G, dA, offs_c, C: tl.constexpr, BK: tl.constexpr):
    """dq_t = sum_s dA[t, s] k_s exp(G_t - G_s) and dk_s = sum_t dA[t, s] q_t exp(G_t - G_s), elementwise."""
    dq = tl.zeros([C, BK], dtype=tl.float32)
    dk = tl.zeros([C, BK], dtype=tl.float32)
    for s in range(C):
        k_s = _row_of(k, offs_c, s)
        G_s = _row_of(G, offs_c, s)
        decay = _exp(tl.minimum(G - G_s[None, :], 0.0))
        dA_s = tl.sum(tl.where(offs_c[None, :] == s, dA, 0.0), axis=1)
        dq += dA_s[:, None] * k_s[None, :] * decay
        dk_s = tl.sum(dA_s[:, None] * q * decay, axis=0)
        dk = tl.where((offs_c == s)[:, None], dk_s[None, :], dk)
    return dq, dk


@triton.jit
def _state_tile_program(T, n_segments, cu_seqlens, state_offsets, lower_bound, H: tl.constexpr, K: tl.constexpr,
                        V: tl.constexpr, C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                        HAS_BOUND: tl.constexpr, IS_VARLEN: tl.constexpr):
    """What a sequential kernel's program owns: the [BK, BV] tile (K block i_k, V block i_v) of the state of
    sequence and head i_nh, over segment i_seg of its chunks (see `_segments`). Its sequence-head, segment,
    head, sequence bounds and chunk-state offset, the tile's offsets and masks, and b and 1 - b of its K
    channels. The grid is one axis, tiles of a state next to each other: a second or third axis would stop
    at 65535 (Path-X's 2D scan has a million sequence-heads)."""
    tiles_per_state: tl.constexpr = tl.cdiv(K, BK) * tl.cdiv(V, BV)
    i_walk, i_kv = tl.program_id(0) // tiles_per_state, tl.program_id(0) % tiles_per_state
    i_nh, i_seg = i_walk // n_segments, i_walk % n_segments
    i_k, i_v = i_kv % tl.cdiv(K, BK), i_kv // tl.cdiv(K, BK)
    i_n, i_h = i_nh // H, i_nh % H
    bos, eos, state_off = _sequence(i_n, T, C, cu_seqlens, state_offsets, IS_VARLEN)
    offs_k = i_k * BK + tl.arange(0, BK)
    offs_v = i_v * BV + tl.arange(0, BV)
    mask_k, mask_v = offs_k < K, offs_v < V
    mask_kv = mask_k[:, None] & mask_v[None, :]
    state_tile = offs_k[:, None] * V + offs_v[None, :]
    b, one_minus_b = _bound(lower_bound, i_h, offs_k, mask_k, K, BK, HAS_BOUND)
    return (i_nh, i_seg, i_v, i_n, i_h, bos, eos, state_off, offs_k, offs_v, mask_k, mask_v, mask_kv, state_tile,
            b, one_minus_b)


@triton.jit
def _store_segment_end(S, D, segment_ends, segment_decays, i_nh, i_seg, n_segments, i_v, offs_k, mask_k, state_tile,
                       mask_kv, K: tl.constexpr, V: tl.constexpr):
    """A segment program's results for `_segment_carry_kernel`: its local end tile (float32) and the gate sum D
    over its chunks (the first V block writes that)."""
    i_segment = i_nh.to(tl.int64) * n_segments + i_seg
    tl.store(segment_ends + i_segment * K * V + state_tile, S, mask=mask_kv)
    tl.store(segment_decays + i_segment * K + offs_k, D, mask=mask_k & (i_v == 0))


@triton.jit
def _initial_tile(x, i_nh, state_tile, mask_kv, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr,
                  BV: tl.constexpr, GIVEN: tl.constexpr):
    """The program's tile of a float32 [N, H, K, V] state (an initial state or a final state's gradient), zeros
    when none is given."""
    tile = tl.zeros([BK, BV], dtype=tl.float32)
    if GIVEN:
        tile += tl.load(x + i_nh.to(tl.int64) * K * V + state_tile, mask=mask_kv, other=0.0).to(tl.float32)
    return tile


@triton.jit
def _fwd_states_kernel(
    f, v, lower_bound, h0, states, final_state, chunk_decays, segment_ends, segment_decays, seeds, cu_seqlens,
    state_offsets, stride_f, stride_v, T, n_segments, segment_chunks,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    HAS_BOUND: tl.constexpr, HAS_H0: tl.constexpr, OUTPUT_FINAL: tl.constexpr, SEGMENTED: tl.constexpr,
    SEEDED: tl.constexpr, IS_VARLEN: tl.constexpr, REVERSE: tl.constexpr, PRECISION: tl.constexpr,
    WIDE_DT: tl.constexpr,
):
    """SEGMENTED: each segment from zero (see `_segments`), for `_segment_carry_kernel`. SEEDED: each segment from
    its true starting tile, the seed a segmented forward left (`_Walks.carry`), so the chunk states are exact with
    no carry pass: the backward's recomputation."""
    (i_nh, i_seg, i_v, i_n, i_h, bos, eos, state_off, offs_k, offs_v, mask_k, mask_v, mask_kv, state_tile, b,
     one_minus_b) = _state_tile_program(T, n_segments, cu_seqlens, state_offsets, lower_bound, H, K, V, C, BK, BV,
                                        HAS_BOUND, IS_VARLEN)
    length = eos - bos
    offs_c = tl.arange(0, C)
    S = tl.where(i_seg == 0, _initial_tile(h0, i_nh, state_tile, mask_kv, K, V, BK, BV, HAS_H0), 0.0)
    if SEEDED:  # the first segment's seed is zero: it starts from the initial tile above
        S += tl.load(seeds + (i_nh.to(tl.int64) * n_segments + i_seg) * K * V + state_tile, mask=mask_kv,
                     other=0.0).to(tl.float32)
    D = tl.zeros([BK], dtype=tl.float32)  # gate sum since the segment's start
    n_chunks = tl.cdiv(length, C)
    first = i_seg * segment_chunks
    last = tl.minimum(first + segment_chunks, n_chunks)
    for i_t in range(first, last):
        tl.store(states + ((state_off + i_t) * H + i_h) * K * V + state_tile, S.to(states.dtype.element_ty),
                 mask=mask_kv)
        if SEGMENTED:
            tl.store(chunk_decays + ((state_off + i_t) * H + i_h) * K + offs_k, D, mask=mask_k & (i_v == 0))
        valid, rows = _chunk_rows(i_t, offs_c, length, bos, eos, C, REVERSE)
        mask_ck = valid[:, None] & mask_k[None, :]
        _, k, _, _, G, G_last = _chunk_gate(f, rows, mask_ck, stride_f, i_h, offs_k, offs_c, b, one_minus_b, K, C)
        k_end = (k * _exp(G_last[None, :] - G)).to(WIDE_DT)
        v_t = tl.load(v + rows[:, None] * stride_v + i_h * V + offs_v[None, :], mask=valid[:, None] & mask_v[None, :],
                      other=0.0)
        S = S * _exp(G_last)[:, None] + tl.dot(tl.trans(k_end), v_t.to(WIDE_DT), input_precision=PRECISION)
        D += G_last
    if last == n_chunks:
        # The layout's slot after a sequence's last chunk is filled too: no slot of the buffer is left unwritten.
        tl.store(states + ((state_off + n_chunks) * H + i_h) * K * V + state_tile, S.to(states.dtype.element_ty),
                 mask=mask_kv)
    if SEGMENTED:
        if last == n_chunks:
            tl.store(chunk_decays + ((state_off + n_chunks) * H + i_h) * K + offs_k, D,
                     mask=mask_k & (i_v == 0))
        _store_segment_end(S, D, segment_ends, segment_decays, i_nh, i_seg, n_segments, i_v, offs_k,
                           mask_k, state_tile, mask_kv, K, V)
    elif OUTPUT_FINAL:
        tl.store(final_state + i_nh.to(tl.int64) * K * V + state_tile, S, mask=mask_kv)


@triton.jit
def _chunk_tile(i_n, i_t, i_h, T, cu_seqlens, state_offsets, lower_bound, H: tl.constexpr, K: tl.constexpr,
                C: tl.constexpr, BK: tl.constexpr, HAS_BOUND: tl.constexpr, IS_VARLEN: tl.constexpr,
                REVERSE: tl.constexpr):
    """What a chunk-parallel kernel's program owns: chunk i_t of sequence i_n, head i_h, the whole K. Its
    sequence's chunk-state offset and length, the chunk's rows and masks, the causal mask, b and 1 - b."""
    bos, eos, state_off = _sequence(i_n, T, C, cu_seqlens, state_offsets, IS_VARLEN)
    length = eos - bos
    offs_c = tl.arange(0, C)
    offs_k = tl.arange(0, BK)
    mask_k = offs_k < K
    valid, rows = _chunk_rows(i_t, offs_c, length, bos, eos, C, REVERSE)
    mask_ck = valid[:, None] & mask_k[None, :]
    causal = offs_c[:, None] >= offs_c[None, :]
    b, one_minus_b = _bound(lower_bound, i_h, offs_k, mask_k, K, BK, HAS_BOUND)
    return state_off, length, offs_c, offs_k, mask_k, valid, rows, mask_ck, causal, b, one_minus_b


@triton.jit
def _fwd_output_kernel(
    q, f, v, lower_bound, states, o, chunk_decays, seeds, cu_seqlens, state_offsets, chunk_table, stride_q, stride_f,
    stride_v, scale, T, n_segments, segment_chunks,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    HAS_BOUND: tl.constexpr, IS_VARLEN: tl.constexpr, REVERSE: tl.constexpr, PRECISION: tl.constexpr,
    WIDE_DT: tl.constexpr, SEEDED: tl.constexpr,
):
    """SEEDED: the chunk states are a segmented walk's local ones; the true state at a chunk's start is
    local + exp(D) seed, D the gate sum since its segment's start and seed the segment's true start
    (`_Walks.carry`), so the correction is one more product, (q exp(G + D)) seed, instead of a carry pass that
    reads and writes every chunk state."""
    i_c, i_h = tl.program_id(0), tl.program_id(1)
    i_n, i_t = _chunk_of_program(i_c, T, C, chunk_table, IS_VARLEN)
    if i_n < 0:
        return
    state_off, length, offs_c, offs_k, mask_k, valid, rows, mask_ck, causal, b, one_minus_b = _chunk_tile(
        i_n, i_t, i_h, T, cu_seqlens, state_offsets, lower_bound, H, K, C, BK, HAS_BOUND, IS_VARLEN, REVERSE)
    DT = q.dtype.element_ty
    _, k, _, _, G, _ = _chunk_gate(f, rows, mask_ck, stride_f, i_h, offs_k, offs_c, b, one_minus_b, K, C)
    q_t = tl.load(q + rows[:, None] * stride_q + i_h * K + offs_k[None, :], mask=mask_ck, other=0.0).to(tl.float32)
    anchored, _, q_mid, k_mid = _anchored_operands(q_t, k, G, offs_c, valid, C, WIDE_DT)
    A = _scores(q_t, k, G, offs_c, anchored, q_mid, k_mid, C, BK, PRECISION)
    A = tl.where(causal, A * scale, 0.0).to(DT)
    q_decayed = q_t * _exp(G) * scale
    q_inter = q_decayed.to(WIDE_DT)
    state_at_start = states + ((state_off + i_t) * H + i_h) * K * V
    if SEEDED:
        D = tl.load(chunk_decays + ((state_off + i_t) * H + i_h) * K + offs_k, mask=mask_k, other=0.0)
        q_seed = (q_decayed * _exp(D)[None, :]).to(WIDE_DT)
        seed = seeds + ((i_n * H + i_h).to(tl.int64) * n_segments + i_t // segment_chunks) * K * V
    for i_v in range(0, tl.cdiv(V, BV)):
        offs_v = i_v * BV + tl.arange(0, BV)
        mask_v = offs_v < V
        mask_cv = valid[:, None] & mask_v[None, :]
        mask_kv = mask_k[:, None] & mask_v[None, :]
        state_tile = offs_k[:, None] * V + offs_v[None, :]
        v_t = tl.load(v + rows[:, None] * stride_v + i_h * V + offs_v[None, :], mask=mask_cv, other=0.0).to(DT)
        h_start = tl.load(state_at_start + state_tile, mask=mask_kv, other=0.0).to(WIDE_DT)
        out = tl.dot(A, v_t, input_precision=PRECISION) + tl.dot(q_inter, h_start, input_precision=PRECISION)
        if SEEDED:
            seed_tile = tl.load(seed + state_tile, mask=mask_kv, other=0.0).to(WIDE_DT)
            out += tl.dot(q_seed, seed_tile, input_precision=PRECISION)
        tl.store(o + (rows[:, None] * H + i_h) * V + offs_v[None, :], out.to(o.dtype.element_ty), mask=mask_cv)


@triton.jit
def _bwd_dh_kernel(
    q, f, do, lower_bound, d_final, dstates, dh0, chunk_decays, segment_ends, segment_decays, cu_seqlens,
    state_offsets, stride_q, stride_f, scale, T, n_segments, segment_chunks,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    HAS_BOUND: tl.constexpr, HAS_DFINAL: tl.constexpr, WRITE_DH0: tl.constexpr, SEGMENTED: tl.constexpr,
    IS_VARLEN: tl.constexpr, REVERSE: tl.constexpr, PRECISION: tl.constexpr, WIDE_DT: tl.constexpr,
):
    (i_nh, i_seg, i_v, i_n, i_h, bos, eos, state_off, offs_k, offs_v, mask_k, mask_v, mask_kv, state_tile, b,
     one_minus_b) = _state_tile_program(T, n_segments, cu_seqlens, state_offsets, lower_bound, H, K, V, C, BK, BV,
                                        HAS_BOUND, IS_VARLEN)
    length = eos - bos
    chunk_off = state_off - i_n  # a sequence has one chunk fewer than chunk states
    offs_c = tl.arange(0, C)
    dS = tl.where(i_seg == n_segments - 1, _initial_tile(d_final, i_nh, state_tile, mask_kv, K, V, BK, BV, HAS_DFINAL),
                  0.0)
    D = tl.zeros([BK], dtype=tl.float32)  # gate sum from the chunk's end to the segment's end
    n_chunks = tl.cdiv(length, C)
    first = i_seg * segment_chunks
    last = tl.minimum(first + segment_chunks, n_chunks)
    for j in range(0, last - first):
        i_t = last - 1 - j
        tl.store(dstates + ((chunk_off + i_t) * H + i_h) * K * V + state_tile, dS.to(dstates.dtype.element_ty),
                 mask=mask_kv)
        if SEGMENTED:
            tl.store(chunk_decays + ((chunk_off + i_t) * H + i_h) * K + offs_k, D, mask=mask_k & (i_v == 0))
        valid, rows = _chunk_rows(i_t, offs_c, length, bos, eos, C, REVERSE)
        mask_ck = valid[:, None] & mask_k[None, :]
        _, _, _, _, G, G_last = _chunk_gate(f, rows, mask_ck, stride_f, i_h, offs_k, offs_c, b, one_minus_b, K, C)
        q_t = tl.load(q + rows[:, None] * stride_q + i_h * K + offs_k[None, :], mask=mask_ck, other=0.0)
        do_t = tl.load(do + (rows[:, None] * H + i_h) * V + offs_v[None, :],
                       mask=valid[:, None] & mask_v[None, :], other=0.0)
        q_inter = (q_t.to(tl.float32) * _exp(G) * scale).to(WIDE_DT)
        dS = dS * _exp(G_last)[:, None] + tl.dot(tl.trans(q_inter), do_t.to(WIDE_DT), input_precision=PRECISION)
        D += G_last
    if SEGMENTED:
        _store_segment_end(dS, D, segment_ends, segment_decays, i_nh, i_seg, n_segments, i_v, offs_k, mask_k,
                           state_tile, mask_kv, K, V)
    elif WRITE_DH0:
        tl.store(dh0 + i_nh.to(tl.int64) * K * V + state_tile, dS, mask=mask_kv)


@triton.jit
def _after_segment(carry, segment_ends, segment_decays, i_nh, i_segment_of_walk, n_segments, offs_k, mask_k,
                   state_tile, mask_kv, K: tl.constexpr, V: tl.constexpr):
    """The tile carried out of a segment: what came in, decayed over the segment, plus its local end."""
    i_segment = i_nh.to(tl.int64) * n_segments + i_segment_of_walk
    decay = tl.load(segment_decays + i_segment * K + offs_k, mask=mask_k, other=0.0)
    end = tl.load(segment_ends + i_segment * K * V + state_tile, mask=mask_kv, other=0.0)
    return carry * _exp(decay)[:, None] + end


@triton.jit
def _segment_carry_kernel(
    chunk_states, chunk_decays, segment_ends, segment_decays, boundary_state, seeds, cu_seqlens, state_offsets, T,
    n_segments, segment_chunks,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    BACKWARD: tl.constexpr, FIX_STATES: tl.constexpr, WRITE_SEEDS: tl.constexpr, WRITE_BOUNDARY: tl.constexpr,
):
    """The second half of a segmented walk (equal lengths only). Each segment program above started from zero
    (except the one at the walk's start, which had the true initial tile); this sums what the segments before
    it carry in: carry = sum over earlier segments j of exp(gate sums of the segments between) * end_j, the
    segment's seed. FIX_STATES then adds exp(D_chunk) * carry to every chunk state of the segment, D_chunk its
    gate sum from the segment's start; WRITE_SEEDS stores the seed instead, for consumers that add it themselves.
    BACKWARD (the dh walk) runs from the sequence's end: "earlier" segments are the later ones. The program of
    the segment where the walk ends writes the float32 boundary state (the final state, or dh0)."""
    (i_nh, i_seg, i_v, i_n, i_h, bos, eos, state_off, offs_k, offs_v, mask_k, mask_v, mask_kv, state_tile, b,
     one_minus_b) = _state_tile_program(T, n_segments, cu_seqlens, state_offsets, chunk_decays, H, K, V, C, BK, BV,
                                        False, False)  # no bound here: chunk_decays stands in, never read
    n_chunks = tl.cdiv(T, C)
    slot_off = state_off - i_n if BACKWARD else state_off  # dh has one slot per chunk, the states one more
    walk_pos = n_segments - 1 - i_seg if BACKWARD else i_seg  # segments before this one in walk order
    carry = tl.zeros([BK, BV], dtype=tl.float32)
    for j in range(0, walk_pos):
        carry = _after_segment(carry, segment_ends, segment_decays, i_nh, n_segments - 1 - j if BACKWARD else j,
                               n_segments, offs_k, mask_k, state_tile, mask_kv, K, V)
    first = i_seg * segment_chunks
    last = tl.minimum(first + segment_chunks, n_chunks)
    if BACKWARD:
        end_slot = last
    else:
        end_slot = last + (last == n_chunks).to(tl.int32)  # and the slot after the sequence's last chunk
    if WRITE_SEEDS:
        tl.store(seeds + (i_nh.to(tl.int64) * n_segments + i_seg) * K * V + state_tile,
                 carry.to(seeds.dtype.element_ty), mask=mask_kv)
    if FIX_STATES and walk_pos > 0:
        for i_t in range(first, end_slot):
            slot = ((slot_off + i_t) * H + i_h) * K
            decay = tl.load(chunk_decays + slot + offs_k, mask=mask_k, other=0.0)
            tile = chunk_states + slot * V + state_tile
            local = tl.load(tile, mask=mask_kv, other=0.0).to(tl.float32)
            tl.store(tile, (local + _exp(decay)[:, None] * carry).to(chunk_states.dtype.element_ty), mask=mask_kv)
    if WRITE_BOUNDARY and walk_pos == n_segments - 1:
        boundary = _after_segment(carry, segment_ends, segment_decays, i_nh, i_seg, n_segments, offs_k, mask_k,
                                  state_tile, mask_kv, K, V)
        tl.store(boundary_state + i_nh.to(tl.int64) * K * V + state_tile, boundary, mask=mask_kv)


@triton.jit
def _bwd_kernel(
    q, f, v, do, lower_bound, states, dstates, dq, df, dv, db, cu_seqlens, state_offsets, chunk_table,
    stride_q, stride_f, stride_v, scale, T,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    HAS_BOUND: tl.constexpr, IS_VARLEN: tl.constexpr, REVERSE: tl.constexpr, PRECISION: tl.constexpr,
    ANCHORED_DT: tl.constexpr, WIDE_DT: tl.constexpr, HOLD_GATE: tl.constexpr,
):
    i_c, i_h = tl.program_id(0), tl.program_id(1)
    i_n, i_t = _chunk_of_program(i_c, T, C, chunk_table, IS_VARLEN)
    if i_n < 0:
        return
    state_off, length, offs_c, offs_k, mask_k, valid, rows, mask_ck, causal, b, one_minus_b = _chunk_tile(
        i_n, i_t, i_h, T, cu_seqlens, state_offsets, lower_bound, H, K, C, BK, HAS_BOUND, IS_VARLEN, REVERSE)
    chunk = state_off - i_n + i_t
    DT = q.dtype.element_ty

    # Registers bound this kernel (255 per thread, one 8-warp program per SM). HOLD_GATE keeps the gate, q and
    # the anchored operands across the V loop; otherwise only what the loop needs (A, k_end) is held, and the
    # gate and q are read again after it and recomputed in two steps. Recomputing is 55% slower at bf16 on the
    # H100 (kernels/NOTES.md, v3.2), but holding them at float32 makes ptxas give up (32 registers, 19 KiB of
    # spills): 16-bit inputs hold, float32 recomputes.
    g, k, sig, sig_neg, G, G_last = _chunk_gate(f, rows, mask_ck, stride_f, i_h, offs_k, offs_c, b, one_minus_b,
                                                K, C)
    q_t = tl.load(q + rows[:, None] * stride_q + i_h * K + offs_k[None, :], mask=mask_ck, other=0.0).to(tl.float32)
    anchored, G_mid, q_mid, k_mid = _anchored_operands(q_t, k, G, offs_c, valid, C, ANCHORED_DT)
    A = _scores(q_t, k, G, offs_c, anchored, q_mid, k_mid, C, BK, PRECISION)
    A = tl.where(causal, A * scale, 0.0).to(DT)
    k_end = (k * _exp(G_last[None, :] - G)).to(WIDE_DT)

    dq_inter = tl.zeros([C, BK], dtype=tl.float32)
    dk_state = tl.zeros([C, BK], dtype=tl.float32)
    dA = tl.zeros([C, C], dtype=tl.float32)
    dh_dot_h = tl.zeros([BK], dtype=tl.float32)
    state_at_start = states + ((state_off + i_t) * H + i_h) * K * V
    dstate_at_end = dstates + (chunk * H + i_h) * K * V
    for i_v in range(0, tl.cdiv(V, BV)):
        offs_v = i_v * BV + tl.arange(0, BV)
        mask_v = offs_v < V
        mask_cv = valid[:, None] & mask_v[None, :]
        mask_kv = mask_k[:, None] & mask_v[None, :]
        state_tile = offs_k[:, None] * V + offs_v[None, :]
        v_t = tl.load(v + rows[:, None] * stride_v + i_h * V + offs_v[None, :], mask=mask_cv, other=0.0).to(DT)
        do_t = tl.load(do + (rows[:, None] * H + i_h) * V + offs_v[None, :], mask=mask_cv, other=0.0).to(DT)
        h_start = tl.load(state_at_start + state_tile, mask=mask_kv, other=0.0).to(WIDE_DT)
        dh_end = tl.load(dstate_at_end + state_tile, mask=mask_kv, other=0.0).to(WIDE_DT)
        dA += tl.dot(do_t, tl.trans(v_t), input_precision=PRECISION)
        dq_inter += tl.dot(do_t.to(WIDE_DT), tl.trans(h_start), input_precision=PRECISION)
        dk_state += tl.dot(v_t.to(WIDE_DT), tl.trans(dh_end), input_precision=PRECISION)
        dv_t = tl.dot(tl.trans(A), do_t, input_precision=PRECISION) + tl.dot(k_end, dh_end, input_precision=PRECISION)
        tl.store(dv + (rows[:, None] * H + i_h) * V + offs_v[None, :], dv_t.to(dv.dtype.element_ty), mask=mask_cv)
        dh_dot_h += tl.sum(h_start.to(tl.float32) * dh_end.to(tl.float32), axis=1)

    # The diagonal pairs (t, t) of the intra-chunk scores carry no decay, so their gate gradients cancel
    # exactly: they are kept out of the dq, dk used for dG (otherwise dG would be a difference of O(1)
    # terms, all rounding, when the gates are near 0) and added to the stored dq, dk afterwards.
    eye = offs_c[:, None] == offs_c[None, :]
    dA_diag = tl.sum(tl.where(eye, dA, 0.0), axis=1) * scale
    dA = tl.where(offs_c[:, None] > offs_c[None, :], dA * scale, 0.0)
    if not HOLD_GATE:
        _, k, _, _, G, G_last = _chunk_gate(f, rows, mask_ck, stride_f, i_h, offs_k, offs_c, b, one_minus_b, K, C)
        q_t = tl.load(q + rows[:, None] * stride_q + i_h * K + offs_k[None, :], mask=mask_ck, other=0.0)
        q_t = q_t.to(tl.float32)
        anchored, G_mid, q_mid, k_mid = _anchored_operands(q_t, k, G, offs_c, valid, C, ANCHORED_DT)
    dq_t = dq_inter * _exp(G) * scale
    dk_state = dk_state * _exp(G_last[None, :] - G)
    if anchored:
        dq_t += _exp(G - G_mid[None, :]) * tl.dot(dA.to(ANCHORED_DT), k_mid, input_precision=PRECISION)
        dk_intra = _exp(G_mid[None, :] - G) * tl.dot(tl.trans(dA.to(ANCHORED_DT)), q_mid,
                                                        input_precision=PRECISION)
    else:
        dq_intra, dk_intra = _intra_grads_exact(q_t, k, G, dA, offs_c, C, BK)
        dq_t += dq_intra
    tl.store(dq + (rows[:, None] * H + i_h) * K + offs_k[None, :],
             (dq_t + dA_diag[:, None] * k).to(dq.dtype.element_ty),
             mask=mask_ck)
    dk_t = dk_intra + dk_state + dA_diag[:, None] * q_t

    # Gate: dg_j = sum over (query, key) pairs whose decay spans step j. Within the chunk that is the
    # reverse cumulative sum of q dq - k dk; the chunk end acts as one more query (the state S_C), whose
    # key-side pairs are the earlier rows. Its pair with the last row carries no decay: left out too.
    last_row = tl.minimum(length - i_t * C, C) - 1
    k_dk_state = tl.where(mask_ck & (offs_c < last_row)[:, None], k * dk_state, 0.0)
    state_term = _exp(G_last) * dh_dot_h + tl.sum(k_dk_state, axis=0)
    dG = tl.where(mask_ck, q_t * dq_t - k * dk_intra, 0.0) - k_dk_state
    dg = tl.sum(dG, axis=0)[None, :] - tl.cumsum(dG, axis=0) + dG + state_term[None, :]
    # lambda = b + (1 - b) sigmoid(f), k = (1 - b) sigmoid(-f): d lambda / df = -dk / df = (1 - b) sigmoid(f)
    # sigmoid(-f) and d lambda / db = -dk / db = sigmoid(-f), with d log(lambda) / d lambda = exp(-g). Through f
    # that is written with the sigmoid term's share of lambda, (1 - b) sigmoid(f) / lambda, which is 1 without
    # a bound even where lambda underflows.
    if not HOLD_GATE:
        f_t = tl.load(f + rows[:, None] * stride_f + i_h * K + offs_k[None, :], mask=mask_ck, other=0.0)
        g, _, sig, sig_neg = _gate(f_t.to(tl.float32), b, one_minus_b, mask_ck)
    inverse_lambda = _exp(-g)
    share = tl.where((b == 0)[None, :], 1.0, one_minus_b[None, :] * sig * inverse_lambda)
    df_t = sig_neg * (dg * share - dk_t * one_minus_b[None, :] * sig)
    tl.store(df + (rows[:, None] * H + i_h) * K + offs_k[None, :], df_t.to(df.dtype.element_ty), mask=mask_ck)
    if HAS_BOUND:
        db_t = sig_neg * (dg * inverse_lambda - dk_t)
        tl.store(db + (chunk * H + i_h) * K + offs_k, tl.sum(tl.where(mask_ck, db_t, 0.0), axis=0), mask=mask_k)


def _state_programs(K: int, V: int, tiles: dict, walks: int) -> int:
    """Grid of the sequential kernels: one program per state tile of every (sequence, head) walk (or segment)."""
    return triton.cdiv(K, tiles["BK"]) * triton.cdiv(V, tiles["BV"]) * walks


def _wide_tile_programs(walks: int, K: int, V: int) -> int:
    """Programs of a sequential kernel over `walks` (sequence, head) walks with 64 x 64 state tiles."""
    return walks * triton.cdiv(K, 64) * triton.cdiv(V, 64)


MIN_SEGMENT_CHUNKS = 2
"""A segment walks at least this many chunks: a walk of one chunk gains nothing from being cut."""


def _segments(n_chunks: int, walks: int, K: int, V: int, device: torch.device | None, carry: str) -> int:
    """Into how many segments each walk of the sequential kernels is cut. A walk is a chain of dependent chunk
    steps, so with few walks (long sequences, small batches: T 16K x 2) most SMs would wait: then each walk is
    cut into segments run at once from a zero state, and `_segment_carry_kernel` sums what the earlier segments
    carry in. How `carry` (see `_Walks`) hands that on sets when cutting pays:
    - "rewrite" adds it to every chunk state, reading and writing them once more (0.32 ms at the record shape,
      about what a walk over them costs): only where the walks leave most SMs idle, fewer 64 x 64 tile programs
      than half the SMs (H100: the 370M LM at T 16K x 2, 64 programs, trains 12% faster; the record shape at
      T 16K, 128, and 8K, 256, ran slower cut).
    - "seeds" stores one tile per segment, nearly free: wherever the walks leave SMs idle, at most one program
      per SM ("seeded" walks must cut as the seeds were cut). The LM at T 8K x 4, 128 programs: 3% faster cut.
    Then enough segments for 8 programs per SM (the LM at T 16K: 3% faster than 4). Equal lengths only:
    packed sequences are walked whole."""
    programs = _wide_tile_programs(walks, K, V)
    if programs > (_sm_count(device) // 2 if carry == "rewrite" else _sm_count(device)):
        return 1
    return max(1, min(triton.cdiv(8 * _sm_count(device), programs), n_chunks // MIN_SEGMENT_CHUNKS))


def _segment_layout(n_chunks: int, walks: int, K: int, V: int, is_varlen: bool, device: torch.device | None,
                    carry: str) -> tuple[int, int]:
    """How many segments each walk is cut into and how many chunks each segment walks (`_segments`; none left
    empty, packed sequences walked whole)."""
    n_segments = 1 if is_varlen else _segments(n_chunks, walks, K, V, device, carry)
    segment_chunks = triton.cdiv(n_chunks, n_segments)
    return triton.cdiv(n_chunks, segment_chunks), segment_chunks


def _seed_count(B: int, T: int, H: int, K: int, V: int, cu_seqlens: Tensor | None, device: torch.device) -> int:
    """Seeds a forward without saved states leaves for the backward: one per segment of each walk when cut."""
    if cu_seqlens is not None:
        return 0
    n_segments, _ = _segment_layout(triton.cdiv(T, CHUNK), B * H, K, V, False, device, "seeds")
    return B * H * n_segments if n_segments > 1 else 0


class _Walks:
    """How the sequential kernel `kernel` ("states" or "dh") walks the chunks: its tiles, the segments of each walk
    (see `_segments`), the kernel arguments that say so and the buffers the segments hand to the carry pass.
    What the carry pass hands on, `carry`: "rewrite" fixes every chunk state; "seeds" leaves them local and
    stores each segment's true starting tile, its seed (the output kernel adds exp(D) seed itself); "seeded"
    walks start each segment from the seeds a "seeds" forward left, so their states are exact with no carry."""

    def __init__(self, kernel: str, layout: "_Layout", T: int, H: int, K: int, V: int, dtype: torch.dtype,
                 device: torch.device, carry: str):
        self.H, self.K, self.V = H, K, V
        walks = layout.n_sequences * H
        self.n_segments, segment_chunks = _segment_layout(triton.cdiv(T, CHUNK), walks, K, V, layout.is_varlen,
                                                          device, carry)
        self.carries_seeds = carry == "seeds"
        self.seeded = carry == "seeded" and self.n_segments > 1
        self.segmented = self.n_segments > 1 and not self.seeded
        self.segment_chunks = segment_chunks if self.n_segments > 1 else 2**30  # one walk, any length
        self.tiles = _tiles(kernel, K, V, dtype, walks * self.n_segments, device)
        self.grid = (_state_programs(K, V, self.tiles, walks * self.n_segments),)
        slots = layout.n_states if kernel == "states" else layout.n_chunks
        shape = lambda *dims: dims if self.segmented else (0,)
        self.chunk_decays = torch.empty(shape(slots, H, K), dtype=torch.float32, device=device)
        self.segment_ends = torch.empty(shape(walks * self.n_segments, K, V), dtype=torch.float32, device=device)
        self.segment_decays = torch.empty(shape(walks * self.n_segments, K), dtype=torch.float32, device=device)

    def kernel_args(self) -> tuple:
        """The walk's arguments of the states and dh kernels (after their outputs), in their order."""
        return self.chunk_decays, self.segment_ends, self.segment_decays

    def carry(self, chunk_states: Tensor, seeds: Tensor, boundary: Tensor | None, layout: "_Layout", T: int,
              backward: bool) -> None:
        """The carry pass of a segmented walk: fixes the chunk states or stores the seeds (`carry`), and writes
        the boundary state (final or dh0)."""
        if not self.segmented:
            return
        tiles = {name: value for name, value in self.tiles.items() if name != "num_stages"}
        _segment_carry_kernel[self.grid](
            chunk_states, self.chunk_decays, self.segment_ends, self.segment_decays,
            boundary if boundary is not None else self.segment_ends, seeds, layout.cu_seqlens, layout.state_offsets,
            T, self.n_segments, self.segment_chunks, H=self.H, K=self.K, V=self.V, C=CHUNK, BACKWARD=backward,
            FIX_STATES=not self.carries_seeds, WRITE_SEEDS=self.carries_seeds, WRITE_BOUNDARY=boundary is not None,
            **tiles,
        )


def _block(n: int) -> int:
    """Tile width for a head dim: a power of two, at least 16 (the matmul minimum)."""
    return max(16, triton.next_power_of_2(n))


TILE_OVERRIDES: dict[str, dict] = {}
"""Replaces entries of `_tiles` per kernel name; set only by benchmarks/scan_sweep.py, which times alternatives."""


def _tiles(kernel: str, K: int, V: int, dtype: torch.dtype, walks: int = 0,
           device: torch.device | None = None) -> dict:
    """Tile sizes and launch options of one kernel ("states", "output", "dh", "grads") for a head size and
    input dtype; the sequential kernels (states, dh) also depend on how many (sequence, head) `walks` share
    the GPU's SMs. Chosen by benchmarks/scan_sweep.py on the H100 (kernels/NOTES.md, "v3.1 on the H100"):
    - states and dh run one program per (walk, K block, V block): a 64 x 64 tile and 2 warps while that gives
      at least 2 programs per SM (T 2K, B 16), a 32-wide K block and 4 warps below it (T 16K, B 2), where
      otherwise most SMs wait.
    - output and grads hold the whole K: 8 warps where a [C, K] tile is 128 wide (with four, the grads
      kernel's tiles spill, ptxas -v), except the output kernel of bfloat16 inputs, fastest with a 128-wide
      V block and 4 warps (float16 holds its states in float32 there: 255 registers, not measured). No
      software pipelining at K 256, whose staged tiles would pass the 227 KiB of shared memory, and for
      float32 at K 256 a 32-wide V block in the grads kernel (244 KiB at 64)."""
    BK, BV = _block(K), min(64, _block(V))
    wide = {"num_warps": 8 if BK >= 128 else 4, "num_stages": 1 if BK >= 256 else 3}
    if kernel in ("states", "dh") and _wide_tile_programs(walks, K, V) >= 2 * _sm_count(device):
        tiles = dict(BK=min(64, BK), BV=BV, num_warps=2, num_stages=2)
    elif kernel in ("states", "dh"):
        tiles = dict(BK=min(32, BK), BV=BV, num_warps=4, num_stages=2)
    elif kernel == "output" and BK <= 128 and dtype == torch.bfloat16:
        tiles = dict(BK=BK, BV=min(128, _block(V)), num_warps=4, num_stages=3)
    elif kernel == "output":
        tiles = dict(BK=BK, BV=BV, **wide)
    elif kernel == "grads":
        tiles = dict(BK=BK, BV=BV // 2 if BK >= 256 and dtype == torch.float32 else BV,
                     HOLD_GATE=dtype != torch.float32, **wide)
    else:
        raise ValueError(f"no tiles for kernel {kernel!r}")
    return {**tiles, **TILE_OVERRIDES.get(kernel, {})}


@functools.cache
def _sm_count(device: torch.device | None) -> int:
    """Streaming multiprocessors of a CUDA device; elsewhere (the interpreter, the sm_90a compile check) an
    H100's, so that those pick the launches an H100 would."""
    if device is not None and device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 132


def _row_stride(x: Tensor) -> Tensor:
    """x itself if its [B, T] rows are evenly strided with dense heads (views of a fused projection are);
    otherwise a contiguous copy."""
    B, T, H, D = x.shape
    if x.stride(3) == 1 and x.stride(2) == D and x.stride(0) == T * x.stride(1):
        return x
    return x.contiguous()


class _Layout:
    """Where each sequence's chunks and chunk states live: arithmetic for equal lengths, tables for packed."""

    def __init__(self, B: int, T: int, cu_seqlens: Tensor | None, device: torch.device):
        self.is_varlen = cu_seqlens is not None
        if not self.is_varlen:
            self.n_sequences = B
            n_chunks = triton.cdiv(T, CHUNK)
            self.n_states, self.n_chunks = B * (n_chunks + 1), B * n_chunks
            self.cu_seqlens = self.state_offsets = self.chunk_table = torch.empty(0, dtype=torch.int32, device=device)
            return
        cu_seqlens = cu_seqlens.to(device=device, dtype=torch.int32)
        N = cu_seqlens.numel() - 1
        self.n_sequences = N
        # Upper bounds known from shapes alone, so nothing waits on the GPU: sum ceil(L / C) <= T / C + N.
        self.n_chunks = T // CHUNK + N
        self.n_states = self.n_chunks + N
        chunks = (cu_seqlens[1:] - cu_seqlens[:-1] + CHUNK - 1) // CHUNK
        chunk_offsets = torch.cat([chunks.new_zeros(1), chunks.cumsum(0)])
        self.state_offsets = (chunk_offsets + torch.arange(N + 1, device=device)).to(torch.int32)
        index = torch.arange(self.n_chunks, device=device, dtype=torch.int32)
        sequence = torch.searchsorted(chunk_offsets[1:].to(torch.int32), index, right=True)
        position = index - chunk_offsets[sequence.clamp(max=N - 1)]
        sequence = torch.where(sequence < N, sequence, -1)
        self.chunk_table = torch.stack([sequence, position], 1).to(torch.int32).contiguous()
        self.cu_seqlens = cu_seqlens


def _empty(*shape, dtype: torch.dtype, device: torch.device) -> Tensor:
    if POISON_OUTPUTS:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


def _precision(x: Tensor) -> str:
    return "ieee" if x.dtype == torch.float32 else "tf32"


def _wide_dtype(x: Tensor) -> torch.dtype:
    """The type of what is scaled by exp of a gate sum: the anchored intra-chunk operands (factors up to
    exp(40)), the chunk states, their gradients and the operands that meet them (factors down to exp(-20)
    per step when the gates are near 0). float16 leaves its range there (largest 65504, smallest
    subnormal 6e-8), so float16 inputs take those in float32 (tf32 matmuls); bfloat16 and float32 keep
    their own type. The backward's anchored operands are always float32 (tf32): the gate gradient
    q dq - k dk cancels the pairs that do not span a step, and bfloat16 rounding would leave that noisy."""
    return torch.float32 if x.dtype == torch.float16 else x.dtype


def _tl_dtype(dtype: torch.dtype):
    return {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}[dtype]


def _constexprs(q: Tensor, v: Tensor, lower_bound: Tensor | None, layout: _Layout, reverse: bool) -> dict:
    """What every scan kernel is specialised on."""
    _, _, H, K = q.shape
    return dict(H=H, K=K, V=v.shape[-1], C=CHUNK, HAS_BOUND=lower_bound is not None, IS_VARLEN=layout.is_varlen,
                REVERSE=reverse, PRECISION=_precision(q), WIDE_DT=_tl_dtype(_wide_dtype(q)))


def _store_states(f: Tensor, v: Tensor, bound: Tensor, h0: Tensor, states: Tensor, final: Tensor, layout: _Layout,
                  common: dict, has_h0: bool, output_final_state: bool, seeds: Tensor, carry: str) -> _Walks:
    """The sequential states pass: every chunk's starting state into `states` (and the final state), exact, or
    local with `seeds` (`_Walks`' `carry`)."""
    _, T, H, K = f.shape
    V = v.shape[-1]
    walks = _Walks("states", layout, T, H, K, V, f.dtype, f.device, carry)
    _fwd_states_kernel[walks.grid](
        f, v, bound, h0, states, final, *walks.kernel_args(), seeds, layout.cu_seqlens, layout.state_offsets,
        f.stride(1), v.stride(1), T, walks.n_segments, walks.segment_chunks, HAS_H0=has_h0,
        OUTPUT_FINAL=output_final_state, SEGMENTED=walks.segmented, SEEDED=walks.seeded, **walks.tiles, **common,
    )
    walks.carry(states, seeds, final if output_final_state else None, layout, T, backward=False)
    return walks


@torch.library.custom_op("hgrn2::scan_fwd", mutates_args=())
def scan_fwd(
    q: Tensor, f: Tensor, v: Tensor, lower_bound: Optional[Tensor], initial_state: Optional[Tensor],
    cu_seqlens: Optional[Tensor], scale: float, reverse: bool, save_states: bool, output_final_state: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Returns o [B, T, H, V], the final state [N, H, K, V] (float32), the chunk states for the backward (or
    none) and, without them, the seeds of cut walks ([B H segments, K, V] in the states' type, or none), from
    which the backward's `scan_states` rebuilds them exactly in one pass."""
    q, f, v = (_row_stride(x) for x in (q, f, v))
    B, T, H, K = q.shape
    V = v.shape[-1]
    layout = _Layout(B, T, cu_seqlens, q.device)
    N = layout.n_sequences
    o = _empty(B, T, H, V, dtype=q.dtype, device=q.device)
    final = _empty(N if output_final_state else 0, H, K, V, dtype=torch.float32, device=q.device)
    # The output pass reads the chunk states back: they are stored even when the backward will not need them.
    # States kept for the backward must be exact; otherwise cut walks leave them local, and seeds to add.
    states = _empty(layout.n_states, H, K, V, dtype=_wide_dtype(q), device=q.device)
    # Seeds in the states' type: every output program of a segment reads its seed again (from L2), and float32
    # seeds made the output kernel 44% slower (record shape, T 16K: 0.81 ms against 0.56; bfloat16 0.67).
    seeds = _empty(0 if save_states else _seed_count(B, T, H, K, V, cu_seqlens, q.device), K, V,
                   dtype=states.dtype, device=q.device)
    dummy = q.new_empty(0)
    bound = dummy if lower_bound is None else lower_bound.float().contiguous()
    h0 = dummy if initial_state is None else initial_state.float().contiguous()
    common = _constexprs(q, v, lower_bound, layout, reverse)
    with torch.cuda.device(q.device.index) if q.is_cuda else nullcontext():
        walks = _store_states(f, v, bound, h0, states, final, layout, common, initial_state is not None,
                              output_final_state, seeds, "rewrite" if save_states else "seeds")
        _fwd_output_kernel[(layout.n_chunks, H)](
            q, f, v, bound, states, o, walks.chunk_decays, seeds, layout.cu_seqlens, layout.state_offsets,
            layout.chunk_table, q.stride(1), f.stride(1), v.stride(1), scale, T, walks.n_segments,
            walks.segment_chunks, SEEDED=walks.segmented and walks.carries_seeds, **_tiles("output", K, V, q.dtype),
            **common,
        )
    if not save_states:  # a fresh empty tensor: a view would keep the whole buffer alive
        states = _empty(0, H, K, V, dtype=states.dtype, device=q.device)
    return o, final, states, seeds


@scan_fwd.register_fake
def _(q, f, v, lower_bound, initial_state, cu_seqlens, scale, reverse, save_states, output_final_state):
    B, T, H, K = q.shape
    layout_states = (T // CHUNK + 2 * (cu_seqlens.shape[0] - 1)) if cu_seqlens is not None else B * (-(-T // CHUNK) + 1)
    N = B if cu_seqlens is None else cu_seqlens.shape[0] - 1
    V = v.shape[-1]
    n_seeds = 0 if save_states else _seed_count(B, T, H, K, V, cu_seqlens, q.device)
    return (
        q.new_empty(B, T, H, V),
        q.new_empty(N if output_final_state else 0, H, K, V, dtype=torch.float32),
        q.new_empty(layout_states if save_states else 0, H, K, V, dtype=_wide_dtype(q)),
        q.new_empty(n_seeds, K, V, dtype=_wide_dtype(q)),
    )


@torch.library.custom_op("hgrn2::scan_states", mutates_args=())
def scan_states(
    q: Tensor, f: Tensor, v: Tensor, lower_bound: Optional[Tensor], initial_state: Optional[Tensor], seeds: Tensor,
    cu_seqlens: Optional[Tensor], reverse: bool,
) -> Tensor:
    """The chunk states the backward reads, recomputed from f and v (q gives the dtype and layout only), from the
    forward's seeds where it cut the walks."""
    f, v = _row_stride(f), _row_stride(v)
    B, T, H, K = f.shape
    layout = _Layout(B, T, cu_seqlens, f.device)
    states = _empty(layout.n_states, H, K, v.shape[-1], dtype=_wide_dtype(q), device=f.device)
    dummy = f.new_empty(0)
    bound = dummy if lower_bound is None else lower_bound.float().contiguous()
    h0 = dummy if initial_state is None else initial_state.float().contiguous()
    with torch.cuda.device(f.device.index) if f.is_cuda else nullcontext():
        _store_states(f, v, bound, h0, states, dummy.float(), layout, _constexprs(q, v, lower_bound, layout, reverse),
                      initial_state is not None, False, seeds, "seeded")
    return states


@scan_states.register_fake
def _(q, f, v, lower_bound, initial_state, seeds, cu_seqlens, reverse):
    B, T, H, K = q.shape
    n_states = (T // CHUNK + 2 * (cu_seqlens.shape[0] - 1)) if cu_seqlens is not None else B * (-(-T // CHUNK) + 1)
    return q.new_empty(n_states, H, K, v.shape[-1], dtype=_wide_dtype(q))


@torch.library.custom_op("hgrn2::scan_bwd", mutates_args=())
def scan_bwd(
    q: Tensor, f: Tensor, v: Tensor, lower_bound: Optional[Tensor], states: Tensor, do: Tensor,
    d_final: Optional[Tensor], cu_seqlens: Optional[Tensor], scale: float, reverse: bool, want_dh0: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Returns dq, df, dv, d lower_bound ([H, K], empty without a bound) and d initial_state (or empty)."""
    q, f, v = (_row_stride(x) for x in (q, f, v))
    do = do.contiguous()
    B, T, H, K = q.shape
    V = v.shape[-1]
    layout = _Layout(B, T, cu_seqlens, q.device)
    N = layout.n_sequences
    dstates = _empty(layout.n_chunks, H, K, V, dtype=_wide_dtype(q), device=q.device)
    dh0 = _empty(N if want_dh0 else 0, H, K, V, dtype=torch.float32, device=q.device)
    dq = _empty(B, T, H, K, dtype=q.dtype, device=q.device)
    df = _empty(B, T, H, K, dtype=f.dtype, device=q.device)
    dv = _empty(B, T, H, V, dtype=v.dtype, device=q.device)
    db_chunks = torch.zeros(layout.n_chunks if lower_bound is not None else 0, H, K, dtype=torch.float32,
                            device=q.device)
    dummy = q.new_empty(0)
    bound = dummy if lower_bound is None else lower_bound.float().contiguous()
    common = _constexprs(q, v, lower_bound, layout, reverse)
    with torch.cuda.device(q.device.index) if q.is_cuda else nullcontext():
        walks = _Walks("dh", layout, T, H, K, V, q.dtype, q.device, "rewrite")
        _bwd_dh_kernel[walks.grid](
            q, f, do, bound, dummy if d_final is None else d_final.float().contiguous(), dstates, dh0,
            *walks.kernel_args(), layout.cu_seqlens, layout.state_offsets, q.stride(1), f.stride(1), scale, T,
            walks.n_segments, walks.segment_chunks, HAS_DFINAL=d_final is not None, WRITE_DH0=want_dh0,
            SEGMENTED=walks.segmented, **walks.tiles, **common,
        )
        walks.carry(dstates, dummy, dh0 if want_dh0 else None, layout, T, backward=True)
        _bwd_kernel[(layout.n_chunks, H)](
            q, f, v, do, bound, states, dstates, dq, df, dv, db_chunks, layout.cu_seqlens, layout.state_offsets,
            layout.chunk_table, q.stride(1), f.stride(1), v.stride(1), scale, T, **_tiles("grads", K, V, q.dtype),
            ANCHORED_DT=tl.float32, **common,
        )
    db = db_chunks.sum(0) if lower_bound is not None else dummy.float()
    return dq, df, dv, db, dh0


@scan_bwd.register_fake
def _(q, f, v, lower_bound, states, do, d_final, cu_seqlens, scale, reverse, want_dh0):
    B, T, H, K = q.shape
    N = B if cu_seqlens is None else cu_seqlens.shape[0] - 1
    V = v.shape[-1]
    return (
        q.new_empty(q.shape), f.new_empty(f.shape), v.new_empty(v.shape),
        q.new_empty((H, K) if lower_bound is not None else (0,), dtype=torch.float32),
        q.new_empty(N if want_dh0 else 0, H, K, V, dtype=torch.float32),
    )


def _setup_context(ctx, inputs, output):
    q, f, v, lower_bound, initial_state, cu_seqlens, scale, reverse, save_states, output_final_state = inputs
    ctx.save_for_backward(q, f, v, lower_bound, initial_state, output[2], output[3], cu_seqlens)
    ctx.scale, ctx.reverse = scale, reverse
    ctx.has_initial_state = initial_state is not None
    ctx.output_final_state = output_final_state
    ctx.recompute_states = not save_states
    # The chunk states and seeds are outputs only so that autograd keeps them; left as None, their gradient is never
    # materialised (a zero-filled buffer of the states' size: 0.5 GiB and 0.16 ms at the record shape).
    ctx.set_materialize_grads(False)


def _backward(ctx, do, d_final, d_states, d_seeds):
    q, f, v, lower_bound, initial_state, states, seeds, cu_seqlens = ctx.saved_tensors
    if ctx.recompute_states:
        states = scan_states(q, f, v, lower_bound, initial_state, seeds, cu_seqlens, ctx.reverse)
    d_final = d_final if ctx.output_final_state else None
    if do is None:  # only the final state was used (grads are not materialised, see _setup_context)
        do = torch.zeros_like(v)
    dq, df, dv, db, dh0 = scan_bwd(q, f, v, lower_bound, states, do, d_final, cu_seqlens, ctx.scale, ctx.reverse,
                                   ctx.has_initial_state)
    return (dq, df, dv, db.view_as(lower_bound) if lower_bound is not None else None,
            dh0 if ctx.has_initial_state else None, None, None, None, None, None)


scan_fwd.register_autograd(_backward, setup_context=_setup_context)


def triton_scan(
    q: Tensor, f: Tensor, i: Tensor, lower_bound: Tensor | None, scale: float, initial_state: Tensor | None,
    cu_seqlens: Tensor | None, reverse: bool, output_final_state: bool, recompute_states: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """The scan through the custom op (torch.compile sees one opaque node). The chunk states are kept for
    autograd, or with `recompute_states` rebuilt in the backward by one more states pass."""
    needs_grad = torch.is_grad_enabled() and any(
        x is not None and x.requires_grad for x in (q, f, i, lower_bound, initial_state)
    )
    o, final, _, _ = scan_fwd(
        q, f, i.to(q.dtype), lower_bound, initial_state, cu_seqlens, float(scale), reverse,
        needs_grad and not recompute_states, output_final_state,
    )
    return o, (final if output_final_state else None)
