"""Sampling from a trained language model with the recurrent state: constant memory and time per token."""

import sys
from collections.abc import Iterator

import torch
from torch import Tensor

from datamodules.tokenizers import load_tokenizer
from hgrn2_lightning.lm import CausalLM, LanguageModel


def sample_next(
    logits: Tensor,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Next tokens [B] from logits [B, vocab]: greedy when temperature is 0, else top-k / top-p sampling."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        # Drop a token once the tokens before it already hold top_p of the mass; the first always stays.
        drop_sorted = cumulative - sorted_logits.softmax(dim=-1) >= top_p
        logits = logits.masked_fill(drop_sorted.scatter(-1, order, drop_sorted), float("-inf"))
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.inference_mode()
def generate(
    model: CausalLM,
    prompt: Tensor,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> Iterator[Tensor]:
    """Yields the next token [B] for each of max_new_tokens steps after prompt [B, T].

    The prompt runs through the chunked scan once; each new token then advances the per-layer states
    (float32 [B, H, e, e]) in place, so a step costs the same at token 10 and at token 100,000.
    """
    if prompt.numel() == 0 or prompt.dim() != 2:
        raise ValueError(f"the prompt must be a non-empty [batch, tokens] tensor, got shape {tuple(prompt.shape)}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    states = model.new_states(prompt.shape[0], prompt.device)
    logits = model(prompt, states)[:, -1]
    for step in range(max_new_tokens):
        token = sample_next(logits, temperature, top_k, top_p, generator)
        yield token
        if step + 1 < max_new_tokens:
            logits = model(token[:, None], states)[:, -1]


def generate_command(
    ckpt_path: str,
    prompt: str = "def ",
    max_new_tokens: int = 200,
    temperature: float = 0.8,
    top_k: int | None = None,
    top_p: float | None = 0.95,
    seed: int | None = None,
    device: str = "auto",
) -> str:
    """Sample a continuation of a prompt from a language-model checkpoint, streaming it to stdout.

    Stops after max_new_tokens or at the end-of-text token. Returns the prompt and its continuation.

    Args:
        ckpt_path: a checkpoint written by `hgrn2 fit` with a LanguageModel.
        prompt: the text to continue.
        max_new_tokens: how many tokens to generate.
        temperature: 0 is greedy decoding; higher is more random.
        top_k: sample only among the k most likely tokens.
        top_p: sample only among the most likely tokens that hold this much probability.
        seed: seed of the sampler, for a reproducible sample.
        device: "auto" (CUDA when available), "cpu" or "cuda".
    """
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if not prompt:
        raise ValueError("the prompt is empty: give some text to continue, e.g. --prompt 'def '")
    module = LanguageModel.load_from_checkpoint(ckpt_path, map_location=device, weights_only=False)
    module.eval()
    tokenizer = load_tokenizer(module.hparams.tokenizer)
    prompt_ids = torch.tensor([tokenizer.encode(prompt)], device=device)
    generator = torch.Generator(device).manual_seed(seed) if seed is not None else None
    decode = tokenizer.stream_decoder()
    pieces = [prompt]
    sys.stdout.write(prompt)
    for token in generate(module.model, prompt_ids, max_new_tokens, temperature, top_k, top_p, generator):
        if int(token[0]) == tokenizer.eot_id:  # the document ended
            break
        pieces.append(decode(int(token[0])))
        sys.stdout.write(pieces[-1])
        sys.stdout.flush()
    sys.stdout.write("\n")
    return "".join(pieces)
