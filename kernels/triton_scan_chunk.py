"""One chunk's math in the Triton scan kernels (kernels/triton_scan_kernels.py): the gate formed from the
forget logits and the lower bound, its cumulative sum over a chunk, and the intra-chunk scores and their
gradients, with tiles whose positions lie along either axis.

Intra-chunk scores A[t, s] = sum_k q_tk k_sk exp(G_tk - G_sk) are a matmul after anchoring at the
chunk's middle row m: (q exp(G - G_m)) (k exp(G_m - G))^T. That is exact as long as no exponent
leaves float range, which the kernel checks per chunk (|G - G_m| <= 40); a chunk with a wider gate
range (gates near 0 without a lower bound) is cut into halves, quarters (or eighths) anchored at their own
middles, and takes an exact elementwise path only where blocks of 8 are too wide as well (`_fallback_scores`).
"""

import os

import triton
import triton.language as tl
from triton.language.extra import libdevice

FLOAT32_TINY = tl.constexpr(1.1754944e-38)
"""Smallest normal float32: GPUs flush what lies below it to 0."""
ANCHOR_RANGE = tl.constexpr(40.0)
"""Largest |G - G_m| of the matmul path: exp(+-2 * 40) stays far inside float32 and bfloat16 range."""
LOG2_E = tl.constexpr(1.4426950408889634)
SMALLEST_BLOCK = tl.constexpr(8)
"""The fallback's finest blocks (`_fallback_scores`): 4 steps each way from their anchor, gates down to about
exp(-10) a step."""
MAX_LEVELS = tl.constexpr(3)
"""Levels of blocks a chunk of at most 64 is cut into before SMALLEST_BLOCK: halves, quarters, eighths."""
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
def _sigmoids(f):
    """sigmoid(f) and sigmoid(-f), from one exponential and one reciprocal, neither overflowing."""
    e = _exp(-tl.abs(f))
    r = 1 / (1 + e)  # sigmoid(|f|)
    return tl.where(f >= 0, r, e * r), tl.where(f >= 0, e * r, r)


@triton.jit
def _gate(f, b, one_minus_b, mask):
    """g = log(lambda) and k = 1 - lambda from fp32 logits f, with sigmoid(f) and sigmoid(-f) for the backward;
    zero where masked. lambda = b + (1 - b) sigmoid(f), k = (1 - b) sigmoid(-f), b = 0 without a bound; b and
    1 - b come broadcastable to f's tile (`_per_channel`).

    Three special-function operations per element (an exponential, a reciprocal, a logarithm), which is
    what bounds the kernels' arithmetic: each computes the gate of every element it touches. lambda is a
    sum of positive terms, never a difference, so g is right to about 1e-7 of its size. Where b is 0,
    lambda = sigmoid(f) underflows below f = -87; it is held at float32's smallest normal there, a decay
    to 0 within one step either way (the backward's chain rule does not go through lambda there)."""
    sig, sig_neg = _sigmoids(f)
    k = one_minus_b * sig_neg
    g = _log(tl.maximum(b + one_minus_b * sig, FLOAT32_TINY))
    return tl.where(mask, g, 0.0), tl.where(mask, k, 0.0), sig, sig_neg


@triton.jit
def _bound(lower_bound, i_h, offs_k, mask_k, K: tl.constexpr, BK: tl.constexpr, HAS_BOUND: tl.constexpr):
    """b and 1 - b of the head's K channels (0 and 1 when there is no bound)."""
    b = tl.zeros([BK], dtype=tl.float32)
    if HAS_BOUND:
        b += tl.load(lower_bound + i_h * K + offs_k, mask=mask_k, other=0.0).to(tl.float32)
    return b, 1 - b


@triton.jit
def _per_channel(x, AXIS: tl.constexpr):
    """A per-channel vector ([K]) broadcastable to a chunk tile whose positions lie along AXIS: [C, K] when AXIS
    is 0, [K, C] when 1."""
    if AXIS == 0:
        y = x[None, :]
    else:
        y = x[:, None]
    return y


@triton.jit
def _per_position(x, AXIS: tl.constexpr):
    """A per-position vector ([C]) broadcastable to a chunk tile whose positions lie along AXIS."""
    if AXIS == 0:
        y = x[:, None]
    else:
        y = x[None, :]
    return y


@triton.jit
def _position(x, offs_c, m, AXIS: tl.constexpr):
    """Position m of a chunk tile (positions along AXIS), as a per-channel vector."""
    return tl.sum(tl.where(_per_position(offs_c == m, AXIS), x, 0.0), axis=AXIS)


@triton.jit
def _chunk_gate(f_t, b, one_minus_b, mask, offs_c, C: tl.constexpr, AXIS: tl.constexpr,
                CUMSUM_BY_MATMUL: tl.constexpr):
    """The gate of one chunk from its forget logits f_t (positions along AXIS): `_gate`'s g, k, sigmoid(+-f), then
    the cumulative gate G from the chunk's start and its last position G_last, the decay across the whole chunk.
    CUMSUM_BY_MATMUL: take G by `_cumsum_by_matmul` where it applies (128-wide tiles of 16-bit inputs, positions along
    axis 0), for the kernels where that measured faster."""
    g, k, sig, sig_neg = _gate(f_t.to(tl.float32), _per_channel(b, AXIS), _per_channel(one_minus_b, AXIS), mask)
    if CUMSUM_BY_MATMUL and AXIS == 0 and f_t.shape[1] >= 128 and f_t.dtype != tl.float32:
        G = _cumsum_by_matmul(g, offs_c)
    else:
        G = tl.cumsum(g, axis=AXIS)
    return g, k, sig, sig_neg, G, _position(G, offs_c, C - 1, AXIS)


@triton.jit
def _decayed_to_chunk_end(x, G, G_last, AXIS: tl.constexpr):
    """x exp(G_last - G) for a chunk tile with positions along AXIS: each position's term carried to the chunk's end,
    as a key enters the state there (and, in the backward, as the state's gradient reaches it)."""
    return x * _exp(_per_channel(G_last, AXIS) - G)


@triton.jit
def _cumsum_by_matmul(g, offs_c):
    """The cumulative sum of a [C, K] tile over its positions (axis 0) as lower-triangular ones times g, on the tensor
    cores. Tiles 128 channels wide spread a chunk's positions over the warps, so `tl.cumsum` goes through shared
    memory: at the record shape it was a fifth of the one-pass forward's instructions (ncu, H100), which the product
    made 0.739 -> 0.672 ms (H100; 0.754 -> 0.675 on the H200). Elsewhere it lost or tied (H100 and H200, triton 3.8,
    kernels/HISTORY.md, eighteenth session): the dh walk 0.467 -> 0.488 on the H100 (a gain on the H200), the output
    kernel (three programs per SM hide the scan) 0.468 -> 0.476 at T 16K, 64-wide tiles (a cheap scan) 0.187 ->
    0.240 in the dh walk. The states walk scans: its 128-wide tiles (the backward's rebuild at T 2K) went unmeasured,
    and the dh walk, its mirror, lost on the H100.
    g is split into two float16 parts (g lies in [-88, 0]), so G keeps about 22 bits: only for 16-bit inputs."""
    lower = (offs_c[:, None] >= offs_c[None, :]).to(tl.float16)
    g_high = g.to(tl.float16)
    return tl.dot(lower, g_high) + tl.dot(lower, (g - g_high.to(tl.float32)).to(tl.float16))


@triton.jit
def _anchor(G, offs_c, valid, C: tl.constexpr, AXIS: tl.constexpr):
    """The anchor position G_m and whether every |G - G_m| of the chunk is within the matmul path's range."""
    G_mid = _position(G, offs_c, C // 2 - 1, AXIS)
    spread = tl.max(tl.max(tl.where(_per_position(valid, AXIS), tl.abs(G - _per_channel(G_mid, AXIS)), 0.0), axis=1),
                    axis=0)
    return G_mid, spread <= ANCHOR_RANGE


@triton.jit
def _scores_exact(q, k, G, offs_c, C: tl.constexpr, BK: tl.constexpr):
    """A[t, s] = sum_k q_tk k_sk exp(G_tk - G_sk), one key at a time: no exponent is ever positive."""
    A = tl.zeros([C, C], dtype=tl.float32)
    for s in range(C):
        k_s = _position(k, offs_c, s, 0)
        G_s = _position(G, offs_c, s, 0)
        column = tl.sum(q * k_s[None, :] * _exp(tl.minimum(G - G_s[None, :], 0.0)), axis=1)
        A = tl.where(offs_c[None, :] == s, column[:, None], A)
    return A


@triton.jit
def _anchored_operands(q, k, G, G_mid, OPERAND_DT: tl.constexpr, AXIS: tl.constexpr):
    """The anchored operands q exp(G - G_m) and k exp(G_m - G) in OPERAND_DT, positions along AXIS."""
    return ((q * _exp(G - _per_channel(G_mid, AXIS))).to(OPERAND_DT),
            (k * _exp(_per_channel(G_mid, AXIS) - G)).to(OPERAND_DT))


@triton.jit
def _decays(G, G_last, AXIS: tl.constexpr):
    """exp(G) and exp(G_last - G) of a chunk tile with positions along AXIS: how the state at the chunk's start
    reaches each position, and how each position reaches the chunk's end."""
    return _exp(G), _exp(_per_channel(G_last, AXIS) - G)


@triton.jit
def _decays_from_anchor(G, G_mid, G_last, AXIS: tl.constexpr):
    """`_decays` of a chunk one anchor spans, as its anchored decays exp(G - G_m), exp(G_m - G)
    (which its operands take anyway: the compiler shares them) times per-channel factors: two special-function
    operations per element fewer. Exact within the anchor's range (|G - G_m| <= 40): exp(G_last - G_m) >= e^-40, and
    where exp(G_m) flushes to 0 (G_m below -87) every exp(G) of the chunk is below e^-47, a state term that rounds
    away beside the chunk's own. The forwards take it (H100, record shape: one-pass forward 0.700 -> 0.683-0.687 ms,
    no-grad forward 0.673 -> 0.633-0.638); the grads kernel only in its launches that write dv (T 16K 1.80 -> 1.75):
    elsewhere it tied at the record shape and lost at 64-wide heads (ViT-tiny 0.206 -> 0.213, kernels/HISTORY.md,
    twenty-third session)."""
    return (_exp(G - _per_channel(G_mid, AXIS)) * _per_channel(_exp(G_mid), AXIS),
            _exp(_per_channel(G_mid, AXIS) - G) * _per_channel(_exp(G_last - G_mid), AXIS))


@triton.jit
def _pair_sums(a, b, PRECISION: tl.constexpr, AXIS: tl.constexpr):
    """The [C, C] sums over channels of a_t b_s, for tiles with positions along AXIS."""
    if AXIS == 0:
        sums = tl.dot(a, tl.trans(b), input_precision=PRECISION)
    else:
        sums = tl.dot(tl.trans(a), b, input_precision=PRECISION)
    return sums


@triton.jit
def _block_anchors(G, offs_c, BLOCK: tl.constexpr, C: tl.constexpr, AXIS: tl.constexpr):
    """G at the middle of each position's block of BLOCK positions, as a tile like G."""
    anchors = _per_channel(_position(G, offs_c, BLOCK // 2 - 1, AXIS), AXIS)
    for j in tl.static_range(1, C // BLOCK):
        anchor = _per_channel(_position(G, offs_c, j * BLOCK + BLOCK // 2 - 1, AXIS), AXIS)
        anchors = tl.where(_per_position(offs_c // BLOCK == j, AXIS), anchor, anchors)
    return anchors


@triton.jit
def _anchored_by_blocks(G, offs_c, valid, BLOCK: tl.constexpr, C: tl.constexpr, AXIS: tl.constexpr):
    """Whether a chunk that one anchor cannot span can be cut into blocks of BLOCK positions, each anchored at its own
    middle: every |G - G_j| within range, G_j the `_block_anchors`. An anchor of half the span passes gates twice as
    steep in log (halves at C 32: down to about exp(-5) a step, against exp(-2.5) for one anchor); the pairs across
    blocks need no check (`_across_blocks`)."""
    spread = tl.max(tl.max(tl.where(_per_position(valid, AXIS),
                                    tl.abs(G - _block_anchors(G, offs_c, BLOCK, C, AXIS)), 0.0), axis=1), axis=0)
    return spread <= ANCHOR_RANGE


@triton.jit
def _same_block(offs_c, BLOCK: tl.constexpr):
    """The [C, C] pairs whose positions lie in the same block of BLOCK positions."""
    return (offs_c[:, None] // BLOCK) == (offs_c[None, :] // BLOCK)


@triton.jit
def _across_blocks(G, offs_c, BLOCK: tl.constexpr, C: tl.constexpr, AXIS: tl.constexpr):
    """The two factors of the decay of a pair across two neighbouring blocks of BLOCK positions that together make one
    block of 2 BLOCK (query in the second, key in the first): exp(G - G_b) on the second blocks' positions and
    exp(G_b - G) on the first blocks', zero on the others, G_b at the first block's last position. Each is at most 1
    whatever the gates, so this needs no range check; their pair sums hold only within one block of 2 BLOCK."""
    boundaries = _per_channel(_position(G, offs_c, BLOCK - 1, AXIS), AXIS)
    for j in tl.static_range(1, C // (2 * BLOCK)):
        boundary = _per_channel(_position(G, offs_c, (2 * j + 1) * BLOCK - 1, AXIS), AXIS)
        boundaries = tl.where(_per_position(offs_c // (2 * BLOCK) == j, AXIS), boundary, boundaries)
    second = _per_position((offs_c // BLOCK) % 2 == 1, AXIS)
    return (tl.where(second, _exp(tl.minimum(G - boundaries, 0.0)), 0.0),
            tl.where(second, 0.0, _exp(tl.minimum(boundaries - G, 0.0))))


@triton.jit
def _scores_by_blocks(q, k, G, offs_c, BLOCK: tl.constexpr, C: tl.constexpr, OPERAND_DT: tl.constexpr,
                      PRECISION: tl.constexpr, AXIS: tl.constexpr):
    """The intra-chunk scores of a chunk cut into anchored blocks of BLOCK positions (`_anchored_by_blocks`): one
    matmul for the pairs within a block, then one for each level of pairs across blocks, BLOCK, 2 BLOCK, ... C / 2
    (`_across_blocks`)."""
    G_block = _block_anchors(G, offs_c, BLOCK, C, AXIS)
    A = tl.where(_same_block(offs_c, BLOCK), _pair_sums((q * _exp(G - G_block)).to(OPERAND_DT),
                                                       (k * _exp(G_block - G)).to(OPERAND_DT), PRECISION, AXIS), 0.0)
    for level in tl.static_range(MAX_LEVELS):
        if (BLOCK << level) < C:
            q_across, k_across = _across_blocks(G, offs_c, BLOCK << level, C, AXIS)
            across = _pair_sums((q * q_across).to(OPERAND_DT), (k * k_across).to(OPERAND_DT), PRECISION, AXIS)
            if (BLOCK << (level + 1)) < C:
                across = tl.where(_same_block(offs_c, BLOCK << (level + 1)), across, 0.0)
            A += across
    return A


@triton.jit
def _scores_elementwise(q, k, G, offs_c, C: tl.constexpr, BK: tl.constexpr, AXIS: tl.constexpr):
    """`_scores_exact` for tiles with positions along AXIS."""
    if AXIS == 0:
        A = _scores_exact(q, k, G, offs_c, C, BK)
    else:
        A = _scores_exact(tl.trans(q), tl.trans(k), tl.trans(G), offs_c, C, BK)
    return A


@triton.jit
def _anchored_block(G, offs_c, valid, FINEST: tl.constexpr, C: tl.constexpr, AXIS: tl.constexpr):
    """The widest blocks, C / 2, C / 4, ... down to FINEST positions, that can all be anchored at their own
    middles (`_anchored_by_blocks`): their size, or 0 where none can. Each level passes gates twice as steep in log."""
    block = 0
    for level in tl.static_range(1, MAX_LEVELS + 1):
        if (C >> level) >= FINEST:
            if block == 0:
                if _anchored_by_blocks(G, offs_c, valid, C >> level, C, AXIS):
                    block = C >> level
    return block


@triton.jit
def _fallback_scores(q, k, G, offs_c, valid, C: tl.constexpr, BK: tl.constexpr, OPERAND_DT: tl.constexpr,
                     PRECISION: tl.constexpr, AXIS: tl.constexpr, FINEST: tl.constexpr):
    """A[t, s] = sum_k q_tk k_sk exp(G_tk - G_sk) for every (t, s) of a chunk that one anchor cannot span (the caller
    masks), from float32 q, k with positions along AXIS, and the size of the blocks it took (`_anchored_block`; 0:
    elementwise, 10x slower than the anchored matmul: the output kernel at the record shape 5.6 ms against 0.56,
    ninth session). The no-grad forward's chunks of 64 at the record shape with forget logits N(-3, 1) and no bound
    took 11.7 ms elementwise, 1.66 by quarters (H100, kernels/HISTORY.md, tenth session). FINEST: SMALLEST_BLOCK, or
    C / 2 for the halves only: the output kernel's single launch at C 32, whose anchored chunks the finer levels'
    code inline cost 6% (spills)."""
    block = _anchored_block(G, offs_c, valid, FINEST, C, AXIS)
    if block == 0:
        A = _scores_elementwise(q, k, G, offs_c, C, BK, AXIS)
    else:
        A = tl.zeros([C, C], dtype=tl.float32)
        for level in tl.static_range(1, MAX_LEVELS + 1):
            if (C >> level) >= FINEST:
                if block == C >> level:
                    A = _scores_by_blocks(q, k, G, offs_c, C >> level, C, OPERAND_DT, PRECISION, AXIS)
    return A, block


@triton.jit
def _chunk_products(q, k, G, G_last, offs_c, valid, C: tl.constexpr, BK: tl.constexpr, OPERAND_DT: tl.constexpr,
                    PRECISION: tl.constexpr):
    """What a forward takes from a [C, K] chunk (positions along axis 0) where one launch does every chunk: the
    intra-chunk scores (by one anchor, or by halves or elementwise: `_fallback_scores`, halves only, as finer levels'
    code inline spills), exp(G) and exp(G_last - G) (`_decays_from_anchor` where anchored)."""
    G_mid, anchored = _anchor(G, offs_c, valid, C, 0)
    if anchored:
        A = _pair_sums(*_anchored_operands(q, k, G, G_mid, OPERAND_DT, 0), PRECISION, 0)
        to_start, to_end = _decays_from_anchor(G, G_mid, G_last, 0)
    else:
        A = _fallback_scores(q, k, G, offs_c, valid, C, BK, OPERAND_DT, PRECISION, 0, C // 2)[0]
        to_start, to_end = _decays(G, G_last, 0)
    return A, to_start, to_end


@triton.jit
def _fallback_intra_grads(q, k, G, dA, offs_c, block, C: tl.constexpr, BK: tl.constexpr, OPERAND_DT: tl.constexpr,
                          PRECISION: tl.constexpr, FINEST: tl.constexpr):
    """The intra-chunk dq and dk ([K, C] tiles) of a chunk `_fallback_scores` took by blocks of `block` positions,
    or elementwise (0)."""
    if block == 0:
        dq_ck, dk_ck = _intra_grads_exact(tl.trans(q), tl.trans(k), tl.trans(G), dA, offs_c, C, BK)
        dq, dk = tl.trans(dq_ck), tl.trans(dk_ck)
    else:
        dq = tl.zeros([BK, C], dtype=tl.float32)
        dk = tl.zeros([BK, C], dtype=tl.float32)
        for level in tl.static_range(1, MAX_LEVELS + 1):
            if (C >> level) >= FINEST:
                if block == C >> level:
                    dq, dk = _intra_grads_by_blocks(q, k, G, dA, offs_c, C >> level, C, OPERAND_DT, PRECISION)
    return dq, dk


@triton.jit
def _intra_grads_exact(q, k, G, dA, offs_c, C: tl.constexpr, BK: tl.constexpr):
    """dq_t = sum_s dA[t, s] k_s exp(G_t - G_s) and dk_s = sum_t dA[t, s] q_t exp(G_t - G_s), elementwise."""
    dq = tl.zeros([C, BK], dtype=tl.float32)
    dk = tl.zeros([C, BK], dtype=tl.float32)
    for s in range(C):
        k_s = _position(k, offs_c, s, 0)
        G_s = _position(G, offs_c, s, 0)
        decay = _exp(tl.minimum(G - G_s[None, :], 0.0))
        dA_s = tl.sum(tl.where(offs_c[None, :] == s, dA, 0.0), axis=1)
        dq += dA_s[:, None] * k_s[None, :] * decay
        dk_s = tl.sum(dA_s[:, None] * q * decay, axis=0)
        dk = tl.where((offs_c == s)[:, None], dk_s[None, :], dk)
    return dq, dk


@triton.jit
def _intra_grads_by_blocks(q, k, G, dA, offs_c, BLOCK: tl.constexpr, C: tl.constexpr, OPERAND_DT: tl.constexpr,
                           PRECISION: tl.constexpr):
    """`_intra_grads_exact`'s dq and dk ([K, C] tiles here) by the blocks' matmuls, as `_scores_by_blocks` takes
    the scores."""
    G_block = _block_anchors(G, offs_c, BLOCK, C, 1)
    up, down = _exp(G - G_block), _exp(G_block - G)
    dA_within = tl.where(_same_block(offs_c, BLOCK), dA, 0.0).to(OPERAND_DT)
    dq = up * tl.dot((k * down).to(OPERAND_DT), tl.trans(dA_within), input_precision=PRECISION)
    dk = down * tl.dot((q * up).to(OPERAND_DT), dA_within, input_precision=PRECISION)
    for level in tl.static_range(MAX_LEVELS):
        if (BLOCK << level) < C:
            q_across, k_across = _across_blocks(G, offs_c, BLOCK << level, C, 1)
            dA_across = dA
            if (BLOCK << (level + 1)) < C:
                dA_across = tl.where(_same_block(offs_c, BLOCK << (level + 1)), dA, 0.0)
            dA_across = dA_across.to(OPERAND_DT)
            dq += q_across * tl.dot((k * k_across).to(OPERAND_DT), tl.trans(dA_across), input_precision=PRECISION)
            dk += k_across * tl.dot((q * q_across).to(OPERAND_DT), dA_across, input_precision=PRECISION)
    return dq, dk


@triton.jit
def _gate_grad_factors(g, sig, sig_neg, one_minus_b):
    """(1 - b) sigmoid(f) and d log(lambda) / db = sigmoid(-f) / lambda ([K, C] tiles): with k, what turns the
    gradients of log(lambda) and of k into df and db (`_bwd_kernel`)."""
    return one_minus_b[:, None] * sig, sig_neg * _exp(-g)
