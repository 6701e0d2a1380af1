"""Where the decode path's bfloat16 numbers first part from the full forward's (issue 4), module by module.

One prompt runs through `Generator.prefill` and `n` greedy `step`s (eager, so hooks see every module), then the
prompt and its continuation run through the full forward at once. Every submodule's output is recorded on both
paths at the same positions (the prompt's last token and each fed token) and compared: the first modules that
differ show which operation rounds differently. Variants split the causes:
- default: the Triton chunked scan on the full forward and prefill, the Triton decode step;
- reference scans: the PyTorch chunked scan and per-step loop on both paths (float32 inside, as on the CPU);
- fp32 reductions: cuBLAS not allowed reduced-precision reductions in bfloat16 GEMMs (split K at small M).
Beside them, the full forward against itself: the same sequence alone and in a batch of 4, where only the GEMMs'
shapes differ. On the CPU (torch 2.14.1, the defaults below) the 370M model gives 1.26e-2 for decode against the
full forward with either scan (the first difference: block 0's input projection, 3e-5, where the same inputs meet
a GEMM of M 1 against M 86), and 0.94e-2 for the full forward alone against batched: a bfloat16 model this deep
carries any one-ulp difference up to its own rounding noise, about 1e-2 (each path is about 1.3e-2 from the
float64 logits). The tiny model's GEMMs round alike at every M there: 0.

    python benchmarks/decode_divergence.py [--size tiny|370m] [--steps 16] [--prompt 70]
"""

import argparse
import contextlib
import functools

import torch

import hgrn2_lightning.model as model_module
from hgrn2_lightning.generate import Generator
from hgrn2_lightning.lm import CausalLM
from hgrn2_lightning.model import HGRU2, HGRN2Config

SIZES = {  # tiny: the generation tests' model; 370m: benchmarks/generate.py's
    "tiny": (dict(d_model=32, n_layers=3, expand_ratio=8), 50),
    "370m": (dict(d_model=1024, n_layers=24, expand_ratio=128, mlp_hidden=2816), 32000),
}


def build(size: str, device: str) -> CausalLM:
    config, vocab_size = SIZES[size]
    torch.manual_seed(0)
    model = CausalLM(HGRN2Config(**config), vocab_size)
    with torch.no_grad():  # every layer its own lower bound, as the tests do
        model.backbone.lower_bound_logits.normal_(0, 1.0)
    return model.to(device, torch.bfloat16).eval()


class Recorder:
    """Every submodule's output along time, per call: `take(positions)` keeps those positions of each call."""

    def __init__(self, model: torch.nn.Module):
        self.outputs: dict[str, list[torch.Tensor]] = {}
        self.order: list[str] = []
        self.handles = [module.register_forward_hook(functools.partial(self._keep, name))
                        for name, module in model.named_modules() if name]

    def _keep(self, name, module, inputs, output):
        if isinstance(output, torch.Tensor) and output.dim() >= 3:  # [B, T, ...]
            if name not in self.outputs:
                self.outputs[name] = []
                self.order.append(name)
            self.outputs[name].append(output[0].float().flatten(1))  # [T, features] of the only sequence

    def close(self) -> dict[str, torch.Tensor]:
        for handle in self.handles:
            handle.remove()
        return {name: torch.cat(parts) for name, parts in self.outputs.items()}


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


@contextlib.contextmanager
def variant(name: str, model: CausalLM):
    mixers = [module for module in model.modules() if isinstance(module, HGRU2)]
    step, reductions = model_module.hgrn2_step, torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction
    if name == "reference scans":
        for mixer in mixers:
            mixer.scan_backend = "chunked"
        model_module.hgrn2_step = functools.partial(step, backend="naive")
    if name == "fp32 reductions":
        torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction = False
    try:
        yield
    finally:
        for mixer in mixers:
            mixer.scan_backend = "auto"
        model_module.hgrn2_step = step
        torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction = reductions


def compare(model: CausalLM, prompt: list[int], steps: int) -> tuple[float, list[tuple[str, float]], list[int]]:
    """The logits' relative error, decode path against full forward, every module's in forward order, and the
    sequence (the prompt and the tokens fed)."""
    generator = Generator(model, cuda_graph=False)
    recorder = Recorder(model)
    logits = [generator.prefill([prompt]).float()]
    for _ in range(steps):
        logits.append(generator.step(logits[-1].argmax(-1)).float())
    decoded = recorder.close()
    fed = [int(x.argmax(-1)) for x in logits[:-1]]
    sequence = torch.tensor(prompt + fed, device=logits[0].device)[None]
    recorder = Recorder(model)
    with torch.inference_mode():
        full_logits = model(sequence)[0, len(prompt) - 1 :].float()
    full = recorder.close()
    # The decode side recorded the whole prompt at prefill, then one position per step.
    P = len(prompt)
    per_module = []
    for name in full:
        if name in decoded and decoded[name].shape[0] == P + steps:
            per_module.append((name, relative(decoded[name][P - 1 :], full[name][P - 1 :])))
    return relative(torch.cat(logits), full_logits), per_module, prompt + fed


def batch_divergence(model: CausalLM, tokens: list[int]) -> float:
    """The full forward's logits for `tokens` alone against the same row in a batch with 3 other sequences."""
    device = model.embed.weight.device
    sequence = torch.tensor(tokens, device=device)[None]
    others = torch.randint(0, model.embed.num_embeddings, (3, len(tokens)), generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        return relative(model(torch.cat([sequence, others.to(device)]))[0].float(), model(sequence)[0].float())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=list(SIZES), default="tiny")
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--prompt", type=int, default=70, help="prompt length (longer than the 32-token chunk)")
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = build(args.size, device)
    prompt = torch.randint(0, model.embed.num_embeddings, (args.prompt,),
                           generator=torch.Generator().manual_seed(1)).tolist()
    names = ["default", "reference scans"] + (["fp32 reductions"] if device == "cuda" else [])
    for name in names:
        with variant(name, model):
            logits_error, per_module, sequence = compare(model, prompt, args.steps)
        first = [(module, error) for module, error in per_module if error > 1e-3][:6]
        blocks = [f"{error:.1e}" for module, error in per_module if module.count(".") == 2 and "blocks" in module]
        print(f"{args.size}, {name}: logits {logits_error:.2e}; block outputs {' '.join(blocks)}")
        print("  first modules over 1e-3: " + (", ".join(f"{m} {e:.1e}" for m, e in first) or "none"))
    alone_vs_batched = batch_divergence(model, sequence)
    print(f"{args.size}, the full forward alone against in a batch of 4: logits {alone_vs_batched:.2e}")


if __name__ == "__main__":
    main()
