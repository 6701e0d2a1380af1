"""Whole training steps of the language model, as users run them: `hgrn2 fit` with a config and trainer flags.

Each `--run NAME="FLAGS"` is one `hgrn2 fit` process (fresh, so its first-step time includes imports,
kernel compilation and data setup) for `--steps` optimizer steps; its ThroughputMonitor writes tokens/s,
MFU, peak memory per device, first-step seconds and the per-step losses (mean over ranks). Baselines
(`--baselines llama fla`) train transformers' LlamaForCausalLM (SDPA) and fla's HGRN2ForCausalLM of the
same size in a plain loop in this process: bf16 autocast, fused AdamW, the same batch shape.

The data is a synthetic 32k-vocabulary token folder made here from the Python standard library's
source (byte pairs folded into 32,000 ids, with a word-level tokenizer.json that names them): it
trains like text (the loss falls) and needs no download.

    python benchmarks/train.py --steps 60 --run "1gpu=" --run "ddp2=--trainer.devices 2 --trainer.strategy ddp" \
        [--config configs/lm/hgrn2_370m.yaml] [--baselines llama] [--out benchmarks/results]
    python benchmarks/train.py --smoke     # CPU, a tiny model, two runs of a few steps: checks the script runs

With several runs the table ends with each run's per-step losses against the first run's. The fast path
against the plain PyTorch scan (same data and seed; the plain scan needs a smaller batch):

    python benchmarks/train.py --steps 200 --tag=-curves \
        --run "plain=--model.init_args.scan_backend chunked --model.init_args.compile_blocks false \
            --model.init_args.recompute_scan_states false --model.init_args.chunked_loss false \
            --data.init_args.batch_size 4" \
        --run "fast=--data.init_args.batch_size 4"
"""

import argparse
import json
import re
import shlex
import subprocess
import sys
import time
from contextlib import nullcontext
from datetime import date
from pathlib import Path

import numpy as np
import torch
import triton

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

import fla_tuning  # noqa: E402  (benchmarks/ is not a package)
from datamodules.text import read_documents  # noqa: E402

VOCAB = 32000


def make_token_folder(folder: Path, vocab_size: int = VOCAB) -> Path:
    """train.bin / val.bin of the stdlib's bytes, two bytes per token folded into `vocab_size` ids."""
    if (folder / "meta.json").exists():
        return folder
    from tokenizers import Tokenizer, models

    folder.mkdir(parents=True, exist_ok=True)
    data = np.frombuffer(b"".join(read_documents("stdlib")), dtype=np.uint8)
    data = data[: len(data) // 2 * 2].astype(np.int64)
    tokens = ((data[0::2] * 256 + data[1::2]) % (vocab_size - 1)).astype(np.uint16)
    split = len(tokens) * 98 // 100
    tokens[:split].tofile(folder / "train.bin")
    tokens[split:].tofile(folder / "val.bin")
    vocab = {f"t{i}": i for i in range(vocab_size - 1)} | {"</s>": vocab_size - 1}
    Tokenizer(models.WordLevel(vocab, unk_token="t0")).save(str(folder / "tokenizer.json"))
    meta = {"tokenizer": str((folder / "tokenizer.json").resolve()), "dtype": "uint16", "val_bytes_per_token": 2.0}
    (folder / "meta.json").write_text(json.dumps(meta) + "\n")
    return folder


def run_ours(name: str, flags: str, config: str, data: Path, steps: int, out: Path) -> dict:
    """One `hgrn2 fit` process; returns its throughput.json with the command that made it."""
    log_dir = out / "runs" / name
    # Language-model configs read the synthetic token folder; other configs bring their data in FLAGS.
    data_flags = ["--data.init_args.source", str(data)] if "TextDataModule" in Path(config).read_text() else []
    command = [
        sys.executable, "-m", "hgrn2_lightning", "fit", "--config", config, *data_flags,
        "--trainer.max_steps", str(steps),
        "--trainer.limit_val_batches", "0",
        "--trainer.enable_checkpointing", "false",
        "--trainer.callbacks", "[]",
        "--trainer.logger.init_args.save_dir", str(log_dir),
        "--trainer.default_root_dir", str(log_dir),
        *shlex.split(flags),
    ]  # fmt: skip
    print(f"[{name}] {shlex.join(command)}", flush=True)
    started = time.time()
    record = {"name": name, "command": shlex.join(["hgrn2", *command[3:]])}
    finished = subprocess.run(command, cwd=ROOT)
    if finished.returncode:  # recorded, so one failing strategy does not cost the other runs' numbers
        return {**record, "error": f"exit status {finished.returncode}"}
    summary = json.loads(next(log_dir.rglob("throughput.json")).read_text())
    return {**record, "wall_s": time.time() - started, **summary}


def build_baseline(name: str, smoke: bool) -> torch.nn.Module:
    """The anchors' models (../shared/ANCHORS.md): hidden 1024, 24 layers, MLP 2816, vocab 32000."""
    size = dict(hidden_size=64, num_hidden_layers=2, intermediate_size=128) if smoke else {}
    size = {"hidden_size": 1024, "num_hidden_layers": 24, "intermediate_size": 2816, **size}
    if name == "llama":
        from transformers import LlamaConfig, LlamaForCausalLM

        heads = 2 if smoke else 8
        config = LlamaConfig(vocab_size=VOCAB, num_attention_heads=heads, num_key_value_heads=heads, **size)
        return LlamaForCausalLM._from_config(config, attn_implementation="sdpa")
    if name == "fla":
        from fla.models import HGRN2Config, HGRN2ForCausalLM

        return HGRN2ForCausalLM(HGRN2Config(vocab_size=VOCAB, expand_ratio=32 if smoke else 128, **size))
    raise ValueError(f"unknown baseline {name!r}: choose llama or fla")


def run_baseline(name: str, seq_len: int, batch: int, steps: int, smoke: bool, weights: str = "fp32") -> dict:
    """Plain loop, bf16 autocast, fused AdamW, the same data, over fp32 weights (what bf16-mixed does) or with
    `weights` "bf16" over bf16 weights (ANCHORS.md's setting; ours: `--trainer.precision bf16-true`)."""
    device = "cpu" if smoke else "cuda"
    torch.manual_seed(0)
    model = build_baseline(name, smoke).to(device, torch.bfloat16 if weights == "bf16" else torch.float32)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4, fused=device == "cuda")
    tokens = torch.randint(0, VOCAB, (batch, seq_len + 1), device=device)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    step_ends = []
    for _ in range(steps):
        with torch.autocast(device, dtype=torch.bfloat16):
            loss = model(input_ids=tokens[:, :-1], labels=tokens[:, 1:]).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss.item()  # one sync per step, as the Lightning loop's finite-loss check
        step_ends.append(time.perf_counter())
    timed = np.diff(step_ends)[min(5, steps - 2) :]
    return {
        "name": name if weights == "fp32" else f"{name}, bf16 weights",
        "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
        "seq_len": seq_len,
        "batch": batch,
        "per_s": batch * seq_len / float(np.median(timed)),
        "peak_gib_per_device": [torch.cuda.max_memory_allocated() / 2**30] if device == "cuda" else None,
    }


def loss_agreement(runs: list[dict]) -> list[dict]:
    """How far each later run's per-step losses lie from the first run's: the check that a fast path trains like
    the plain one (same config, data and seed, e.g. `--run "plain=--model.init_args.scan_backend chunked"`)."""
    finished = [run for run in runs if run.get("losses")]
    rows = []
    for run in finished[1:]:
        reference = np.array(finished[0]["losses"])
        losses = np.array(run["losses"])
        steps = min(len(reference), len(losses))
        relative = np.abs(losses[:steps] - reference[:steps]) / np.abs(reference[:steps])
        rows.append({"name": run["name"], "against": finished[0]["name"], "steps": steps,
                     "max_relative": float(relative.max()), "mean_relative": float(relative.mean())})
    return rows


def markdown(result: dict) -> str:
    lines = [
        f"Training steps on {result['device']} ({result['date']}; torch {result['torch']}, "
        f"triton {result['triton']}); config {result['config']}, {result['steps']} steps per run.",
        "",
        f"| run | devices | {result['unit']}/s | per device | MFU | peak GiB per device | first step s |",
        "|---|---|---|---|---|---|---|",
    ]
    for run in result["ours"]:
        if "error" in run:
            lines.append(f"| {run['name']} | failed: {run['error']} | | | | | |")
            continue
        mfu = f"{run['mfu']:.1%}" if run.get("mfu") else "-"
        peaks = ", ".join(f"{p:.1f}" for p in run["peak_gib_per_device"] or []) or "-"
        lines.append(
            f"| {run['name']} | {run['world_size']} | {run['per_s']:,.0f} | {run['per_s_per_device']:,.0f} | {mfu} "
            f"| {peaks} | {run['first_step_s']:.0f} |"
        )
    for base in result["baselines"]:
        peaks = ", ".join(f"{p:.1f}" for p in base["peak_gib_per_device"] or []) or "-"
        lines.append(
            f"| {base['name']} ({base['params_m']:.0f}M, T {base['seq_len']} x {base['batch']}) | 1 "
            f"| {base['per_s']:,.0f} | {base['per_s']:,.0f} | - | {peaks} | - |"
        )
    for agreement in loss_agreement(result["ours"]):
        lines.append(
            f"\n{agreement['name']} against {agreement['against']}: per-step losses within "
            f"{agreement['max_relative']:.1e} relative (mean {agreement['mean_relative']:.1e}) over "
            f"{agreement['steps']} steps."
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/lm/hgrn2_370m.yaml")
    parser.add_argument("--run", action="append", default=[], metavar='NAME="FLAGS"', help="one hgrn2 fit run")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--baselines", nargs="*", default=[], choices=["llama", "fla"])
    parser.add_argument("--baseline-shape", default="2048x16", help="SEQ_LENxBATCH of the baselines")
    parser.add_argument("--baseline-weights", choices=["fp32", "bf16"], default="fp32",
                        help="fp32: bf16 autocast over fp32 weights (as bf16-mixed); bf16: bf16 weights (ANCHORS.md)")
    parser.add_argument("--data", default="runs/bench-tokens", help="the synthetic token folder (made if missing)")
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--tag", default="", help="suffix of the result file name")
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny model and data: checks the script runs")
    parser.add_argument("--fla-tuning", default="benchmarks/fla-tuning",
                        help="fla's autotuning results, reused and kept (benchmarks/fla_tuning.py)")
    args = parser.parse_args()

    out = Path(args.out)
    data = make_token_folder(Path(args.data))
    runs = args.run
    if args.smoke:  # Inductor's CPU compile of the blocks would take a minute on a cold cache: the smoke runs eager
        smoke_flags = (
            "--trainer.accelerator cpu --trainer.precision 32 --model.init_args.compile_blocks false "
            "--model.init_args.backbone.d_model 32 "
            "--model.init_args.backbone.n_layers 2 --model.init_args.backbone.expand_ratio 16 "
            "--model.init_args.backbone.mlp_hidden 64 --data.init_args.seq_len 64 --data.init_args.batch_size 2 "
            "--data.init_args.num_workers 0"
        )
        runs = [f"smoke={smoke_flags}", f"smoke-again={smoke_flags}"]  # the second: the loss comparison
    device = torch.cuda.get_device_name() if torch.cuda.is_available() and not args.smoke else "cpu"
    result = {
        "device": device,
        "date": date.today().isoformat(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "config": args.config,
        "steps": args.steps,
        "unit": "tokens",
        "ours": [],
        "baselines": [],
    }
    gpu = re.search(r"\b[A-Z]\d{2,4}\b", device)  # "NVIDIA H100 80GB HBM3" -> h100
    gpu = gpu.group().lower() if gpu else device.split()[0].lower()
    stem = f"train-{gpu}{args.tag}"
    out.mkdir(parents=True, exist_ok=True)

    def write() -> None:  # after every run: a later failure or timeout keeps what was measured
        (out / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
        (out / f"{stem}.md").write_text(markdown(result))

    for spec in runs:
        name, _, flags = spec.partition("=")
        result["ours"].append(run_ours(name, flags, args.config, data, args.steps, out))
        result["unit"] = result["ours"][0].get("unit", "tokens")
        write()
    seq_len, batch = (64, 2) if args.smoke else (int(x) for x in args.baseline_shape.split("x"))
    for name in args.baselines:
        with fla_tuning.reused(args.fla_tuning) if name == "fla" else nullcontext():
            result["baselines"].append(run_baseline(name, seq_len, batch, args.steps, args.smoke,
                                                    args.baseline_weights))
        write()
    result["loss_agreement"] = loss_agreement(result["ours"])
    write()
    print(markdown(result))


if __name__ == "__main__":
    main()
