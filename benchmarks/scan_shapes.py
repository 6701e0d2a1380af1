"""GPU time per call of each scan kernel in one forward + backward, and of a forward without grad (evaluation,
which may take other kernels: `_forward_chunk`, `_fused_forward`), at the shapes the models run: the record shape
(at T 2K and at T 16K, where the walks are cut into segments), the ViTs' (T 256 and, at 16 px patches, 196), packed
documents, a length that is not a multiple of 16. bf16, a
lower bound, fresh random inputs; kernel time from torch.profiler (`scan.kernel_ms`), so the host is left out.

To compare two versions of the kernels in one device call (timings of separate calls differ by a few percent),
copy the other one beside the tree (here, before the call: the device gets the working tree, not .git) and run
both as variants. Each variant is its own process, run in turn, every round, and the table at the end sets the
rounds side by side:

    git archive <commit> kernels | tar -x -C base_kernels
    python benchmarks/scan_shapes.py --variant "base=--kernels-from base_kernels" --variant tree= --rounds 2

A variant's value is this script's own options. To try a launch option at every shape before changing `_tiles`
(how the walks' 3 stages were found):

    python benchmarks/scan_shapes.py --variant tree= --variant "dh3=--tiles dh:num_stages=3" --rounds 2
"""

import argparse
import ast
import json
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

SHAPES = {  # name: (B, T, H, K = V, packed)
    "record": (16, 2048, 16, 128, False),
    "record-t16k": (2, 16384, 16, 128, False),
    "record-t1000": (32, 1000, 16, 128, False),
    "record-t4k": (8, 4096, 16, 128, False),
    "record-t8k": (4, 8192, 16, 128, False),
    "record-packed": (16, 2048, 16, 128, True),
    "heads64": (16, 2048, 16, 64, False),
    "vit-tiny": (256, 256, 3, 64, False),
    "vit-tiny-patch16": (256, 196, 3, 64, False),
    "vit-small": (256, 256, 6, 64, False),
}


def packed_boundaries(tokens: int, T: int, generator) -> list[int]:
    """Documents of 50 to 2T tokens end to end, the last cut at `tokens`."""
    ends = torch.randint(50, 2 * T, (tokens // 50,), generator=generator).cumsum(0)
    return [0, *ends[ends < tokens].tolist(), tokens]


def tile_overrides(items: list[str]) -> dict[str, dict]:
    """`KERNEL:NAME=VALUE` items as `kernels.triton_scan_dispatch.TILE_OVERRIDES`, e.g.
    ["dh:num_stages=3", "dh:BK=64"] -> {"dh": {"num_stages": 3, "BK": 64}}. Values are Python literals."""
    overrides: dict[str, dict] = {}
    for item in items:
        kernel, _, assignment = item.partition(":")
        name, _, value = assignment.partition("=")
        try:
            overrides.setdefault(kernel, {})[name] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            raise ValueError(f"--tiles {item!r}: expected KERNEL:NAME=VALUE with a Python literal value, "
                             f"e.g. dh:num_stages=3") from None
        if not kernel or not name:
            raise ValueError(f"--tiles {item!r}: expected KERNEL:NAME=VALUE, e.g. dh:num_stages=3")
    return overrides


def scan_calls(hgrn2_scan, B: int, T: int, H: int, K: int, packed: bool, recompute_states: bool = False):
    """One scan's forward + backward, the same forward without grad, and the inputs whose gradients accumulate."""
    generator = torch.Generator().manual_seed(0)
    shape = (1, B * T, H, K) if packed else (B, T, H, K)
    q, f, v = (torch.randn(*shape, generator=generator).to("cuda", torch.bfloat16).requires_grad_() for _ in range(3))
    bound = (torch.rand(H, K, generator=generator) * 0.9).cuda().requires_grad_()
    do = torch.randn(*shape, generator=generator).to("cuda", torch.bfloat16)
    cu_seqlens = None
    if packed:
        cu_seqlens = torch.tensor(packed_boundaries(B * T, T, generator), dtype=torch.int32, device="cuda")

    def forward_backward() -> None:
        o, _ = hgrn2_scan(q, f, v, bound, cu_seqlens=cu_seqlens, check_bound=False, recompute_states=recompute_states)
        o.backward(do)

    def forward() -> None:
        with torch.no_grad():
            hgrn2_scan(q, f, v, bound, cu_seqlens=cu_seqlens, check_bound=False)

    return forward_backward, forward, [q, f, v, bound]


def variants(items: list[str]) -> dict[str, list[str]]:
    """`NAME=OPTIONS` items as {name: this script's options}, e.g. ["base=--kernels-from b", "tree="] ->
    {"base": ["--kernels-from", "b"], "tree": []}."""
    named: dict[str, list[str]] = {}
    for item in items:
        name, equals, options = item.partition("=")
        if not name or not equals:
            raise ValueError(f"--variant {item!r}: expected NAME=OPTIONS, e.g. base=--kernels-from base_kernels")
        if name in named:
            raise ValueError(f"--variant {name!r} is given twice: name each variant once")
        named[name] = shlex.split(options)
    return named


def comparison_table(rows: list[dict], names: list[str]) -> str:
    """Markdown: a line per shape, each variant's f+b and no-grad forward over the rounds ("a / b")."""
    runs: dict[tuple[str, str], list[dict]] = {}
    for row in rows:
        runs.setdefault((row["shape"], row["variant"]), []).append(row)
    shapes = list(dict.fromkeys(row["shape"] for row in rows))
    header = ["shape", *(f"{name} f+b" for name in names), *(f"{name} no-grad" for name in names)]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for shape in shapes:
        cells = [shape]
        for key in ("fb_ms", "forward_ms"):
            cells += [" / ".join(f"{run[key]:.3f}" for run in runs.get((shape, name), [])) or "-" for name in names]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def compare(named: dict[str, list[str]], rounds: int, common: list[str]) -> None:
    """Runs every variant in its own process, in turn, `rounds` times, then prints the table of all of them."""
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for round_ in range(1, rounds + 1):
            for name, options in named.items():
                out = Path(folder) / f"{name}-{round_}.jsonl"
                command = [sys.executable, __file__, *common, *options, "--json-lines", str(out)]
                print(f"# round {round_}, {name}: {shlex.join(command[1:])}", flush=True)
                subprocess.run(command, check=True)
                rows += [dict(json.loads(line), variant=name) for line in out.read_text().splitlines()]
    print(comparison_table(rows, list(named)), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kernels-from", metavar="DIR", help="a folder holding another version's kernels/ package")
    parser.add_argument("--shapes", nargs="+", choices=list(SHAPES), default=list(SHAPES))
    parser.add_argument("--tiles", nargs="+", default=[], metavar="KERNEL:NAME=VALUE",
                        help="launch options over `_tiles`' choice for every shape, e.g. dh:num_stages=3")
    parser.add_argument("--recompute-states", action="store_true",
                        help="the backward rebuilds the chunk states (recompute_states, the LM configs' choice)")
    parser.add_argument("--gluon-grads", action="store_true",
                        help="the backward's gradients by the Gluon kernel (`GLUON_GRADS`, off by default)")
    parser.add_argument("--variant", action="append", default=[], metavar="NAME=OPTIONS",
                        help="compare: run this script with OPTIONS as variant NAME (repeat for each variant)")
    parser.add_argument("--rounds", type=int, default=2, help="with --variant: how many times each variant runs")
    parser.add_argument("--json-lines", metavar="FILE", help="also append each shape's times to FILE as JSON")
    args = parser.parse_args()
    try:
        overrides = tile_overrides(args.tiles)
        named = variants(args.variant)
    except ValueError as error:
        parser.error(str(error))
    if named:
        if args.kernels_from or args.tiles or args.json_lines or args.gluon_grads:
            parser.error("--kernels-from, --tiles, --gluon-grads and --json-lines belong inside a --variant's options")
        compare(named, args.rounds, ["--shapes", *args.shapes] + (["--recompute-states"] if args.recompute_states
                                                                   else []))
        return
    if args.kernels_from:
        sys.path.insert(0, str(Path(args.kernels_from).resolve()))
    sys.path.insert(1, str(Path(__file__).resolve().parent))
    import kernels  # from --kernels-from when given
    try:
        from kernels import triton_scan_dispatch as dispatch
    except ImportError:  # kernels from before the thirty-second session kept their launch choices in triton_scan
        from kernels import triton_scan as dispatch
    from scan import kernel_ms  # benchmarks/ is not a package

    dispatch.TILE_OVERRIDES.update(overrides)
    dispatch.GLUON_GRADS = args.gluon_grads
    label = args.kernels_from or str(Path(kernels.__file__).parent.parent)
    label += "".join(f" {item}" for item in args.tiles) + (" recompute" if args.recompute_states else "")
    label += " gluon-grads" if args.gluon_grads else ""
    for name in args.shapes:
        forward_backward, forward, inputs = scan_calls(kernels.hgrn2_scan, *SHAPES[name], args.recompute_states)
        times = kernel_ms(forward_backward, calls=20, grad_to_none=inputs)
        top = "  ".join(f"{kernel[:14]} {ms:.3f}" for kernel, ms in list(times.items())[:4])
        forward_ms = sum(kernel_ms(forward, calls=20).values())
        B, T, H, K, packed = SHAPES[name]
        shape = f"{name} (B {B}, T {T}, H {H}, K {K}{', packed' if packed else ''})"
        print(f"{label}  {shape:48s} f+b {sum(times.values()):.3f} ms | {top} | no-grad forward {forward_ms:.3f} ms",
              flush=True)
        if args.json_lines:
            with open(args.json_lines, "a") as out:
                out.write(json.dumps({"shape": name, "fb_ms": sum(times.values()), "forward_ms": forward_ms,
                                      "kernels_ms": times}) + "\n")


if __name__ == "__main__":
    main()
