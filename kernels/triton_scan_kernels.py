"""Triton kernels of the HGRN2 training scan (forward and backward); kernels/triton_scan.py launches them and
registers the torch custom ops.

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
            the gradient of the state at each chunk end: dS <- exp(G_C) dS + scale (q exp(G))^T do,
            and leaves time-contiguous copies of q and f for the grads pass.
  grads     one program per (chunk, head), all chunks in parallel, its tiles held [K, C]: dq, dk, dv, the gate gradient
            dG = q dq - k dk (reverse-cumulated within the chunk, plus the chunk-end state term
            sum_v S dS), and from it df and the lower bound's gradient, per chunk.
With few (sequence, head) walks the two sequential passes cut each walk into segments run at once, joined
by a short carry pass (`_segment_carry_kernel`; when to cut: kernels/triton_scan_dispatch.py, `_segments`, and
kernels/triton_scan.py, `_Walks`).
Where a cut walk must start each segment from its true state (seeded), the segments' ends come first, summed
without a walk (`_segment_ends_kernel`).
With many walks of small heads the forward is one pass instead (`_fwd_fused_kernel`: the states walk computing
each chunk's outputs from the state in its registers; when: kernels/triton_scan_dispatch.py, `_fused_forward`).

One chunk's math (the gate, the cumulative gate, the intra-chunk scores and their gradients) is
kernels/triton_scan_chunk.py's.
"""

import triton
import triton.language as tl

from kernels.triton_scan_chunk import (
    SMALLEST_BLOCK,
    _anchor,
    _anchored_operands,
    _bound,
    _chunk_gate,
    _chunk_products,
    _decayed_to_chunk_end,
    _decays,
    _decays_from_anchor,
    _exp,
    _fallback_intra_grads,
    _fallback_scores,
    _gate,
    _gate_grad_factors,
    _pair_sums,
    _per_channel,
)

ONE_LAUNCH = tl.constexpr(0)
"""A chunk-parallel kernel launched once: every chunk, its fallback path inline."""
ANCHORED_LAUNCH = tl.constexpr(1)
"""The first of two launches: the chunks one anchor spans; the others are marked in `flags` and left."""
FALLBACK_LAUNCH = tl.constexpr(2)
"""The second: only the chunks the first marked, by anchored blocks or elementwise (`_fallback_scores`)."""


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
def _load_rows(x, rows, stride, i_h, offs, D: tl.constexpr, mask, eviction_policy: tl.constexpr = ""):
    """The [C, block] tile of head i_h of a [rows, H, D] tensor (row stride `stride`) at the chunk's memory rows."""
    return tl.load(x + rows[:, None] * stride + i_h * D + offs[None, :], mask=mask, other=0.0,
                   eviction_policy=eviction_policy)


@triton.jit
def _store_rows(x, rows, i_h, offs, H: tl.constexpr, D: tl.constexpr, value, mask):
    """`value` into the [C, block] tile of head i_h of a contiguous [rows, H, D] output at the chunk's memory rows."""
    tl.store(x + (rows[:, None] * H + i_h) * D + offs[None, :], value.to(x.dtype.element_ty), mask=mask)


@triton.jit
def _by_time(chunk, offs_c, i_h, offs_k, H: tl.constexpr, K: tl.constexpr, C: tl.constexpr):
    """Offsets of the [K, C] tile of head i_h in chunk `chunk` (counted over all sequences, as the state gradients
    are) of a [chunks, H, K, C] copy of a [B, T, H, K] tensor, positions in scan order (backwards in a reverse
    scan). The dh walk writes whole chunks, zeros past a sequence's end, and the grads kernel reads them masked by
    channel alone. So each tile is one contiguous, aligned block that Triton moves in 16-byte vectors whatever T
    or the packed sequences' starts: a [B, H, K, T] copy, masked by position, went element by element where T is
    not a multiple of 16 (the ViT's T 196: dh walk 0.186 ms against 0.093 at T 256; kernels/HISTORY.md, eleventh
    session)."""
    return ((chunk * H + i_h) * K + offs_k[:, None]) * C + offs_c[None, :]


@triton.jit
def _scores_tile(scores, chunk, i_h, offs_c, H: tl.constexpr, C: tl.constexpr):
    """Pointers of the [C, C] intra-chunk scores of head i_h in chunk `chunk` (counted over all sequences) of a
    [chunks, H, C, C] buffer: what the one-pass forward keeps for the dh walk's dv (`_bwd_dh_kernel`)."""
    return scores + ((chunk * H + i_h) * C + offs_c[:, None]) * C + offs_c[None, :]


@triton.jit
def _mark_for_the_fallback(flags, i_c, i_h, H: tl.constexpr, anchored):
    """The first launch of a chunk-parallel kernel leaves chunk i_c of head i_h to the fallback launch unless
    `anchored` (every program writes its byte: the buffer needs no zeroing)."""
    tl.store(flags + i_c * H + i_h, (~anchored).to(tl.int8))


@triton.jit
def _left_to_the_fallback(flags, i_c, i_h, H: tl.constexpr):
    """Whether the first launch of a chunk-parallel kernel left chunk i_c of head i_h to the fallback launch."""
    return tl.load(flags + i_c * H + i_h) != 0


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
def _segment_range(i_seg, segment_chunks, n_chunks):
    """The chunks [first, last) that segment i_seg of a walk over n_chunks covers (the last segment may be short)."""
    first = i_seg * segment_chunks
    return first, tl.minimum(first + segment_chunks, n_chunks)


@triton.jit
def _store_state(tiles, slot, S, state_tile, mask_kv, K: tl.constexpr, V: tl.constexpr):
    """The state tile S at chunk slot `slot` ((chunk state) * H + head) of a [slots, H, K, V] buffer, in its type."""
    tl.store(tiles + slot * K * V + state_tile, S.to(tiles.dtype.element_ty), mask=mask_kv)


@triton.jit
def _store_walk_step(tiles, chunk_decays, slot, S, D, state_tile, mask_kv, offs_k, mask_k, i_v, K: tl.constexpr,
                     V: tl.constexpr, SEGMENTED: tl.constexpr):
    """A sequential kernel's tile of chunk slot `slot` ((chunk state) * H + head): the state (or its gradient) in the
    buffer's type and, in a segmented walk, the gate sum D since the segment's start (the first V block writes it)."""
    _store_state(tiles, slot, S, state_tile, mask_kv, K, V)
    if SEGMENTED:
        _store_chunk_decay(chunk_decays, slot, D, offs_k, mask_k, i_v, K)


@triton.jit
def _store_chunk_decay(chunk_decays, slot, D, offs_k, mask_k, i_v, K: tl.constexpr):
    """The gate sum D since the segment's start at chunk slot `slot`, for the seeds (the first V block writes it)."""
    tl.store(chunk_decays + slot * K + offs_k, D, mask=mask_k & (i_v == 0))


@triton.jit
def _chunk_seed(seeds, chunk_decays, state_off, i_n, i_t, i_h, n_segments, segment_chunks, offs_k, mask_k,
                H: tl.constexpr, K: tl.constexpr, V: tl.constexpr):
    """What a chunk of a cut walk adds to its outputs: the gate sum D from its segment's start and that segment's
    seed (its true starting state, [K, V]); the true state at the chunk's start is the local one + exp(D) seed."""
    D = tl.load(chunk_decays + ((state_off + i_t) * H + i_h) * K + offs_k, mask=mask_k, other=0.0)
    return D, seeds + ((i_n * H + i_h).to(tl.int64) * n_segments + i_t // segment_chunks) * K * V


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
def _segment_start(initial, seeds, i_nh, i_seg, walk_start, n_segments, state_tile, mask_kv, K: tl.constexpr,
                   V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, GIVEN: tl.constexpr, SEEDED: tl.constexpr):
    """The float32 tile a sequential program starts its segment from: the given initial tile (h0, or the final
    state's gradient for the dh walk) in the segment where the walk starts (`walk_start`), zeros in the others,
    and with SEEDED the segment's seed (`_segment_carry_kernel`'s, zero where the walk starts), so that every
    segment starts from its true state."""
    S = tl.where(i_seg == walk_start, _initial_tile(initial, i_nh, state_tile, mask_kv, K, V, BK, BV, GIVEN), 0.0)
    if SEEDED:
        S += tl.load(seeds + (i_nh.to(tl.int64) * n_segments + i_seg) * K * V + state_tile, mask=mask_kv,
                     other=0.0).to(tl.float32)
    return S


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
    its true starting tile, the seed a segmented walk left (`_Walks.carry`), so the chunk states are exact with
    no carry pass: the backward's recomputation."""
    (i_nh, i_seg, i_v, i_n, i_h, bos, eos, state_off, offs_k, offs_v, mask_k, mask_v, mask_kv, state_tile, b,
     one_minus_b) = _state_tile_program(T, n_segments, cu_seqlens, state_offsets, lower_bound, H, K, V, C, BK, BV,
                                        HAS_BOUND, IS_VARLEN)
    length = eos - bos
    offs_c = tl.arange(0, C)
    S = _segment_start(h0, seeds, i_nh, i_seg, 0, n_segments, state_tile, mask_kv, K, V, BK, BV, HAS_H0, SEEDED)
    D = tl.zeros([BK], dtype=tl.float32)  # gate sum since the segment's start
    n_chunks = tl.cdiv(length, C)
    first, last = _segment_range(i_seg, segment_chunks, n_chunks)
    for i_t in range(first, last):
        _store_walk_step(states, chunk_decays, (state_off + i_t) * H + i_h, S, D, state_tile, mask_kv, offs_k, mask_k,
                         i_v, K, V, SEGMENTED)
        valid, rows = _chunk_rows(i_t, offs_c, length, bos, eos, C, REVERSE)
        mask_ck = valid[:, None] & mask_k[None, :]
        f_t = _load_rows(f, rows, stride_f, i_h, offs_k, K, mask_ck)
        _, k, _, _, G, G_last = _chunk_gate(f_t, b, one_minus_b, mask_ck, offs_c, C, 0, CUMSUM_BY_MATMUL=False)
        k_end = _decayed_to_chunk_end(k, G, G_last, 0).to(WIDE_DT)
        v_t = _load_rows(v, rows, stride_v, i_h, offs_v, V, valid[:, None] & mask_v[None, :])
        S = S * _exp(G_last)[:, None] + tl.dot(tl.trans(k_end), v_t.to(WIDE_DT), input_precision=PRECISION)
        D += G_last
    if last == n_chunks:
        # The layout's slot after a sequence's last chunk is filled too: no slot of the buffer is left unwritten.
        _store_walk_step(states, chunk_decays, (state_off + n_chunks) * H + i_h, S, D, state_tile, mask_kv, offs_k,
                         mask_k, i_v, K, V, SEGMENTED)
    if SEGMENTED:
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
def _v_block(i_v, offs_k, mask_k, valid, V: tl.constexpr, BV: tl.constexpr):
    """V block i_v of a chunk-parallel kernel's loop: its offsets, the masks of its [C, BV] rows and [K, BV] state
    tile, and that tile's offsets in a [K, V] state."""
    offs_v = i_v * BV + tl.arange(0, BV)
    mask_v = offs_v < V
    mask_cv, mask_kv = valid[:, None] & mask_v[None, :], mask_k[:, None] & mask_v[None, :]
    return offs_v, mask_cv, mask_kv, offs_k[:, None] * V + offs_v[None, :]


@triton.jit
def _fwd_output_kernel(
    q, f, v, lower_bound, states, o, chunk_decays, seeds, flags, cu_seqlens, state_offsets, chunk_table, stride_q,
    stride_f, stride_v, scale, T, n_segments, segment_chunks,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    HAS_BOUND: tl.constexpr, IS_VARLEN: tl.constexpr, REVERSE: tl.constexpr, PRECISION: tl.constexpr,
    WIDE_DT: tl.constexpr, SEEDED: tl.constexpr, LAUNCH: tl.constexpr,
):
    """LAUNCH: ONE_LAUNCH at C 32, where the fallback's code inline cost the anchored chunks nothing measurable and a
    second launch cost 12-24 us (kernels/HISTORY.md, ninth session); ANCHORED_LAUNCH then FALLBACK_LAUNCH at C 64,
    where it spills (kernels/triton_scan.py, `scan_fwd`).

    SEEDED: the chunk states are a segmented walk's local ones; the true state at a chunk's start is local + exp(D)
    seed, D the gate sum since its segment's start and seed the segment's true start (`_Walks.carry`), so the
    correction is one more product, (q exp(G + D)) seed, instead of a carry pass that reads and writes every chunk
    state."""
    i_c, i_h = tl.program_id(0), tl.program_id(1)
    i_n, i_t = _chunk_of_program(i_c, T, C, chunk_table, IS_VARLEN)
    if i_n < 0:
        return
    if LAUNCH == FALLBACK_LAUNCH:
        if not _left_to_the_fallback(flags, i_c, i_h, H):
            return
    state_off, length, offs_c, offs_k, mask_k, valid, rows, mask_ck, causal, b, one_minus_b = _chunk_tile(
        i_n, i_t, i_h, T, cu_seqlens, state_offsets, lower_bound, H, K, C, BK, HAS_BOUND, IS_VARLEN, REVERSE)
    DT = q.dtype.element_ty
    _, k, _, _, G, G_last = _chunk_gate(_load_rows(f, rows, stride_f, i_h, offs_k, K, mask_ck), b, one_minus_b,
                                        mask_ck, offs_c, C, 0, CUMSUM_BY_MATMUL=False)
    q_t = _load_rows(q, rows, stride_q, i_h, offs_k, K, mask_ck).to(tl.float32)
    if LAUNCH == FALLBACK_LAUNCH:
        A = _fallback_scores(q_t, k, G, offs_c, valid, C, BK, WIDE_DT, PRECISION, 0, SMALLEST_BLOCK)[0]
        to_start = _decays(G, G_last, 0)[0]
    elif LAUNCH == ANCHORED_LAUNCH:
        G_mid, anchored = _anchor(G, offs_c, valid, C, 0)
        _mark_for_the_fallback(flags, i_c, i_h, H, anchored)
        if not anchored:
            return
        A = _pair_sums(*_anchored_operands(q_t, k, G, G_mid, WIDE_DT, 0), PRECISION, 0)
        to_start = _decays_from_anchor(G, G_mid, G_last, 0)[0]
    else:
        A, to_start, _ = _chunk_products(q_t, k, G, G_last, offs_c, valid, C, BK, WIDE_DT, PRECISION)
    A = tl.where(causal, A * scale, 0.0).to(DT)
    q_decayed = q_t * to_start * scale
    q_inter = q_decayed.to(WIDE_DT)
    state_at_start = states + ((state_off + i_t) * H + i_h) * K * V
    if SEEDED:
        D, seed = _chunk_seed(seeds, chunk_decays, state_off, i_n, i_t, i_h, n_segments, segment_chunks, offs_k,
                              mask_k, H, K, V)
        q_seed = (q_decayed * _exp(D)[None, :]).to(WIDE_DT)
    for i_v in range(0, tl.cdiv(V, BV)):
        offs_v, mask_cv, mask_kv, state_tile = _v_block(i_v, offs_k, mask_k, valid, V, BV)
        v_t = _load_rows(v, rows, stride_v, i_h, offs_v, V, mask_cv).to(DT)
        h_start = tl.load(state_at_start + state_tile, mask=mask_kv, other=0.0).to(WIDE_DT)
        # Transposed only for 16-bit states at C 32. tf32 products' transposed operands pass the 227 KiB of shared
        # memory (fp16 inputs at C 64). At the no-grad forward's C 64 (record shape, H100) they lost at T 8K (0.93 ->
        # 0.98 ms) and tied at T 16K. The seed tile is loaded in each branch: loaded before it, the pipelining's
        # buffers grew from 80 KiB of shared memory at C 64 to 112 (120 transposed: one program per SM, T 16K 0.87 ->
        # 1.15 ms).
        if WIDE_DT == tl.float32 or C > 32:
            out = tl.dot(A, v_t, input_precision=PRECISION) + tl.dot(q_inter, h_start, input_precision=PRECISION)
            if SEEDED:
                seed_tile = tl.load(seed + state_tile, mask=mask_kv, other=0.0).to(WIDE_DT)
                out += tl.dot(q_seed, seed_tile, input_precision=PRECISION)
        else:  # o^T = v^T A^T + h^T (q exp(G))^T: M = BV rows for the tensor cores' wgmma, not C
            out_T = tl.dot(tl.trans(v_t), tl.trans(A), input_precision=PRECISION) + tl.dot(
                tl.trans(h_start), tl.trans(q_inter), input_precision=PRECISION)
            if SEEDED:
                seed_tile = tl.load(seed + state_tile, mask=mask_kv, other=0.0).to(WIDE_DT)
                out_T += tl.dot(tl.trans(seed_tile), tl.trans(q_seed), input_precision=PRECISION)
            out = tl.trans(out_T)
        _store_rows(o, rows, i_h, offs_v, H, V, out, mask_cv)


@triton.jit(do_not_specialize=["n_segments"])  # see the loop below
def _fwd_fused_kernel(
    q, f, v, lower_bound, h0, o, final_state, states, scores, chunk_decays, segment_ends, segment_decays, seeds,
    walk_flags, cu_seqlens, state_offsets, stride_q, stride_f, stride_v, scale, T, n_segments, segment_chunks,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    HAS_BOUND: tl.constexpr, HAS_H0: tl.constexpr, OUTPUT_FINAL: tl.constexpr, STORE_STATES: tl.constexpr,
    STORE_SCORES: tl.constexpr, SEGMENTED: tl.constexpr, SEEDED: tl.constexpr, IS_VARLEN: tl.constexpr,
    REVERSE: tl.constexpr, PRECISION: tl.constexpr, WIDE_DT: tl.constexpr, ONLY_FLAGGED: tl.constexpr = False,
):
    """The forward in one pass: one program per (sequence, head, V block) walks the sequence's chunks in order
    holding its state tile in float32 registers (transposed, [BV, K]), and for each chunk writes the outputs from it
    (the output kernel's products) before advancing it (the states kernel's). No chunk state is read back from
    memory, and none is written unless STORE_STATES (for the backward, as the states kernel stores them). Each V
    block computes the chunk's gate and intra-chunk scores again; with STORE_SCORES the first keeps the scores for
    the dh walk's dv (`_bwd_dh_kernel`).

    SEGMENTED (a forward without a backward, too few walks to fill the GPU): each segment of a walk's chunks runs
    at once from a zero state (the first from the initial one), storing the gate sum D since its start at every
    chunk and its end for `_segment_carry_kernel`; its outputs then lack (q exp(G + D)) seed, which
    `_fwd_seed_kernel` adds. SEEDED (a forward a backward follows, with as few walks): each segment starts from its
    true state, the seed that the segments' ends (`_segment_ends_kernel`) and the carry pass found first, so that
    its outputs, chunk states and scores are exact as written.

    ONLY_FLAGGED: only the walks whose `walk_flags` are set, the ones the Gluon forward could not anchor
    (kernels/gluon_scan_forward.py); the others return at once."""
    (i_nh, i_seg, i_v, i_n, i_h, bos, eos, state_off, offs_k, offs_v, mask_k, mask_v, mask_kv, state_tile, b,
     one_minus_b) = _state_tile_program(T, n_segments, cu_seqlens, state_offsets, lower_bound, H, K, V, C, BK, BV,
                                        HAS_BOUND, IS_VARLEN)
    if ONLY_FLAGGED:
        if tl.load(walk_flags + i_nh) == 0:
            return
    length = eos - bos
    offs_c = tl.arange(0, C)
    causal = offs_c[:, None] >= offs_c[None, :]
    DT = q.dtype.element_ty
    # The state is held transposed, [BV, BK]: the output's product then takes it as the tensor cores' left operand
    # straight from registers (o^T = S^T (q exp(G))^T), with M = BV rows, instead of staging it in shared memory.
    # It is stored transposed back (sm_90a spills 148 bytes a thread, against 192-264 with transposed offsets).
    S_T = tl.trans(_segment_start(h0, seeds, i_nh, i_seg, 0, n_segments, state_tile, mask_kv, K, V, BK, BV, HAS_H0,
                                  SEEDED))
    D = tl.zeros([BK], dtype=tl.float32)  # gate sum since the segment's start
    n_chunks = tl.cdiv(length, C)
    # Whole walks too start at a chunk the compiler does not know (n_segments is never specialised to 1): with a
    # constant 0 the loop at 3 pipeline stages took 0.59 ms without grad at T 2K, with this 0.48 (H100, triton 3.8,
    # twenty-sixth session; 2 stages 0.56 either way).
    first, last = _segment_range(i_seg, segment_chunks, n_chunks)
    for i_t in range(first, last):
        if SEGMENTED:
            _store_chunk_decay(chunk_decays, (state_off + i_t) * H + i_h, D, offs_k, mask_k, i_v, K)
        if STORE_STATES:
            _store_state(states, (state_off + i_t) * H + i_h, tl.trans(S_T), state_tile, mask_kv, K, V)
        valid, rows = _chunk_rows(i_t, offs_c, length, bos, eos, C, REVERSE)
        mask_ck = valid[:, None] & mask_k[None, :]
        mask_cv = valid[:, None] & mask_v[None, :]
        _, k, _, _, G, G_last = _chunk_gate(_load_rows(f, rows, stride_f, i_h, offs_k, K, mask_ck), b, one_minus_b,
                                            mask_ck, offs_c, C, 0, CUMSUM_BY_MATMUL=True)
        q_t = _load_rows(q, rows, stride_q, i_h, offs_k, K, mask_ck).to(tl.float32)
        A, to_start, to_end = _chunk_products(q_t, k, G, G_last, offs_c, valid, C, BK, WIDE_DT, PRECISION)
        A = tl.where(causal, A * scale, 0.0).to(DT)
        if STORE_SCORES:
            if i_v == 0:
                tl.store(_scores_tile(scores, state_off - i_n + i_t, i_h, offs_c, H, C), A)
        v_T = tl.trans(_load_rows(v, rows, stride_v, i_h, offs_v, V, mask_cv).to(DT))
        out_T = tl.dot(v_T, tl.trans(A), input_precision=PRECISION) + tl.dot(
            S_T.to(WIDE_DT), tl.trans((q_t * to_start * scale).to(WIDE_DT)), input_precision=PRECISION)
        _store_rows(o, rows, i_h, offs_v, H, V, tl.trans(out_T), mask_cv)
        k_end = (k * to_end).to(WIDE_DT)
        S_T = S_T * _exp(G_last)[None, :] + tl.dot(v_T.to(WIDE_DT), k_end, input_precision=PRECISION)
        if SEGMENTED:
            D += G_last
    if SEGMENTED:
        _store_segment_end(tl.trans(S_T), D, segment_ends, segment_decays, i_nh, i_seg, n_segments, i_v, offs_k,
                           mask_k, state_tile, mask_kv, K, V)
    ends_walk = last == n_chunks  # the walk's last segment (a whole walk is one)
    if STORE_STATES:  # and the slot after the last chunk, as the states kernel: none left unwritten
        _store_state(states, (state_off + n_chunks) * H + i_h, tl.trans(S_T), state_tile, mask_kv & ends_walk, K, V)
    if OUTPUT_FINAL:
        tl.store(final_state + i_nh.to(tl.int64) * K * V + state_tile, tl.trans(S_T), mask=mask_kv & ends_walk)


@triton.jit
def _fwd_seed_kernel(
    q, f, lower_bound, o, chunk_decays, seeds, cu_seqlens, state_offsets, chunk_table, stride_q, stride_f, scale, T,
    n_segments, segment_chunks,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    HAS_BOUND: tl.constexpr, IS_VARLEN: tl.constexpr, REVERSE: tl.constexpr, PRECISION: tl.constexpr,
    WIDE_DT: tl.constexpr,
):
    """What a segmented one-pass forward's outputs lack past each walk's first segment: the true state at a chunk's
    start is its segment's local one plus exp(D) seed (`_fwd_output_kernel`'s SEEDED), so one program per (chunk,
    head) adds (q exp(G + D)) seed to the outputs already written."""
    i_c, i_h = tl.program_id(0), tl.program_id(1)
    i_n, i_t = _chunk_of_program(i_c, T, C, chunk_table, IS_VARLEN)
    if i_n < 0 or i_t < segment_chunks:  # the first segment started from the true initial state
        return
    state_off, length, offs_c, offs_k, mask_k, valid, rows, mask_ck, causal, b, one_minus_b = _chunk_tile(
        i_n, i_t, i_h, T, cu_seqlens, state_offsets, lower_bound, H, K, C, BK, HAS_BOUND, IS_VARLEN, REVERSE)
    _, _, _, _, G, G_last = _chunk_gate(_load_rows(f, rows, stride_f, i_h, offs_k, K, mask_ck), b, one_minus_b,
                                        mask_ck, offs_c, C, 0, CUMSUM_BY_MATMUL=False)
    D, seed = _chunk_seed(seeds, chunk_decays, state_off, i_n, i_t, i_h, n_segments, segment_chunks, offs_k, mask_k,
                          H, K, V)
    q_t = _load_rows(q, rows, stride_q, i_h, offs_k, K, mask_ck).to(tl.float32)
    q_seed = (q_t * _exp(G + D[None, :]) * scale).to(WIDE_DT)
    for i_v in range(0, tl.cdiv(V, BV)):
        offs_v, mask_cv, mask_kv, state_tile = _v_block(i_v, offs_k, mask_k, valid, V, BV)
        seed_tile = tl.load(seed + state_tile, mask=mask_kv, other=0.0).to(WIDE_DT)
        out = _load_rows(o, rows, H * V, i_h, offs_v, V, mask_cv).to(tl.float32)
        _store_rows(o, rows, i_h, offs_v, H, V, out + tl.dot(q_seed, seed_tile, input_precision=PRECISION), mask_cv)


@triton.jit
def _bwd_dh_kernel(
    q, f, do, lower_bound, d_final, dstates, dh0, chunk_decays, segment_ends, segment_decays, seeds, q_by_time,
    f_by_time, scores, dv, cu_seqlens, state_offsets, stride_q, stride_f, scale, T, n_segments, segment_chunks,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    HAS_BOUND: tl.constexpr, HAS_DFINAL: tl.constexpr, WRITE_DH0: tl.constexpr, SEGMENTED: tl.constexpr,
    SEEDED: tl.constexpr, IS_VARLEN: tl.constexpr, REVERSE: tl.constexpr, PRECISION: tl.constexpr,
    WIDE_DT: tl.constexpr, WRITE_DV: tl.constexpr,
):
    """Also copies q and f into `q_by_time`, `f_by_time` (see `_by_time`; the first V block of each K block writes
    them): the grads kernel reads them time-contiguous, and this walk reads every chunk of both anyway.

    WRITE_DV (a walk over the whole K, whole or SEEDED, after a one-pass forward that kept its intra-chunk
    `scores`): dv = A^T do + (k exp(G_C - G)) dS as well, from the chunk-end state gradient dS in registers, and
    the grads kernel skips it (`_scores_kept` in kernels/triton_scan_dispatch.py says where, and what it gained).

    SEGMENTED and SEEDED as in the states walk (`_fwd_states_kernel`), from the sequence's end: a cut walk that
    writes dv must write exact state gradients as it goes, so `_segment_ends_kernel` and the carry pass find each
    segment's seed first."""
    (i_nh, i_seg, i_v, i_n, i_h, bos, eos, state_off, offs_k, offs_v, mask_k, mask_v, mask_kv, state_tile, b,
     one_minus_b) = _state_tile_program(T, n_segments, cu_seqlens, state_offsets, lower_bound, H, K, V, C, BK, BV,
                                        HAS_BOUND, IS_VARLEN)
    length = eos - bos
    chunk_off = state_off - i_n  # a sequence has one chunk fewer than chunk states
    offs_c = tl.arange(0, C)
    # Held transposed, [BV, BK], as the one-pass forward holds its state: dv's product takes it from registers.
    tile_T, mask_T = offs_v[:, None] + offs_k[None, :] * V, mask_v[:, None] & mask_k[None, :]
    dS_T = tl.trans(_segment_start(d_final, seeds, i_nh, i_seg, n_segments - 1, n_segments, state_tile, mask_kv, K, V,
                                   BK, BV, HAS_DFINAL, SEEDED))
    D = tl.zeros([BK], dtype=tl.float32)  # gate sum from the chunk's end to the segment's end
    n_chunks = tl.cdiv(length, C)
    first, last = _segment_range(i_seg, segment_chunks, n_chunks)
    for j in range(0, last - first):
        i_t = last - 1 - j
        _store_walk_step(dstates, chunk_decays, (chunk_off + i_t) * H + i_h, dS_T, D, tile_T, mask_T, offs_k, mask_k,
                         i_v, K, V, SEGMENTED)
        valid, rows = _chunk_rows(i_t, offs_c, length, bos, eos, C, REVERSE)
        mask_ck = valid[:, None] & mask_k[None, :]
        f_t = _load_rows(f, rows, stride_f, i_h, offs_k, K, mask_ck)
        q_t = _load_rows(q, rows, stride_q, i_h, offs_k, K, mask_ck)
        if i_v == 0:  # one V block writes the copies; the others skip their transposes too
            by_time = _by_time(chunk_off + i_t, offs_c, i_h, offs_k, H, K, C)
            # Whole chunks, zeros past the sequence's end (masked loads above): see `_by_time`.
            tl.store(f_by_time + by_time, tl.trans(f_t), mask=mask_k[:, None])
            tl.store(q_by_time + by_time, tl.trans(q_t), mask=mask_k[:, None])
        _, k, _, _, G, G_last = _chunk_gate(f_t, b, one_minus_b, mask_ck, offs_c, C, 0, CUMSUM_BY_MATMUL=False)
        mask_cv = valid[:, None] & mask_v[None, :]
        do_T = tl.trans(_load_rows(do, rows, H * V, i_h, offs_v, V, mask_cv))
        if WRITE_DV:
            A = tl.load(_scores_tile(scores, chunk_off + i_t, i_h, offs_c, H, C))
            k_end = _decayed_to_chunk_end(k, G, G_last, 0).to(WIDE_DT)
            dv_T = tl.dot(do_T.to(A.dtype), A, input_precision=PRECISION) + tl.dot(
                dS_T.to(WIDE_DT), tl.trans(k_end), input_precision=PRECISION)
            _store_rows(dv, rows, i_h, offs_v, H, V, tl.trans(dv_T), mask_cv)
        q_inter = (q_t.to(tl.float32) * _exp(G) * scale).to(WIDE_DT)
        dS_T = dS_T * _exp(G_last)[None, :] + tl.dot(do_T.to(WIDE_DT), q_inter, input_precision=PRECISION)
        D += G_last
    if SEGMENTED:
        _store_segment_end(dS_T, D, segment_ends, segment_decays, i_nh, i_seg, n_segments, i_v, offs_k, mask_k,
                           tile_T, mask_T, K, V)
    elif WRITE_DH0:  # by the segment where the walk ends (a whole walk is one)
        tl.store(dh0 + i_nh.to(tl.int64) * K * V + tile_T, dS_T, mask=mask_T & (i_seg == 0))


@triton.jit
def _segment_ends_kernel(
    q, f, y, lower_bound, initial, segment_ends, segment_decays, cu_seqlens, state_offsets, stride_q, stride_f,
    stride_y, scale, T, n_segments, segment_chunks,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    BT: tl.constexpr, HAS_BOUND: tl.constexpr, HAS_INITIAL: tl.constexpr, BACKWARD: tl.constexpr,
    IS_VARLEN: tl.constexpr, REVERSE: tl.constexpr, PRECISION: tl.constexpr, WIDE_DT: tl.constexpr,
):
    """What a segmented walk hands the carry pass (each segment's end from zero, and its gate sum), where nothing
    else of it is wanted: the seeds of a seeded walk (`_one_pass_segments`). The states walk's ends (y = v; q is not
    read) or, BACKWARD, the dh walk's (y = do: the state gradient at the segment's start in time).

    Not walked: each position's term reaches the end decayed by the gate sum from it to the end, at most 1, so the
    segment goes in BT-position steps from its end, the gate sum D of the steps already taken a [BK] vector, and
    the [BK, BV] sum takes every step's product without the walk's rescaling, as a matmul's main loop does. No
    chunk state is wanted, so a step may be wider than a chunk."""
    (i_nh, i_seg, i_v, i_n, i_h, bos, eos, state_off, offs_k, offs_v, mask_k, mask_v, mask_kv, state_tile, b,
     one_minus_b) = _state_tile_program(T, n_segments, cu_seqlens, state_offsets, lower_bound, H, K, V, C, BK, BV,
                                        HAS_BOUND, IS_VARLEN)
    first, last = _segment_range(i_seg, segment_chunks, tl.cdiv(eos - bos, C))
    start, end = first * C, tl.minimum(last * C, eos - bos)  # the segment's positions, in walk order
    offs_t = tl.arange(0, BT)
    S = tl.zeros([BK, BV], dtype=tl.float32)
    D = tl.zeros([BK], dtype=tl.float32)
    for j in range(0, tl.cdiv(end - start, BT)):
        if BACKWARD:  # the dh walk ends at the segment's start
            p = start + j * BT + offs_t
        else:
            p = end - (j + 1) * BT + offs_t
        valid = (p >= start) & (p < end)
        rows = eos - 1 - p if REVERSE else bos + p
        mask_tk = valid[:, None] & mask_k[None, :]
        f_t = _load_rows(f, rows, stride_f, i_h, offs_k, K, mask_tk)
        _, k, _, _, G, G_last = _chunk_gate(f_t, b, one_minus_b, mask_tk, offs_t, BT, 0, CUMSUM_BY_MATMUL=False)
        if BACKWARD:
            q_t = _load_rows(q, rows, stride_q, i_h, offs_k, K, mask_tk).to(tl.float32)
            x_t = q_t * _exp(G + D[None, :]) * scale
        else:
            x_t = k * _exp(G_last[None, :] - G + D[None, :])
        y_t = _load_rows(y, rows, stride_y, i_h, offs_v, V, valid[:, None] & mask_v[None, :])
        S = tl.dot(tl.trans(x_t.to(WIDE_DT)), y_t.to(WIDE_DT), acc=S, input_precision=PRECISION)
        D += G_last
    if HAS_INITIAL:  # h0, or the final state's gradient, enters the segment where the walk starts
        walk_start = n_segments - 1 if BACKWARD else 0
        initial_tile = _initial_tile(initial, i_nh, state_tile, mask_kv & (i_seg == walk_start), K, V, BK, BV, True)
        S += _exp(D)[:, None] * initial_tile
    _store_segment_end(S, D, segment_ends, segment_decays, i_nh, i_seg, n_segments, i_v, offs_k, mask_k, state_tile,
                       mask_kv, K, V)


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
    first, last = _segment_range(i_seg, segment_chunks, n_chunks)
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
    q_by_time, f_by_time, v, do, lower_bound, states, dstates, dq, df, dv, db, flags, cu_seqlens, state_offsets,
    chunk_table, stride_v, scale, T,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    HAS_BOUND: tl.constexpr, IS_VARLEN: tl.constexpr, REVERSE: tl.constexpr, PRECISION: tl.constexpr,
    ANCHORED_DT: tl.constexpr, WIDE_DT: tl.constexpr, HOLD_GATE: tl.constexpr, LAUNCH: tl.constexpr,
    WRITE_DV: tl.constexpr, OWN_MMA_LOADS: tl.constexpr,
):
    """Launched twice. The first launch (ANCHORED_LAUNCH) does the chunks whose intra-chunk pairs one anchor spans
    (nearly all) and marks the others in `flags`; the second (FALLBACK_LAUNCH) does only those, by anchored blocks
    or elementwise (`_fallback_scores`). Fallback code in the same launch costs the anchored chunks registers and
    spills even though it never runs for them: at the record shape (H100) this kernel took 1.93 ms with the
    elementwise path inline, 2.10 with the halves too, and 1.75 split (kernels/HISTORY.md, ninth session).

    Every per-channel tile is held [K, C], and q and the gate come from the dh kernel's time-contiguous copies, so
    that Triton lays a chunk's positions inside each warp: the cumulative sums and reductions over C (a third of
    this kernel's instructions) then need no shared memory: 2.69 -> 2.21 ms at the record shape with the copy of f
    (HISTORY.md, v4), 1.91 with the copy of q too (HISTORY.md, fifth and sixth sessions).

    WRITE_DV: dv too, unless the dh walk wrote it (`_bwd_dh_kernel`).

    OWN_MMA_LOADS: the V loop's tensor-core products read tiles loaded for them alone, apart from the same tiles'
    register users. Triton 3.8 then gives them the extra pipeline slot an asynchronous wgmma needs; otherwise its
    pipelining races (`_tiles`)."""
    i_c, i_h = tl.program_id(0), tl.program_id(1)
    i_n, i_t = _chunk_of_program(i_c, T, C, chunk_table, IS_VARLEN)
    if i_n < 0:
        return
    if LAUNCH == FALLBACK_LAUNCH:
        if not _left_to_the_fallback(flags, i_c, i_h, H):
            return
    state_off, length, offs_c, offs_k, mask_k, valid, rows, mask_ck, causal, b, one_minus_b = _chunk_tile(
        i_n, i_t, i_h, T, cu_seqlens, state_offsets, lower_bound, H, K, C, BK, HAS_BOUND, IS_VARLEN, REVERSE)
    chunk = state_off - i_n + i_t
    DT = q_by_time.dtype.element_ty
    mask_kc = tl.trans(mask_ck)
    by_time = _by_time(chunk, offs_c, i_h, offs_k, H, K, C)
    f_kc, q_kc = f_by_time + by_time, q_by_time + by_time
    copied = mask_k[:, None]  # the copies' whole chunks, zeros past the end: see `_by_time`

    # Registers bound this kernel (255 per thread, one 8-warp program per SM). HOLD_GATE keeps the gate, q and
    # the anchored operands across the V loop; otherwise only what the loop needs (A, k_end) is held, and the
    # gate and q are read again after it and recomputed. Recomputing is 55% slower at bf16 on the H100
    # (kernels/HISTORY.md, v3.2), but holding them at float32 makes ptxas give up (32 registers, 19 KiB of
    # spills): 16-bit inputs hold, float32 recomputes.
    g, k, sig, sig_neg, G, G_last = _chunk_gate(tl.load(f_kc, mask=copied, other=0.0), b, one_minus_b, mask_kc,
                                                offs_c, C, 1, CUMSUM_BY_MATMUL=False)
    q_t = tl.load(q_kc, mask=copied, other=0.0).to(tl.float32)
    if LAUNCH == FALLBACK_LAUNCH:
        A, block = _fallback_scores(q_t, k, G, offs_c, valid, C, BK, ANCHORED_DT, PRECISION, 1, SMALLEST_BLOCK)
    else:
        G_mid, anchored = _anchor(G, offs_c, valid, C, 1)
        _mark_for_the_fallback(flags, i_c, i_h, H, anchored)
        if not anchored:
            return
        q_mid, k_mid = _anchored_operands(q_t, k, G, G_mid, ANCHORED_DT, 1)
        if WRITE_DV:
            A = _pair_sums(q_mid, k_mid, PRECISION, 1)
    if WRITE_DV:
        A = tl.where(causal, A * scale, 0.0).to(DT)
        k_end = _decayed_to_chunk_end(k, G, G_last, 1).to(WIDE_DT)
    # Held instead of g, sigmoid(f) and sigmoid(-f): two tiles for three, fewer spills, and triton 3.8 evaluates the
    # log once (grads at the ViT's shape 0.268 -> 0.262 ms, 64-wide LM heads 0.693 -> 0.670, the record shape
    # unchanged; H200, triton 3.6, kernels/HISTORY.md, fifteenth session).
    if HOLD_GATE:
        sig_share, dlog_db = _gate_grad_factors(g, sig, sig_neg, one_minus_b)

    dq_inter = tl.zeros([BK, C], dtype=tl.float32)
    dk_state = tl.zeros([BK, C], dtype=tl.float32)
    dA = tl.zeros([C, C], dtype=tl.float32)
    dh_dot_h = tl.zeros([BK], dtype=tl.float32)
    state_at_start = states + ((state_off + i_t) * H + i_h) * K * V
    dstate_at_end = dstates + (chunk * H + i_h) * K * V
    for i_v in range(0, tl.cdiv(V, BV)):
        offs_v, mask_cv, mask_kv, state_tile = _v_block(i_v, offs_k, mask_k, valid, V, BV)
        v_t = _load_rows(v, rows, stride_v, i_h, offs_v, V, mask_cv).to(DT)
        do_t = _load_rows(do, rows, H * V, i_h, offs_v, V, mask_cv).to(DT)
        h_start = tl.load(state_at_start + state_tile, mask=mask_kv, other=0.0).to(WIDE_DT)
        dh_end = tl.load(dstate_at_end + state_tile, mask=mask_kv, other=0.0).to(WIDE_DT)
        if OWN_MMA_LOADS:  # another eviction hint, so that Triton does not merge these loads with the ones above
            mma_v = _load_rows(v, rows, stride_v, i_h, offs_v, V, mask_cv, "evict_last").to(WIDE_DT)
            mma_do = _load_rows(do, rows, H * V, i_h, offs_v, V, mask_cv, "evict_last").to(WIDE_DT)
            mma_h = tl.load(state_at_start + state_tile, mask=mask_kv, other=0.0, eviction_policy="evict_last")
            mma_dh = tl.load(dstate_at_end + state_tile, mask=mask_kv, other=0.0, eviction_policy="evict_last")
            mma_h, mma_dh = mma_h.to(WIDE_DT), mma_dh.to(WIDE_DT)
        else:
            mma_v, mma_do, mma_h, mma_dh = v_t.to(WIDE_DT), do_t.to(WIDE_DT), h_start, dh_end
        dA += tl.dot(do_t, tl.trans(v_t), input_precision=PRECISION)
        dq_inter += tl.dot(mma_h, tl.trans(mma_do), input_precision=PRECISION)
        dk_state += tl.dot(mma_dh, tl.trans(mma_v), input_precision=PRECISION)
        if WRITE_DV:
            dv_t = tl.dot(tl.trans(A), do_t, input_precision=PRECISION) + tl.dot(tl.trans(k_end), dh_end,
                                                                                  input_precision=PRECISION)
            _store_rows(dv, rows, i_h, offs_v, H, V, dv_t, mask_cv)
        dh_dot_h += tl.sum(h_start.to(tl.float32) * dh_end.to(tl.float32), axis=1)

    # The diagonal pairs (t, t) of the intra-chunk scores carry no decay, so their gate gradients cancel
    # exactly: they are kept out of the dq, dk used for dG (otherwise dG would be a difference of O(1)
    # terms, all rounding, when the gates are near 0) and added to the stored dq, dk afterwards.
    eye = offs_c[:, None] == offs_c[None, :]
    dA_diag = tl.sum(tl.where(eye, dA, 0.0), axis=1) * scale
    dA = tl.where(offs_c[:, None] > offs_c[None, :], dA * scale, 0.0)
    if not HOLD_GATE:
        _, k, _, _, G, G_last = _chunk_gate(tl.load(f_kc, mask=copied, other=0.0), b, one_minus_b, mask_kc, offs_c,
                                            C, 1, CUMSUM_BY_MATMUL=False)
        q_t = tl.load(q_kc, mask=copied, other=0.0).to(tl.float32)
        if LAUNCH == ANCHORED_LAUNCH:
            G_mid, _ = _anchor(G, offs_c, valid, C, 1)
            q_mid, k_mid = _anchored_operands(q_t, k, G, G_mid, ANCHORED_DT, 1)
    if LAUNCH == ANCHORED_LAUNCH and WRITE_DV:  # where it gained (T 16K 1.80 -> 1.75 ms; ViT-tiny lost 0.206 -> 0.213)
        to_start, to_end = _decays_from_anchor(G, G_mid, G_last, 1)
    else:
        to_start, to_end = _decays(G, G_last, 1)
    dq_t = dq_inter * to_start * scale
    dk_state *= to_end
    if LAUNCH == ANCHORED_LAUNCH:
        dq_t += _exp(G - G_mid[:, None]) * tl.dot(k_mid, tl.trans(dA.to(ANCHORED_DT)), input_precision=PRECISION)
        dk_intra = _exp(G_mid[:, None] - G) * tl.dot(q_mid, dA.to(ANCHORED_DT), input_precision=PRECISION)
    else:
        dq_intra, dk_intra = _fallback_intra_grads(q_t, k, G, dA, offs_c, block, C, BK, ANCHORED_DT, PRECISION,
                                                   SMALLEST_BLOCK)
        dq_t += dq_intra
    channel_rows = (rows[None, :] * H + i_h) * K + offs_k[:, None]
    tl.store(dq + channel_rows, (dq_t + dA_diag[None, :] * k).to(dq.dtype.element_ty), mask=mask_kc)
    dk_t = dk_intra + dk_state + dA_diag[None, :] * q_t

    # Gate: dg_j = sum over (query, key) pairs whose decay spans step j. Within the chunk that is the
    # reverse cumulative sum of q dq - k dk; the chunk end acts as one more query (the state S_C), whose
    # key-side pairs are the earlier positions. Its pair with the last position carries no decay: left out too.
    last_position = tl.minimum(length - i_t * C, C) - 1
    k_dk_state = tl.where(mask_kc & (offs_c < last_position)[None, :], k * dk_state, 0.0)
    state_term = _exp(G_last) * dh_dot_h + tl.sum(k_dk_state, axis=1)
    dG = tl.where(mask_kc, q_t * dq_t - k * dk_intra, 0.0) - k_dk_state
    dg = tl.sum(dG, axis=1)[:, None] - tl.cumsum(dG, axis=1) + dG + state_term[:, None]
    if not HOLD_GATE:
        g, _, sig, sig_neg = _gate(tl.load(f_kc, mask=copied, other=0.0).to(tl.float32), _per_channel(b, 1),
                                   _per_channel(one_minus_b, 1), mask_kc)
        sig_share, dlog_db = _gate_grad_factors(g, sig, sig_neg, one_minus_b)
    # lambda = b + (1 - b) sigmoid(f) = 1 - k, k = (1 - b) sigmoid(-f). d lambda / db = -dk / db = sigmoid(-f) =
    # k / (1 - b), so db = dg sigmoid(-f) / lambda - dk k / (1 - b); d lambda / df = -dk / df = (1 - b) sigmoid(f)
    # sigmoid(-f), so df = (1 - b) sigmoid(f) db. Where b is 0 that is written df = k (dg - sigmoid(f) dk), with
    # no 1 / lambda: lambda = sigmoid(f) underflows below f = -87.
    if HAS_BOUND:
        db_t = dlog_db * dg - k * (1 / one_minus_b)[:, None] * dk_t
        df_t = tl.where((b == 0)[:, None], k * (dg - sig_share * dk_t), sig_share * db_t)
        tl.store(db + (chunk * H + i_h) * K + offs_k, tl.sum(tl.where(mask_kc, db_t, 0.0), axis=1), mask=mask_k)
    else:
        df_t = k * (dg - sig_share * dk_t)
    tl.store(df + channel_rows, df_t.to(df.dtype.element_ty), mask=mask_kc)

