"""Where a Triton kernel's instructions and stalls go, per line of its Python source, from Nsight Compute.

Triton keeps line info, so `ncu --page source --print-source cuda,sass` attributes every SASS instruction to the
innermost Python line it came from (inlined helpers included). This sums that CSV per line and prints the lines
with the most stall samples beside their share of the executed instructions. On the GPU machine (ncu is in
/usr/local/cuda/bin), for the scan's backward kernel at the record shape:

    ncu --kernel-name _bwd_kernel --launch-skip 1 --launch-count 1 --set full --import-source yes -o grads \\
        python3 -c "import sys, torch; sys.path.insert(0, 'benchmarks'); from scan_sweep import training_step; \\
    step = training_step(16, 2048, 16, 128, torch.bfloat16, 'cuda'); [step() for _ in range(3)]"
    ncu -i grads.ncu-rep --page source --csv --print-source cuda,sass > grads.csv
    python benchmarks/ncu_lines.py grads.csv [--top 40]

kernels/HISTORY.md ("The grads kernel under Nsight Compute") has what it showed.
"""

import argparse
import csv
import os


def per_line(path: str) -> list[tuple[str, int, str, float, float]]:
    """(file, line, source, stall samples, executed instructions) of every source line of the CSV. Its rows come
    in sections, one per source file ("File Path"); a line's own row has "-" where an instruction row has its
    address."""
    lines, file = [], None
    with open(path, newline="") as handle:
        for row in csv.reader(handle):
            if row and row[0] == "File Path":
                file = os.path.basename(row[1])
            elif len(row) > 7 and row[0] not in ("", "Line No") and row[2] == "-":
                lines.append((file, int(row[0]), row[1].strip(), float(row[4] or 0), float(row[7] or 0)))
    if not lines:
        raise SystemExit(f"{path}: no per-line rows; export it with --page source --csv --print-source cuda,sass")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("csv")
    parser.add_argument("--top", type=int, default=40)
    args = parser.parse_args()
    lines = per_line(args.csv)
    samples, instructions = sum(line[3] for line in lines), sum(line[4] for line in lines)
    print(f"{samples:.0f} stall samples, {instructions:.0f} warp instructions executed")
    print("stalls  instructions  line")
    for file, number, source, stall, executed in sorted(lines, key=lambda line: -line[3])[: args.top]:
        print(f"{stall / samples:6.1%}  {executed / instructions:12.1%}  {file}:{number}  {source[:90]}")


if __name__ == "__main__":
    main()
