"""Compiles every Triton launch of the scan, decode and cross-entropy ops for an H100 (sm_90a) without a GPU.

The interpreter that runs the kernels in CI executes them as Python: it accepts code the compiler refuses
(a loop-carried name that changes type, for one) and knows nothing of registers or shared memory. Here the
ops run on CPU tensors with Triton's launch intercepted: each launch they would make (the kernel, its
argument types and the specialisation and launch options the dispatch chose) is compiled through Triton
and ptxas for sm_90a instead, and its SASS searched for global accesses of one 16-bit element. Run in a
process without TRITON_INTERPRET (tests/kernels/test_sm90_compile.py):

    python -m tests.kernels.sm90_launches [SHARD COUNT]   prints one JSON line per launch (of every COUNT-th
                                                          case from SHARD: processes that share the work)
"""

import json
import os
import re
import subprocess
import sys
import tempfile

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.runtime.jit import KernelInterface

SHARED_MEMORY_LIMIT = 227 * 1024
"""Bytes of shared memory one block may use on sm_90."""

_NAMES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
_TYPES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32", torch.int8: "i8", torch.int32: "i32",
          torch.int64: "i64"}


def record_launches(run) -> list[tuple]:
    """The (kernel, grid, arguments, keyword arguments) of every launch `run()` makes; none is executed."""
    launches = []
    original = KernelInterface.__getitem__
    KernelInterface.__getitem__ = lambda kernel, grid: lambda *args, **kwargs: launches.append(
        (kernel, grid, args, kwargs))
    try:
        run()
    finally:
        KernelInterface.__getitem__ = original
    return launches


def compile_launch(kernel, args, kwargs):
    """Compiles one recorded launch for sm_90a as the runtime would specialise it: pointers and multiples of 16
    marked 16-divisible, the constexprs and num_warps / num_stages the dispatch passed. Returns the compiled
    kernel and its launch options."""
    names = kernel.arg_names
    constexprs = {(names.index(name),): value for name, value in kwargs.items() if name in names}
    options = {name: value for name, value in kwargs.items() if name not in names}
    signature, attrs = {}, {}
    for index, (name, value) in enumerate(zip(names, args)):
        if isinstance(value, torch.Tensor):
            signature[name] = "*" + _TYPES[value.dtype]
            attrs[(index,)] = [["tt.divisibility", 16]]
        elif isinstance(value, float):
            signature[name] = "fp32"
        else:
            signature[name] = "i32"
            if value % 16 == 0:
                attrs[(index,)] = [["tt.divisibility", 16]]
    for name in names[len(args):]:
        signature[name] = "constexpr"
    source = ASTSource(kernel, signature, constexprs=constexprs, attrs=attrs)
    return triton.compile(source, target=GPUTarget("cuda", 90, 32), options=options), options


def compile_for_sm90(kernel, grid, args, kwargs) -> dict:
    """`compile_launch`, summed up: shared memory, 16-bit global accesses, the launch's options and head sizes."""
    compiled, options = compile_launch(kernel, args, kwargs)
    return {"kernel": kernel.__name__, "grid": list(grid), "shared_bytes": compiled.metadata.shared,
            "global_16bit_accesses": _global_16bit_accesses(compiled.asm["cubin"]),
            "wgmma_refill_races": wgmma_refill_races(compiled.asm["ttgir"]), **options,
            **{name: str(value) for name, value in kwargs.items() if name in ("K", "BK", "BV", "WIDE_DT")}}


def wgmma_refill_races(ttgir: str) -> list[str]:
    """The pipelined shared-memory buffers of a kernel's TTGIR that an asynchronous wgmma may still be reading when
    the loop refills the same slot: a race, undefined behaviour in PTX. Triton 3.8 gives a loop's pipelined tile
    only as many slots as loads in flight when the tile has register users besides a wgmma, yet lets the wgmma read
    the slot itself, and waits for it only when the loop's dots exceed `pendings`. The grads kernel had these
    (kernels/HISTORY.md, twentieth session: at 3 stages gate gradients off by 2e-2 to 5e-2 in bf16, at 2 the record
    shape's gradients differing bitwise from run to run)."""
    races = []
    lines = ttgir.splitlines()
    for buffer, slots in re.findall(r"(%\w+) = ttg.local_alloc : \(\) -> !ttg.memdesc<(\d+)x", ttgir):
        in_flight = len(re.findall(rf"ttg.memdesc_index {buffer}\[%c\d+_i32\]", ttgir))  # the prologue's fills
        if int(slots) > in_flight:
            continue  # the loop refills a slot that no dot of this iteration reads
        views = set(re.findall(rf"(%\w+) = ttg.memdesc_index {buffer}\[", ttgir))
        views |= set(re.findall(rf"(%\w+) = ttg.memdesc_trans (?:{'|'.join(map(re.escape, views))})\b", ttgir))
        dots_since_read = None  # async dots issued since the last one that reads the buffer, while it may be pending
        for line in lines:
            dot = re.search(r"ttng.warp_group_dot (%\w+), (%\w+),.*isAsync = true", line)
            if dot and views & {dot.group(1), dot.group(2)}:
                dots_since_read = 0
            elif dot and dots_since_read is not None:
                dots_since_read += 1
            wait = re.search(r"warp_group_dot_wait .*pendings = (\d+)", line)
            if wait and dots_since_read is not None and dots_since_read >= int(wait.group(1)):
                dots_since_read = None
            refill = re.search(r"ttg.async_copy_global_to_local %\w+, (%\w+)", line)
            if refill and dots_since_read is not None and refill.group(1) in views:
                races.append(buffer)
                break
    return races


def _global_16bit_accesses(cubin: bytes) -> int:
    """Global loads and stores of one 16-bit element each in the kernel's SASS: a tile of bf16 / fp16 values that
    Triton could not move in 16-byte vectors (alignment or a mask it cannot prove constant over 8 elements)."""
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "kernel.cubin")
        with open(path, "wb") as file:
            file.write(cubin)
        tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
        sass = subprocess.run([tool, "-sass", path], capture_output=True, text=True, check=True).stdout
    return len(re.findall(r"\b(?:LDG|STG)\.E\.[US]16\b", sass))


def scan_training_step(dtype: torch.dtype, K: int, H: int = 2, B: int = 2, cu_seqlens: torch.Tensor | None = None,
                       reverse: bool = False, recompute: bool = False):
    """Forward with states for the backward (or, `recompute`, with seeds to rebuild them from), then the backward,
    as autograd calls them. Many heads (H * B walks) give the sequential kernels their wide tiles, few their
    narrow ones."""
    from kernels.triton_scan import scan_bwd, scan_fwd, scan_states
    from kernels.triton_scan_dispatch import CHUNK

    def run():
        T = 100
        q, f, v = (torch.zeros(B, T, H, K, dtype=dtype) for _ in range(3))
        bound, h0 = torch.zeros(H, K), torch.zeros(B, H, K, K)
        _, _, states, seeds, scores = scan_fwd(q, f, v, bound, h0, cu_seqlens, 1.0, reverse, not recompute, True,
                                               CHUNK, True)
        if recompute:
            states = scan_states(q, f, v, bound, h0, seeds, cu_seqlens, reverse)
        scan_bwd(q, f, v, bound, h0, states, scores, torch.zeros_like(v), torch.zeros(B, H, K, K), cu_seqlens, 1.0,
                 reverse, True)

    return run


def scan_inference(dtype: torch.dtype, K: int, H: int = 2, B: int = 2, cu_seqlens: torch.Tensor | None = None):
    """A forward no backward follows: its own chunk (`_forward_chunk`; with 64, the output kernel's two launches,
    which add the seeds of cut walks, or none where the walks are whole: packed)."""
    from kernels.triton_scan import scan_fwd
    from kernels.triton_scan_dispatch import _forward_chunk

    def run():
        q, f, v = (torch.zeros(B, 200, H, K, dtype=dtype) for _ in range(3))
        sequences = B if cu_seqlens is None else len(cu_seqlens) - 1
        scan_fwd(q, f, v, torch.zeros(H, K), torch.zeros(sequences, H, K, K), cu_seqlens, 1.0, False, False, True,
                 _forward_chunk(B, H, K, K, dtype, cu_seqlens, None, backward=False), False)

    return run


def decode(dtype: torch.dtype, K: int, B: int = 4):
    from kernels.triton_decode import decode_step

    def run():
        q, f, i = (torch.zeros(B, 1, 2, K, dtype=dtype) for _ in range(3))
        decode_step(q, f, i, torch.zeros(2, K), torch.zeros(B, 2, K, K), 1.0)

    return run


def cross_entropy(dtype: torch.dtype, vocab: int):
    from kernels.triton_cross_entropy import loss_and_grad_

    def run():
        loss_and_grad_(torch.zeros(4, vocab, dtype=dtype), torch.zeros(4, dtype=torch.long), -100, True)

    return run


CASES = {  # "few heads": 4 walks of 4 chunks, cut into segments (kernels.triton_scan_dispatch._segments)
    "bf16 K128 few heads": scan_training_step(torch.bfloat16, 128),
    "bf16 K128 few heads recomputed": scan_training_step(torch.bfloat16, 128, recompute=True),
    "bf16 K128 packed reverse": scan_training_step(
        torch.bfloat16, 128, cu_seqlens=torch.tensor([0, 37, 200], dtype=torch.int32), reverse=True),
    "fp16 K128 few heads": scan_training_step(torch.float16, 128),
    "fp32 K256 few heads": scan_training_step(torch.float32, 256),
    "fp16 K256 few heads": scan_training_step(torch.float16, 256),
    "bf16 K256 few heads": scan_training_step(torch.bfloat16, 256),
    "bf16 K64 few heads": scan_training_step(torch.bfloat16, 64),  # the ViTs' heads: the grads kernel's own V block
    "bf16 K16 few heads": scan_training_step(torch.bfloat16, 16),
    "fp32 K4 small heads": scan_training_step(torch.float32, 4, H=16),
    # one-pass forward; whole-state walks (the dh walk, and the states walk that recomputes the states)
    "bf16 K128 many heads": scan_training_step(torch.bfloat16, 128, H=128),
    "bf16 K128 many heads recomputed": scan_training_step(torch.bfloat16, 128, H=128, recompute=True),
    "bf16 K128 many heads inference": scan_inference(torch.bfloat16, 128, H=128),
    "bf16 K128 packed inference": scan_inference(
        torch.bfloat16, 128, B=1, cu_seqlens=torch.tensor([0, 37, 200], dtype=torch.int32)),
    # the ViTs' walks: one-pass forward (`_fused_forward`), storing the chunk states (and scores) or not; a 64 x 64
    # dh walk that writes dv
    "bf16 K64 many heads": scan_training_step(torch.bfloat16, 64, H=144),
    "bf16 K64 many heads inference": scan_inference(torch.bfloat16, 64, H=144),
    "fp32 K128 few heads": scan_training_step(torch.float32, 128),
    **{f"{name} K{K} inference": scan_inference(dtype, K) for name, dtype in _NAMES.items() for K in (64, 128, 256)},
    "decode bf16 K128": decode(torch.bfloat16, 128),
    # Path-X's 2D scan runs every image row as a sequence: 256 images x 128 rows x 32 heads of size 1.
    "bf16 K1 Path-X rows": scan_training_step(torch.bfloat16, 1, H=32, B=256 * 128),
    "decode bf16 K16 batch 40000": decode(torch.bfloat16, 16, B=40000),
    "cross entropy bf16 vocab 32000": cross_entropy(torch.bfloat16, 32000),
    "cross entropy fp32 vocab 50": cross_entropy(torch.float32, 50),
}
GRID_LIMITS = (2**31 - 1, 65535, 65535)
"""CUDA's largest grid, per axis."""


def main() -> None:
    if os.environ.get("TRITON_INTERPRET"):
        raise SystemExit("unset TRITON_INTERPRET: this compiles the kernels rather than interpreting them")
    shard, count = (int(n) for n in sys.argv[1:3]) if len(sys.argv) > 1 else (0, 1)
    for case, run in list(CASES.items())[shard::count]:
        for launch in record_launches(run):
            print(json.dumps({"case": case, **compile_for_sm90(*launch)}), flush=True)


if __name__ == "__main__":
    main()
