"""What a scan kernel's instructions are, by kind, from its sm_90a SASS compiled offline (no GPU needed).

Compiles one launch that a case of tests/kernels/sm90_launches.py records (the dispatch's own tiles and
constexprs), disassembles it with the nvdisasm that ships with Triton, and counts the static instructions by
kind: float math, integer and address arithmetic, shared memory, barriers, shuffles, special functions, tensor
cores, global memory, spills. Static counts: a loop's body counts once. To see what the GPU's own Triton
makes, run it under the GPU image's Triton version (kernels/HISTORY.md, fifteenth session, used triton 3.6
installed beside this tree's torch):

    python benchmarks/sass_mix.py "bf16 K128 many heads" _bwd_kernel --launch 1
"""

import argparse
import collections
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

KINDS = {  # opcode (the part before the first dot) -> kind; what is not here counts as "other"
    "float math": ("FMUL", "FADD", "FFMA", "FSEL", "FMNMX", "FSETP", "FCHK"),
    "integer and address": ("IMAD", "IADD3", "LEA", "LOP3", "SHF", "ISETP", "SGXT", "IABS", "VIADD", "IMNMX"),
    "moves and selects": ("MOV", "SEL", "PRMT", "CS2R", "S2R"),
    "shared memory": ("LDS", "STS", "LDSM", "STSM"),
    "barriers": ("BAR", "WARPSYNC", "DEPBAR", "LDGDEPBAR"),
    "shuffles": ("SHFL",),
    "special functions (MUFU)": ("MUFU",),
    "conversions": ("F2F", "F2FP", "I2F", "F2I"),
    "tensor cores": ("HMMA", "HGMMA"),
    "global memory": ("LDG", "STG", "LDGSTS", "RED", "ATOMG"),
    "spills (local memory)": ("LDL", "STL"),
}
_INSTRUCTION = re.compile(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_]*)")
"""An instruction line of `nvdisasm -c`: its address comment, an optional predicate, then the opcode."""


def opcodes(sass: str) -> collections.Counter:
    """How many times each opcode (without its modifiers) appears in a disassembly."""
    return collections.Counter(match.group(1) for match in map(_INSTRUCTION.search, sass.splitlines()) if match)


def by_kind(counts: collections.Counter) -> dict[str, int]:
    """The opcode counts summed by KINDS, the rest as "other", in KINDS' order."""
    kind_of = {opcode: kind for kind, names in KINDS.items() for opcode in names}
    kinds = dict.fromkeys([*KINDS, "other"], 0)
    for opcode, n in counts.items():
        kinds[kind_of.get(opcode, "other")] += n
    return kinds


def compiled_sass(case: str, kernel_name: str, launch: int | None) -> tuple[str, dict]:
    """The SASS of the first launch of `kernel_name` that `case` records (with LAUNCH == `launch` if given), and its
    launch options."""
    import triton

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from tests.kernels import sm90_launches

    for kernel, _, args, kwargs in sm90_launches.record_launches(sm90_launches.CASES[case]):
        if kernel.__name__ == kernel_name and (launch is None or kwargs.get("LAUNCH") == launch):
            compiled, options = sm90_launches.compile_launch(kernel, args, kwargs)
            break
    else:
        raise SystemExit(f"case {case!r} launches no {kernel_name}" + (f" with LAUNCH {launch}" if launch else ""))
    nvdisasm = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "nvdisasm")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(compiled.asm["cubin"])
        cubin.flush()
        sass = subprocess.run([nvdisasm, "-c", cubin.name], capture_output=True, text=True, check=True).stdout
    return sass, {**options, **kwargs}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("case", help="a case of tests/kernels/sm90_launches.py")
    parser.add_argument("kernel", help="the kernel's name, e.g. _bwd_kernel")
    parser.add_argument("--launch", type=int, help="its LAUNCH constexpr (1 anchored, 2 fallback), where it has one")
    args = parser.parse_args()
    if os.environ.get("TRITON_INTERPRET"):
        raise SystemExit("unset TRITON_INTERPRET: this compiles the kernel rather than interpreting it")
    import triton

    sass, info = compiled_sass(args.case, args.kernel, args.launch)
    kinds = by_kind(opcodes(sass))
    total = sum(kinds.values())
    options = ", ".join(f"{name} {info[name]}" for name in ("K", "BK", "BV", "num_warps") if name in info)
    print(f"{args.kernel} ({args.case}; {options}; triton {triton.__version__}): {total} instructions")
    for kind, n in kinds.items():
        print(f"  {kind:26s} {n:5d}  {n / total:6.1%}")


if __name__ == "__main__":
    main()
