"""Which launches the Triton scan takes for a shape and a GPU (kernels/triton_scan.py launches them): the chunk
lengths, which forward runs, how the sequential walks are cut into segments, and each kernel's tiles and launch
options. Each choice names what it was measured against (kernels/HISTORY.md has every measurement)."""

import functools

import torch
from torch import Tensor

CHUNK = 32
"""Tokens per chunk of the training scan (the forward that keeps or rebuilds states for a backward, and the
backward): at 64 the grads kernel's [C, K] tiles spill (kernels/HISTORY.md, v1 and v2)."""
INFERENCE_CHUNK = 64
"""Tokens per chunk of a forward no backward follows, where `_forward_chunk` says: half the chunk states to write
and read back."""

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
"""Replaces entries of `_tiles` per kernel name; set only by benchmarks/scan_sweep.py and scan_shapes.py (`--tiles`),
which time alternatives."""


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


def _gluon_segments(B: int, H: int, device: torch.device | None) -> int:
    """Into how many segments the Gluon forward cuts each walk (`_warp_specialized`): as many as give each SM one
    program (a short sequence gets at most one a chunk, `_Walks`)."""
    return max(1, _sm_count(device) // (B * H))
