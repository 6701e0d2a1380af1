"""The backward's chunk-parallel gradients (dq, df and the lower bound's) of 128-wide bfloat16 heads on Hopper
(sm_90), as one warp-specialised Gluon kernel: what the Triton grads kernel's anchored launch (`_bwd_kernel`)
computes, where the dh walk wrote dv from the forward's scores. One persistent program per SM takes (chunk, head)
items in turn:

- loader (1 warp): TMA loads of an item's q, f, v and do rows (a ring of SMALL_STAGES) and of its chunk-start state
  S_0 and chunk-end state gradient dS (a ring of STATE_STAGES, 64 KiB an item: most of the kernel's bytes);
- two compute warpgroups, taking even and odd items: each issues its item's products on the tensor cores and forms
  the gate while they run. Positions lie along the tiles' columns ([K, C], M = K for the wgmmas):
  - P^T = S_0 do^T and R^T = dS v^T (wgmma), the scores' gradient dA = do v^T (mma_v2), S_0 . dS summed over V;
  - the gate anchored at the chunk's start as the forward's (kernels/gluon_scan_forward.py): exp(G) a running
    product of lambda, so q exp(G) and k exp(-G) take no logarithm;
  - the intra-chunk terms as two more wgmmas, from q exp(G) and k exp(-G) written over the item's do and v slots;
  - dq, dk, the gate gradient as a reverse cumulative sum over the chunk, then df and db, as `_bwd_kernel`.

Chunks whose gate product drops below exp(-80) (gates near 0 without a bound) are left to the Triton kernel's
fallback launch, which their flag byte sends them to, as the anchored launch's would.

Gluon kernels do not run under TRITON_INTERPRET: CI compiles this one for sm_90a on the CPU
(tests/kernels/test_gluon_compile.py) and the GPU tests run it (tests/kernels/test_triton_scan.py).
"""

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

from kernels.gluon_scan_forward import (
    _STATE_TILE,
    NARROWEST,
    _descriptor,
    _gate,
    _product,
    _reciprocal,
    _slot,
    _tiles_descriptor,
)

SMALL_STAGES = 2
"""Items' q, f, v and do in flight (8 KiB each an item): one a compute warpgroup."""
STATE_STAGES = 2
"""Items' S_0 and dS in flight (32 KiB each an item)."""
COMPUTE_REGISTERS = 248
"""Registers a thread of the odd items' warpgroup; the even one (the default partition) takes the rest."""


@gluon.aggregate
class _Modes:
    """What a launch does, for its partitions: constexprs (in a plain tuple they would reach them as run-time
    values)."""
    HAS_BOUND: gl.constexpr


@gluon.jit
def _item(j, T, H, C: gl.constexpr):
    """This program's j-th (chunk, head) item: its chunk over all sequences, sequence, chunk in the sequence and
    head (every program takes items pid, pid + programs, ...)."""
    item = gl.program_id(0) + j * gl.num_programs(0)
    i_c = item // H
    n_chunks = gl.cdiv(T, C)
    return i_c, i_c // n_chunks, i_c % n_chunks, item % H


@gluon.jit
def _items(n_items):
    """How many items this program takes."""
    return gl.cdiv(n_items - gl.program_id(0), gl.num_programs(0))


@gluon.jit
def _load_partition(args):
    """Issues the TMA loads of every item, SMALL_STAGES and STATE_STAGES items ahead of their users."""
    descriptors, pointers, sizes, small, chunk_states, sums_bufs, barriers, modes = args
    q_desc, f_desc, v_desc, do_desc, states_desc, dstates_desc = descriptors
    T, H, scale, n_items = sizes
    q_bufs, f_bufs, v_bufs, do_bufs = small
    S0_bufs, dS_bufs = chunk_states
    small_ready, small_empty, states_ready, states_empty = barriers
    n_small: gl.constexpr = q_bufs.type.shape[0]
    n_states: gl.constexpr = S0_bufs.type.shape[0]
    C: gl.constexpr = q_bufs.type.shape[1]
    K: gl.constexpr = q_bufs.type.shape[2]
    n_chunks = gl.cdiv(T, C)
    for j in range(_items(n_items)):
        i_c, i_n, c, i_h = _item(j, T, H, C)
        # the states first: their slot is freed early in an item, the small tiles' at its end
        s2, phase2 = _slot(j, n_states)
        mbarrier.wait(states_empty.index(s2), phase2 ^ 1)
        mbarrier.expect(states_ready.index(s2), 2 * states_desc.block_type.nbytes)
        start = ((i_n * (n_chunks + 1) + c) * H + i_h) * K  # the chunk-start state (`_sequence`'s slots)
        tma.async_copy_global_to_shared(states_desc, [start, 0], states_ready.index(s2), S0_bufs.index(s2))
        tma.async_copy_global_to_shared(dstates_desc, [(i_c * H + i_h) * K, 0], states_ready.index(s2),
                                        dS_bufs.index(s2))
        s, phase = _slot(j, n_small)
        mbarrier.wait(small_empty.index(s), phase ^ 1)
        mbarrier.expect(small_ready.index(s), 4 * q_desc.block_type.nbytes)
        row = i_n * T + c * C
        tma.async_copy_global_to_shared(q_desc, [row, i_h * K], small_ready.index(s), q_bufs.index(s))
        tma.async_copy_global_to_shared(f_desc, [row, i_h * K], small_ready.index(s), f_bufs.index(s))
        tma.async_copy_global_to_shared(v_desc, [row, i_h * K], small_ready.index(s), v_bufs.index(s))
        tma.async_copy_global_to_shared(do_desc, [row, i_h * K], small_ready.index(s), do_bufs.index(s))


@gluon.jit
def _state_products_sum(S0, dS, sums, layout: gl.constexpr):
    """sum over V of S_0 dS, each channel's, into `sums` ([K] float32 in shared memory), 32 rows at a time (a
    whole [K, V] tile would take 128 registers a thread for each of the two)."""
    K: gl.constexpr = S0.type.shape[0]
    ROWS: gl.constexpr = 32
    for k0 in gl.static_range(0, K, ROWS):
        product = S0.slice(k0, ROWS).load(layout).to(gl.float32) * dS.slice(k0, ROWS).load(layout).to(gl.float32)
        sums.slice(k0, ROWS).store(gl.sum(product, axis=1))


@gluon.jit
def _store_rows(x, out, i_n, offs_c, start, T, H, i_h, rows: gl.constexpr, length, anchored):
    """A chunk's [K, C] tile as its `length` rows from `start` of head i_h of out [B, T, H, K] (in out's type),
    unless the chunk is not `anchored` (the fallback launch writes it then)."""
    K: gl.constexpr = x.type.shape[0]
    x = gl.convert_layout(gl.permute(x.to(out.dtype.element_ty), (1, 0)), rows)
    offs_t = gl.convert_layout(offs_c, gl.SliceLayout(1, rows))
    offs_k = gl.arange(0, K, layout=gl.SliceLayout(0, rows))
    gl.store(out + ((i_n * T + start + offs_t[:, None]) * H + i_h) * K + offs_k[None, :], x,
             mask=(offs_t < length)[:, None] & anchored)


@gluon.jit
def _compute_partition(args, PARITY: gl.constexpr):
    """The gradients of this program's items of one parity (see the module's docstring)."""
    descriptors, pointers, sizes, small, chunk_states, sums_bufs, barriers, modes = args
    lower_bound, dq, df, db, flags = pointers
    T, H, scale, n_items = sizes
    q_bufs, f_bufs, v_bufs, do_bufs = small
    S0_bufs, dS_bufs = chunk_states
    small_ready, small_empty, states_ready, states_empty = barriers
    n_small: gl.constexpr = q_bufs.type.shape[0]
    n_states: gl.constexpr = S0_bufs.type.shape[0]
    C: gl.constexpr = q_bufs.type.shape[1]
    K: gl.constexpr = q_bufs.type.shape[2]
    # [K, C] tiles, positions along the columns: the wgmmas' accumulators (M = K), and a thread per channel for the
    # per-element work, whose cumulative products and sums over the chunk then stay in its registers (Gluon scans
    # no wgmma layout)
    products: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, C, 16])
    tile: gl.constexpr = gl.BlockedLayout([1, C], [32, 1], [4, 1], [1, 0])
    # the same accumulators, from tf32 products (8 deep)
    products_tf32: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                            instr_shape=[16, C, 8])
    scores: gl.constexpr = gl.NVMMADistributedLayout(version=[2, 0], warps_per_cta=[2, 2], instr_shape=[16, 8])
    rows: gl.constexpr = gl.BlockedLayout([1, 8], [2, 16], [4, 1], [1, 0])
    state_rows: gl.constexpr = gl.BlockedLayout([1, 8], [2, 16], [4, 1], [1, 0])
    sums = sums_bufs.index(PARITY)
    offs_k = gl.arange(0, K, layout=gl.SliceLayout(1, tile))
    offs_c = gl.arange(0, C, layout=gl.SliceLayout(0, tile))
    at_end = offs_c[None, :] == C - 1
    offs_s = gl.arange(0, C, layout=gl.SliceLayout(1, scores))
    strictly_later = offs_s[:, None] > gl.arange(0, C, layout=gl.SliceLayout(0, scores))[None, :]
    diagonal = offs_s[:, None] == gl.arange(0, C, layout=gl.SliceLayout(0, scores))[None, :]
    for j in range(PARITY, _items(n_items), 2):
        i_c, i_n, c, i_h = _item(j, T, H, C)
        s, phase = _slot(j, n_small)
        s2, phase2 = _slot(j, n_states)
        q_s, f_s, v_s, do_s = q_bufs.index(s), f_bufs.index(s), v_bufs.index(s), do_bufs.index(s)
        if modes.HAS_BOUND:
            b = gl.load(lower_bound + i_h * K + offs_k)
        else:
            b = gl.zeros([K], gl.float32, gl.SliceLayout(1, tile))
        length = gl.minimum(T - c * C, C)  # positions of the chunk inside its sequence
        valid = (offs_c < length)[None, :]
        mbarrier.wait(states_ready.index(s2), phase2)
        mbarrier.wait(small_ready.index(s), phase)
        S0_s, dS_s = S0_bufs.index(s2), dS_bufs.index(s2)
        # The products with the states first, on the tensor cores while the gate is formed: their slot is then free
        # for the loader long before the item's end.
        P = warpgroup_mma(S0_s, do_s.permute((1, 0)), gl.zeros([K, C], gl.float32, products), is_async=True)
        R = warpgroup_mma(dS_s, v_s.permute((1, 0)), gl.zeros([K, C], gl.float32, products), is_async=True)
        _state_products_sum(S0_s, dS_s, sums, state_rows)
        dA = mma_v2(do_s.load(gl.DotOperandLayout(0, scores, 2)),
                    v_s.permute((1, 0)).load(gl.DotOperandLayout(1, scores, 2)),
                    gl.zeros([C, C], gl.float32, scores))
        gate, k, _, _ = _gate(f_s.permute((1, 0)).load(tile).to(gl.float32), b[:, None], valid)
        decay = gl.associative_scan(gate, 1, _product)  # exp(G_t) from the chunk's start
        decay_last = gl.sum(gl.where(at_end, decay, 0.0), axis=1)
        anchored = gl.min(decay_last, axis=0) >= NARROWEST
        P, R = warpgroup_mma_wait(0, deps=[P, R])
        # The states are read: their slot takes the intra-chunk products' float32 operands (tf32 on the tensor
        # cores, as `_bwd_kernel`'s: in bfloat16 the lower bound's gradient, a sum of terms that cancel, came out
        # 1.4e-2 from float64): k exp(-G), q exp(G) (zero past the sequence's end, where the rows are the next
        # sequence's) and the scores' gradient, both ways round. The diagonal pairs carry no decay: their gate
        # gradients cancel exactly, so they are kept out of the dq, dk that the gate gradient takes, and added to
        # the stored ones (as `_bwd_kernel`). The scale is applied after the products: dq's intra-chunk part
        # accumulates onto S_0 do^T. exp(-G) is one rcp each time it is wanted: held, it spilled.
        operands = S0_s._reinterpret(gl.float32, [2, K, C], gl.NVMMASharedLayout.get_default_for([K, C], gl.float32))
        k_anchored, q_decayed = operands.index(0), operands.index(1)
        pair_grads = dS_s._reinterpret(gl.float32, [K * K // (2 * C * C), C, C],  # the whole slot, two used
                                       gl.NVMMASharedLayout.get_default_for([C, C], gl.float32))
        dA_later, dA_later_T = pair_grads.index(0), pair_grads.index(1)
        k_anchored.store(k * _reciprocal(decay))
        q_decayed.store(gl.where(valid, q_s.permute((1, 0)).load(tile).to(gl.float32) * decay, 0.0))
        dA_masked = gl.where(strictly_later, dA, 0.0)
        dA_later.store(dA_masked)
        dA_later_T.store(gl.permute(dA_masked, (1, 0)))
        fence_async_shared()
        P = warpgroup_mma(k_anchored, dA_later.permute((1, 0)), gl.convert_layout(P, products_tf32),
                          precision="tf32", is_async=True)
        P = warpgroup_mma_wait(0, deps=[P])
        # Then each product consumed as it lands: the registers of more at once spilled.
        dq_t = decay * gl.convert_layout(P, tile) * scale
        diagonal_scores = _diagonal(dA, diagonal, tile)[None, :] * scale
        _store_rows(dq_t + diagonal_scores * k, dq, i_n, offs_c, c * C, T, H, i_h, rows, length, anchored)
        # q is zero past the sequence's end, and k: no mask needed below until db's sum
        q = gl.where((offs_c < length)[None, :], q_s.permute((1, 0)).load(tile).to(gl.float32), 0.0)
        dG = q * dq_t
        dk_t = diagonal_scores * q
        dk_state = gl.convert_layout(R, tile) * (decay_last[:, None] * _reciprocal(decay))
        # the chunk end's pair with the last position carries no decay
        k_dk_state = gl.where((offs_c < length - 1)[None, :], k * dk_state, 0.0)
        dG -= k_dk_state
        dk_t += dk_state
        state_term = decay_last * sums.load(gl.SliceLayout(1, tile)) + gl.sum(k_dk_state, axis=1)
        dk_intra = warpgroup_mma(q_decayed, dA_later_T.permute((1, 0)), gl.zeros([K, C], gl.float32, products_tf32),
                                 precision="tf32", is_async=True)
        dk_intra = warpgroup_mma_wait(0, deps=[dk_intra])
        mbarrier.arrive(states_empty.index(s2), count=1)
        dk_intra = gl.convert_layout(dk_intra, tile) * (_reciprocal(decay) * scale)
        dG -= k * dk_intra
        dk_t += dk_intra
        # dg_j = sum over t >= j of dG_t, and the state term (the chunk end as one more query)
        dg = gl.sum(dG, axis=1)[:, None] - gl.associative_scan(dG, 1, _add) + dG + state_term[:, None]
        _, _, sig, sig_neg = _gate(f_s.permute((1, 0)).load(tile).to(gl.float32), b[:, None],
                                   (offs_c < length)[None, :])
        mbarrier.arrive(small_empty.index(s), count=1)
        # lambda = b + (1 - b) sigmoid(f), k = (1 - b) sigmoid(-f): db = dg sigmoid(-f) / lambda - dk k / (1 - b),
        # df = (1 - b) sigmoid(f) db, written k (dg - sigmoid(f) dk) where b is 0 (no 1 / lambda: `_bwd_kernel`)
        if modes.HAS_BOUND:
            one_minus_b = (1 - b)[:, None]
            db_t = sig_neg * _reciprocal(b[:, None] + one_minus_b * sig) * dg - k * _reciprocal(one_minus_b) * dk_t
            df_t = gl.where((b == 0)[:, None], k * (dg - sig * dk_t), one_minus_b * sig * db_t)
            gl.store(db + (i_c * H + i_h) * K + offs_k,
                     gl.sum(gl.where((offs_c < length)[None, :], db_t, 0.0), axis=1),
                     mask=(offs_k < K) & anchored)
        else:
            df_t = k * (dg - sig * dk_t)
        _store_rows(df_t, df, i_n, offs_c, c * C, T, H, i_h, rows, length, anchored)
        gl.store(flags + i_c * H + i_h, (~anchored).to(gl.int8))


@gluon.jit
def _add(a, b):
    return a + b


@gluon.jit
def _diagonal(dA, diagonal, layout: gl.constexpr):
    """The diagonal of the scores' gradient dA, a per-position vector of `layout`'s tiles (formed where it is
    used: held, every thread of the per-channel layout keeps all C of it)."""
    return gl.convert_layout(gl.sum(gl.where(diagonal, dA, 0.0), axis=1), gl.SliceLayout(0, layout))


@gluon.jit
def _even_partition(args):
    _compute_partition(args, 0)


@gluon.jit
def _odd_partition(args):
    _compute_partition(args, 1)


@gluon.jit
def _grads_kernel(q_desc, f_desc, v_desc, do_desc, states_desc, dstates_desc, lower_bound, dq, df, db, flags, T, H,
                  scale, n_items, HAS_BOUND: gl.constexpr, SMALL_STAGES: gl.constexpr, STATE_STAGES: gl.constexpr,
                  COMPUTE_REGISTERS: gl.constexpr):
    C: gl.constexpr = q_desc.block_type.shape[0]
    K: gl.constexpr = q_desc.block_type.shape[1]
    small = (gl.allocate_shared_memory(gl.bfloat16, [SMALL_STAGES, C, K], q_desc.layout),
             gl.allocate_shared_memory(gl.bfloat16, [SMALL_STAGES, C, K], f_desc.layout),
             gl.allocate_shared_memory(gl.bfloat16, [SMALL_STAGES, C, K], v_desc.layout),
             gl.allocate_shared_memory(gl.bfloat16, [SMALL_STAGES, C, K], do_desc.layout))
    chunk_states = (gl.allocate_shared_memory(gl.bfloat16, [STATE_STAGES, K, K], states_desc.layout),
                    gl.allocate_shared_memory(gl.bfloat16, [STATE_STAGES, K, K], states_desc.layout))
    sums_bufs = gl.allocate_shared_memory(gl.float32, [2, K], gl.SwizzledSharedLayout(1, 1, 1, [0]))
    small_ready = gl.allocate_shared_memory(gl.int64, [SMALL_STAGES, 1], mbarrier.MBarrierLayout())
    small_empty = gl.allocate_shared_memory(gl.int64, [SMALL_STAGES, 1], mbarrier.MBarrierLayout())
    states_ready = gl.allocate_shared_memory(gl.int64, [STATE_STAGES, 1], mbarrier.MBarrierLayout())
    states_empty = gl.allocate_shared_memory(gl.int64, [STATE_STAGES, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(SMALL_STAGES):
        mbarrier.init(small_ready.index(i), count=1)
        mbarrier.init(small_empty.index(i), count=1)
    for i in gl.static_range(STATE_STAGES):
        mbarrier.init(states_ready.index(i), count=1)
        mbarrier.init(states_empty.index(i), count=1)
    args = ((q_desc, f_desc, v_desc, do_desc, states_desc, dstates_desc), (lower_bound, dq, df, db, flags),
            (T, H, scale, n_items), small, chunk_states, sums_bufs,
            (small_ready, small_empty, states_ready, states_empty), _Modes(HAS_BOUND))
    gl.warp_specialize([(_even_partition, (args, )), (_odd_partition, (args, )), (_load_partition, (args, ))],
                       [4, 1], [COMPUTE_REGISTERS, 24])


_BY_CHANNEL_TILE = gl.NVMMASharedLayout(swizzle_byte_width=0, element_bitwidth=16, rank=2)
"""q's and f's [CHUNK, HEAD] tiles in shared memory, read only a channel a thread: unswizzled, each element's
address is the thread's plus a constant. 128-byte swizzled, every thread held its own 32 addresses (they depend
on its lane) across the loop, and the registers spilled."""


def _descriptors(q: Tensor, f: Tensor, v: Tensor, do: Tensor, states: Tensor, dstates: Tensor) -> list:
    """The kernel's TMA descriptors of its inputs, in its order."""
    return [_descriptor(q, _BY_CHANNEL_TILE), _descriptor(f, _BY_CHANNEL_TILE), _descriptor(v), _descriptor(do),
            _tiles_descriptor(states, _STATE_TILE), _tiles_descriptor(dstates, _STATE_TILE)]


def grads(q: Tensor, f: Tensor, v: Tensor, do: Tensor, bound: Tensor | None, states: Tensor, dstates: Tensor,
          dq: Tensor, df: Tensor, db_chunks: Tensor, flags: Tensor, scale: float, programs: int) -> None:
    """Writes dq and df [B, T, H, K] and db_chunks [B T / C, H, K] (each chunk's share of the lower bound's
    gradient, with a bound) of every chunk it anchors, and every chunk's byte of flags (int8 [B T / C, H]): 1 for
    those it leaves to `_bwd_kernel`'s fallback launch. q, f, v with evenly strided rows, do contiguous, states
    [B (T / C + 1), H, K, K] and dstates [B T / C, H, K, K] bfloat16 (`scan_fwd`'s slots, the dh walk's);
    bound [H, K] float32 or none. `programs`: at most one per SM."""
    B, T, H, _ = q.shape
    n_items = flags.numel()
    _grads_kernel[(min(programs, n_items), )](
        *_descriptors(q, f, v, do, states, dstates), db_chunks if bound is None else bound, dq, df, db_chunks, flags, T,
        H, scale, n_items, HAS_BOUND=bound is not None, SMALL_STAGES=SMALL_STAGES, STATE_STAGES=STATE_STAGES,
        COMPUTE_REGISTERS=COMPUTE_REGISTERS, num_warps=4)
