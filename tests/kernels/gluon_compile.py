"""Compiles the Gluon forward (kernels/gluon_scan_forward.py) for an H100 (sm_90a) on the CPU, which the interpreter
cannot run, and reports what ptxas made of it. Run in a process without TRITON_INTERPRET
(tests/kernels/test_gluon_compile.py):

    python -m tests.kernels.gluon_compile      prints one JSON line per variant (no states, whole walks; then
                                               an initial state, segments)
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

from kernels import gluon_scan_forward


def compile_forward(with_states: bool):
    """The kernel as `gluon_scan_forward.forward` launches it, for B 1, T 64, H 2: whole walks with no initial or
    final state, or walks cut into segments from an initial state (the final state is written by the carry
    pass there, so OUTPUT_FINAL goes unused: the whole-walk launch takes both)."""
    x = torch.zeros(1, 64, 2, gluon_scan_forward.HEAD, dtype=torch.bfloat16)
    kernel = gluon_scan_forward._forward_kernel
    descriptors = [gluon_scan_forward._descriptor(x).__mangle__() for _ in range(3)]
    signature = dict(zip(kernel.arg_names, descriptors + ["*fp32", "*fp32", "*bf16", "*fp32", "*i32", "*fp32",
                                                          "*fp32", "*fp32", "i32", "i32", "fp32", "i32", "i32"]))
    constants = dict(HAS_H0=with_states, OUTPUT_FINAL=with_states, SEGMENTED=with_states,
                     STAGES=gluon_scan_forward.STAGES, RING=gluon_scan_forward.RING,
                     GATE_REGISTERS=gluon_scan_forward.GATE_REGISTERS)
    signature.update({name: "constexpr" for name in constants})
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
    for with_states in (False, True):
        print(json.dumps({"with_states": with_states, **report(compile_forward(with_states))}), flush=True)
