"""Launching the Triton scan kernels (kernels/triton_scan_kernels.py, which describes the algorithm) and
registering them as torch operators: the walks' buffers and carry pass, where packed sequences' chunks and chunk
states live, and the forward, the states recomputation and the backward, with autograd. Which launches a shape
takes (chunk lengths, segments, tiles) is kernels/triton_scan_dispatch.py's to say.
"""

from contextlib import nullcontext
from typing import Optional

import torch
import triton.language as tl
from torch import Tensor

from kernels import gluon_scan_forward, gluon_scan_grads
from kernels import triton_scan_dispatch as dispatch
from kernels.library import define_op
from kernels.triton_scan_kernels import (
    ANCHORED_LAUNCH,
    FALLBACK_LAUNCH,
    ONE_LAUNCH,
    _bwd_dh_kernel,
    _bwd_kernel,
    _fwd_fused_kernel,
    _fwd_output_kernel,
    _fwd_seed_kernel,
    _fwd_states_kernel,
    _segment_carry_kernel,
    _segment_ends_kernel,
)
from kernels.triton_scan_small import _small_bwd_kernel, _small_fwd_kernel

POISON_OUTPUTS = False
"""Tests set this: outputs then start as NaN, so an element a kernel forgot to write shows."""


class _Walks:
    """How the sequential kernel `kernel` ("states" or "dh", or their segment ends: `_tiles`) walks the chunks: its
    tiles, the segments of each walk (see `_segments`), the kernel arguments that say so and the buffers the segments
    hand to the carry pass. What the carry pass hands on, `carry`: "rewrite" fixes every chunk state; "seeds" leaves
    them local and stores each segment's true starting tile, its seed (the output kernel or `_fwd_seed_kernel` adds
    exp(D) seed); "seeded" walks start each segment from the seeds a "seeds" walk left, so their states are exact with
    no carry. The one-pass forward's segments (`n_segments`, `_one_pass_segments`) hand on their ends as the states
    walk's do, and so do the ends a seeded walk's seeds are found from (`find_seeds`)."""

    def __init__(self, kernel: str, layout: "_Layout", T: int, H: int, K: int, V: int, dtype: torch.dtype,
                 device: torch.device, carry: str, dv_in_walk: bool = False, n_segments: int | None = None):
        self.H, self.K, self.V = H, K, V
        walks = layout.n_sequences * H
        n_chunks = dispatch._cdiv(T, layout.chunk)
        if n_segments is None:
            self.n_segments, segment_chunks = dispatch._segment_layout(n_chunks, walks, K, V, layout.is_varlen, device)
        else:  # the one-pass forward's own cut (`_one_pass_segments`)
            self.n_segments, segment_chunks = dispatch._cut(n_chunks, n_segments)
        self.carries_seeds = carry == "seeds"
        self.seeded = carry == "seeded" and self.n_segments > 1
        self.segmented = self.n_segments > 1 and not self.seeded
        self.segment_chunks = segment_chunks if self.n_segments > 1 else 2**30  # one walk, any length
        self.tiles = dispatch._tiles(kernel, K, V, dtype, walks * self.n_segments, device, layout.chunk,
                                     layout.is_varlen, dv_in_walk)
        self.grid = (dispatch._state_programs(K, V, self.tiles, walks * self.n_segments),)
        slots = layout.n_states if kernel == "states" else layout.n_chunks
        slots = 0 if kernel.endswith("_ends") else slots  # `find_seeds` writes no chunk's gate sum
        if self.segmented:
            self.chunk_decays = torch.empty(slots, H, K, dtype=torch.float32, device=device)
            self.segment_ends = torch.empty(walks * self.n_segments, K, V, dtype=torch.float32, device=device)
            self.segment_decays = torch.empty(walks * self.n_segments, K, dtype=torch.float32, device=device)
        else:  # never read; one allocation, a few microseconds of host, for the three
            self.chunk_decays = self.segment_ends = self.segment_decays = torch.empty(0, device=device)

    def kernel_args(self) -> tuple:
        """The walk's arguments of the states and dh kernels (after their outputs), in their order."""
        return self.chunk_decays, self.segment_ends, self.segment_decays

    def find_seeds(self, q: Tensor, f: Tensor, y: Tensor, bound: Tensor, initial: Tensor | None, seeds: Tensor,
                   layout: "_Layout", T: int, scale: float, common: dict, backward: bool) -> None:
        """The seeds of a seeded walk into `seeds`: each segment's end from zero (`_segment_ends_kernel`, y = v, or
        do for the dh walk, whose `initial` is the final state's gradient), then the carry pass."""
        _segment_ends_kernel[self.grid](
            q, f, y, bound, q if initial is None else initial, self.segment_ends, self.segment_decays,
            layout.cu_seqlens, layout.state_offsets, q.stride(1), f.stride(1), y.stride(1), scale, T, self.n_segments,
            self.segment_chunks, HAS_INITIAL=initial is not None, BACKWARD=backward, **self.tiles, **common,
        )
        self.carry(q.new_empty(0), seeds, None, layout, T, backward)

    def carry(self, chunk_states: Tensor, seeds: Tensor, boundary: Tensor | None, layout: "_Layout", T: int,
              backward: bool) -> None:
        """The carry pass of a segmented walk: fixes the chunk states or stores the seeds (`carry`), and writes
        the boundary state (final or dh0)."""
        if not self.segmented:
            return
        tiles = {name: value for name, value in self.tiles.items() if name not in ("num_stages", "BT")}
        _segment_carry_kernel[self.grid](
            chunk_states, self.chunk_decays, self.segment_ends, self.segment_decays,
            boundary if boundary is not None else self.segment_ends, seeds, layout.cu_seqlens, layout.state_offsets,
            T, self.n_segments, self.segment_chunks, H=self.H, K=self.K, V=self.V, C=layout.chunk,
            BACKWARD=backward,
            FIX_STATES=not self.carries_seeds, WRITE_SEEDS=self.carries_seeds, WRITE_BOUNDARY=boundary is not None,
            **tiles,
        )


def _row_stride(x: Tensor) -> Tensor:
    """x itself if its [B, T] rows are evenly strided with dense heads (views of a fused projection are);
    otherwise a contiguous copy."""
    B, T, H, D = x.shape
    if x.stride(3) == 1 and x.stride(2) == D and x.stride(0) == T * x.stride(1):
        return x
    return x.contiguous()


def _state_slots(B: int, T: int, cu_seqlens: Tensor | None, chunk: int) -> int:
    """Rows of the chunk-state buffer: every chunk's start and each sequence's end. For packed sequences an upper
    bound from shapes alone (sum ceil(L / C) <= T / C + N), so nothing waits on the GPU."""
    if cu_seqlens is None:
        return B * (dispatch._cdiv(T, chunk) + 1)
    n_sequences = cu_seqlens.shape[0] - 1
    return T // chunk + 2 * n_sequences


class _Layout:
    """Where each sequence's chunks of `chunk` tokens and chunk states live: arithmetic for equal lengths, tables
    for packed."""

    def __init__(self, B: int, T: int, cu_seqlens: Tensor | None, device: torch.device, chunk: int = dispatch.CHUNK):
        self.is_varlen, self.chunk = cu_seqlens is not None, chunk
        if not self.is_varlen:
            self.n_sequences = B
            n_chunks = dispatch._cdiv(T, chunk)
            self.n_states, self.n_chunks = _state_slots(B, T, None, chunk), B * n_chunks
            self.cu_seqlens = self.state_offsets = self.chunk_table = torch.empty(0, dtype=torch.int32, device=device)
            return
        cu_seqlens = cu_seqlens.to(device=device, dtype=torch.int32)
        N = cu_seqlens.numel() - 1
        self.n_sequences = N
        # Upper bounds known from shapes alone, so nothing waits on the GPU: sum ceil(L / C) <= T / C + N.
        self.n_chunks = T // chunk + N
        self.n_states = _state_slots(B, T, cu_seqlens, chunk)
        chunks = (cu_seqlens[1:] - cu_seqlens[:-1] + chunk - 1) // chunk
        chunk_offsets = torch.cat([chunks.new_zeros(1), chunks.cumsum(0)])
        self.state_offsets = (chunk_offsets + torch.arange(N + 1, device=device)).to(torch.int32)
        index = torch.arange(self.n_chunks, device=device, dtype=torch.int32)
        sequence = torch.searchsorted(chunk_offsets[1:].to(torch.int32), index, right=True)
        position = index - chunk_offsets[sequence.clamp(max=N - 1)]
        sequence = torch.where(sequence < N, sequence, -1)
        self.chunk_table = torch.stack([sequence, position], 1).to(torch.int32).contiguous()
        self.cu_seqlens = cu_seqlens


def _fallback_flags(layout: _Layout, H: int, device: torch.device) -> Tensor:
    """One byte per (chunk, head) of a chunk-parallel kernel launched twice: the first launch (ANCHORED_LAUNCH)
    marks the chunks whose intra-chunk pairs one anchor cannot span, and the second (FALLBACK_LAUNCH) does those
    alone, so that the first carries none of the fallback's code (kernels/triton_scan_kernels.py, `_bwd_kernel`).
    Programs past a packed batch's last chunk write and read nothing."""
    return torch.empty(layout.n_chunks * H, dtype=torch.int8, device=device)


def _empty(*shape, dtype: torch.dtype, device: torch.device) -> Tensor:
    if POISON_OUTPUTS:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


def _precision(x: Tensor) -> str:
    return "ieee" if x.dtype == torch.float32 else "tf32"


FLOAT32_STATE_ENTRIES = 32 * 32
"""bfloat16 heads with at most this many state entries keep their chunk states in float32 (below)."""


def _wide_dtype(x: Tensor, K: int, V: int) -> torch.dtype:
    """The type of what is scaled by exp of a gate sum: the anchored intra-chunk operands (factors up to
    exp(40)), the chunk states, their gradients and the operands that meet them (factors down to exp(-20)
    per step when the gates are near 0). float16 leaves its range there (largest 65504, smallest
    subnormal 6e-8), so float16 inputs take those in float32 (tf32 matmuls); bfloat16 and float32 keep
    their own type, except small bfloat16 heads (K V <= FLOAT32_STATE_ENTRIES, the small-head kernels' among
    them): their states cost little in float32 (K V / C values per token against K of q), and in bfloat16 the
    lower bound's gradient of a layer with few channels (H K = 16: a handful of sums that cancel) had a tail
    past 1e-2 of relative error (1 draw in about 50; largest of 30 draws 7.4e-3 against 4.1e-3 in float32,
    kernels/HISTORY.md, ninth session). The backward's anchored operands are always float32 (tf32): the gate
    gradient q dq - k dk cancels the pairs that do not span a step, and bfloat16 rounding would leave that
    noisy."""
    if x.dtype == torch.float16 or (x.dtype == torch.bfloat16 and K * V <= FLOAT32_STATE_ENTRIES):
        return torch.float32
    return x.dtype


def _tl_dtype(dtype: torch.dtype):
    return {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}[dtype]


def _constexprs(q: Tensor, v: Tensor, lower_bound: Tensor | None, layout: _Layout, reverse: bool) -> dict:
    """What every scan kernel is specialised on."""
    _, _, H, K = q.shape
    return dict(H=H, K=K, V=v.shape[-1], C=layout.chunk, HAS_BOUND=lower_bound is not None, IS_VARLEN=layout.is_varlen,
                REVERSE=reverse, PRECISION=_precision(q), WIDE_DT=_tl_dtype(_wide_dtype(q, K, v.shape[-1])))


def _store_states(f: Tensor, v: Tensor, bound: Tensor, h0: Tensor, states: Tensor, final: Tensor, layout: _Layout,
                  common: dict, has_h0: bool, output_final_state: bool, seeds: Tensor, carry: str) -> _Walks:
    """The sequential states pass: every chunk's starting state into `states` (and the final state), exact, or
    local with `seeds` (`_Walks`' `carry`). A "seeded" pass cuts its walks as the forward that left the seeds did
    (one per segment of each walk)."""
    _, T, H, K = f.shape
    V = v.shape[-1]
    n_segments = max(1, seeds.shape[0] // (layout.n_sequences * H)) if carry == "seeded" else None
    walks = _Walks("states", layout, T, H, K, V, f.dtype, f.device, carry, n_segments=n_segments)
    _fwd_states_kernel[walks.grid](
        f, v, bound, h0, states, final, *walks.kernel_args(), seeds, layout.cu_seqlens, layout.state_offsets,
        f.stride(1), v.stride(1), T, walks.n_segments, walks.segment_chunks, HAS_H0=has_h0,
        OUTPUT_FINAL=output_final_state, SEGMENTED=walks.segmented, SEEDED=walks.seeded, **walks.tiles, **common,
    )
    walks.carry(states, seeds, final if output_final_state else None, layout, T, backward=False)
    return walks


def scan_fwd(
    q: Tensor, f: Tensor, v: Tensor, lower_bound: Optional[Tensor], initial_state: Optional[Tensor],
    cu_seqlens: Optional[Tensor], scale: float, reverse: bool, save_states: bool, output_final_state: bool,
    chunk: int, backward: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Returns o [B, T, H, V], the final state [N, H, K, V] (float32), the chunk states for the backward (or
    none), without them the seeds of cut walks ([B H segments, K, V] in the states' type, or none), from
    which the backward's `scan_states` rebuilds them exactly in one pass, and the intra-chunk scores the backward
    takes dv from ([chunks, H, C, C] in q's type, where `_scores_kept`; or none). `chunk`: CHUNK where a backward
    follows (`backward`; its states and seeds are the backward's), else `_forward_chunk`'s."""
    q, f, v = (_row_stride(x) for x in (q, f, v))
    B, T, H, K = q.shape
    V = v.shape[-1]
    layout = _Layout(B, T, cu_seqlens, q.device, chunk)
    N = layout.n_sequences
    o = _empty(B, T, H, V, dtype=q.dtype, device=q.device)
    final = _empty(N if output_final_state else 0, H, K, V, dtype=torch.float32, device=q.device)
    if not (backward or save_states) and gluon_scan_forward.applies(K, V, q.dtype, cu_seqlens, reverse,
                                                                    q.device):
        _warp_specialized(q, f, v, lower_bound, initial_state, o, final if output_final_state else None, scale)
        return o, final, _empty(0, H, K, V, dtype=_wide_dtype(q, K, V), device=q.device), q.new_empty(
            0, K, V, dtype=_wide_dtype(q, K, V)), _no_scores(q, chunk)
    dummy = q.new_empty(0)
    bound = dummy if lower_bound is None else lower_bound.float().contiguous()
    h0 = dummy if initial_state is None else initial_state.float().contiguous()
    if dispatch._small_heads(K, V):  # no seeds: a backward without kept states walks them again itself
        states = _empty(layout.n_states if save_states else 0, H, K, V, dtype=_wide_dtype(q, K, V),
                        device=q.device)
        with torch.cuda.device(q.device.index) if q.is_cuda else nullcontext():
            _small_fwd_kernel[(N * H,)](
                q, f, v, bound, h0, o, final, states, layout.cu_seqlens, layout.state_offsets, q.stride(1),
                f.stride(1), v.stride(1), scale, T, H=H, K=K, V=V, C=chunk, HAS_BOUND=lower_bound is not None,
                HAS_H0=initial_state is not None, OUTPUT_FINAL=output_final_state, STORE_STATES=save_states,
                IS_VARLEN=layout.is_varlen, REVERSE=reverse, **dispatch._small_head_tiles(K, V),
            )
        return o, final, states, q.new_empty(0, K, V, dtype=_wide_dtype(q, K, V)), _no_scores(q, chunk)
    one_pass_segments = dispatch._one_pass_segments(B, H, K, V, q.dtype, cu_seqlens, q.device)
    if one_pass_segments > 1 or dispatch._fused_forward(B, H, K, V, q.dtype, cu_seqlens, q.device):
        states = _empty(layout.n_states if save_states else 0, H, K, V, dtype=_wide_dtype(q, K, V), device=q.device)
        keep_scores = backward and dispatch._scores_kept(B, H, K, V, q.dtype, cu_seqlens, q.device)
        scores = _empty(layout.n_chunks if keep_scores else 0, H, chunk, chunk, dtype=q.dtype, device=q.device)
        common = _constexprs(q, v, lower_bound, layout, reverse)
        # A cut walk's segments hand on their ends as the states walk's do (its tiles for the carry pass). Without
        # a backward they run from zero and the seeds are added to their outputs afterwards; with one they start
        # from seeds found first (`_one_pass_segments`).
        walks = _Walks("states_ends" if backward else "states", layout, T, H, K, V, q.dtype, q.device, "seeds",
                       n_segments=one_pass_segments)
        seeded = backward and walks.segmented
        seeds = _empty(N * H * walks.n_segments if walks.segmented else 0, K, V, dtype=states.dtype, device=q.device)
        with torch.cuda.device(q.device.index) if q.is_cuda else nullcontext():
            if seeded:
                walks.find_seeds(q, f, v, bound, h0 if initial_state is not None else None, seeds, layout, T, scale,
                                 common, backward=False)
            if backward and gluon_scan_forward.applies(K, V, q.dtype, cu_seqlens, reverse, q.device):
                # the Gluon forward, keeping what the backward takes (its no-grad use: `_warp_specialized`)
                given = (h0 if initial_state is not None else None, o, final if output_final_state else None)
                kept = (states if save_states else None, scores if keep_scores else None)
                flags = gluon_scan_forward.forward(
                    q, f, v, q.new_zeros(H, K, dtype=torch.float32) if lower_bound is None else bound, *given, scale,
                    walks.n_segments, walks.segment_chunks, *walks.kernel_args(), seeds if seeded else None, *kept)
                _rerun_flagged(flags, q, f, v, bound, *given, *kept, layout, scale, common, backward=True)
            else:
                tiles = dispatch._tiles("fused", K, V, q.dtype, backward=backward)
                _fwd_fused_kernel[(dispatch._state_programs(K, V, tiles, N * H * walks.n_segments),)](
                    q, f, v, bound, h0, o, final, states, scores, *walks.kernel_args(), seeds, dummy,
                    layout.cu_seqlens, layout.state_offsets, q.stride(1), f.stride(1), v.stride(1), scale, T,
                    walks.n_segments, walks.segment_chunks, HAS_H0=initial_state is not None,
                    OUTPUT_FINAL=output_final_state and (seeded or not walks.segmented), STORE_STATES=save_states,
                    STORE_SCORES=keep_scores, SEGMENTED=walks.segmented and not seeded, SEEDED=seeded, **tiles,
                    **common,
                )
            if walks.segmented and not seeded:
                walks.carry(dummy, seeds, final if output_final_state else None, layout, T, backward=False)
                _fwd_seed_kernel[(layout.n_chunks, H)](
                    q, f, bound, o, walks.chunk_decays, seeds, layout.cu_seqlens, layout.state_offsets,
                    layout.chunk_table, q.stride(1), f.stride(1), scale, T, walks.n_segments, walks.segment_chunks,
                    **dispatch._tiles("seed", K, V, q.dtype), **common,
                )
        # The backward rebuilds chunk states it was not given from the seeds (`scan_states`).
        seeds = seeds if seeded and not save_states else q.new_empty(0, K, V, dtype=states.dtype)
        return o, final, states, seeds, scores
    # The output pass reads the chunk states back: they are stored even when the backward will not need them.
    # States kept for the backward must be exact; otherwise cut walks leave them local, and seeds to add.
    states = _empty(layout.n_states, H, K, V, dtype=_wide_dtype(q, K, V), device=q.device)
    # Seeds in the states' type: every output program of a segment reads its seed again (from L2), and float32
    # seeds made the output kernel 44% slower (record shape, T 16K: 0.81 ms against 0.56; bfloat16 0.67).
    n_seeds = 0 if save_states else dispatch._seed_count(B, T, H, K, V, q.dtype, cu_seqlens, q.device, chunk)
    seeds = _empty(n_seeds, K, V, dtype=states.dtype, device=q.device)
    common = _constexprs(q, v, lower_bound, layout, reverse)
    with torch.cuda.device(q.device.index) if q.is_cuda else nullcontext():
        walks = _store_states(f, v, bound, h0, states, final, layout, common, initial_state is not None,
                              output_final_state, seeds, "rewrite" if save_states else "seeds")
        # At chunk 64 the fallback's code inline spills (592 bytes a thread at K 128, sm_90a): two launches, as the
        # grads kernel's (`_fallback_flags`); at 32 one, where a second launch would cost more than it saves.
        launches = (ONE_LAUNCH,) if chunk == dispatch.CHUNK else (ANCHORED_LAUNCH, FALLBACK_LAUNCH)
        flags = _fallback_flags(layout, H, q.device) if len(launches) > 1 else dummy
        for launch in launches:
            _fwd_output_kernel[(layout.n_chunks, H)](
                q, f, v, bound, states, o, walks.chunk_decays, seeds, flags, layout.cu_seqlens, layout.state_offsets,
                layout.chunk_table, q.stride(1), f.stride(1), v.stride(1), scale, T, walks.n_segments,
                walks.segment_chunks, SEEDED=walks.segmented and walks.carries_seeds, LAUNCH=launch,
                **dispatch._tiles("output", K, V, q.dtype, chunk=chunk), **common,
            )
    if not save_states:  # a fresh empty tensor: a view would keep the whole buffer alive
        states = _empty(0, H, K, V, dtype=states.dtype, device=q.device)
    seeds = seeds if backward else q.new_empty(0, K, V, dtype=seeds.dtype)  # only a backward reads them
    return o, final, states, seeds, _no_scores(q, chunk)


def _warp_specialized(q: Tensor, f: Tensor, v: Tensor, lower_bound: Tensor | None, initial_state: Tensor | None,
                      o: Tensor, final: Tensor | None, scale: float) -> None:
    """The forward no backward follows where the Gluon kernel `applies` (kernels/gluon_scan_forward.py): o (and
    the final state) by it, then:
    - where its walks are fewer than the SMs, cut into segments (`_gluon_segments`), the carry pass and
      `_fwd_seed_kernel`, which add the seeds to the outputs of the segments after the first. H100, record shape,
      kernel ms: T 8K (64 walks) 0.424 whole -> 0.374 cut, T 16K (32 walks) 0.92 -> 0.427 (thirty-first session);
    - the walks it flagged, again (`_rerun_flagged`)."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    # the Gluon kernel always reads a bound: zeros are none
    bound = q.new_zeros(H, K, dtype=torch.float32) if lower_bound is None else lower_bound.float().contiguous()
    h0 = None if initial_state is None else initial_state.float().contiguous()
    layout = _Layout(B, T, None, q.device, dispatch.CHUNK)
    cut = _Walks("states", layout, T, H, K, V, q.dtype, q.device, "seeds",
                 n_segments=dispatch._gluon_segments(B, H, q.device))
    common = _constexprs(q, v, lower_bound, layout, False)
    dummy = q.new_empty(0)
    with torch.cuda.device(q.device.index) if q.is_cuda else nullcontext():  # the CPU: the tests' stand-in
        flags = gluon_scan_forward.forward(q, f, v, bound, h0, o, None if cut.segmented else final, scale,
                                           cut.n_segments, cut.segment_chunks, *cut.kernel_args())
        if cut.segmented:
            seeds = _empty(B * H * cut.n_segments, K, V, dtype=_wide_dtype(q, K, V), device=q.device)
            cut.carry(dummy, seeds, final, layout, T, backward=False)
            _fwd_seed_kernel[(layout.n_chunks, H)](
                q, f, bound, o, cut.chunk_decays, seeds, layout.cu_seqlens, layout.state_offsets, layout.chunk_table,
                q.stride(1), f.stride(1), scale, T, cut.n_segments, cut.segment_chunks,
                **dispatch._tiles("seed", K, V, q.dtype), **common,
            )
        _rerun_flagged(flags, q, f, v, bound, h0, o, final, None, None, layout, scale, common, backward=False)


def _rerun_flagged(flags: Tensor, q: Tensor, f: Tensor, v: Tensor, bound: Tensor, h0: Tensor | None, o: Tensor,
                   final: Tensor | None, states: Tensor | None, scores: Tensor | None, layout: _Layout, scale: float,
                   common: dict, backward: bool) -> None:
    """The walks the Gluon forward flagged (a chunk beyond its anchor's span: gates near 0 without a bound) again,
    whole, by the one-pass Triton forward, which falls back by blocks and overwrites their outputs (and the chunk
    states and scores kept for a backward). The unflagged walks' programs return at once (a few microseconds)."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    tiles = dispatch._tiles("fused", K, V, q.dtype, backward=backward)
    dummy = q.new_empty(0)
    given = lambda x: dummy if x is None else x
    _fwd_fused_kernel[(dispatch._state_programs(K, V, tiles, B * H),)](  # whole walks: no segment's buffers
        q, f, v, bound, given(h0), o, given(final), given(states), given(scores), dummy, dummy, dummy, dummy, flags,
        layout.cu_seqlens, layout.state_offsets, q.stride(1), f.stride(1), v.stride(1), scale, T, 1,
        dispatch._cdiv(T, dispatch.CHUNK), HAS_H0=h0 is not None, OUTPUT_FINAL=final is not None,
        STORE_STATES=states is not None, STORE_SCORES=scores is not None, SEGMENTED=False, SEEDED=False,
        ONLY_FLAGGED=True, **tiles, **common,
    )


def _no_scores(q: Tensor, chunk: int) -> Tensor:
    """`scan_fwd`'s scores where it keeps none."""
    return q.new_empty(0, q.shape[2], chunk, chunk)


scan_fwd_op = define_op(scan_fwd)


@torch.library.register_fake("hgrn2::scan_fwd")
def _(q, f, v, lower_bound, initial_state, cu_seqlens, scale, reverse, save_states, output_final_state, chunk,
      backward):
    B, T, H, K = q.shape
    layout_states = _state_slots(B, T, cu_seqlens, chunk)
    N = B if cu_seqlens is None else cu_seqlens.shape[0] - 1
    V = v.shape[-1]
    n_seeds = 0 if save_states or not backward else dispatch._seed_count(B, T, H, K, V, q.dtype, cu_seqlens,
                                                                          q.device, chunk)
    kept = backward and dispatch._scores_kept(B, H, K, V, q.dtype, cu_seqlens, q.device)
    n_scores = B * dispatch._cdiv(T, chunk) if kept else 0
    return (
        q.new_empty(B, T, H, V),
        q.new_empty(N if output_final_state else 0, H, K, V, dtype=torch.float32),
        q.new_empty(layout_states if save_states else 0, H, K, V, dtype=_wide_dtype(q, K, V)),
        q.new_empty(n_seeds, K, V, dtype=_wide_dtype(q, K, V)),
        q.new_empty(n_scores, H, chunk, chunk),
    )


def scan_states(
    q: Tensor, f: Tensor, v: Tensor, lower_bound: Optional[Tensor], initial_state: Optional[Tensor], seeds: Tensor,
    cu_seqlens: Optional[Tensor], reverse: bool,
) -> Tensor:
    """The chunk states the backward reads, recomputed from f and v (q gives the dtype and layout only), from the
    forward's seeds where it cut the walks."""
    f, v = _row_stride(f), _row_stride(v)
    B, T, H, K = f.shape
    layout = _Layout(B, T, cu_seqlens, f.device)
    states = _empty(layout.n_states, H, K, v.shape[-1], dtype=_wide_dtype(q, K, v.shape[-1]), device=f.device)
    dummy = f.new_empty(0)
    bound = dummy if lower_bound is None else lower_bound.float().contiguous()
    h0 = dummy if initial_state is None else initial_state.float().contiguous()
    with torch.cuda.device(f.device.index) if f.is_cuda else nullcontext():
        _store_states(f, v, bound, h0, states, dummy.float(), layout, _constexprs(q, v, lower_bound, layout, reverse),
                      initial_state is not None, False, seeds, "seeded")
    return states


scan_states_op = define_op(scan_states)


@torch.library.register_fake("hgrn2::scan_states")
def _(q, f, v, lower_bound, initial_state, seeds, cu_seqlens, reverse):
    B, T, H, K = q.shape
    n_states = _state_slots(B, T, cu_seqlens, dispatch.CHUNK)
    return q.new_empty(n_states, H, K, v.shape[-1], dtype=_wide_dtype(q, K, v.shape[-1]))


def scan_bwd(
    q: Tensor, f: Tensor, v: Tensor, lower_bound: Optional[Tensor], initial_state: Optional[Tensor], states: Tensor,
    scores: Tensor, do: Tensor, d_final: Optional[Tensor], cu_seqlens: Optional[Tensor], scale: float, reverse: bool,
    want_dh0: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Returns dq, df, dv, d lower_bound ([H, K], empty without a bound) and d initial_state (or empty), from the
    chunk states `states` and, where the forward kept them (`_scores_kept`), its intra-chunk `scores`; the
    small-head kernels walk the states again themselves where `states` is empty."""
    q, f, v = (_row_stride(x) for x in (q, f, v))
    do = do.contiguous()
    B, T, H, K = q.shape
    V = v.shape[-1]
    layout = _Layout(B, T, cu_seqlens, q.device)
    N = layout.n_sequences
    dh0 = _empty(N if want_dh0 else 0, H, K, V, dtype=torch.float32, device=q.device)
    dq = _empty(B, T, H, K, dtype=q.dtype, device=q.device)
    df = _empty(B, T, H, K, dtype=f.dtype, device=q.device)
    dv = _empty(B, T, H, V, dtype=v.dtype, device=q.device)
    if dispatch._small_heads(K, V):
        return (dq, df, dv, *_small_scan_bwd(q, f, v, lower_bound, initial_state, states, do, d_final, layout,
                                              scale, reverse, dq, df, dv, dh0))
    dstates = _empty(layout.n_chunks, H, K, V, dtype=_wide_dtype(q, K, V), device=q.device)
    # Every chunk's program writes its row; a packed batch's programs past its last chunk write nothing.
    db_chunks = (torch.zeros if layout.is_varlen else _empty)(layout.n_chunks if lower_bound is not None else 0, H, K,
                                                              dtype=torch.float32, device=q.device)
    dummy = q.new_empty(0)
    bound = dummy if lower_bound is None else lower_bound.float().contiguous()
    common = _constexprs(q, v, lower_bound, layout, reverse)
    has_d_final = d_final is not None
    d_final = d_final.float().contiguous() if has_d_final else dummy
    with torch.cuda.device(q.device.index) if q.is_cuda else nullcontext():
        # A walk that writes dv from the forward's scores is cut as the one-pass forward was, and seeded: its
        # segments' ends and the carry pass find each segment's seed first (`_one_pass_segments`).
        dv_in_walk = scores.numel() > 0
        n_segments = dispatch._one_pass_segments(B, H, K, V, q.dtype, cu_seqlens, q.device) if dv_in_walk else None
        walks = _Walks("dh", layout, T, H, K, V, q.dtype, q.device, "seeded" if dv_in_walk else "rewrite",
                       dv_in_walk=dv_in_walk, n_segments=n_segments)
        if dv_in_walk and walks.tiles["BK"] < K:
            raise RuntimeError("scan_bwd: the forward kept its scores for a dh walk over the whole K, but this one "
                               "splits K: `_scores_kept` and `_tiles` disagree")
        seeds = _empty(N * H * walks.n_segments if walks.seeded else 0, K, V, dtype=dstates.dtype, device=q.device)
        if walks.seeded:
            ends = _Walks("dh_ends", layout, T, H, K, V, q.dtype, q.device, "seeds", n_segments=n_segments)
            ends.find_seeds(q, f, do, bound, d_final if has_d_final else None, seeds, layout, T, scale, common,
                            backward=True)
        q_by_time = _empty(layout.n_chunks, H, K, layout.chunk, dtype=q.dtype, device=q.device)
        f_by_time = _empty(layout.n_chunks, H, K, layout.chunk, dtype=f.dtype, device=q.device)
        _bwd_dh_kernel[walks.grid](
            q, f, do, bound, d_final, dstates, dh0, *walks.kernel_args(), seeds, q_by_time, f_by_time, scores, dv,
            layout.cu_seqlens, layout.state_offsets, q.stride(1), f.stride(1), scale, T, walks.n_segments,
            walks.segment_chunks, HAS_DFINAL=has_d_final, WRITE_DH0=want_dh0, SEGMENTED=walks.segmented,
            SEEDED=walks.seeded, WRITE_DV=dv_in_walk, **walks.tiles, **common,
        )
        walks.carry(dstates, dummy, dh0 if want_dh0 else None, layout, T, backward=True)
        flags = _fallback_flags(layout, H, q.device)
        launches = (ANCHORED_LAUNCH, FALLBACK_LAUNCH)
        if (dispatch.GLUON_GRADS and dv_in_walk
                and gluon_scan_forward.applies(K, V, q.dtype, cu_seqlens, reverse, q.device)):
            # the anchored launch's work by the Gluon kernel, which flags the chunks it leaves to the fallback
            gluon_scan_grads.grads(q, f, v, do, None if lower_bound is None else bound, states, dstates, dq, df,
                                   db_chunks, flags, scale, dispatch._sm_count(q.device))
            launches = (FALLBACK_LAUNCH,)
        for launch in launches:
            _bwd_kernel[(layout.n_chunks, H)](
                q_by_time, f_by_time, v, do, bound, states, dstates, dq, df, dv, db_chunks, flags, layout.cu_seqlens,
                layout.state_offsets, layout.chunk_table, v.stride(1), scale, T,
                **dispatch._tiles("grads", K, V, q.dtype, dv_in_walk=dv_in_walk), ANCHORED_DT=tl.float32,
                LAUNCH=launch, WRITE_DV=not dv_in_walk, **common,
            )
    db = db_chunks.sum(0) if lower_bound is not None else dummy.float()
    return dq, df, dv, db, dh0


def _small_scan_bwd(q, f, v, lower_bound, initial_state, states, do, d_final, layout, scale, reverse, dq, df, dv,
                    dh0):
    """The small-head backward into dq, df, dv and dh0; returns d lower_bound and dh0. Without the forward's
    `states`, the kernel walks them again into scratch."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    N = layout.n_sequences
    dummy = q.new_empty(0)
    db_sequences = _empty(N if lower_bound is not None else 0, H, K, dtype=torch.float32, device=q.device)
    with torch.cuda.device(q.device.index) if q.is_cuda else nullcontext():
        _small_bwd_kernel[(N * H,)](
            q, f, v, do, dummy if lower_bound is None else lower_bound.float().contiguous(),
            dummy if initial_state is None else initial_state.float().contiguous(),
            dummy if d_final is None else d_final.float().contiguous(),
            states if states.numel() else _empty(layout.n_states, H, K, V, dtype=torch.float32, device=q.device), dq,
            df, dv, db_sequences, dh0,
            layout.cu_seqlens, layout.state_offsets, q.stride(1), f.stride(1), v.stride(1), scale, T, H=H, K=K, V=V,
            C=layout.chunk, HAS_BOUND=lower_bound is not None, HAS_H0=initial_state is not None,
            HAS_DFINAL=d_final is not None, WRITE_DH0=dh0.numel() > 0, STATES_KEPT=states.numel() > 0,
            IS_VARLEN=layout.is_varlen, REVERSE=reverse, **dispatch._small_head_tiles(K, V),
        )
    return (db_sequences.sum(0) if lower_bound is not None else dummy.float()), dh0


scan_bwd_op = define_op(scan_bwd)


@torch.library.register_fake("hgrn2::scan_bwd")
def _(q, f, v, lower_bound, initial_state, states, scores, do, d_final, cu_seqlens, scale, reverse, want_dh0):
    B, T, H, K = q.shape
    N = B if cu_seqlens is None else cu_seqlens.shape[0] - 1
    V = v.shape[-1]
    return (
        q.new_empty(q.shape), f.new_empty(f.shape), v.new_empty(v.shape),
        q.new_empty((H, K) if lower_bound is not None else (0,), dtype=torch.float32),
        q.new_empty(N if want_dh0 else 0, H, K, V, dtype=torch.float32),
    )


def _setup_context(ctx, inputs, output):
    q, f, v, lower_bound, initial_state, cu_seqlens, scale, reverse, save_states, output_final_state, _, _ = inputs
    ctx.save_for_backward(q, f, v, lower_bound, initial_state, output[2], output[3], output[4], cu_seqlens)
    ctx.scale, ctx.reverse = scale, reverse
    ctx.has_initial_state = initial_state is not None
    ctx.output_final_state = output_final_state
    ctx.recompute_states = not save_states
    # The chunk states, seeds and scores are outputs only so that autograd keeps them; left as None, their gradient
    # is never materialised (a zero-filled buffer of the states' size: 0.5 GiB and 0.16 ms at the record shape).
    ctx.set_materialize_grads(False)


def _backward(ctx, do, d_final, d_states, d_seeds, d_scores):
    q, f, v, lower_bound, initial_state, states, seeds, scores, cu_seqlens = ctx.saved_tensors
    if ctx.recompute_states and not dispatch._small_heads(q.shape[-1], v.shape[-1]):
        states = scan_states_op(q, f, v, lower_bound, initial_state, seeds, cu_seqlens, ctx.reverse)
    d_final = d_final if ctx.output_final_state else None
    if do is None:  # only the final state was used (grads are not materialised, see _setup_context)
        do = torch.zeros_like(v)
    dq, df, dv, db, dh0 = scan_bwd_op(q, f, v, lower_bound, initial_state, states, scores, do, d_final, cu_seqlens,
                                      ctx.scale, ctx.reverse, ctx.has_initial_state)
    return (dq, df, dv, db.view_as(lower_bound) if lower_bound is not None else None,
            dh0 if ctx.has_initial_state else None, None, None, None, None, None, None, None)


torch.library.register_autograd("hgrn2::scan_fwd", _backward, setup_context=_setup_context)


class _EagerScan(torch.autograd.Function):
    """`scan_fwd` with its autograd outside torch.compile: one autograd node around the launcher. The operator's
    registered autograd runs Python glue at every call, forward and backward (argument defaults, a redispatch
    below autograd), which torch.compile traces away but eager training pays. `forward` takes the context itself:
    a Function with a separate `setup_context` binds its arguments to the signature with `inspect` at every call
    (a forward + backward's Python, launches stubbed, on a 2-core CPU: 224 us with it, 177 without). The
    backward calls the operators either way, so that torch.compile can trace it."""

    @staticmethod
    def forward(ctx, *inputs):
        outputs = scan_fwd(*inputs)
        _setup_context(ctx, inputs, outputs)
        return outputs

    backward = staticmethod(_backward)


def triton_scan(
    q: Tensor, f: Tensor, i: Tensor, lower_bound: Tensor | None, scale: float, initial_state: Tensor | None,
    cu_seqlens: Tensor | None, reverse: bool, output_final_state: bool, recompute_states: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """The scan through the operator hgrn2::scan_fwd where torch.compile traces (it sees one opaque node), else
    through `_EagerScan`, or the launcher alone where no gradient is wanted. The chunk states are kept for
    autograd, or with `recompute_states` rebuilt in the backward by one more states pass."""
    needs_grad = torch.is_grad_enabled() and any(
        x is not None and x.requires_grad for x in (q, f, i, lower_bound, initial_state)
    )
    B, _, H, K = q.shape
    if torch.compiler.is_compiling():
        scan = scan_fwd_op
    else:
        scan = _EagerScan.apply if needs_grad else scan_fwd
    o, final, _, _, _ = scan(
        q, f, i.to(q.dtype), lower_bound, initial_state, cu_seqlens, float(scale), reverse,
        needs_grad and not recompute_states, output_final_state,
        dispatch._forward_chunk(B, H, K, i.shape[-1], q.dtype, cu_seqlens, q.device, backward=needs_grad), needs_grad,
    )
    return o, (final if output_final_state else None)
