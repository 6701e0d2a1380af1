"""The forward of 128-wide bfloat16 heads on Hopper (sm_90), as one warp-specialised Gluon kernel: one program per
(sequence, head) walk, its roles in different warps so that one chunk's gate is formed while the previous chunk's
products run. Without a backward it writes o (and the final state); with one it also keeps what the backward reads,
each chunk's start state and scores A, by TMA from shared memory.

- loader (1 warp): TMA loads of each chunk's q, f and v into a ring of STAGES slots;
- two gate partitions (4 warps each, even and odd chunks): lambda and k from f and the lower bound, exp(G) as the
  running product of the gates (no logarithm), the operands q exp(G) scale and k exp(-G), the intra-chunk scores A
  (an mma of the two) and k exp(G_last - G), written to a ring of RING slots;
- state (the default partition, 4 warps): holds S^T [V, K] in float32 registers; for each chunk
  o^T = v^T A^T + S^T (q exp(G) scale)^T (wgmma, M = V), then S^T = exp(G_last) S^T + v^T (k exp(G_last - G)).

The Triton one-pass forward (`_fwd_fused_kernel`) runs the same steps in order in each of its 8 warps, and is
bound by that chain (kernels/NOTES.md). Here the gate's special functions and elementwise work, the bottleneck
(with the state partition's work removed a throwaway copy took 0.41 ms at T 2K, with the gate's removed 0.19), run
beside the products, in two partitions (one: 0.342 ms). Where the walks are fewer than the SMs the caller cuts
them into segments, as the Triton forward's (kernels/triton_scan.py, `_warp_specialized`). H100, record shape
(H 16, K = V = 128, B T = 32768), kernel ms (`benchmarks/scan_shapes.py`): 0.237-0.253 at T 1K-4K against
0.468-0.535 for the Triton forward, 0.374 at T 8K against 0.61, 0.427 at T 16K against 0.665 (kernels/HISTORY.md,
thirty-first session). Keeping the chunk states (32 KiB a chunk and head, as much as q, f, v and o together) and
scores: 0.411 ms at every T from 1K to 16K against the Triton one-pass forward's 0.645-0.667 (seeded segments at
T 8K and 16K; thirty-second session).

Anchored at each chunk's start: exp(G_t), the product of the gates from the chunk's start to t, and its inverse
stay inside float32 and bfloat16 range while exp(G_last) >= exp(-80) (the span the Triton kernels' middle anchor
allows, |G - G_mid| <= 40). A product has no logarithm to round, and bf16 outputs came out nearer float64 than
the Triton forward's (3.35e-3 against 3.67e-3, B 2, T 256). A walk with a chunk beyond that span (gates near 0
without a lower bound) is flagged, and the caller runs it again with the Triton kernel, which falls back by blocks.

Gluon kernels do not run under TRITON_INTERPRET: CI compiles this one for sm_90a on the CPU
(tests/kernels/test_gluon_compile.py) and the GPU tests run it (tests/kernels/test_triton_scan.py).
"""

import torch
import triton
from torch import Tensor
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import mma_v2
from triton.experimental.gluon.language.nvidia.hopper import (
    fence_async_shared,
    mbarrier,
    tma,
    warpgroup_mma,
    warpgroup_mma_wait,
)
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

TRITON_VERSION = tuple(int(part) for part in triton.__version__.split(".")[:2])
CHUNK = 32
STAGES = 3
"""Loaded chunks in flight (4 measured the same, 2 lost: 0.30 ms at T 2K)."""
RING = 4
"""Gated chunks in flight between the gate and state partitions (2: 0.245 ms at T 2K, 4: 0.233)."""
GATE_REGISTERS = 112
"""Registers a thread of each gate partition: what leaves the state partition its 256 (the 4 warpgroups share
64K). No spills (sm_90a, ptxas)."""
HEAD = 128

LOG2_E = gl.constexpr(1.4426950408889634)
LN_2 = gl.constexpr(0.6931471805599453)
NARROWEST = gl.constexpr(1.8048513878454153e-35)
"""exp(-80): the smallest gate product across a chunk the start anchor takes (see the module's docstring)."""


@gluon.jit
def _reciprocal(x):
    """1 / x as one rcp.approx: the gate partitions' throughput is their special functions (3 an element)."""
    return gl.inline_asm_elementwise("rcp.approx.ftz.f32 $0, $1;", "=f,f", [x], dtype=gl.float32, is_pure=True,
                                     pack=1)


@gluon.jit
def _log(x):
    """log(x) as one lg2.approx and a multiply (-inf at 0: a decay below float32's range, a flagged chunk)."""
    return gl.inline_asm_elementwise("lg2.approx.ftz.f32 $0, $1;", "=f,f", [x], dtype=gl.float32, is_pure=True,
                                     pack=1) * LN_2


@gluon.jit
def _gate(f, b, valid):
    """lambda = b + (1 - b) sigmoid(f) and k = 1 - lambda = (1 - b) sigmoid(-f) of float32 logits f, with
    sigmoid(f) and sigmoid(-f): one ex2 and one rcp an element. Where not `valid` (past a sequence's end),
    lambda = 1 and k = 0: such a position changes nothing."""
    e = gl.exp2(-gl.abs(f) * LOG2_E)
    r = _reciprocal(1 + e)  # sigmoid(|f|); e r = sigmoid(-|f|)
    sig = gl.where(f >= 0, r, e * r)
    sig_neg = gl.where(f >= 0, e * r, r)
    return gl.where(valid, b + (1 - b) * sig, 1.0), gl.where(valid, (1 - b) * sig_neg, 0.0), sig, sig_neg


@gluon.jit
def _product(a, b):
    return a * b


@gluon.jit
def _slot(c, N: gl.constexpr):
    """Chunk c's slot in a ring of N, and the parity of its turn there (an mbarrier's phase)."""
    return c % N, (c // N) & 1


@gluon.jit
def _walk_segment(cut, T, H, C: gl.constexpr):
    """This program's sequence, head, walk, segment and chunks [first, last) (a walk is one segment unless cut)."""
    chunk_decays, segment_ends, segment_decays, n_segments, segment_chunks = cut
    i_nh = gl.program_id(0) // n_segments
    i_seg = gl.program_id(0) % n_segments
    first = i_seg * segment_chunks
    return i_nh // H, i_nh % H, i_nh, i_seg, first, gl.minimum(first + segment_chunks, gl.cdiv(T, C))


@gluon.aggregate
class _Modes:
    """What a launch does, for its partitions: as constexprs (in a plain tuple they reach them as run-time
    booleans, and every branch is compiled)."""
    HAS_H0: gl.constexpr
    OUTPUT_FINAL: gl.constexpr
    SEGMENTED: gl.constexpr
    SEEDED: gl.constexpr
    STORE_STATES: gl.constexpr
    STORE_SCORES: gl.constexpr


@gluon.jit
def _load_partition(args):
    """Issues the TMA loads of every chunk's q, f and v rows, STAGES chunks ahead of their users."""
    descriptors, pointers, cut, sizes, loaded, gated, state_buf, barriers, modes = args
    q_desc, f_desc, v_desc, states_desc, scores_desc = descriptors
    T, H, scale = sizes
    q_bufs, f_bufs, v_bufs = loaded
    load_ready, load_empty, ring_ready, ring_empty = barriers
    n_stages: gl.constexpr = q_bufs.type.shape[0]
    C: gl.constexpr = q_bufs.type.shape[1]
    K: gl.constexpr = q_bufs.type.shape[2]
    i_n, i_h, i_nh, i_seg, first, last = _walk_segment(cut, T, H, C)
    for c in range(first, last):
        s, phase = _slot(c - first, n_stages)
        mbarrier.wait(load_empty.index(s), phase ^ 1)
        mbarrier.expect(load_ready.index(s), 3 * q_desc.block_type.nbytes)
        row = i_n * T + c * C
        tma.async_copy_global_to_shared(q_desc, [row, i_h * K], load_ready.index(s), q_bufs.index(s))
        tma.async_copy_global_to_shared(f_desc, [row, i_h * K], load_ready.index(s), f_bufs.index(s))
        tma.async_copy_global_to_shared(v_desc, [row, i_h * K], load_ready.index(s), v_bufs.index(s))


@gluon.jit
def _gate_partition(args, PARITY: gl.constexpr):
    """The gate of the chunks of one parity, and what the state partition takes from it (see the module's
    docstring). Rows past the sequence's end (the last chunk of a T that C does not divide, read from the next
    sequence or zero-filled) take lambda = 1 and k = 0: they change nothing. STORE_SCORES: each chunk's scores A
    go to memory from their ring slot by TMA, for the backward's dv."""
    descriptors, pointers, cut, sizes, loaded, gated, state_buf, barriers, modes = args
    q_desc, f_desc, v_desc, states_desc, scores_desc = descriptors
    lower_bound, h0, seeds, o, final, flags = pointers
    T, H, scale = sizes
    q_bufs, f_bufs, v_bufs = loaded
    qa_bufs, ka_bufs, ke_bufs, a_bufs, decay_bufs = gated
    load_ready, load_empty, ring_ready, ring_empty = barriers
    n_stages: gl.constexpr = q_bufs.type.shape[0]
    C: gl.constexpr = q_bufs.type.shape[1]
    K: gl.constexpr = q_bufs.type.shape[2]
    n_ring: gl.constexpr = qa_bufs.type.shape[0]
    # A thread per channel, the chunk's positions in its registers: the running product needs no other thread.
    by_channel: gl.constexpr = gl.BlockedLayout([C, 1], [1, 32], [1, 4], [0, 1])
    scores: gl.constexpr = gl.NVMMADistributedLayout(version=[2, 0], warps_per_cta=[2, 2], instr_shape=[16, 8])
    i_n, i_h, i_nh, i_seg, first, last = _walk_segment(cut, T, H, C)
    offs_c = gl.arange(0, C, layout=gl.SliceLayout(1, by_channel))
    b = gl.load(lower_bound + i_h * K + gl.arange(0, K, layout=gl.SliceLayout(0, by_channel)))[None, :]
    at_end = (offs_c == C - 1)[:, None]
    causal = (gl.arange(0, C, layout=gl.SliceLayout(1, scores))[:, None]
              >= gl.arange(0, C, layout=gl.SliceLayout(0, scores))[None, :])
    narrowest = 1.0
    for c in range(first + PARITY, last, 2):
        s, phase = _slot(c - first, n_stages)
        mbarrier.wait(load_ready.index(s), phase)
        f = f_bufs.index(s).load(by_channel).to(gl.float32)
        valid = (c * C + offs_c < T)[:, None]
        gate, k, _, _ = _gate(f, b, valid)
        decay = gl.associative_scan(gate, 0, _product)  # exp(G_t) from the chunk's start
        decay_last = gl.sum(gl.where(at_end, decay, 0.0), axis=0)
        narrowest = gl.minimum(narrowest, gl.min(decay_last, axis=0))
        q = q_bufs.index(s).load(by_channel).to(gl.float32)
        fence_async_shared()  # the loads above before the loader's next TMA writes into the slot
        mbarrier.arrive(load_empty.index(s), count=1)
        q_a = q * decay * scale
        if modes.STORE_SCORES:  # kept scores have zero rows past the sequence's end, as the Triton forward's
            q_a = gl.where(valid, q_a, 0.0)
        k_a = k * _reciprocal(decay)
        r2, phase2 = _slot(c - first, n_ring)
        mbarrier.wait(ring_empty.index(r2), phase2 ^ 1)
        qa_bufs.index(r2).store(q_a.to(gl.bfloat16))
        ka_bufs.index(r2).store(k_a.to(gl.bfloat16))
        ke_bufs.index(r2).store((k_a * decay_last[None, :]).to(gl.bfloat16))
        decay_bufs.index(r2).store(decay_last)
        A = mma_v2(qa_bufs.index(r2).load(gl.DotOperandLayout(0, scores, 2)),
                   ka_bufs.index(r2).permute((1, 0)).load(gl.DotOperandLayout(1, scores, 2)),
                   gl.zeros([C, C], gl.float32, scores))
        if modes.STORE_SCORES:  # this partition's store from the slot two of its chunks ago has read it
            tma.store_wait(1)
        a_bufs.index(r2).store(gl.where(causal, A, 0.0).to(gl.bfloat16))
        fence_async_shared()  # the stores above before the state partition's wgmmas (and TMA) read them
        if modes.STORE_SCORES:
            tma.async_copy_shared_to_global(scores_desc, [((i_n * gl.cdiv(T, C) + c) * H + i_h) * C, 0],
                                            a_bufs.index(r2))
        mbarrier.arrive(ring_ready.index(r2), count=1)
    gl.atomic_max(flags + i_nh, (narrowest < NARROWEST).to(gl.int32))
    if modes.STORE_SCORES:
        tma.store_wait(0)


@gluon.jit
def _even_gate_partition(args):
    _gate_partition(args, 0)


@gluon.jit
def _odd_gate_partition(args):
    _gate_partition(args, 1)


@gluon.jit
def _state_tile(states, index, K: gl.constexpr, V: gl.constexpr, layout: gl.constexpr):
    """Pointers to the [K, V] state `index` of `states` as S^T's [V, K] entries. Formed where they are used: held
    across the walk, their 128 registers a thread made the state partition spill."""
    rows = gl.arange(0, V, layout=gl.SliceLayout(1, layout))[:, None]
    columns = gl.arange(0, K, layout=gl.SliceLayout(0, layout))[None, :]
    return states + index.to(gl.int64) * K * V + rows + columns * V


@gluon.jit
def _store_chunk_state(S_T, state_buf, states_desc, slot, H, i_h):
    """S^T as chunk state `slot` (a chunk start, or a walk's end) of the [slots, H, K, V] buffer behind
    `states_desc`: written transposed into shared memory, then by TMA, once the previous one has been read."""
    K: gl.constexpr = state_buf.type.shape[0]
    tma.store_wait(0)
    state_buf.permute((1, 0)).store(S_T)
    fence_async_shared()
    tma.async_copy_shared_to_global(states_desc, [(slot * H + i_h) * K, 0], state_buf)


@gluon.jit
def _state_partition(args):
    """The walk's state and outputs (see the module's docstring). STORE_STATES: every chunk-start state, and the
    walk's end, in bfloat16 for the backward, as the Triton forward's slots (`_sequence`)."""
    descriptors, pointers, cut, sizes, loaded, gated, state_buf, barriers, modes = args
    q_desc, f_desc, v_desc, states_desc, scores_desc = descriptors
    lower_bound, h0, seeds, o, final, flags = pointers
    T, H, scale = sizes
    q_bufs, f_bufs, v_bufs = loaded
    qa_bufs, ka_bufs, ke_bufs, a_bufs, decay_bufs = gated
    load_ready, load_empty, ring_ready, ring_empty = barriers
    n_stages: gl.constexpr = q_bufs.type.shape[0]
    C: gl.constexpr = q_bufs.type.shape[1]
    K: gl.constexpr = q_bufs.type.shape[2]
    V: gl.constexpr = v_bufs.type.shape[2]
    n_ring: gl.constexpr = qa_bufs.type.shape[0]
    state: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, K, 16])
    outputs: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, C, 16])
    rows: gl.constexpr = gl.BlockedLayout([1, 8], [2, 16], [4, 1], [1, 0])
    chunk_decays, segment_ends, segment_decays, n_segments, segment_chunks = cut
    i_n, i_h, i_nh, i_seg, first, last = _walk_segment(cut, T, H, C)
    n_chunks = gl.cdiv(T, C)
    offs_t = gl.arange(0, C, layout=gl.SliceLayout(1, rows))
    offs_v = gl.arange(0, V, layout=gl.SliceLayout(0, rows))
    # The gate sums of a cut walk, one channel a thread: in the state's own slice layout each thread would hold 32
    # of them (and as many pointers), which spilled 1.9 KB.
    per_channel: gl.constexpr = gl.BlockedLayout([1], [32], [4], [0])
    offs_k = gl.arange(0, K, layout=per_channel)
    S_T = gl.zeros([V, K], gl.float32, state)
    if modes.HAS_H0:
        if i_seg == 0:  # the other segments start from zero, or from their seeds
            S_T = gl.load(_state_tile(h0, i_nh, K, V, state))
    if modes.SEEDED:
        S_T += gl.load(_state_tile(seeds, i_nh * n_segments + i_seg, K, V, state)).to(gl.float32)
    D = gl.zeros([K], gl.float32, per_channel)  # log of the decay since the segment's start
    # D at each chunk for `_fwd_seed_kernel`, at the slots of the states walk (`_sequence`)
    decays_at = chunk_decays + (i_n * (n_chunks + 1) * H + i_h) * K + offs_k
    for c in range(first, last):
        s, phase = _slot(c - first, n_stages)
        r2, phase2 = _slot(c - first, n_ring)
        if modes.SEGMENTED:
            gl.store(decays_at + c * (H * K), D)
        mbarrier.wait(ring_ready.index(r2), phase2)
        mbarrier.wait(load_ready.index(s), phase)
        v_T = v_bufs.index(s).permute((1, 0))
        # Everything that reads the state's registers comes before this chunk's products are issued: otherwise
        # ptxas waits for them (it does not see that the last update was waited for).
        S_start = S_T.to(gl.bfloat16)
        if modes.STORE_STATES:
            _store_chunk_state(S_start, state_buf, states_desc, i_n * (n_chunks + 1) + c, H, i_h)
        S_operand = gl.convert_layout(S_start, gl.DotOperandLayout(0, outputs, 2))
        decay = decay_bufs.index(r2).load(gl.SliceLayout(0, state))
        S_T = S_T * decay[None, :]
        out = warpgroup_mma(v_T, a_bufs.index(r2).permute((1, 0)), gl.zeros([V, C], gl.float32, outputs),
                            is_async=True)
        out = warpgroup_mma(S_operand, qa_bufs.index(r2).permute((1, 0)), out, is_async=True)
        S_T = warpgroup_mma(v_T, ke_bufs.index(r2), S_T, is_async=True)
        out, S_operand = warpgroup_mma_wait(1, deps=[out, S_operand])
        out = gl.convert_layout(gl.permute(out.to(gl.bfloat16), (1, 0)), rows)
        t = c * C + offs_t
        gl.store(o + ((i_n * T + t[:, None]) * H + i_h) * V + offs_v[None, :], out, mask=(t < T)[:, None])
        S_T = warpgroup_mma_wait(0, deps=[S_T])
        mbarrier.arrive(load_empty.index(s), count=1)
        mbarrier.arrive(ring_empty.index(r2), count=1)
        if modes.SEGMENTED:
            D += _log(decay_bufs.index(r2).load(per_channel))
    if modes.SEGMENTED:  # the segment's local end and decay, for `_segment_carry_kernel`
        gl.store(_state_tile(segment_ends, i_nh * n_segments + i_seg, K, V, state), S_T)
        gl.store(segment_decays + (i_nh * n_segments + i_seg).to(gl.int64) * K + offs_k, D)
    elif last == n_chunks:  # the walk's last segment (a whole walk is one)
        if modes.OUTPUT_FINAL:
            gl.store(_state_tile(final, i_nh, K, V, state), S_T)
        if modes.STORE_STATES:
            _store_chunk_state(S_T.to(gl.bfloat16), state_buf, states_desc, i_n * (n_chunks + 1) + n_chunks, H,
                               i_h)
    if modes.STORE_STATES:
        tma.store_wait(0)


@gluon.jit
def _forward_kernel(q_desc, f_desc, v_desc, states_desc, scores_desc, lower_bound, h0, seeds, o, final, flags,
                    chunk_decays, segment_ends, segment_decays, T, H, scale, n_segments, segment_chunks,
                    HAS_H0: gl.constexpr, OUTPUT_FINAL: gl.constexpr, SEGMENTED: gl.constexpr,
                    SEEDED: gl.constexpr, STORE_STATES: gl.constexpr, STORE_SCORES: gl.constexpr,
                    STAGES: gl.constexpr, RING: gl.constexpr, GATE_REGISTERS: gl.constexpr):
    C: gl.constexpr = q_desc.block_type.shape[0]
    K: gl.constexpr = q_desc.block_type.shape[1]
    tile: gl.constexpr = q_desc.layout
    loaded = (gl.allocate_shared_memory(gl.bfloat16, [STAGES, C, K], tile),
              gl.allocate_shared_memory(gl.bfloat16, [STAGES, C, K], tile),
              gl.allocate_shared_memory(gl.bfloat16, [STAGES, C, K], tile))
    if STORE_STATES:  # a kept chunk state on its way out (32 KiB at K = V = 128)
        state_buf = gl.allocate_shared_memory(gl.bfloat16, states_desc.block_type.shape, states_desc.layout)
    else:
        state_buf = gl.allocate_shared_memory(gl.bfloat16, [8, 8], gl.SwizzledSharedLayout(1, 1, 1, [1, 0]))
    gated = (gl.allocate_shared_memory(gl.bfloat16, [RING, C, K], tile),
             gl.allocate_shared_memory(gl.bfloat16, [RING, C, K], tile),
             gl.allocate_shared_memory(gl.bfloat16, [RING, C, K], tile),
             gl.allocate_shared_memory(gl.bfloat16, [RING, C, C],
                                       gl.NVMMASharedLayout.get_default_for([C, C], gl.bfloat16)),
             gl.allocate_shared_memory(gl.float32, [RING, K], gl.SwizzledSharedLayout(1, 1, 1, [0])))
    load_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    load_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    ring_ready = gl.allocate_shared_memory(gl.int64, [RING, 1], mbarrier.MBarrierLayout())
    ring_empty = gl.allocate_shared_memory(gl.int64, [RING, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(STAGES):
        mbarrier.init(load_ready.index(i), count=1)
        mbarrier.init(load_empty.index(i), count=2)  # a gate partition (q, f) and the state partition (v)
    for i in gl.static_range(RING):
        mbarrier.init(ring_ready.index(i), count=1)
        mbarrier.init(ring_empty.index(i), count=1)
    args = ((q_desc, f_desc, v_desc, states_desc, scores_desc), (lower_bound, h0, seeds, o, final, flags),
            (chunk_decays, segment_ends, segment_decays, n_segments, segment_chunks), (T, H, scale), loaded, gated,
            state_buf, (load_ready, load_empty, ring_ready, ring_empty),
            _Modes(HAS_H0, OUTPUT_FINAL, SEGMENTED, SEEDED, STORE_STATES, STORE_SCORES))
    gl.warp_specialize([(_state_partition, (args, )), (_even_gate_partition, (args, )),
                        (_odd_gate_partition, (args, )), (_load_partition, (args, ))], [4, 4, 1],
                       [GATE_REGISTERS, GATE_REGISTERS, 24])


def applies(K: int, V: int, dtype: torch.dtype, cu_seqlens: Tensor | None, reverse: bool,
            device: torch.device) -> bool:
    """Whether `forward` takes a scan, with or without a backward: bfloat16 128-wide heads of equal lengths,
    causal, on a Hopper GPU, under triton 3.8 or later (Gluon's API changed before it)."""
    return (TRITON_VERSION >= (3, 8) and dtype == torch.bfloat16 and K == V == HEAD and cu_seqlens is None
            and not reverse and _is_hopper(device))


def _is_hopper(device: torch.device) -> bool:
    """sm_90: wgmma and setmaxnreg, which this kernel is written for (Blackwell's tensor cores take tcgen05)."""
    return device.type == "cuda" and torch.cuda.is_available() and torch.cuda.get_device_capability(device)[0] == 9


_TILE = gl.NVMMASharedLayout.get_default_for([CHUNK, HEAD], gl.bfloat16)
"""A chunk's [CHUNK, HEAD] tile in shared memory, as TMA writes it and the tensor cores read it (formed once: it
costs host time at every call)."""
_SCORES_TILE = gl.NVMMASharedLayout.get_default_for([CHUNK, CHUNK], gl.bfloat16)
"""A chunk's scores in shared memory, as the kernel lays them out for its wgmma (and TMA keeps them)."""
_STATE_TILE = gl.NVMMASharedLayout.get_default_for([HEAD, HEAD], gl.bfloat16)


def _descriptor(x: Tensor, layout=_TILE) -> TensorDescriptor:
    """x [B, T, H, HEAD] as TMA's [B T, H HEAD] rows of [CHUNK, HEAD] blocks (x's rows evenly strided, heads
    dense), laid out in shared memory as `layout`."""
    B, T, H, D = x.shape
    return TensorDescriptor(x, [B * T, H * D], [x.stride(1), 1], [CHUNK, D], layout)


def _tiles_descriptor(x: Tensor, layout) -> TensorDescriptor:
    """x [n, H, R, R] (contiguous chunk states or scores) as TMA's [n H R, R] rows of [R, R] blocks."""
    n, H, R, _ = x.shape
    return TensorDescriptor(x, [n * H * R, R], [R, 1], [R, R], layout)


def forward(q: Tensor, f: Tensor, v: Tensor, bound: Tensor, initial_state: Tensor | None, o: Tensor,
            final: Tensor | None, scale: float, n_segments: int, segment_chunks: int, chunk_decays: Tensor,
            segment_ends: Tensor, segment_decays: Tensor, seeds: Tensor | None = None, states: Tensor | None = None,
            scores: Tensor | None = None) -> Tensor:
    """Writes o (and the final state) of every walk, and returns int32 flags [B H]: the walks to run again with
    the Triton kernel (a chunk beyond the anchor's span). bound: [H, K] float32 (zeros for no bound);
    initial_state and final float32 [B, H, K, V]; q, f, v with evenly strided rows (`_row_stride`).
    With n_segments > 1 each walk is cut into segments of segment_chunks chunks run at once:
    - without `seeds` from zero (the first from the initial state), storing what the Triton forward's segments
      store for the carry pass and `_fwd_seed_kernel` (`chunk_decays`, `segment_ends`, `segment_decays`:
      kernels/triton_scan.py, `_Walks`); the final state is then the carry pass's to write;
    - with `seeds` (bfloat16 [B H n_segments, K, V], the carry pass's) each from its own, exact as it goes.
    For a backward: `states`, bfloat16 [B (T / C + 1), H, K, V], takes every chunk-start state and each walk's
    end, `scores`, bfloat16 [B T / C, H, C, C], each chunk's scores A (the Triton forward's slots)."""
    B, T, H, _ = q.shape
    flags = torch.zeros(B * H, dtype=torch.int32, device=q.device)
    dummy = flags.new_empty(0, dtype=torch.float32)
    q_desc = _descriptor(q)
    _forward_kernel[(B * H * n_segments, )](
        q_desc, _descriptor(f), _descriptor(v), q_desc if states is None else _tiles_descriptor(states, _STATE_TILE),
        q_desc if scores is None else _tiles_descriptor(scores, _SCORES_TILE), bound,
        dummy if initial_state is None else initial_state, dummy if seeds is None else seeds, o,
        dummy if final is None else final, flags, chunk_decays, segment_ends, segment_decays, T, H, scale,
        n_segments, segment_chunks, HAS_H0=initial_state is not None, OUTPUT_FINAL=final is not None,
        SEGMENTED=n_segments > 1 and seeds is None, SEEDED=n_segments > 1 and seeds is not None,
        STORE_STATES=states is not None, STORE_SCORES=scores is not None, STAGES=STAGES, RING=RING,
        GATE_REGISTERS=GATE_REGISTERS, num_warps=4)
    return flags
