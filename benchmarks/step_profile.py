"""Where one training step of the language model spends its GPU time: kernel time per step, by kind.

Builds the LanguageModel of an LM config (its speed options included) and runs the step `hgrn2 fit` runs
(bf16 autocast over float32 weights, gradient clipping, fused AdamW) on random tokens, then profiles a few
steps and sums each kernel's GPU time. Kinds: the scan's kernels, matmuls, Inductor's fused kernels (the
compiled blocks), the optimizer, the fused cross-entropy, the rest. Writes
benchmarks/results/step-profile-<gpu>-T<seq-len>.json.

    python benchmarks/step_profile.py [--config configs/lm/hgrn2_370m.yaml] [--seq-len 2048] [--batch 16]
"""

import argparse
import json
import re
from collections import defaultdict
from datetime import date
from pathlib import Path

import torch
import yaml

from hgrn2_lightning import LanguageModel
from hgrn2_lightning.model import HGRN2Config
from hgrn2_lightning.optim import OptimConfig
from kernels import triton_scan_kernels, triton_scan_small

ROOT = Path(__file__).resolve().parents[1]
# Every kernel the scan modules define, so that a new one is counted as the scan's (the one-pass forward and the
# carry pass were once counted as "other").
SCAN_KERNELS = sorted(name for module in (triton_scan_kernels, triton_scan_small) for name in vars(module)
                      if name.endswith("_kernel"))
KINDS = {  # first match wins
    "scan": rf"^({'|'.join(SCAN_KERNELS)})$",
    "cross-entropy": r"^_loss_and_grad_kernel$",
    "matmul": r"gemm|nvjet|cutlass|sm90_xmma|Kernel2",
    "optimizer": r"multi_tensor|fused_adam|FusedAdam",
    "compiled (Inductor)": r"^triton_",
}


def kind_of(name: str) -> str:
    return next((kind for kind, pattern in KINDS.items() if re.search(pattern, name)), "other")


def kernel_times(step, steps: int) -> tuple[dict[str, float], dict[str, float]]:
    """GPU ms per step of each kernel that `steps` calls of `step` launch, and their sums by kind."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as profile:
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
    kernels: dict[str, float] = defaultdict(float)
    for event in profile.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            kernels[event.name] += event.device_time_total / 1e3 / steps
    kinds: dict[str, float] = defaultdict(float)
    for name, ms in kernels.items():
        kinds[kind_of(name)] += ms
    return kernels, kinds


def print_kernel_times(kernels: dict[str, float], kinds: dict[str, float], top: int = 25) -> None:
    print("GPU kernel time per step by kind:")
    for kind, ms in sorted(kinds.items(), key=lambda item: -item[1]):
        print(f"  {kind:22s} {ms:7.2f} ms")
    for name, ms in sorted(kernels.items(), key=lambda item: -item[1])[:top]:
        print(f"  {ms:7.2f}  {name[:110]}")


def build(config_path: str) -> LanguageModel:
    args = yaml.safe_load(Path(config_path).read_text())["model"]["init_args"]
    options = {k: v for k, v in args.items() if k not in ("backbone", "optim")}
    return LanguageModel(backbone=HGRN2Config(**args["backbone"]), optim=OptimConfig(**args.get("optim", {})),
                         vocab_size=32000, **options)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(ROOT / "configs" / "lm" / "hgrn2_370m.yaml"))
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = parser.parse_args()

    module = build(args.config).cuda()
    optimizer = torch.optim.AdamW(module.parameters(), lr=1e-4, fused=True)
    tokens = torch.randint(0, 32000, (args.batch, args.seq_len + 1), device="cuda")
    batch = (tokens[:, :-1], tokens[:, 1:])

    def step() -> None:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = module._loss(batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(module.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(3):  # compilation and autotuning
        step()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(args.steps):
        step()
    end.record()
    torch.cuda.synchronize()
    wall_ms = start.elapsed_time(end) / args.steps

    kernels, kinds = kernel_times(step, args.steps)
    tokens_per_step = args.batch * args.seq_len
    result = {
        "device": torch.cuda.get_device_name(), "date": str(date.today()), "torch": torch.__version__,
        "config": args.config, "seq_len": args.seq_len, "batch": args.batch,
        "step_ms": wall_ms, "tokens_per_s": tokens_per_step / wall_ms * 1e3,
        "kernel_ms_by_kind": dict(sorted(kinds.items(), key=lambda item: -item[1])),
        "top_kernels_ms": dict(sorted(kernels.items(), key=lambda item: -item[1])[:25]),
    }
    print(f"step {wall_ms:.1f} ms ({result['tokens_per_s']:,.0f} tokens/s)")
    print_kernel_times(kernels, kinds)
    gpu = re.sub(r"[^a-z0-9]+", "", torch.cuda.get_device_name().lower().split()[1])
    out = Path(args.out) / f"step-profile-{gpu}-T{args.seq_len}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
