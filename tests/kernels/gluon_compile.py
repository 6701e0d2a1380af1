"""Compiles the Gluon kernels (kernels/gluon_scan_forward.py, gluon_scan_grads.py) for an H100 (sm_90a) on the CPU,
which the interpreter cannot run, and reports what ptxas made of them. Run in a process without TRITON_INTERPRET
(tests/kernels/test_gluon_compile.py):

    python -m tests.kernels.gluon_compile      prints one JSON line per variant of the forward (VARIANTS), then
                                               of the grads kernel (kernels/gluon_scan_grads.py)
"""

import json
import re
import subprocess
import tempfile

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.backends.nvidia.compiler import get_ptxas
from triton.experimental.gluon._runtime import GluonASTSource

from kernels import gluon_scan_forward, gluon_scan_grads


VARIANTS = {
    # whole walks with no initial or final state
    "no grad": dict(),
    # walks cut into segments from an initial state (the carry pass writes the final state then)
    "no grad, cut": dict(HAS_H0=True, SEGMENTED=True),
    # a backward follows: the chunk states and scores kept, whole walks, from and to a state
    "training": dict(HAS_H0=True, OUTPUT_FINAL=True, STORE_STATES=True, STORE_SCORES=True),
    # and walks cut into segments, each from its seed
    "training, seeded": dict(HAS_H0=True, OUTPUT_FINAL=True, SEEDED=True, STORE_STATES=True, STORE_SCORES=True),
}


def compile_forward(variant: str):
    """The kernel as `gluon_scan_forward.forward` launches it in `variant` (VARIANTS), for B 1, T 64, H 2."""
    x = torch.zeros(1, 64, 2, gluon_scan_forward.HEAD, dtype=torch.bfloat16)
    tiles = torch.zeros(3, 2, gluon_scan_forward.HEAD, gluon_scan_forward.HEAD, dtype=torch.bfloat16)
    scores = torch.zeros(2, 2, gluon_scan_forward.CHUNK, gluon_scan_forward.CHUNK, dtype=torch.bfloat16)
    modes = {**dict(HAS_H0=False, OUTPUT_FINAL=False, SEGMENTED=False, SEEDED=False, STORE_STATES=False,
                    STORE_SCORES=False), **VARIANTS[variant]}
    kernel = gluon_scan_forward._forward_kernel
    q_desc = gluon_scan_forward._descriptor(x)
    descriptors = [q_desc] * 3 + [
        gluon_scan_forward._tiles_descriptor(tiles, gluon_scan_forward._STATE_TILE) if modes["STORE_STATES"]
        else q_desc,
        gluon_scan_forward._tiles_descriptor(scores, gluon_scan_forward._SCORES_TILE) if modes["STORE_SCORES"]
        else q_desc]
    signature = dict(zip(kernel.arg_names, [d.__mangle__() for d in descriptors] + [
        "*fp32", "*fp32", "*bf16", "*bf16", "*fp32", "*i32", "*fp32", "*fp32", "*fp32", "i32", "i32", "fp32", "i32",
        "i32"]))
    constants = dict(modes, STAGES=gluon_scan_forward.STAGES, RING=gluon_scan_forward.RING,
                     GATE_REGISTERS=gluon_scan_forward.GATE_REGISTERS)
    return _compile(kernel, signature, constants)


def compile_grads(has_bound: bool):
    """The grads kernel as `gluon_scan_grads.grads` launches it, for B 1, T 64, H 2."""
    x = torch.zeros(1, 64, 2, gluon_scan_forward.HEAD, dtype=torch.bfloat16)
    tiles = torch.zeros(3, 2, gluon_scan_forward.HEAD, gluon_scan_forward.HEAD, dtype=torch.bfloat16)
    kernel = gluon_scan_grads._grads_kernel
    descriptors = gluon_scan_grads._descriptors(x, x, x, x, tiles, tiles)
    signature = dict(zip(kernel.arg_names, [d.__mangle__() for d in descriptors] + [
        "*fp32", "*bf16", "*bf16", "*fp32", "*i8", "i32", "i32", "fp32", "i32"]))
    constants = dict(HAS_BOUND=has_bound, SMALL_STAGES=gluon_scan_grads.SMALL_STAGES,
                     STATE_STAGES=gluon_scan_grads.STATE_STAGES, COMPUTE_REGISTERS=gluon_scan_grads.COMPUTE_REGISTERS)
    return _compile(kernel, signature, constants)


def _compile(kernel, signature: dict, constants: dict):
    signature = {**signature, **{name: "constexpr" for name in constants}}
    pointers = [name for name, kind in signature.items() if kind.startswith("*")]
    source = GluonASTSource(kernel, signature,
                            constexprs={(kernel.arg_names.index(name),): value for name, value in constants.items()},
                            attrs={(kernel.arg_names.index(name),): [["tt.divisibility", 16]] for name in pointers})
    return triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4})


def report(compiled) -> dict:
    """Shared memory, each partition's registers (setmaxnreg), ptxas's spills and the waits it had to inject after
    asynchronous wgmmas (each one serialises the products it follows)."""
    with tempfile.NamedTemporaryFile("w", suffix=".ptx") as ptx:
        ptx.write(compiled.asm["ptx"])
        ptx.flush()
        log = subprocess.run([get_ptxas(90).path, "-v", "--gpu-name=sm_90a", ptx.name, "-o", "/dev/null"],
                             capture_output=True, text=True, check=True).stderr
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    return {"shared_bytes": compiled.metadata.shared,
            "registers": sorted({int(n) for n in re.findall(r"setmaxnreg\.\w+\.sync\.aligned\.u32\s+(\d+)",
                                                            compiled.asm["ptx"])}),
            "spilled_bytes": int(spills.group(1)) + int(spills.group(2)),
            "injected_waits": len(re.findall(r"warpgroup\.wait is injected", log))}


if __name__ == "__main__":
    for variant in VARIANTS:
        print(json.dumps({"variant": variant, **report(compile_forward(variant))}), flush=True)
    for has_bound in (True, False):
        print(json.dumps({"variant": f"grads, {'a' if has_bound else 'no'} bound",
                          **report(compile_grads(has_bound))}), flush=True)
