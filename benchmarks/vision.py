"""Training throughput of the HGRN2 ViTs beside timm's DeiT, in one process on one GPU.

Images per second of whole training steps (forward, backward, fused AdamW) at 224 px, batch 256, bf16
autocast, channels-last, on the same random images for every model: hgrn2_vit_tiny and hgrn2_vit_small
built from their configs (configs/imagenet/*.yaml, as a user trains them), hgrn2_vit_tiny with 16 px
patches (DeiT's 196 tokens rather than 256), and timm's deit_tiny_patch16_224 and deit_small_patch16_224
(timm's fused attention). Writes benchmarks/results/vision-<gpu>[-compiled[-MODE]].json.

    python benchmarks/vision.py [--batch 256] [--steps 30] [--compile [MODE]] [--out benchmarks/results]
    python benchmarks/vision.py --smoke     # CPU, tiny images, a few steps: checks the script runs
    python benchmarks/vision.py --compile --profile hgrn2_vit_tiny   # also where its step's GPU time goes

`--compile reduce-overhead` replays each step's kernels from CUDA graphs: a step of these small models launches
hundreds of kernels, and the host may take longer to launch them than the GPU to run them.
"""

import argparse
import json
import platform
import re
import sys
import time
from dataclasses import replace
from datetime import date
from pathlib import Path

import timm
import torch
import torch.nn.functional as F
import triton
import yaml

from hgrn2_lightning.model import HGRN2Config
from hgrn2_lightning.vision import PatchClassifier

sys.path.insert(0, str(Path(__file__).resolve().parent))
from step_profile import kernel_times, print_kernel_times  # noqa: E402  (benchmarks/ is not a package)

ROOT = Path(__file__).resolve().parents[1]
NUM_CLASSES = 1000


def hgrn2_from_config(name: str, patch_size: int | None = None, image_size: int | None = None):
    """The classifier that configs/imagenet/<name>.yaml trains; patch and image size can be overridden."""
    args = yaml.safe_load((ROOT / "configs" / "imagenet" / f"{name}.yaml").read_text())["model"]["init_args"]
    backbone = args["backbone"]
    config = HGRN2Config(**{k: tuple(v) if k == "grid" else v for k, v in backbone.items()})
    patch_size = patch_size or args["patch_size"]
    image_size = image_size or args["image_size"]
    if config.direction == "2d":
        config = replace(config, grid=(image_size // patch_size,) * 2)
    return PatchClassifier(config, NUM_CLASSES, image_size, patch_size)


def contenders(smoke: bool) -> dict:
    """name -> (builder, image size). The smoke run shrinks images to two patches a side."""
    size = lambda patch: 2 * patch if smoke else 224
    return {
        "hgrn2_vit_tiny": (lambda: hgrn2_from_config("hgrn2_vit_tiny", image_size=size(14)), size(14)),
        "hgrn2_vit_tiny_patch16": (
            lambda: hgrn2_from_config("hgrn2_vit_tiny", patch_size=16, image_size=size(16)), size(16)
        ),
        "hgrn2_vit_small": (lambda: hgrn2_from_config("hgrn2_vit_small", image_size=size(14)), size(14)),
        "deit_tiny_patch16_224": (
            lambda: timm.create_model("deit_tiny_patch16_224", num_classes=NUM_CLASSES, img_size=size(16)), size(16)
        ),
        "deit_small_patch16_224": (
            lambda: timm.create_model("deit_small_patch16_224", num_classes=NUM_CLASSES, img_size=size(16)), size(16)
        ),
    }


def measure(model: torch.nn.Module, image_size: int, batch: int, warmup: int, steps: int, compile: str | None,
            profile: bool = False) -> dict:
    """Images/s of training steps after `warmup` untimed ones, and the peak memory of the run; with `profile`, then
    the GPU time per step of each kernel (printed)."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cuda = device.type == "cuda"
    model = model.to(device, memory_format=torch.channels_last).train()
    params = sum(p.numel() for p in model.parameters())
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05, fused=cuda or None)
    step_model = torch.compile(model, mode=None if compile == "default" else compile) if compile else model
    generator = torch.Generator(device).manual_seed(0)
    images = torch.randn(batch, 3, image_size, image_size, device=device, generator=generator)
    images = images.contiguous(memory_format=torch.channels_last)
    labels = torch.randint(0, NUM_CLASSES, (batch,), device=device, generator=generator)

    def train_step() -> None:
        torch.compiler.cudagraph_mark_step_begin()  # the last step's graph outputs are free to be overwritten
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
            loss = F.cross_entropy(step_model(images), labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    for _ in range(warmup):
        train_step()
    if cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        train_step()
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else None
    if profile:
        print_kernel_times(*kernel_times(train_step, steps))
    return {"params_m": round(params / 1e6, 2), "images_per_s": round(batch * steps / seconds, 1), "peak_gib": peak}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--compile", nargs="?", const="default", metavar="MODE",
                        choices=["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"],
                        help="torch.compile every model (both sides), in this torch.compile mode")
    parser.add_argument("--profile", choices=list(contenders(smoke=False)), help="print where this model's step goes")
    parser.add_argument("--only", choices=list(contenders(smoke=False)), nargs="+", help="measure these models only")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny images, 2 steps; writes nothing")
    args = parser.parse_args(argv)
    if args.smoke:
        args.batch, args.warmup, args.steps = 4, 1, 1
    elif not torch.cuda.is_available():
        raise SystemExit("this benchmark times GPU training: run it on a CUDA machine, or pass --smoke to check it")

    rows = []
    for name, (build, image_size) in contenders(args.smoke).items():
        if args.only and name not in args.only:
            continue
        torch.manual_seed(0)
        row = {"model": name, "image_size": image_size, **measure(build(), image_size, args.batch, args.warmup,
                                                                   args.steps, args.compile, name == args.profile)}
        rows.append(row)
        print(json.dumps(row), flush=True)
    reference = next((r["images_per_s"] for r in rows if r["model"] == "deit_tiny_patch16_224"), None)
    for row in rows:
        if reference:
            row["vs_deit_tiny"] = round(row["images_per_s"] / reference, 3)
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else platform.processor() or "cpu"
    results = {
        "benchmark": "training images/s: forward + backward + fused AdamW, bf16 autocast, channels-last",
        "device": device,
        "date": date.today().isoformat(),
        "versions": {"torch": torch.__version__, "triton": triton.__version__, "timm": timm.__version__,
                     "python": platform.python_version()},
        "batch": args.batch,
        "timed_steps": args.steps,
        "compile": args.compile,
        "models": rows,
    }
    if not (args.smoke or args.only):  # the results file holds the whole comparison
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        compiled = "" if not args.compile else "-compiled" + ("" if args.compile == "default" else f"-{args.compile}")
        path = out / f"vision-{re.sub(r'[^a-z0-9]+', '-', device.lower()).strip('-')}{compiled}.json"
        path.write_text(json.dumps(results, indent=2) + "\n")
        print(f"wrote {path}")
    return results


if __name__ == "__main__":
    main()
