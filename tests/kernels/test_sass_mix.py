"""benchmarks/sass_mix.py's counting, on lines in `nvdisasm -c`'s format (the compile itself needs no test here:
tests/kernels/test_sm90_compile.py compiles every launch)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

from sass_mix import by_kind, opcodes  # noqa: E402

SASS = """
        .text._bwd_kernel:
        /*0000*/                   LDC R1, c[0x0][0x28] ;
        /*0010*/                   S2R R0, SR_TID.X ;
        /*0020*/                   FFMA R2, R3, R4, R5 ;
        /*0030*/                   FMUL.FTZ R6, R2, 1.4426950216293334961 ;
        /*0040*/                   MUFU.EX2 R6, R6 ;
        /*0050*/              @!P0 STL [R1+0x10], R6 ;
        /*0060*/               @P1 LDS.128 R8, [R7] ;
        /*0070*/                   HMMA.16816.F32.BF16 R12, R8, R10, R12 ;
        /*0080*/                   SHFL.UP PT, R2, R2, 0x1, RZ ;
        /*0090*/                   IMAD.WIDE R4, R0, 0x4, R4 ;
        /*00a0*/                   FADD R2, R2, R6 ;
        /*00b0*/                   EXIT ;
"""


def test_counts_each_opcode_without_modifiers_or_predicates():
    counts = opcodes(SASS)
    assert counts["FFMA"] == 1 and counts["FMUL"] == 1 and counts["FADD"] == 1 and counts["MUFU"] == 1
    assert counts["STL"] == 1 and counts["LDS"] == 1, "a predicated instruction is counted by its opcode"
    assert sum(counts.values()) == 12, "the section label is not an instruction"


def test_sums_opcodes_by_kind():
    kinds = by_kind(opcodes(SASS))
    assert kinds["float math"] == 3 and kinds["special functions (MUFU)"] == 1 and kinds["tensor cores"] == 1
    assert kinds["spills (local memory)"] == 1 and kinds["shared memory"] == 1 and kinds["shuffles"] == 1
    assert kinds["integer and address"] == 1 and kinds["moves and selects"] == 1
    assert kinds["other"] == 2  # LDC and EXIT
    assert sum(kinds.values()) == 12
