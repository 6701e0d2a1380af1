"""Launching the Triton scan kernels (kernels/triton_scan_kernels.py, which describes the algorithm) and
registering them as torch operators: the tiles and launch options of each kernel, how the sequential walks are
cut into segments, where packed sequences' chunks and chunk states live, and the forward, the states
recomputation and the backward, with autograd.
"""

import functools
from contextlib import nullcontext
from typing import Optional

import torch
import triton.language as tl
from torch import Tensor

from kernels import gluon_scan_forward, gluon_scan_grads
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

CHUNK = 32
"""Tokens per chunk of the training scan (the forward that keeps or rebuilds states for a backward, and the
backward): at 64 the grads kernel's [C, K] tiles spill (kernels/HISTORY.md, v1 and v2)."""
INFERENCE_CHUNK = 64
"""Tokens per chunk of a forward no backward follows, where `_forward_chunk` says: half the chunk states to write
and read back."""

POISON_OUTPUTS = False
"""Tests set this: outputs then start as NaN, so an element a kernel forgot to write shows."""


def _cdiv(a: int, b: int) -> int:
    """ceil(a / b). triton.cdiv and triton.next_power_of_2 are constexpr functions, a few microseconds a call on
    the host; a scan's launch code needs some thirty of them, and a ViT step runs 48 scan ops."""
    return -(-a // b)


def _next_power_of_2(n: int) -> int:
    return 1 << (n - 1).bit_length()


def _state_programs(K: int, V: int, tiles: dict, walks: int) -> int:
    """Grid of the sequential kernels: one program per state tile of every (sequence, head) walk (or segment)."""
    return _cdiv(K, tiles["BK"]) * _cdiv(V, tiles["BV"]) * walks


def _wide_tile_programs(walks: int, K: int, V: int) -> int:
    """Programs of a sequential kernel over `walks` (sequence, head) walks with 64 x 64 state tiles."""
    return walks * _cdiv(K, 64) * _cdiv(V, 64)


SMALL_HEAD = 8
"""Heads whose K and V are both at most this take the small-head kernels (kernels/triton_scan_small.py)."""


def _small_heads(K: int, V: int) -> bool:
    return max(K, V) <= SMALL_HEAD


def _small_head_tiles(K: int, V: int) -> dict:
    """Padded K and V of the small-head kernels, and a warp for every 32 state entries. One head per program: each
    program walks a chain of dependent chunk steps, and more heads per program (fewer programs) or a head's V split
    over several programs (more, each loading the head's q and f again) were both slower (kernels/HISTORY.md, eighth
    session)."""
    KP, VP = _next_power_of_2(K), _next_power_of_2(V)
    return dict(KP=KP, VP=VP, num_warps=max(1, KP * VP // 32))


MIN_SEGMENT_CHUNKS = 2
"""A segment walks at least this many chunks: a walk of one chunk gains nothing from being cut."""


def _segments(n_chunks: int, walks: int, K: int, V: int, device: torch.device | None) -> int:
    """Into how many segments each walk of the sequential kernels is cut. A walk is a chain of dependent chunk
    steps, so with few walks (long sequences, small batches: T 16K x 2) most SMs would wait: then each walk is
    cut into segments run at once from a zero state, and `_segment_carry_kernel` hands on what the earlier
    segments carry in (`_Walks`). Cutting pays where the walks leave SMs idle, at most one 64 x 64 tile program per
    SM, whichever the carry (H100, record shape):
    - rewriting every chunk state (about 0.35 ms a walk) pays at T 16K, 128 programs: f+b 4.60 -> 4.40 ms (it did
      not before the walks' 128-wide V blocks), and not at T 8K, 256 programs: 3.76 -> 4.24.
    - seeds, nearly free: the 370M LM at T 8K x 4, 128 programs, trains 3% faster cut.
    Then as many segments as fit 4 such programs per SM: at the record shape's T 16K x 2 that is 4 segments, whose walks
    take 64 x 128 tiles, 256 programs. Against 8 per SM rounded up (9 segments, 576 programs; the LM at T 16K had
    trained 3% faster with it than with 4, under triton 3.6 and older kernels), H100, triton 3.8, kernel ms, two
    rounds (kernels/HISTORY.md, twenty-second session): f+b 4.15-4.17 -> 3.81-3.83 with the chunk states kept,
    4.38-4.39 -> 4.00 recomputed, the no-grad forward 0.98 -> 0.88; 8 heads (17 -> 8 segments) 2.10 -> 2.00, 2.23 ->
    2.08, 0.51 -> 0.47; 64-wide heads (33 -> 16) 1.62 -> 1.58, recomputed a tie. 2 and 3 segments lost (4.25, 4.03),
    6 won less (4.05). Equal lengths only: packed sequences are walked whole."""
    programs = _wide_tile_programs(walks, K, V)
    if programs > _sm_count(device):
        return 1
    return max(1, min(4 * _sm_count(device) // programs, n_chunks // MIN_SEGMENT_CHUNKS))


def _cut(n_chunks: int, n_segments: int) -> tuple[int, int]:
    """A walk of `n_chunks` cut into at most `n_segments` equal segments, none left empty: how many, and how many
    chunks each walks (the last may walk fewer)."""
    segment_chunks = _cdiv(n_chunks, n_segments)
    return _cdiv(n_chunks, segment_chunks), segment_chunks


def _segment_layout(n_chunks: int, walks: int, K: int, V: int, is_varlen: bool,
                    device: torch.device | None) -> tuple[int, int]:
    """How many segments each walk is cut into and how many chunks each segment walks (`_segments`, `_cut`;
    packed sequences walked whole)."""
    return _cut(n_chunks, 1 if is_varlen else _segments(n_chunks, walks, K, V, device))


def _seed_count(B: int, T: int, H: int, K: int, V: int, dtype: torch.dtype, cu_seqlens: Tensor | None,
                device: torch.device, chunk: int) -> int:
    """Seeds a forward without saved states leaves for the backward: one per segment of each walk when cut (the
    one-pass forward's cut, `_one_pass_segments`, where it runs; else the states walk's, `_segments`)."""
    if cu_seqlens is not None or _small_heads(K, V):
        return 0
    n_chunks = _cdiv(T, chunk)
    one_pass_segments = _one_pass_segments(B, H, K, V, dtype, cu_seqlens, device)
    if one_pass_segments > 1:
        n_segments, _ = _cut(n_chunks, one_pass_segments)
    else:
        n_segments, _ = _segment_layout(n_chunks, B * H, K, V, False, device)
    return B * H * n_segments if n_segments > 1 else 0


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
        n_chunks = _cdiv(T, layout.chunk)
        if n_segments is None:
            self.n_segments, segment_chunks = _segment_layout(n_chunks, walks, K, V, layout.is_varlen, device)
        else:  # the one-pass forward's own cut (`_one_pass_segments`)
            self.n_segments, segment_chunks = _cut(n_chunks, n_segments)
        self.carries_seeds = carry == "seeds"
        self.seeded = carry == "seeded" and self.n_segments > 1
        self.segmented = self.n_segments > 1 and not self.seeded
        self.segment_chunks = segment_chunks if self.n_segments > 1 else 2**30  # one walk, any length
        self.tiles = _tiles(kernel, K, V, dtype, walks * self.n_segments, device, layout.chunk, layout.is_varlen,
                            dv_in_walk)
        self.grid = (_state_programs(K, V, self.tiles, walks * self.n_segments),)
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


def _block(n: int) -> int:
    """Tile width for a head dim: a power of two, at least 16 (the matmul minimum)."""
    return max(16, _next_power_of_2(n))


def _forward_chunk(B: int, H: int, K: int, V: int, dtype: torch.dtype, cu_seqlens: Tensor | None,
                   device: torch.device | None, backward: bool) -> int:
    """The chunk of a forward: INFERENCE_CHUNK where no backward follows, for the two-pass forward of bfloat16
    heads of 128-wide tiles (the record shape, H100: 0.97 -> 0.87 ms at T 2K, 1.21 -> 1.02 at T 16K), else CHUNK.
    64-wide heads lose at 64 (the ViT's: 0.165 -> 0.177 ms); float16 and float32 stage float32 tiles in the output
    kernel that pass the 227 KiB of shared memory at 64 (sm_90a); 256-wide heads were not measured
    (kernels/HISTORY.md, ninth session); the one-pass forward (`_fused_forward`, cut: `_one_pass_segments`) spills
    at 64 (sixteenth)."""
    if (backward or dtype != torch.bfloat16 or _block(max(K, V)) != 128
            or _fused_forward(B, H, K, V, dtype, cu_seqlens, device)
            or _one_pass_segments(B, H, K, V, dtype, cu_seqlens, device) > 1):
        return CHUNK
    return INFERENCE_CHUNK


def _fused_forward(B: int, H: int, K: int, V: int, dtype: torch.dtype, cu_seqlens: Tensor | None,
                   device: torch.device) -> bool:
    """Whether the forward runs as one pass (`_fwd_fused_kernel`) rather than the states and output passes: for
    bfloat16 heads up to 64 wide, where the walks alone fill the GPU (more than 4 programs per 3 SMs, so no walk is
    cut into segments), of equal lengths (a packed batch's longest sequence would bound it). A forward that keeps
    chunk states for the backward stores them from the registers. The ViTs' no-grad forward: 0.155 -> 0.125 ms at
    T 256, 0.254 -> 0.111 at T 196; their training f+b 0.514 -> 0.498 (H100, twelfth session). 64-wide heads of an
    LM (T 2K, H 16), two-pass -> one-pass (H100, fourteenth session): at 1.94 programs per SM (B 16) f+b 1.326 ->
    1.254 ms and no-grad forward 0.396 -> 0.307, at 1.45 (B 12) 1.061 -> 1.053 and 0.326 -> 0.305, but at 1.21
    (B 10) 0.934 -> 0.952 and 0.295 -> 0.301. 128-wide heads, one 8-warp program per walk, from about one such
    program per SM (sixteenth session, triton 3.8, H200, H 16): at T 1K, 2K and 4K (B 32, 16, 8) the no-grad
    forward 0.78 -> 0.72 ms, f+b 2.83 -> 2.78 at T 2K (2.90 -> 2.80 at T 4K), with recomputed states 3.17 -> 3.09;
    under triton 3.6 they lost (0.86 -> 0.98 at T 2K, twelfth session). Below one program per SM each walk's chain
    of chunk steps is too long (T 8K, and cut walks at T 16K). float16 and 256-wide heads would spill (sm_90a),
    float32 by kilobytes a thread."""
    if cu_seqlens is not None or dtype != torch.bfloat16 or _small_heads(K, V):
        return False
    if _block(max(K, V)) <= 64:
        return 3 * _wide_tile_programs(B * H, K, V) > 4 * _sm_count(device)
    return _block(K) == _block(V) == 128 and 32 * B * H >= 31 * _sm_count(device)


def _one_pass_segments(B: int, H: int, K: int, V: int, dtype: torch.dtype, cu_seqlens: Tensor | None,
                       device: torch.device | None) -> int:
    """Into how many segments the one-pass forward cuts each walk where the walks alone would leave at least half
    the SMs idle: bfloat16 128-wide heads of equal lengths, which `_fused_forward` leaves to the two-pass forward.
    As many as give each SM one program (a short sequence gets at most one a chunk, `_Walks`). 1: not cut (the
    one-pass or the two-pass forward).
    - Without a backward each segment runs from zero and `_fwd_seed_kernel` adds the seeds to its outputs (H100,
      twenty-sixth session: T 8K 0.86 -> 0.68 ms, T 16K 0.87 -> 0.74 against the two-pass forward).
    - With one, the chunk states and scores must be exact as they are written: the segments' ends
      (`_segment_ends_kernel`) and the carry pass find the seeds first, then each segment starts from its
      own. The forward then keeps its scores, and the dh walk, cut and seeded the same way, takes dv from them
      (`_scores_kept`). Against the two-pass forward, the carry passes rewriting its states and dv in the grads
      kernel (H100, kernel ms, twenty-eighth session): f+b at T 8K 3.18 -> 3.10, at T 16K 3.65 -> 3.11; with
      recomputed states 3.65 -> 3.34 and 3.75 -> 3.34."""
    if (cu_seqlens is not None or dtype != torch.bfloat16 or _block(K) != 128 or _block(V) != 128
            or _fused_forward(B, H, K, V, dtype, cu_seqlens, device)):
        return 1
    return max(1, _sm_count(device) // (B * H))


def _scores_kept(B: int, H: int, K: int, V: int, dtype: torch.dtype, cu_seqlens: Tensor | None,
                 device: torch.device) -> bool:
    """Whether a forward that a backward follows keeps its intra-chunk scores (bf16 [C, C] a chunk and head, 1/16
    of a 128 x 128 chunk state) for the dh walk, which then takes dv from them and from the state gradient in its
    registers, and the grads kernel skips dv: where the forward is the one-pass one and the dh walk holds the whole
    K (128-wide heads walk the whole state then, `_tiles`). Where the one-pass forward is cut into segments, the dh
    walk is cut the same way, seeded (`_one_pass_segments`). H100, triton 3.8, kernel ms, two
    rounds in one call against the kernels before (kernels/HISTORY.md, nineteenth session):
    - record shape, T 2K: grads 1.61 -> 1.27, dh walk 0.47 -> 0.66, one-pass forward 0.670 -> 0.695; f+b 2.76 ->
      2.64 (2.62 in `benchmarks/scan.py`); T 1K (B 32): 2.94 -> 2.81; T 4K (B 8): 2.80 -> 2.63;
    - vit_small (B 256, T 256, H 6, K 64): grads 0.485 -> 0.391, dh 0.142 -> 0.208; f+b 0.83 -> 0.80.
    The dh walk computing the scores itself instead lost the gain (record: the walk 0.83 ms, f+b a tie; vit_small
    0.83 -> 0.85), and so did 128 x 64 state tiles (T 1K and 4K: f+b 3.27 and 3.09). 64-wide heads whose walk
    split K into 32 x 64 tiles without dv gain too from whole-K 64 x 64 tiles with it (twentieth session): the
    ViT-tiny (B 256, T 256, H 3) f+b 0.444 -> 0.419 ms, at T 196 0.390 -> 0.370, 64-wide LM heads (T 2K, B 16, H 16)
    1.100 -> 1.050. These A/B pairs ran the grads kernel with its pipelining race (`_tiles`). Race-free
    (OWN_MMA_LOADS), dv still belongs in the walk (twenty-first session, f+b without -> with it): record 2.95 ->
    2.70, T 1K 3.14 -> 2.90, T 4K 2.99 -> 2.71, heads64 1.18 -> 1.07, ViT-tiny 0.475 -> 0.424, vit_small 0.889 ->
    0.812."""
    if not (_fused_forward(B, H, K, V, dtype, cu_seqlens, device)
            or _one_pass_segments(B, H, K, V, dtype, cu_seqlens, device) > 1):
        return False
    return _tiles("dh", K, V, dtype, B * H, device, dv_in_walk=True)["BK"] >= K


GLUON_GRADS = False
"""Whether the backward's chunk-parallel gradients take the Gluon kernel (kernels/gluon_scan_grads.py) where it
applies, instead of `_bwd_kernel`'s anchored launch. Off until it is measured faster on the H100: its last version
took 1.144 ms on an H200 against the Triton kernel's 1.33 there, but an earlier one ran 22% slower on the H100 than
on the H200 (1.74 against 1.42), where the Triton kernel takes 1.33 on both (record shape, kernel time;
kernels/HISTORY.md, thirty-second session). Set by benchmarks/scan_shapes.py (`--gluon-grads`) and by the tests
that run it."""

TILE_OVERRIDES: dict[str, dict] = {}
"""Replaces entries of `_tiles` per kernel name; set only by benchmarks/scan_sweep.py, which times alternatives."""


def _tiles(kernel: str, K: int, V: int, dtype: torch.dtype, walks: int = 0, device: torch.device | None = None,
           chunk: int = CHUNK, packed: bool = False, dv_in_walk: bool = False, backward: bool = True) -> dict:
    """Tile sizes and launch options of one kernel ("states", "output", "dh", "grads", "fused", "seed"; "states_ends"
    and "dh_ends", `_segment_ends_kernel` for a seeded walk's seeds, take their walk's tiles and overrides of their own)
    for a head size and input dtype; the sequential kernels (states, dh) also depend on how many (sequence, head)
    `walks` share the GPU's SMs and whether they are `packed` (of unequal lengths); they and the output kernel on the
    `chunk`; the dh walk and the grads kernel on whether the walk writes dv (`dv_in_walk`, `_scores_kept`); the one-pass
    forward on whether a `backward` follows.
    Chosen by benchmarks/scan_sweep.py on the H100 (kernels/HISTORY.md, "v3.1 on the H100"):
    - states and dh run one program per (walk, K block, V block), up to 128 values of V wide: every V block
      computes the gate of its K block again, so the widest V block pays, with 4 warps (kernels/HISTORY.md, seventh
      session: at the record shape states 0.54 -> 0.40 ms, dh 0.65 -> 0.56 at T 2K against 64 x 64 tiles). A
      64-wide K block while the 64 x 64 tiles would give at least 2 programs per SM (T 2K, B 16; and cut walks,
      `_segments`), a 32-wide one below it (T 8K, B 4; measured on the whole walks of T 16K, B 2: states 1.14 ->
      1.03, dh 1.12 -> 1.08), where otherwise most SMs wait. 64-wide heads take 64 x 64 tiles of 2 warps
      from 8 such programs per SM (vit_small's 1,536 walks: dh 0.148 ms against 0.164 with 32 x 64), 32 x 64
      ones of 2 from 2 to 8 (the ViT's 768 walks: states 0.073 -> 0.060 ms, dh 0.092 -> 0.083; twelfth
      session), of 4 below.
    - 128-wide heads of equal lengths in 16-bit at chunk 32 take the whole state in one 4-warp program per walk
      where those fill the SMs in one wave of at most two per SM: each walk then computes its gate once (T 2K,
      B 16: states 0.417 -> 0.339 ms, dh 0.442 -> 0.421, triton 3.8 on the H200; sixteenth session). With more
      programs than that (T 1K: a tie), fewer (T 4K: 0.39 -> 0.51), packed walks (0.42 -> 0.55), 64-wide heads
      (dh 0.19 -> 0.21), chunk 64 (the no-grad forward 0.79 -> 0.90) or float32 inputs (60% of the instructions
      spills) they lose. A dh walk that also writes dv (`dv_in_walk`, `_scores_kept`) takes the whole state whatever
      the number of walks: with 8 warps at K 128 (at 4 it spills 384 bytes), with 4 at K 64 (ViT-tiny's 768 walks:
      dh 0.128 ms with 2 warps, 0.105 with 4; vit_small's 1,536 a tie, 0.209 -> 0.204; twentieth session).
    - The dh walk pipelines 3 stages deep, and so does the states walk where its 64 x 64 tile programs would be
      fewer than four per SM (T 8K, 256 of them; T 16K's cut walks, 512; the twenty-sixth session kept 3 for fewer
      than two, which left T 16K at 2, twenty-seventh). H100, triton 3.8, twenty-sixth session, ms per call
      from 2 stages to 3: dh 0.667 -> 0.589 at T 2K, 0.669 -> 0.597 at T 1000, 0.599 -> 0.480 at T 8K, 0.506 ->
      0.464 at T 16K, packed 0.693 -> 0.644, ViT-tiny 0.107 -> 0.086, vit_small 0.205 -> 0.165; states 0.542 ->
      0.442 at T 8K, 0.377 -> 0.324 at T 16K, but packed (1,024 programs) 0.433 -> 0.471. 4 stages won less.
      Float16, float32 and 256-wide heads, and the states walk of 64-wide heads (which runs only to rebuild the
      states, `recompute_states`, where their one-pass forward does not): not measured.
    - The segment ends of seeded walks (`_segment_ends_kernel`) take their walk's tiles and steps of one chunk
      (BT). H100, twenty-ninth session, both passes at T 8K (B 4): 0.48 ms; steps of 64 positions 0.51, of 128
      0.99; 128 x 128 tiles of 8 warps 0.69, 32 x 128 0.75, 64 x 64 0.74; 8 warps 0.65; 2 stages 0.62.
    - output and grads hold the whole K: 8 warps where a [C, K] tile is 128 wide (with four, the grads
      kernel's tiles spill, ptxas -v), except the output kernel of bfloat16 inputs, fastest with a 128-wide
      V block and 4 warps (float16 holds its states in float32 there: 255 registers, not measured), capped at
      168 registers at chunk 32 for three programs per SM (0.516 -> 0.471 ms at the record shape with triton 3.8,
      0.554 -> 0.519 with 3.6; at chunk 64 it spills and the no-grad forward doubles). At chunk 64 (the no-grad
      forward, whose walks are never cut there: `_one_pass_segments` takes them first) a 64-wide V block (H100,
      triton 3.8, twenty-fifth session, per call: T 8K 0.54 -> 0.47 ms; where it also added the seeds of cut walks
      it lost, T 16K 0.58 -> 0.81: 160 KiB of shared memory, one program per SM). The grads
      kernel of 64-wide heads takes a 32-wide V block since its q and gate copies are chunk-major (the ViT's
      shape: 0.297 -> 0.270 ms, with the gate held or not; kernels/HISTORY.md, eleventh session). No
      software pipelining at K 256, whose staged tiles would pass the 227 KiB of shared memory, and where the
      grads kernel's state tiles are float32 (float32 and float16 inputs) at K 256 a 32-wide V block there (302
      KiB at 64); the grads kernel of bfloat16 pipelines only with loads of its own for the tensor cores (a race
      otherwise, in the code below)."""
    overrides = TILE_OVERRIDES.get(kernel, {})
    if kernel.endswith("_ends"):  # positions a step (`_segment_ends_kernel`)
        overrides = {"BT": chunk, **overrides}
    kernel = kernel.removesuffix("_ends")
    BK, BV = _block(K), min(64, _block(V))
    wide = {"num_warps": 8 if BK >= 128 else 4, "num_stages": 1 if BK >= 256 else 3}
    walk_BV = min(128, _block(V))
    whole_state_programs = walks * _cdiv(V, walk_BV)
    walk_stages = 3 if kernel == "dh" or _wide_tile_programs(walks, K, V) < 4 * _sm_count(device) else 2
    if kernel == "dh" and dv_in_walk and BK in (64, 128):
        tiles = dict(BK=BK, BV=walk_BV, num_warps=8 if BK == 128 else 4, num_stages=walk_stages)
    elif (kernel in ("states", "dh") and BK == 128 and dtype != torch.float32 and chunk == CHUNK and not packed
            and _sm_count(device) < whole_state_programs <= 2 * _sm_count(device)):
        tiles = dict(BK=BK, BV=walk_BV, num_warps=4, num_stages=walk_stages)
    elif kernel in ("states", "dh") and _wide_tile_programs(walks, K, V) >= 2 * _sm_count(device):
        wide_v = walk_BV >= 128
        split_k = not wide_v and _wide_tile_programs(walks, K, V) < 8 * _sm_count(device)
        tiles = dict(BK=min(32 if split_k else 64, BK), BV=walk_BV, num_warps=4 if wide_v else 2,
                     num_stages=walk_stages)
    elif kernel in ("states", "dh"):
        tiles = dict(BK=min(32, BK), BV=walk_BV, num_warps=4, num_stages=walk_stages)
    elif kernel == "output" and BK <= 128 and dtype == torch.bfloat16:
        tiles = dict(BK=BK, BV=min(128 if chunk == CHUNK else 64, _block(V)), num_warps=4, num_stages=3)
        if chunk == CHUNK:
            tiles["maxnreg"] = 168
    elif kernel == "output":
        tiles = dict(BK=BK, BV=BV, **wide)
    elif kernel == "seed":  # the best of 8 at T 8K and 16K (H100, twenty-sixth session): 0.124 and 0.180 ms
        tiles = dict(BK=BK, BV=BV, num_warps=4, num_stages=2)
    elif kernel == "fused" and BK == 128:  # one program per walk: 0.76 ms at T 2K against 1.32 with two of 64
        # Without grad 3 stages win (T 2K 0.56 -> 0.48, cut walks at T 8K 0.55 -> 0.48; the kernel's loop says why);
        # storing the chunk states and scores for the backward they lose (0.66 -> 0.71; twenty-sixth session).
        tiles = dict(BK=BK, BV=walk_BV, num_warps=8, num_stages=2 if backward else 3)
    elif kernel == "fused":  # 3 stages under triton 3.8 (H100, training forward): ViT 0.105 -> 0.099 ms, heads64
        tiles = dict(BK=BK, BV=BV, num_warps=4, num_stages=3)  # 0.267 -> 0.237; 2 won under 3.6 (sixteenth)
    elif kernel == "grads":
        if BK == 64:
            BV = min(32, BV)
        elif BK >= 256 and dtype != torch.bfloat16:
            BV //= 2
        tiles = dict(BK=BK, BV=BV, HOLD_GATE=dtype != torch.float32, OWN_MMA_LOADS=False, **wide)
        # Where its chunk states are bfloat16 (K 64, 128), triton 3.8 pipelines the V loop's tiles, which also have
        # register users, with one slot too few and lets the async wgmma read that slot while the loop refills it
        # (`wgmma_refill_races` in tests/kernels/sm90_launches.py): at 3 stages the gate gradients were off by 2e-2
        # to 5e-2, at 2 the record shape's gradients differed bitwise from run to run. OWN_MMA_LOADS gives the
        # wgmmas loads of their own, and those get the slot. Against the unpipelined launch, the twentieth
        # session's fix (H100, kernels/HISTORY.md, twenty-first session): record f+b 2.89 -> 2.69 ms at 2 stages
        # (3 spill: 2.88), T 16K, where this kernel writes dv, 4.30 -> 4.15 at 3 (2: 4.21), ViT-tiny 0.465 -> 0.424
        # at 3 (2: 0.434).
        if dtype == torch.bfloat16 and BK in (64, 128):
            tiles.update(OWN_MMA_LOADS=True, num_stages=2 if BK == 128 and dv_in_walk else 3)
    else:
        raise ValueError(f"no tiles for kernel {kernel!r}")
    return {**tiles, **overrides}


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


def _state_slots(B: int, T: int, cu_seqlens: Tensor | None, chunk: int) -> int:
    """Rows of the chunk-state buffer: every chunk's start and each sequence's end. For packed sequences an upper
    bound from shapes alone (sum ceil(L / C) <= T / C + N), so nothing waits on the GPU."""
    if cu_seqlens is None:
        return B * (_cdiv(T, chunk) + 1)
    n_sequences = cu_seqlens.shape[0] - 1
    return T // chunk + 2 * n_sequences


class _Layout:
    """Where each sequence's chunks of `chunk` tokens and chunk states live: arithmetic for equal lengths, tables
    for packed."""

    def __init__(self, B: int, T: int, cu_seqlens: Tensor | None, device: torch.device, chunk: int = CHUNK):
        self.is_varlen, self.chunk = cu_seqlens is not None, chunk
        if not self.is_varlen:
            self.n_sequences = B
            n_chunks = _cdiv(T, chunk)
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
    if _small_heads(K, V):  # no seeds: a backward without kept states walks them again itself
        states = _empty(layout.n_states if save_states else 0, H, K, V, dtype=_wide_dtype(q, K, V),
                        device=q.device)
        with torch.cuda.device(q.device.index) if q.is_cuda else nullcontext():
            _small_fwd_kernel[(N * H,)](
                q, f, v, bound, h0, o, final, states, layout.cu_seqlens, layout.state_offsets, q.stride(1),
                f.stride(1), v.stride(1), scale, T, H=H, K=K, V=V, C=chunk, HAS_BOUND=lower_bound is not None,
                HAS_H0=initial_state is not None, OUTPUT_FINAL=output_final_state, STORE_STATES=save_states,
                IS_VARLEN=layout.is_varlen, REVERSE=reverse, **_small_head_tiles(K, V),
            )
        return o, final, states, q.new_empty(0, K, V, dtype=_wide_dtype(q, K, V)), _no_scores(q, chunk)
    one_pass_segments = _one_pass_segments(B, H, K, V, q.dtype, cu_seqlens, q.device)
    if one_pass_segments > 1 or _fused_forward(B, H, K, V, q.dtype, cu_seqlens, q.device):
        states = _empty(layout.n_states if save_states else 0, H, K, V, dtype=_wide_dtype(q, K, V), device=q.device)
        keep_scores = backward and _scores_kept(B, H, K, V, q.dtype, cu_seqlens, q.device)
        scores = _empty(layout.n_chunks if keep_scores else 0, H, chunk, chunk, dtype=q.dtype, device=q.device)
        common = _constexprs(q, v, lower_bound, layout, reverse)
        # A cut walk's segments hand on their ends as the states walk's do (its tiles for the carry pass). Without
        # a backward they run from zero and the seeds are added to their outputs afterwards; with one they start
        # from seeds found first (`_one_pass_segments`).
        walks = _Walks("states_ends" if backward else "states", layout, T, H, K, V, q.dtype, q.device, "seeds",
                       n_segments=one_pass_segments)
        seeded = backward and walks.segmented
        seeds = _empty(N * H * walks.n_segments if walks.segmented else 0, K, V, dtype=states.dtype, device=q.device)
        tiles = _tiles("fused", K, V, q.dtype, backward=backward)
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
                _fwd_fused_kernel[(_state_programs(K, V, tiles, N * H * walks.n_segments),)](
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
                    **_tiles("seed", K, V, q.dtype), **common,
                )
        # The backward rebuilds chunk states it was not given from the seeds (`scan_states`).
        seeds = seeds if seeded and not save_states else q.new_empty(0, K, V, dtype=states.dtype)
        return o, final, states, seeds, scores
    # The output pass reads the chunk states back: they are stored even when the backward will not need them.
    # States kept for the backward must be exact; otherwise cut walks leave them local, and seeds to add.
    states = _empty(layout.n_states, H, K, V, dtype=_wide_dtype(q, K, V), device=q.device)
    # Seeds in the states' type: every output program of a segment reads its seed again (from L2), and float32
    # seeds made the output kernel 44% slower (record shape, T 16K: 0.81 ms against 0.56; bfloat16 0.67).
    seeds = _empty(0 if save_states else _seed_count(B, T, H, K, V, q.dtype, cu_seqlens, q.device, chunk), K, V,
                   dtype=states.dtype, device=q.device)
    common = _constexprs(q, v, lower_bound, layout, reverse)
    with torch.cuda.device(q.device.index) if q.is_cuda else nullcontext():
        walks = _store_states(f, v, bound, h0, states, final, layout, common, initial_state is not None,
                              output_final_state, seeds, "rewrite" if save_states else "seeds")
        # At chunk 64 the fallback's code inline spills (592 bytes a thread at K 128, sm_90a): two launches, as the
        # grads kernel's (`_fallback_flags`); at 32 one, where a second launch would cost more than it saves.
        launches = (ONE_LAUNCH,) if chunk == CHUNK else (ANCHORED_LAUNCH, FALLBACK_LAUNCH)
        flags = _fallback_flags(layout, H, q.device) if len(launches) > 1 else dummy
        for launch in launches:
            _fwd_output_kernel[(layout.n_chunks, H)](
                q, f, v, bound, states, o, walks.chunk_decays, seeds, flags, layout.cu_seqlens, layout.state_offsets,
                layout.chunk_table, q.stride(1), f.stride(1), v.stride(1), scale, T, walks.n_segments,
                walks.segment_chunks, SEEDED=walks.segmented and walks.carries_seeds, LAUNCH=launch,
                **_tiles("output", K, V, q.dtype, chunk=chunk), **common,
            )
    if not save_states:  # a fresh empty tensor: a view would keep the whole buffer alive
        states = _empty(0, H, K, V, dtype=states.dtype, device=q.device)
    seeds = seeds if backward else q.new_empty(0, K, V, dtype=seeds.dtype)  # only a backward reads them
    return o, final, states, seeds, _no_scores(q, chunk)


def _gluon_segments(B: int, H: int, device: torch.device | None) -> int:
    """Into how many segments the Gluon forward cuts each walk (`_warp_specialized`): as many as give each SM one
    program (a short sequence gets at most one a chunk, `_Walks`)."""
    return max(1, _sm_count(device) // (B * H))


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
    layout = _Layout(B, T, None, q.device, CHUNK)
    cut = _Walks("states", layout, T, H, K, V, q.dtype, q.device, "seeds", n_segments=_gluon_segments(B, H, q.device))
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
                **_tiles("seed", K, V, q.dtype), **common,
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
    tiles = _tiles("fused", K, V, q.dtype, backward=backward)
    dummy = q.new_empty(0)
    given = lambda x: dummy if x is None else x
    _fwd_fused_kernel[(_state_programs(K, V, tiles, B * H),)](  # whole walks: no segment's buffers
        q, f, v, bound, given(h0), o, given(final), given(states), given(scores), dummy, dummy, dummy, dummy, flags,
        layout.cu_seqlens, layout.state_offsets, q.stride(1), f.stride(1), v.stride(1), scale, T, 1,
        _cdiv(T, CHUNK), HAS_H0=h0 is not None, OUTPUT_FINAL=final is not None, STORE_STATES=states is not None,
        STORE_SCORES=scores is not None, SEGMENTED=False, SEEDED=False, ONLY_FLAGGED=True, **tiles, **common,
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
    n_seeds = 0 if save_states or not backward else _seed_count(B, T, H, K, V, q.dtype, cu_seqlens, q.device, chunk)
    n_scores = B * _cdiv(T, chunk) if backward and _scores_kept(B, H, K, V, q.dtype, cu_seqlens, q.device) else 0
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
    n_states = _state_slots(B, T, cu_seqlens, CHUNK)
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
    if _small_heads(K, V):
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
        n_segments = _one_pass_segments(B, H, K, V, q.dtype, cu_seqlens, q.device) if dv_in_walk else None
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
        if GLUON_GRADS and dv_in_walk and gluon_scan_forward.applies(K, V, q.dtype, cu_seqlens, reverse, q.device):
            # the anchored launch's work by the Gluon kernel, which flags the chunks it leaves to the fallback
            gluon_scan_grads.grads(q, f, v, do, None if lower_bound is None else bound, states, dstates, dq, df,
                                   db_chunks, flags, scale, _sm_count(q.device))
            launches = (FALLBACK_LAUNCH,)
        for launch in launches:
            _bwd_kernel[(layout.n_chunks, H)](
                q_by_time, f_by_time, v, do, bound, states, dstates, dq, df, dv, db_chunks, flags, layout.cu_seqlens,
                layout.state_offsets, layout.chunk_table, v.stride(1), scale, T,
                **_tiles("grads", K, V, q.dtype, dv_in_walk=dv_in_walk), ANCHORED_DT=tl.float32,
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
            IS_VARLEN=layout.is_varlen, REVERSE=reverse, **_small_head_tiles(K, V),
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
    if ctx.recompute_states and not _small_heads(q.shape[-1], v.shape[-1]):
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
        _forward_chunk(B, H, K, i.shape[-1], q.dtype, cu_seqlens, q.device, backward=needs_grad), needs_grad,
    )
    return o, (final if output_final_state else None)
