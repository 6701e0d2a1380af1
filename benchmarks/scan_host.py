"""Host time of one scan call: where the CPU spends a scan's forward + backward when the GPU is not the limit.

At a shape whose kernels take a few microseconds (B 1, T 64, one 64-wide head, bf16, a bound), the wall time
per call is the host's: the custom ops' dispatch and autograd, our launch code (layouts, tiles, buffers) and
Triton's launches. A ViT step runs 24 forward and 24 backward scan operators, so a millisecond of host per f+b is
24 ms a step of eager or default-compiled training (CUDA graphs replay without it). Prints microseconds per
call of each part and the functions with the most own time (cProfile).

    python benchmarks/scan_host.py [--calls 300]
"""

import argparse
import cProfile
import io
import pstats
import time

import torch
from triton.runtime.jit import JITFunction

import kernels.triton_scan as triton_scan
from kernels import triton_scan_dispatch as dispatch
from kernels import hgrn2_scan


def per_call_us(fn, calls: int) -> float:
    """Median over 5 rounds of the wall time per call, the GPU drained before and after each round."""
    rounds = []
    for _ in range(5):
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
        rounds.append((time.perf_counter() - start) / calls * 1e6)
    return sorted(rounds)[2]


class TritonLaunchTimer:
    """Times every Triton kernel launch (JITFunction.run) while active."""

    def __init__(self):
        self.seconds, self.launches, self._run = 0.0, 0, JITFunction.run

    def __enter__(self):
        timer, run = self, self._run

        def timed_run(jit, *args, **kwargs):
            start = time.perf_counter()
            try:
                return run(jit, *args, **kwargs)
            finally:
                timer.seconds += time.perf_counter() - start
                timer.launches += 1

        JITFunction.run = timed_run
        return self

    def __exit__(self, *exc):
        JITFunction.run = self._run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=300)
    parser.add_argument("--shape", type=int, nargs=4, default=[1, 64, 1, 64], metavar=("B", "T", "H", "K"))
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("this benchmark times the host's side of GPU launches: run it on a CUDA machine")
    B, T, H, K = args.shape
    generator = torch.Generator().manual_seed(0)
    q, f, v = (torch.randn(B, T, H, K, generator=generator).to("cuda", torch.bfloat16).requires_grad_()
               for _ in range(3))
    bound = (torch.rand(H, K, generator=generator) * 0.9).cuda().requires_grad_()
    do = torch.randn(B, T, H, K, generator=generator).to("cuda", torch.bfloat16)
    scale = K**-0.5

    def forward_backward():
        o, _ = hgrn2_scan(q, f, v, bound, check_bound=False)
        o.backward(do)

    def forward_no_grad():
        with torch.no_grad():
            hgrn2_scan(q, f, v, bound, check_bound=False)

    def device_guard():
        with torch.cuda.device(q.device.index):
            pass

    chunk = dispatch.CHUNK
    # The operators as a compiled graph calls them: below autograd, on tensors that need no gradient.
    inputs = [x.detach() for x in (q, f, v, bound)]
    fwd_args = (*inputs, None, None, scale, False, True, False, chunk, True)
    _, _, states, _, scores = triton_scan.scan_fwd(*fwd_args)
    bwd_args = (*inputs, None, states, scores, do, None, None, scale, False, False)
    parts = {
        "public f+b (autograd)": forward_backward,
        "public forward, no grad": forward_no_grad,
        "operator hgrn2::scan_fwd": lambda: triton_scan.scan_fwd_op(*fwd_args),
        "its launcher, scan_fwd": lambda: triton_scan.scan_fwd(*fwd_args),
        "operator hgrn2::scan_bwd": lambda: triton_scan.scan_bwd_op(*bwd_args),
        "its launcher, scan_bwd": lambda: triton_scan.scan_bwd(*bwd_args),
        "torch.empty on the GPU": lambda: torch.empty(64, device="cuda"),
        "torch.zeros on the GPU": lambda: torch.zeros(64, device="cuda"),
        "with torch.cuda.device(q.device.index)": device_guard,
    }
    for _ in range(20):  # compile every kernel, warm the allocator
        forward_backward()
    print(f"shape B {B} T {T} H {H} K {K}, bf16, a bound; microseconds per call (host-bound):")
    for name, fn in parts.items():
        print(f"  {name:40s} {per_call_us(fn, args.calls):8.1f}")
    for name in ("public f+b (autograd)", "its launcher, scan_fwd", "its launcher, scan_bwd"):
        with TritonLaunchTimer() as timer:
            for _ in range(args.calls):
                parts[name]()
            torch.cuda.synchronize()
        print(f"  Triton launches in {name}: {timer.launches / args.calls:.0f} a call, "
              f"{timer.seconds / timer.launches * 1e6:.1f} us each")
    profile = cProfile.Profile()
    profile.enable()
    for _ in range(args.calls):
        forward_backward()
    torch.cuda.synchronize()
    profile.disable()
    text = io.StringIO()
    pstats.Stats(profile, stream=text).sort_stats("tottime").print_stats(25)
    print(text.getvalue())


if __name__ == "__main__":
    main()
