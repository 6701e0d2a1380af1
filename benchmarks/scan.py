"""Speed of the HGRN2 scan beside fla's chunk_gla and causal attention (SDPA flash and cuDNN), one process.

At the HGRN2-1.3B layer shape (H 16, K = V = 128, B * T = 32768 tokens, bf16) for T from 1K to 16K:
forward (no grad) and forward + backward, median of `triton.testing.do_bench`, the same random inputs
for every contender, peak extra memory of forward + backward, and the bandwidth our kernels reach
as a fraction of the measured device-to-device copy bandwidth. A correctness check against the
float64 reference runs first, so every time printed belongs to a kernel that is right.

    python benchmarks/scan.py [--tokens 32768] [--lengths 1024 ...] [--no-fla] [--out benchmarks/results]

Each row also records where our time goes: the GPU time of each kernel per call (torch.profiler). Then the
LRA's small heads (K = V = 1, 2, 4 and 8 at the ListOps shape, and Path-X's layer) against their bandwidth floor.
"""

import argparse
import json
import platform
import sys
import time
from datetime import date
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
from triton.testing import do_bench

from kernels import triton_scan_dispatch as dispatch
from kernels import gluon_scan_forward, hgrn2_scan

sys.path.insert(0, str(Path(__file__).resolve().parent))
import fla_tuning  # noqa: E402  (benchmarks/ is not a package)

H, D = 16, 128
START = time.perf_counter()


def median_ms(fn, grad_to_none=None) -> float:
    return do_bench(fn, warmup=50, rep=300, grad_to_none=grad_to_none, return_mode="median")


def copy_bandwidth() -> float:
    """Device-to-device copy, bytes read + written per second."""
    x = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    return 2 * x.numel() / (median_ms(lambda: y.copy_(x)) * 1e-3)


def peak_extra_bytes(fn) -> int:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def kernel_ms(fn, calls: int = 10, grad_to_none=()) -> dict[str, float]:
    """GPU milliseconds per call of each kernel that fn launches, largest first. Gradients of `grad_to_none`
    are dropped before each call, as in the timed runs, so that no accumulation kernel is counted."""
    fn()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as profile:
        for _ in range(calls):
            for x in grad_to_none:
                x.grad = None
            fn()
        torch.cuda.synchronize()
    times: dict[str, float] = {}
    for event in profile.events():  # the kernels themselves, not the host-side ops that launched them
        if event.device_type == torch.autograd.DeviceType.CUDA:
            times[event.name] = times.get(event.name, 0.0) + event.device_time_total / 1e3 / calls
    return dict(sorted(times.items(), key=lambda item: -item[1]))


def correctness(T: int = 1000) -> dict:
    """bf16 kernel vs the float64 loop at a moderate shape, outputs and all gradients."""
    torch.manual_seed(0)
    q, f, i = (torch.randn(2, T, 4, D, device="cuda").to(torch.bfloat16).double() for _ in range(3))
    b = (torch.rand(4, D, device="cuda") * 0.9).double()
    do = torch.randn(2, T, 4, D, device="cuda", dtype=torch.float64)
    outs = {}
    for backend, dtype in (("triton", torch.bfloat16), ("naive", torch.float64)):
        bound_dtype = torch.float32 if dtype != torch.float64 else dtype
        xs = [x.to(dtype).requires_grad_() for x in (q, f, i)] + [b.to(bound_dtype).requires_grad_()]
        o, _ = hgrn2_scan(*xs, backend=backend)
        grads = torch.autograd.grad((o.double() * do).sum(), xs)
        outs[backend] = [o, *grads]
    names = ["o", "dq", "df", "di", "dlower_bound"]
    return {name: relative(a, b) for name, a, b in zip(names, outs["triton"], outs["naive"])}


def relative(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """||actual - expected|| / ||expected||, in float64."""
    actual, expected = actual.double(), expected.double()
    return ((actual - expected).norm() / expected.norm()).item()


def log(message: str) -> None:
    print(f"[{time.perf_counter() - START:7.1f} s] {message}", flush=True)


def bench_shape(T: int, B: int, fla_chunk_gla) -> dict:
    torch.manual_seed(0)
    q, f, i = (torch.randn(B, T, H, D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    b = (torch.rand(H, D, device="cuda") * 0.5 + 0.25)
    do = torch.randn_like(i)
    row = {"T": T, "B": B}

    def ours_fwd(check_bound: bool = True):
        with torch.no_grad():
            return hgrn2_scan(q, f, i, b, check_bound=check_bound)[0]

    def ours_train(recompute_states: bool = False, check_bound: bool = True):
        o, _ = hgrn2_scan(q, f, i, b, recompute_states=recompute_states, check_bound=check_bound)
        o.backward(do)

    # The public default checks the bound's range (its verdict read once the scan is queued); the models skip it,
    # as fla has no such check: both are timed.
    row["ours_fwd_ms"] = median_ms(ours_fwd)
    row["ours_fwd_unchecked_ms"] = median_ms(lambda: ours_fwd(check_bound=False))
    for x in (q, f, i):
        x.requires_grad_(True)
    row["ours_fwdbwd_ms"] = median_ms(ours_train, grad_to_none=[q, f, i])
    row["ours_fwdbwd_unchecked_ms"] = median_ms(lambda: ours_train(check_bound=False), grad_to_none=[q, f, i])
    row["ours_peak_extra_gib"] = peak_extra_bytes(ours_train) / 2**30
    row["ours_kernels_ms"] = {"fwd": kernel_ms(ours_fwd), "fwdbwd": kernel_ms(ours_train, grad_to_none=[q, f, i])}
    # The memory lever: no chunk states kept between forward and backward, one more states pass instead.
    row["ours_fwdbwd_recompute_ms"] = median_ms(lambda: ours_train(True), grad_to_none=[q, f, i])
    row["ours_recompute_peak_extra_gib"] = peak_extra_bytes(lambda: ours_train(True)) / 2**30
    # Fast forgetting, as a trained first layer (no bound) may learn: lambda about 0.02, a gate range over
    # 40 within half a chunk, where the kernels leave the anchored matmul for the exact elementwise path.
    f_fast = (f.detach() - 4.0).requires_grad_()
    row["ours_fwdbwd_fast_forgetting_ms"] = median_ms(
        lambda: hgrn2_scan(q, f_fast, i, None)[0].backward(do), grad_to_none=[q, f_fast, i])
    log(f"T {T}: ours done")

    if fla_chunk_gla is not None:
        # fla gets the resolved gate for free (computed outside the timing), as in the anchors.
        with torch.no_grad():
            g = torch.logaddexp(b.log(), torch.log1p(-b) + F.logsigmoid(f.float()))
            k = (1 - g.exp()).to(torch.bfloat16)
        g, k = g.requires_grad_(), k.requires_grad_()

        def fla_fwd():
            with torch.no_grad():
                return fla_chunk_gla(q, k, i, g, scale=D**-0.5)[0]

        def fla_train():
            o, _ = fla_chunk_gla(q, k, i, g, scale=D**-0.5)
            o.backward(do)

        row["fla_fwd_ms"] = median_ms(fla_fwd)
        row["fla_fwdbwd_ms"] = median_ms(fla_train, grad_to_none=[q, k, i, g])
        row["fla_peak_extra_gib"] = peak_extra_bytes(fla_train) / 2**30
        log(f"T {T}: fla done")

    qa, ka, va = (x.detach().transpose(1, 2).contiguous().requires_grad_() for x in (q, f, i))
    doa = do.transpose(1, 2).contiguous()
    for name, backend in (("flash", torch.nn.attention.SDPBackend.FLASH_ATTENTION),
                          ("cudnn", torch.nn.attention.SDPBackend.CUDNN_ATTENTION)):
        try:
            with torch.nn.attention.sdpa_kernel(backend):
                def attn_fwd():
                    with torch.no_grad():
                        return F.scaled_dot_product_attention(qa, ka, va, is_causal=True)

                def attn_train():
                    F.scaled_dot_product_attention(qa, ka, va, is_causal=True).backward(doa)

                row[f"sdpa_{name}_fwd_ms"] = median_ms(attn_fwd)
                row[f"sdpa_{name}_fwdbwd_ms"] = median_ms(attn_train, grad_to_none=[qa, ka, va])
        except RuntimeError as error:  # a backend that does not support this shape or device
            row[f"sdpa_{name}_error"] = str(error).splitlines()[0]
    return row


KERNELS = {"_fwd_states_kernel": "states", "_fwd_output_kernel": "output", "_fwd_fused_kernel": "one-pass forward",
           "_bwd_dh_kernel": "dh", "_bwd_kernel": "grads", "_forward_kernel": "Gluon forward"}


def _dispatch(B: int, name: str, *args) -> int:
    """What the dispatch function `name` (kernels/dispatch.py) decides for B sequences of the card's bf16
    heads."""
    return getattr(dispatch, name)(B, H, D, D, torch.bfloat16, None, torch.device("cuda"), *args)


def kernel_bytes(T: int, B: int, chunk: int = dispatch.CHUNK, backward: bool = True) -> dict[str, float]:
    """Bytes each kernel the dispatch runs must move (summed where it runs twice: the segment ends of a seeded forward
    and backward): every tensor it reads or writes once, the chunk states (or their gradients) and the kept
    intra-chunk scores once per chunk of `chunk` tokens, all bf16; the segments' ends and seeds are left out."""
    n = B * T * H
    row = D * 2  # one bf16 row of q, f, i, o, do, dq, df or di
    states = n / chunk * D * D * 2
    cuda = torch.device("cuda")
    if not backward and gluon_scan_forward.applies(D, D, torch.bfloat16, None, False, cuda):
        segments = dispatch._cut(dispatch._cdiv(T, dispatch.CHUNK),
                                    dispatch._gluon_segments(B, H, cuda))[0]
        # q, f, i in, o out; the flagged walks' rerun reads its flags (the card's gates flag none); past each walk's
        # first segment the seeds' kernel reads q, f and o and writes o
        return {"_forward_kernel": n * 4 * row, "_fwd_fused_kernel": 0,
                **({"_fwd_seed_kernel": (1 - 1 / segments) * n * 4 * row} if segments > 1 else {})}
    segments = _dispatch(B, "_one_pass_segments")
    scores = n * chunk * 2 if backward and _dispatch(B, "_scores_kept") else 0  # [C, C] a chunk and head
    if _dispatch(B, "_fused_forward") or segments > 1:
        # q, f, i in; o, and where a backward follows the states and scores, out: by the Gluon forward where it
        # runs (here only with a backward), whose flagged walks' rerun reads its flags
        gluon = backward and gluon_scan_forward.applies(D, D, torch.bfloat16, None, False, cuda)
        forward = {"_forward_kernel" if gluon else "_fwd_fused_kernel": n * 4 * row + (states + scores) * backward,
                   **({"_fwd_fused_kernel": 0} if gluon else {})}
        if segments > 1 and backward:  # the seeds' segment ends: f, i in, and then the backward's q, f, do
            forward["_segment_ends_kernel"] = n * 2 * row + n * 3 * row
        elif segments > 1:  # q, f, o in, o out, past each walk's first segment
            forward["_fwd_seed_kernel"] = (1 - 1 / segments) * n * 4 * row
    else:
        forward = {"_fwd_states_kernel": n * 2 * row + states,  # f, i in; states out
                   "_fwd_output_kernel": n * 4 * row + states}  # q, f, i, states in; o out
    if not backward:
        return forward
    dv = n * row if scores else 0
    return {
        **forward,
        # q, f, do in; q and f copied out time-contiguous, state gradients out; where the scores were kept, them
        # in and dv out
        "_bwd_dh_kernel": n * 3 * row + n * 2 * row + states + scores + dv,
        # the copies of q and f, i, do, states, state gradients in; dq, df and dv (unless the walk wrote it) out
        "_bwd_kernel": n * 7 * row + 2 * states - dv,
    }


def traffic_bytes(T: int, B: int) -> dict:
    """Bytes of the forward without grad (at its own chunk) and of forward + backward."""
    chunk = _dispatch(B, "_forward_chunk", False)
    return {"fwd": sum(kernel_bytes(T, B, chunk, backward=False).values()),
            "fwdbwd": sum(kernel_bytes(T, B).values())}


def kernel_bandwidth_fractions(row: dict, bandwidth: float) -> dict[str, float]:
    """Each kernel's bytes over its own time in forward + backward, as a fraction of the copy bandwidth."""
    times = row["ours_kernels_ms"]["fwdbwd"]
    return {name: moved / (times[name] * 1e-3) / bandwidth
            for name, moved in kernel_bytes(row["T"], row["B"]).items() if name in times}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=32768)
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384])
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--no-fla", action="store_true", help="skip fla (its autotuning takes minutes per shape)")
    parser.add_argument("--fla-tuning", default="benchmarks/fla-tuning",
                        help="fla's autotuning results, reused and kept (benchmarks/fla_tuning.py)")
    args = parser.parse_args()
    try:
        from fla.ops.gla import chunk_gla
    except ImportError:
        chunk_gla = None
        print("fla is not installed: its columns stay empty (make wheels, then carry .wheels)")
    chunk_gla = None if args.no_fla else chunk_gla
    if chunk_gla is not None:
        fla_tuning.seed(args.fla_tuning)

    device = torch.cuda.get_device_name()
    errors = correctness()
    log(f"relative error vs float64 (bf16 inputs): { {k: f'{v:.1e}' for k, v in errors.items()} }")
    bandwidth = copy_bandwidth()
    log(f"copy bandwidth {bandwidth / 1e12:.2f} TB/s")
    rows = []
    for T in args.lengths:
        row = bench_shape(T, args.tokens // T, chunk_gla)
        traffic = traffic_bytes(T, args.tokens // T)
        row["ours_fwd_bandwidth_fraction"] = traffic["fwd"] / (row["ours_fwd_ms"] * 1e-3) / bandwidth
        row["ours_fwdbwd_bandwidth_fraction"] = traffic["fwdbwd"] / (row["ours_fwdbwd_ms"] * 1e-3) / bandwidth
        row["ours_kernel_bandwidth_fractions"] = kernel_bandwidth_fractions(row, bandwidth)
        rows.append(row)
        if chunk_gla is not None:
            fla_tuning.keep(args.fla_tuning)
        log(str({k: round(v, 3) if isinstance(v, float) else v for k, v in row.items() if k != "ours_kernels_ms"}))
        for pass_, kernels in row["ours_kernels_ms"].items():
            log(f"T {T} {pass_} per kernel: " + ", ".join(f"{name[:40]} {ms:.3f}" for name, ms in kernels.items()))
        write(args.out, device, chunk_gla, bandwidth, errors, rows, args.tokens)
    small_heads = [bench_small_heads(K, bandwidth) for K in (1, 2, 4, 8)]
    small_heads.append(bench_small_heads(1, bandwidth, B=16, T=16384, heads=32))  # Path-X's layer at batch 16
    for row in small_heads:
        log(str(row))
    write(args.out, device, chunk_gla, bandwidth, errors, rows, args.tokens, small_heads)


def bench_small_heads(K: int, bandwidth: float, B: int = 32, T: int = 2048, heads: int = 16) -> dict:
    """The LRA's head sizes (expand_ratio 1 for Path-X, 4 for ListOps, 8) at the ListOps shape, against the
    bandwidth floor: q, f, i read and o written once (forward); also do read and dq, df, di written (forward +
    backward). Per call (do_bench, which includes the host's launch time: it bounds calls this small) and the GPU
    time of their kernels."""
    torch.manual_seed(0)
    q, f, i = (torch.randn(B, T, heads, K, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    b = torch.rand(heads, K, device="cuda") * 0.5 + 0.25
    do = torch.randn_like(i)

    def forward():
        with torch.no_grad():
            return hgrn2_scan(q, f, i, b)[0]

    def train():
        hgrn2_scan(q, f, i, b)[0].backward(do)

    row_bytes = B * T * heads * K * 2
    return {
        "B": B, "T": T, "H": heads, "K": K,
        "ours_fwd_ms": median_ms(forward),
        "ours_fwdbwd_ms": median_ms(train, grad_to_none=[q, f, i]),
        "ours_fwd_kernels_ms": sum(kernel_ms(forward).values()),
        "ours_fwdbwd_kernels_ms": sum(kernel_ms(train, grad_to_none=[q, f, i]).values()),
        "floor_fwd_ms": 4 * row_bytes / bandwidth * 1e3,
        "floor_fwdbwd_ms": 11 * row_bytes / bandwidth * 1e3,  # forward 4 rows; backward q, f, i, do in, 3 grads out
    }


def write(out_dir: str, device: str, chunk_gla, bandwidth: float, errors: dict, rows: list, tokens: int,
          small_heads: list | None = None) -> None:
    """Results so far: a run cut short still leaves its finished rows."""
    result = {
        "device": device, "date": date.today().isoformat(), "torch": torch.__version__,
        "triton": triton.__version__, "python": platform.python_version(),
        "fla": _version("fla-core") if chunk_gla else None,
        "shape": {"H": H, "K": D, "V": D, "tokens": tokens, "dtype": "bfloat16"},
        "copy_bandwidth_tb_s": bandwidth / 1e12, "correctness_bf16": errors, "rows": rows,
        "small_heads": small_heads or [],
    }
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    name = device.replace("NVIDIA ", "").split()[0].lower()
    (out / f"scan-{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    table = markdown(result)
    (out / f"scan-{name}.md").write_text(table)
    print(table)


def markdown(result: dict) -> str:
    lines = [
        f"Scan, H {H}, K = V = {D}, {result['shape']['tokens']} tokens, bf16; {result['device']}, "
        f"torch {result['torch']}, triton {result['triton']}, fla {result['fla']}, {result['date']}. "
        f"Milliseconds (median); ratio = fla / ours; bw = our bytes / time / copy bandwidth "
        f"({result['copy_bandwidth_tb_s']:.2f} TB/s).",
        "",
        "| T | B | ours fwd | fla fwd | ratio | ours f+b | fla f+b | ratio | FA2 f+b | cuDNN f+b | bw fwd | bw f+b "
        "| peak GiB ours / fla |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        get = lambda key: r.get(key, float("nan"))
        lines.append(
            f"| {r['T']} | {r['B']} | {get('ours_fwd_ms'):.3f} | {get('fla_fwd_ms'):.3f} | "
            f"{get('fla_fwd_ms') / get('ours_fwd_ms'):.2f} | {get('ours_fwdbwd_ms'):.3f} | "
            f"{get('fla_fwdbwd_ms'):.3f} | "
            f"{get('fla_fwdbwd_ms') / get('ours_fwdbwd_ms'):.2f} | {get('sdpa_flash_fwdbwd_ms'):.3f} | "
            f"{get('sdpa_cudnn_fwdbwd_ms'):.3f} | {get('ours_fwd_bandwidth_fraction'):.2f} | "
            f"{get('ours_fwdbwd_bandwidth_fraction'):.2f} | {get('ours_peak_extra_gib'):.2f} / "
            f"{get('fla_peak_extra_gib'):.2f} |"
        )
    lines += ["", "Per kernel in forward + backward: milliseconds per call (bw: its bytes / time / copy bandwidth).",
              "", "| T | " + " | ".join(KERNELS.values()) + " |", "|---|" + "---|" * len(KERNELS)]
    bandwidth = result["copy_bandwidth_tb_s"] * 1e12
    for r in result["rows"]:
        times, fractions = r["ours_kernels_ms"]["fwdbwd"], kernel_bandwidth_fractions(r, bandwidth)
        cells = [f"{times[name]:.3f} (bw {fractions[name]:.2f})" if name in times else "-" for name in KERNELS]
        lines.append(f"| {r['T']} | " + " | ".join(cells) + " |")
    for r in result["small_heads"]:
        lines.append(
            f"\nSmall heads, B {r['B']}, T {r['T']}, H {r['H']}, K = V = {r['K']}: forward {r['ours_fwd_ms']:.3f} ms a "
            f"call, its kernels {r['ours_fwd_kernels_ms']:.3f} (floor {r['floor_fwd_ms']:.3f}); forward + backward "
            f"{r['ours_fwdbwd_ms']:.3f} ms a call, its kernels {r['ours_fwdbwd_kernels_ms']:.3f} (floor "
            f"{r['floor_fwdbwd_ms']:.3f})."
        )
    return "\n".join(lines) + "\n"


def _version(package: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return None


if __name__ == "__main__":
    main()
