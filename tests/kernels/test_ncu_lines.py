"""benchmarks/ncu_lines.py on an export in Nsight Compute's format: `--page source --csv --print-source cuda,sass`
writes one section per source file, each line's own row (address "-") followed by its instructions' rows."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
HEADER = ('"Line No","Source","Address","Source","Warp Stall Sampling (All Samples)",'
          '"Warp Stall Sampling (Not-issued Samples)","# Samples","Instructions Executed"')
EXPORT = "\n".join([
    '"File Path","/opt/site-packages/triton/language/standard.py"',
    '"Function Name","_bwd_kernel"',
    HEADER,
    '"343","return core.associative_scan(input, axis, _sum_combine, reverse)","-","-","300","250","300","6000"',
    '"","","0x7f00","      SHFL.UP PT, R1, R2, 0x1, RZ","200","150","200","4000"',
    '"File Path","/src/kernels/triton_scan_kernels.py"',
    '"Function Name","_bwd_kernel"',
    HEADER,
    '"52","return tl.exp2(x * LOG2_E)","-","-","100","90","100","3000"',
    '"","","0x7f10","      MUFU.EX2 R3, R4","100","90","100","3000"',
    '"491","dv_t = tl.dot(tl.trans(A), do_t)","-","-","600","500","600","1000"',
])


def test_sums_stalls_and_instructions_per_source_line(tmp_path):
    export = tmp_path / "grads.csv"
    export.write_text(EXPORT + "\n")
    result = subprocess.run([sys.executable, "benchmarks/ncu_lines.py", str(export), "--top", "2"], cwd=ROOT,
                            capture_output=True, text=True, timeout=60, check=True)
    lines = result.stdout.splitlines()
    # Instruction rows are not counted again: 1000 samples and 10000 instructions over the three source lines.
    assert lines[0] == "1000 stall samples, 10000 warp instructions executed"
    assert lines[2].split()[:3] == ["60.0%", "10.0%", "triton_scan_kernels.py:491"]
    assert lines[3].split()[:3] == ["30.0%", "60.0%", "standard.py:343"]
    assert len(lines) == 4, "--top 2 prints two lines"


def test_an_export_without_source_lines_says_how_to_make_one(tmp_path):
    export = tmp_path / "sass-only.csv"
    export.write_text('"Address","Source"\n"0x7f00","      SHFL.UP PT, R1, R2, 0x1, RZ"\n')
    result = subprocess.run([sys.executable, "benchmarks/ncu_lines.py", str(export)], cwd=ROOT,
                            capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode != 0 and "--print-source cuda,sass" in result.stderr
