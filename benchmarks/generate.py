"""Generation speed and memory of our HGRN2 beside fla's HGRN2 and a Llama of the same size (HF generate).

The ~370M configuration (configs/lm/hgrn2_370m.yaml: d 1024, 24 layers, expand ratio 128, SwiGLU 2816,
vocabulary 32000), random weights, bf16, greedy decoding of random prompts, every contender in one run:
- throughput: batch 16, 512-token prompts, 128 new tokens each; new tokens per second with the prefill
  included, from prompt ids on the host to new ids on the host;
- latency: batch 1, time per new token of decoding, (t(128 new) - t(1 new)) / 127, so the prefill drops out;
- memory: peak GPU memory generating 128 and 16,384 new tokens at batch 16 (ours only at 16,384: the
  baselines would take many minutes there).
Ours is checked first: decode-path logits against the full forward (bf16), so every time belongs to a
path that is right. Results go to <out>/generate-<gpu>.json and .md after each contender, so a run cut
short keeps what it finished.

    python benchmarks/generate.py [--out benchmarks/results] [--no-fla] [--no-llama]
    python benchmarks/generate.py --smoke --out /tmp/bench     tiny sizes on the CPU, in seconds
"""

import argparse
import json
import platform
import statistics
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from datetime import date
from pathlib import Path

import torch

from hgrn2_lightning.generate import Generator
from hgrn2_lightning.lm import CausalLM
from hgrn2_lightning.model import HGRN2Config

sys.path.insert(0, str(Path(__file__).resolve().parent))
import fla_tuning  # noqa: E402  (benchmarks/ is not a package)

START = time.perf_counter()


@dataclass
class Sizes:
    d_model: int = 1024
    n_layers: int = 24
    expand_ratio: int = 128
    mlp_hidden: int = 2816
    vocab_size: int = 32000
    batch: int = 16
    prompt: int = 512
    new_tokens: int = 128
    long_new_tokens: int = 16384
    repeats: int = 5


SMOKE = Sizes(d_model=64, n_layers=2, expand_ratio=16, mlp_hidden=128, vocab_size=100, batch=2, prompt=16,
              new_tokens=8, long_new_tokens=64, repeats=2)


def log(message: str) -> None:
    print(f"[{time.perf_counter() - START:7.1f} s] {message}", flush=True)


def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def seconds(fn, repeats: int) -> float:
    """Median wall time of fn after one warm-up call (kernel compilation, autotuning, graph capture)."""
    fn()
    times = []
    for _ in range(repeats):
        synchronize()
        start = time.perf_counter()
        fn()
        synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def peak_gib(fn) -> float:
    synchronize()
    torch.cuda.reset_peak_memory_stats()
    fn()
    synchronize()
    return torch.cuda.max_memory_allocated() / 2**30


def measure(run, sizes: Sizes, device: str, repeats: int, long: bool) -> dict:
    """run(prompts: list[list[int]], new_tokens) -> new ids on the host. The numbers of one contender."""
    generator = torch.Generator().manual_seed(0)
    prompts = torch.randint(0, sizes.vocab_size, (sizes.batch, sizes.prompt), generator=generator).tolist()
    B, N = sizes.batch, sizes.new_tokens
    row = {}
    full = seconds(lambda: run(prompts, N), repeats)
    first = seconds(lambda: run(prompts, 1), repeats)
    row.update(batch_seconds=full, new_tokens_per_s=B * N / full, prefill_ms=first * 1e3,
               batch_step_ms=(full - first) / (N - 1) * 1e3)
    log(f"  batch {B}: {row['new_tokens_per_s']:,.0f} new tokens/s ({full:.3f} s, prefill ~{first * 1e3:.1f} ms)")
    one = prompts[:1]
    decode = seconds(lambda: run(one, N), repeats) - seconds(lambda: run(one, 1), repeats)
    row["latency_ms_per_token"] = decode / (N - 1) * 1e3
    log(f"  batch 1: {row['latency_ms_per_token']:.3f} ms per token")
    if device == "cuda":
        lengths = [N, sizes.long_new_tokens] if long else [N]
        for new_tokens in lengths:
            row[f"peak_gib_{new_tokens}_new"] = peak_gib(lambda new_tokens=new_tokens: run(prompts, new_tokens))
        log(f"  peak memory (GiB) at {lengths} new tokens: {[round(row[f'peak_gib_{n}_new'], 3) for n in lengths]}")
    return row


def bench_ours(sizes: Sizes, device: str, dtype: torch.dtype, result: dict, save) -> None:
    """Our rows, with the CUDA graph and (on the GPU) without; the model is freed on return."""
    config = HGRN2Config(d_model=sizes.d_model, n_layers=sizes.n_layers, expand_ratio=sizes.expand_ratio,
                         mlp_hidden=sizes.mlp_hidden)
    torch.manual_seed(0)
    with torch.device(device):
        model = CausalLM(config, sizes.vocab_size).to(dtype).eval()
    result["params_m"]["ours"] = sum(p.numel() for p in model.parameters()) / 1e6
    graphed = Generator(model)
    result["ours_decode_vs_forward_rel_err"] = decode_error(graphed, sizes)
    log(f"ours: {result['params_m']['ours']:.1f}M parameters; "
        f"decode vs forward {result['ours_decode_vs_forward_rel_err']:.1e}")
    run = lambda prompts, new_tokens: graphed.generate_ids(prompts, new_tokens, temperature=0)
    result["rows"]["ours"] = measure(run, sizes, device, sizes.repeats, long=True)
    save()
    log("ours, the decode step compiled (torch.compile) inside the CUDA graph")
    start = time.perf_counter()
    compiled = Generator(model, compile_step=True)
    compiled.generate_ids([[0]], 2, temperature=0)  # compiles and captures batch size 1 ...
    compiled.generate_ids([[0]] * sizes.batch, 2, temperature=0)  # ... and the batch's size
    result["ours_compiled_first_call_s"] = time.perf_counter() - start
    result["ours_compiled_decode_vs_forward_rel_err"] = decode_error(compiled, sizes)
    run = lambda prompts, new_tokens: compiled.generate_ids(prompts, new_tokens, temperature=0)
    result["rows"]["ours_compiled"] = measure(run, sizes, device, sizes.repeats, long=False)
    save()
    if device == "cuda":
        log("ours, eager (no CUDA graph)")
        eager = Generator(model, cuda_graph=False)
        run = lambda prompts, new_tokens: eager.generate_ids(prompts, new_tokens, temperature=0)
        result["rows"]["ours_eager"] = measure(run, sizes, device, 2, long=False)
        save()


def decode_error(generator: Generator, sizes: Sizes, steps: int = 8) -> float:
    """Worst relative error of the decode path's logits (ragged prompts, packed prefill) against the full forward."""
    lengths = [sizes.prompt, sizes.prompt // 3 + 1, 1]
    prompts = [torch.randint(0, sizes.vocab_size, (n,)).tolist() for n in lengths]
    logits = [generator.prefill(prompts).float()]
    tokens = []
    for _ in range(steps):
        tokens.append(logits[-1].argmax(-1))
        logits.append(generator.step(tokens[-1]).float().clone())
    decoded, tokens = torch.stack(logits, 1), torch.stack(tokens, 1)
    worst = 0.0
    for n, prompt in enumerate(prompts):
        with torch.inference_mode():
            sequence = torch.tensor(prompt + tokens[n].tolist(), device=decoded.device)[None]
            full = generator.model(sequence)[0, len(prompt) - 1 :].float()
        worst = max(worst, ((decoded[n] - full).norm() / full.norm()).item())
    return worst


def hf_generate(model, device: str):
    """HF generate, greedy, exactly new_tokens tokens (min = max, so no end-of-text stops it early)."""

    def run(prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
        ids = torch.tensor(prompts, device=device)
        with torch.inference_mode():
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                                 min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
        return out[:, ids.shape[1] :].tolist()

    return run


def fla_hgrn2(sizes: Sizes, device: str, dtype: torch.dtype):
    from fla.models import HGRN2Config as FlaHGRN2Config
    from fla.models import HGRN2ForCausalLM

    config = FlaHGRN2Config(hidden_size=sizes.d_model, num_hidden_layers=sizes.n_layers,
                            expand_ratio=sizes.expand_ratio, intermediate_size=sizes.mlp_hidden,
                            vocab_size=sizes.vocab_size)
    with torch.device(device):
        return HGRN2ForCausalLM(config).to(dtype).eval()


def llama(sizes: Sizes, device: str, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM, LlamaConfig

    heads = sizes.d_model // sizes.expand_ratio  # 8 heads of 128, as HGRN2's
    config = LlamaConfig(hidden_size=sizes.d_model, intermediate_size=sizes.mlp_hidden,
                         num_hidden_layers=sizes.n_layers, num_attention_heads=heads, num_key_value_heads=heads,
                         vocab_size=sizes.vocab_size, max_position_embeddings=sizes.prompt + sizes.long_new_tokens)
    with torch.device(device):
        return AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").to(dtype).eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU, without fla: checks the script")
    parser.add_argument("--no-fla", action="store_true", help="skip fla's HGRN2 (its kernels compile for minutes)")
    parser.add_argument("--no-llama", action="store_true", help="skip the HF Llama baseline")
    parser.add_argument("--fla-tuning", default="benchmarks/fla-tuning",
                        help="fla's autotuning results, reused and kept (benchmarks/fla_tuning.py)")
    args = parser.parse_args()
    sizes = SMOKE if args.smoke else Sizes()
    device = "cpu" if args.smoke else "cuda"
    dtype = torch.float32 if args.smoke else torch.bfloat16
    name = "cpu" if args.smoke else torch.cuda.get_device_name().replace("NVIDIA ", "").split()[0].lower()
    result = {
        "device": "cpu" if args.smoke else torch.cuda.get_device_name(), "date": date.today().isoformat(),
        "torch": torch.__version__, "python": platform.python_version(), "sizes": asdict(sizes),
        "dtype": str(dtype).removeprefix("torch."), "versions": _versions(), "params_m": {}, "rows": {}, "errors": {},
    }

    save = lambda: write(args.out, name, result)
    bench_ours(sizes, device, dtype, result, save)

    # fla's kernels need a GPU; the smoke run tries the Llama baseline on the CPU, to check its code path.
    baselines = (("llama_sdpa", llama, args.no_llama), ("fla_hgrn2", fla_hgrn2, args.no_fla or args.smoke))
    for label, build, skip in baselines:
        if skip:
            continue
        with fla_tuning.reused(args.fla_tuning) if label == "fla_hgrn2" else nullcontext():
            try:
                baseline = build(sizes, device, dtype)
            except ImportError as error:
                log(f"{label}: not importable ({error}); its row stays empty")
                continue
            result["params_m"][label] = sum(p.numel() for p in baseline.parameters()) / 1e6
            log(f"{label}: {result['params_m'][label]:.1f}M parameters")
            try:
                result["rows"][label] = measure(hf_generate(baseline, device), sizes, device, 2, long=False)
            except Exception as error:  # a baseline broken by a version mismatch must not cost the other rows
                result["errors"][label] = f"{type(error).__name__}: {error}"
                log(f"{label} failed: {result['errors'][label]}")
        save()
        del baseline
        if device == "cuda":
            torch.cuda.empty_cache()


def write(out_dir: str, name: str, result: dict) -> None:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"generate-{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    table = markdown(result)
    (out / f"generate-{name}.md").write_text(table)
    print(table, flush=True)


def markdown(result: dict) -> str:
    s = result["sizes"]
    long, short = f"peak_gib_{s['long_new_tokens']}_new", f"peak_gib_{s['new_tokens']}_new"
    fla = result["rows"].get("fla_hgrn2", {})
    caption = (
        f"Generation, {s['d_model']} wide, {s['n_layers']} layers, expand ratio {s['expand_ratio']}, vocabulary "
        f"{s['vocab_size']}, random weights, {result['dtype']}, greedy; {result['device']}, torch {result['torch']}, "
        f"{result['date']}. Throughput: batch {s['batch']}, {s['prompt']}-token prompts, {s['new_tokens']} new "
        f"tokens, prefill included. Latency: batch 1, per new token. Our decode path against the full forward: "
        f"relative error {result['ours_decode_vs_forward_rel_err']:.1e}."
    )
    if "ours_compiled_first_call_s" in result:
        caption += (
            f" ours_compiled: the decode step through torch.compile, {result['ours_compiled_first_call_s']:.0f} s"
            f" to compile and capture batch sizes 1 and {s['batch']}; against the full forward"
            f" {result['ours_compiled_decode_vs_forward_rel_err']:.1e}."
        )
    header = (
        f"| model | params (M) | new tokens/s | x fla | prefill ms | step ms (B {s['batch']}) | ms/token (B 1) "
        f"| x fla | peak GiB, {s['new_tokens']} new | peak GiB, {s['long_new_tokens']} new |"
    )
    lines = [caption, "", header, "|---|---|---|---|---|---|---|---|---|---|"]
    fmt = lambda x, spec: "-" if x is None else format(x, spec)
    for label, r in result["rows"].items():
        speedup = r["new_tokens_per_s"] / fla["new_tokens_per_s"] if fla else None
        latency = fla["latency_ms_per_token"] / r["latency_ms_per_token"] if fla else None
        params = result["params_m"].get(label.removesuffix("_eager").removesuffix("_compiled"))
        lines.append(
            f"| {label} | {fmt(params, '.1f')} | "
            f"{r['new_tokens_per_s']:,.0f} | {fmt(speedup, '.1f')} | {r['prefill_ms']:.1f} | "
            f"{r['batch_step_ms']:.3f} | {r['latency_ms_per_token']:.3f} | {fmt(latency, '.1f')} | "
            f"{fmt(r.get(short), '.2f')} | {fmt(r.get(long), '.2f')} |"
        )
    lines += [f"\n{label} failed: {error}" for label, error in result["errors"].items()]
    return "\n".join(lines) + "\n"


def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for package in ("triton", "transformers", "fla-core", "flash-linear-attention"):
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            found[package] = None
    return found


if __name__ == "__main__":
    main()
