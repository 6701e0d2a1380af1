"""Times each scan kernel over alternative tile sizes and launch options, to choose
`kernels.triton_scan_dispatch._tiles`.

At the record shape (H 16, K = V = 128, bf16, 32768 tokens) for each length of --lengths, every candidate
of CANDIDATES replaces one kernel's launch (`TILE_OVERRIDES`), and that kernel's own GPU time per call is
read from torch.profiler over forward + backward (or a forward without grad). The sequential kernels'
parallelism depends on B (T 16K leaves B = 2), the chunk-parallel ones' does not: the best launch is reported
per length. Each candidate's outputs and gradients are compared with the default launch's: a tiling changes
only the order of float sums, so they must agree to bf16 rounding.
A candidate that does not fit the GPU (registers, shared memory) is recorded as such.

    python benchmarks/scan_sweep.py [--lengths 2048 16384] [--out benchmarks/results]
    python benchmarks/scan_sweep.py --tokens 65536 --lengths 256 --heads 3 --head-dim 64 --kernels output grads
                                    # the ViT-tiny's scans (B 256, T 256, three 64-wide heads); with
                                    # --kernels fused, their one-pass forward
    python benchmarks/scan_sweep.py --no-grad --kernels states output
                                    # the forward without grad, at its own chunk (`_forward_chunk`: 64 for the
                                    # two-pass bf16 forward of 128-wide heads) and launches
    python benchmarks/scan_sweep.py --smoke     CPU interpreter, tiny shape, two launches per kernel
"""

import argparse
import itertools
import json
import sys
from datetime import date
from pathlib import Path

import torch
import triton

from kernels import triton_scan_dispatch as dispatch
from kernels import hgrn2_scan

sys.path.insert(0, str(Path(__file__).resolve().parent))
from scan import kernel_ms, relative  # noqa: E402  (benchmarks/ is not a package)

KERNEL_NAMES = {"states": "_fwd_states_kernel", "output": "_fwd_output_kernel", "dh": "_bwd_dh_kernel",
                "grads": "_bwd_kernel", "fused": "_fwd_fused_kernel", "seed": "_fwd_seed_kernel",
                # the segment ends that a seeded walk's seeds come from (`_one_pass_segments`: T 8K, 16K in
                # training), forward and backward, are one Triton kernel: their rows time both, the other at its own
                # tiles
                "states_ends": "_segment_ends_kernel", "dh_ends": "_segment_ends_kernel"}
FORWARD_KERNELS = {"states", "output", "fused", "seed"}


def _grid(**axes) -> list[dict]:
    return [dict(zip(axes, values)) for values in itertools.product(*axes.values())]


# The walks' V blocks each compute the gate of their K block again: a wider V block computes it for more of the
# state, but leaves fewer programs to hide each chunk step's latency.
WALK_CANDIDATES = (_grid(BK=[32, 64], BV=[32, 64], num_warps=[2, 4], num_stages=[2, 3])
                   + _grid(BK=[32, 64, 128], BV=[128], num_warps=[4, 8], num_stages=[2, 3]))
# The 128-wide whole-state programs (the dh walk that writes dv, the one-pass forward) take 255 registers at 8
# warps: one program per SM, each chunk step's chain of products waited on alone. Capped at 128 (sm_90a: dh spills
# 492 bytes, the one-pass forward 780), two programs per SM could overlap their chains.
TWO_PER_SM = _grid(BK=[128], BV=[128], num_warps=[8], num_stages=[2], maxnreg=[128])
CANDIDATES = {
    "states": WALK_CANDIDATES,
    "states_ends": WALK_CANDIDATES,
    "dh_ends": WALK_CANDIDATES,
    "dh": WALK_CANDIDATES + TWO_PER_SM,
    # maxnreg caps registers per thread so that more programs share an SM, at the price of spills: ptxas
    # (sm_90a) gives the output kernel 168 with 36 bytes (three 4-warp programs instead of two) or 128 with 264.
    # The grads kernel of bfloat16 pipelines only with OWN_MMA_LOADS (a race otherwise, `_tiles`); at 2 stages its
    # tiles then take 120 KiB of shared memory, too much for two 8-warp programs per SM, so capping its registers
    # no longer pays. The first sweep's losers (grads at BV 32 or 4 warps: 2-5x slower) are left out.
    "output": _grid(BV=[64, 128], num_warps=[4, 8], num_stages=[2, 3])
    + _grid(BV=[128], num_warps=[4], num_stages=[3], maxnreg=[128, 168]),
    "grads": _grid(BV=[64], num_warps=[8], num_stages=[1], OWN_MMA_LOADS=[False], HOLD_GATE=[True, False])
    + _grid(BV=[64], num_warps=[8], num_stages=[2, 3], OWN_MMA_LOADS=[True], HOLD_GATE=[True, False]),
    # The one-pass forward of 128-wide heads holds the whole state in one 8-warp program's registers (255 of them at
    # BV 64 too, sm_90a); 3 stages compile without spills.
    "fused": _grid(BV=[64, 128], num_warps=[8], num_stages=[2, 3]) + TWO_PER_SM,
    # The cut one-pass forward's second pass (`_one_pass_segments`: T 8K, 16K without grad)
    "seed": _grid(BV=[64, 128], num_warps=[4, 8], num_stages=[2, 3]),
}
SMALL_HEAD_CANDIDATES = {  # K <= 64 (the ViTs' heads): [32, 64] tiles, so fewer warps and holding the gate may pay
    **CANDIDATES,
    "dh": WALK_CANDIDATES,
    "output": _grid(BV=[64], num_warps=[2, 4, 8], num_stages=[2, 3]),
    "grads": _grid(BV=[32, 64], num_warps=[4, 8], num_stages=[1], OWN_MMA_LOADS=[False], HOLD_GATE=[True, False])
    + _grid(BV=[32, 64], num_warps=[4, 8], num_stages=[2, 3], OWN_MMA_LOADS=[True], HOLD_GATE=[True, False])
    # 4 warps: 255 registers, so 2 programs per SM; at 128 (3 or 4 per SM by shared memory) ptxas spills.
    + _grid(BV=[32], num_warps=[4], num_stages=[2, 3], OWN_MMA_LOADS=[True], maxnreg=[128, 168]),
    # The one-pass forward, which replaces states and output for many walks of these heads (`_fused_forward`).
    "fused": _grid(BV=[32, 64], num_warps=[2, 4, 8], num_stages=[1, 2, 3]),
}


def training_step(B: int, T: int, H: int, K: int, dtype: torch.dtype, device: str):
    """fwd + bwd of the scan on fixed random inputs; returns the output and every gradient."""
    torch.manual_seed(0)
    q, f, i = (torch.randn(B, T, H, K, device=device, dtype=dtype, requires_grad=True) for _ in range(3))
    b = (torch.rand(H, K, device=device) * 0.5 + 0.25).requires_grad_()
    do = torch.randn(B, T, H, K, device=device, dtype=dtype)

    def step() -> list[torch.Tensor]:
        o, _ = hgrn2_scan(q, f, i, b, backend="triton")
        return [o.detach(), *torch.autograd.grad(o, (q, f, i, b), do)]

    return step


def forward_step(B: int, T: int, H: int, K: int, dtype: torch.dtype, device: str):
    """The scan's forward without grad on fixed random inputs; returns the output."""
    torch.manual_seed(0)
    q, f, i = (torch.randn(B, T, H, K, device=device, dtype=dtype) for _ in range(3))
    b = torch.rand(H, K, device=device) * 0.5 + 0.25

    def step() -> list[torch.Tensor]:
        with torch.no_grad():
            return [hgrn2_scan(q, f, i, b, backend="triton")[0]]

    return step


def sweep(kernel: str, candidates: list[dict], step, timed: bool) -> list[dict]:
    """One row per candidate: its launch, the kernel's milliseconds per call (timed runs), its largest
    relative difference from the default launch, or why it failed."""
    reference = step()
    rows = []
    for candidate in candidates:
        dispatch.TILE_OVERRIDES[kernel] = candidate
        row = dict(candidate)
        try:
            outputs = step()
            row["max_rel_diff"] = max(relative(a, b) for a, b in zip(outputs, reference))
            if timed:
                row["ms"] = kernel_ms(step).get(KERNEL_NAMES[kernel])
        except Exception as error:  # a launch that does not fit this GPU is a result, not a crash
            row["error"] = f"{type(error).__name__}: {str(error).splitlines()[0][:200]}"
        finally:
            dispatch.TILE_OVERRIDES.clear()
        rows.append(row)
        print(kernel, row, flush=True)
    return rows


def best(rows: list[dict]) -> dict | None:
    """The fastest candidate among those that ran and agree with the default launch."""
    timed = [row for row in rows if row.get("ms") is not None and row["max_rel_diff"] < 1e-2]
    return min(timed, key=lambda row: row["ms"], default=None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=32768)
    parser.add_argument("--lengths", type=int, nargs="+", default=[2048, 16384])
    parser.add_argument("--chunk", type=int, default=dispatch.CHUNK, help="the kernels' chunk length C")
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--kernels", nargs="+", default=["states", "output", "dh", "grads"],
                        choices=list(SMALL_HEAD_CANDIDATES),
                        help="fused: the one-pass forward, where `_fused_forward` picks it (bf16, many walks)")
    parser.add_argument("--no-grad", action="store_true",
                        help="time the forward without grad (states, output, fused) instead of forward + backward")
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--smoke", action="store_true", help="CPU interpreter, tiny shape, two launches per kernel")
    args = parser.parse_args()
    if args.no_grad and not set(args.kernels) <= FORWARD_KERNELS:
        parser.error(f"--no-grad times the forward's kernels only: pass --kernels from {sorted(FORWARD_KERNELS)}")
    device = "cpu" if args.smoke else "cuda"
    dispatch.CHUNK = args.chunk
    lengths = [40] if args.smoke else args.lengths
    dtype = torch.float32 if args.smoke else torch.bfloat16
    result = {"device": "cpu" if args.smoke else torch.cuda.get_device_name(), "date": date.today().isoformat(),
              "torch": torch.__version__, "triton": triton.__version__,
              "shape": {"tokens": args.tokens, "heads": args.heads, "head_dim": args.head_dim, "chunk": args.chunk},
              "no_grad": args.no_grad,
              "kernels": {}}
    for kernel in args.kernels:
        result["kernels"][kernel] = {"chunk": {}, "default": {}, "rows": {}, "best": {}}
        for T in lengths:
            B, H, K = (1, 1, 16) if args.smoke else (args.tokens // T, args.heads, args.head_dim)
            # The default launch is timed first: the one to beat. The sequential kernels' depends on how many walks
            # there are, counting the segments that few long walks are cut into.
            chunk = (dispatch._forward_chunk(B, H, K, K, dtype, None, torch.device(device), backward=False)
                     if args.no_grad else args.chunk)
            if kernel.endswith("_ends"):
                segments = dispatch._one_pass_segments(B, H, K, K, dtype, None, torch.device(device))
            else:
                segments, _ = dispatch._segment_layout(dispatch._cdiv(T, chunk), B * H, K, K, False,
                                                          torch.device(device))
            dv_in_walk = not args.no_grad and dispatch._scores_kept(B, H, K, K, dtype, None, torch.device(device))
            default = dispatch._tiles(kernel, K, K, dtype, B * H * segments, torch.device(device), chunk=chunk,
                                         dv_in_walk=dv_in_walk, backward=not args.no_grad)
            pool = SMALL_HEAD_CANDIDATES if K <= 64 else CANDIDATES
            candidates = [default] + [c for c in pool[kernel] if {**default, **c} != default]
            candidates = candidates[:2] if args.smoke else candidates
            step = (forward_step if args.no_grad else training_step)(B, T, H, K, dtype, device)
            rows = sweep(kernel, candidates, step, timed=not args.smoke)
            summary = result["kernels"][kernel]
            summary["chunk"][T], summary["default"][T], summary["rows"][T] = chunk, default, rows
            summary["best"][T] = best(rows)
            print(kernel, T, "default", default, "best", summary["best"][T], flush=True)
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        name = "cpu" if args.smoke else result["device"].replace("NVIDIA ", "").split()[0].lower()
        shape = "" if (args.heads, args.head_dim) == (16, 128) else f"-H{args.heads}-K{args.head_dim}"
        shape += "" if args.chunk == 32 else f"-C{args.chunk}"
        shape += "-no-grad" if args.no_grad else ""
        (out / f"scan-sweep-{name}{shape}.json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
