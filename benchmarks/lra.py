"""Training and inference throughput (sequences/s) of the LRA ListOps and Path-X configs, one GPU.

The model, batch size and precision (bf16 autocast) come from configs/lra/<task>.yaml; the inputs
are random, shaped as the task's: ListOps 2048 token ids with lengths drawn in (500, 2000), Path-X
16384 pixel values. A training step is forward, backward and the AdamW step; the median step time of
`--steps` timed steps after `--warmup` untimed ones (Triton compiles and autotunes during those)
gives sequences/s. If the config's batch does not fit, the batch is halved until it does (recorded).

    python benchmarks/lra.py [--tasks listops pathx] [--out benchmarks/results]
    python benchmarks/lra.py --compile-blocks      the blocks compiled (model.compile_blocks): lra-<gpu>-compiled.json
    python benchmarks/lra.py --smoke      a tiny CPU run of the same code, to know the script works
"""

import argparse
import importlib
import json
import platform
import statistics
import time
from datetime import date
from pathlib import Path

import torch
import torch.nn.functional as F
import yaml

from hgrn2_lightning.lra import SequenceClassifier
from hgrn2_lightning.model import HGRN2Config
from hgrn2_lightning.optim import OptimConfig

ROOT = Path(__file__).resolve().parents[1]


def build(task: str, smoke: bool, compile_blocks: bool = False) -> tuple[SequenceClassifier, int, int, bool]:
    """The config's model, batch size, sequence length, and whether it reads tokens (toy sizes with `smoke`)."""
    config = yaml.safe_load((ROOT / "configs" / "lra" / f"{task}.yaml").read_text())
    model_args, data_args = config["model"]["init_args"], config["data"]["init_args"]
    module, name = config["data"]["class_path"].rsplit(".", 1)
    data = getattr(importlib.import_module(module), name)(**data_args)  # attributes only; nothing is read
    backbone = dict(model_args["backbone"])
    length = data.max_length if data.vocab_size else data.grid[0] * data.grid[1]
    if smoke:  # the same code path at toy sizes
        side = 8
        backbone.update(d_model=8, n_layers=2, mlp_hidden=8, grid=[side, side] if backbone.get("grid") else None)
        length = 64 if data.vocab_size else side * side
    model = SequenceClassifier(
        backbone=HGRN2Config(**{**backbone, "grid": tuple(backbone["grid"]) if backbone.get("grid") else None}),
        num_classes=data.num_classes,
        vocab_size=data.vocab_size,
        input_channels=data.input_channels,
        paired=data.paired,
        positional_encoding=model_args.get("positional_encoding", "none"),
        optim=OptimConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in model_args["optim"].items()}),
        compile_blocks=compile_blocks,
    )
    return model, data.batch_size, length, data.vocab_size is not None


def random_batch(batch: int, length: int, tokens: bool, vocab_size: int | None, device: str):
    if tokens:
        lengths = torch.randint(min(501, length), min(2000, length) + 1, (batch,), device=device)
        inputs = torch.randint(1, vocab_size, (batch, length), device=device)
        inputs = inputs * (torch.arange(length, device=device)[None] < lengths[:, None])
    else:
        inputs = torch.rand(batch, length, 1, device=device)
        lengths = torch.full((batch,), length, device=device)
    return inputs, lengths, torch.randint(0, 2, (batch,), device=device)


def median_seconds(step, steps: int, warmup: int, device: str) -> float:
    times = []
    for n in range(warmup + steps):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        step()
        if device == "cuda":
            torch.cuda.synchronize()
        if n >= warmup:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def time_steps(
    model, optimizer, batch, autocast, steps: int, warmup: int, device: str
) -> tuple[float, float, float | None]:
    """Median seconds of a training step and of an inference step, and the training's peak memory (GiB)."""
    inputs, lengths, labels = batch

    def train_step():
        with autocast:
            loss = F.cross_entropy(model(inputs, lengths).float(), labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def eval_step():
        with torch.no_grad(), autocast:
            model(inputs, lengths)

    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    model.train()
    train = median_seconds(train_step, steps, warmup, device)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None
    model.eval()
    return train, median_seconds(eval_step, steps, warmup, device), peak


def measure(task: str, steps: int, warmup: int, smoke: bool, compile_blocks: bool = False) -> dict:
    device = "cpu" if smoke else "cuda"
    module, config_batch, length, tokens = build(task, smoke, compile_blocks)
    batch = 2 if smoke else config_batch
    model = module.model.to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=module.optim.lr, betas=module.optim.betas)
    autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=not smoke)
    row = {"task": task, "config": f"configs/lra/{task}.yaml", "config_batch": config_batch, "seq_len": length,
           "parameters": sum(p.numel() for p in model.parameters()), "compile_blocks": compile_blocks}
    while True:
        batch_data = random_batch(batch, length, tokens, module.hparams.vocab_size, device)
        try:
            train, evaluate, peak = time_steps(model, optimizer, batch_data, autocast, steps, warmup, device)
            break
        except torch.OutOfMemoryError:
            optimizer.zero_grad(set_to_none=True)
            torch.cuda.empty_cache()
            if batch == 1:
                raise
            batch //= 2
            print(f"{task}: out of memory, trying batch {batch}")
    row.update(batch=batch, train_step_ms=train * 1e3, train_seqs_per_s=batch / train,
               eval_seqs_per_s=batch / evaluate, train_peak_gib=peak)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", nargs="+", default=["listops", "pathx"])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--compile-blocks", action="store_true", help="compile each block (model.compile_blocks)")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU; prints, writes nothing")
    args = parser.parse_args()
    if not args.smoke and not torch.cuda.is_available():
        parser.error("this benchmark needs a CUDA GPU; --smoke runs a tiny version on the CPU")
    steps, warmup = (2, 1) if args.smoke else (args.steps, args.warmup)
    rows = []
    for task in args.tasks:
        rows.append(measure(task, steps, warmup, args.smoke, args.compile_blocks))
        print(json.dumps(rows[-1]))
    if args.smoke:
        return
    device = torch.cuda.get_device_name()
    result = {"device": device, "date": date.today().isoformat(), "torch": torch.__version__,
              "python": platform.python_version(), "precision": "bf16 autocast", "rows": rows}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = device.replace("NVIDIA ", "").split()[0].lower() + ("-compiled" if args.compile_blocks else "")
    (out / f"lra-{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out / f'lra-{name}.json'}")


if __name__ == "__main__":
    main()
