"""Text generation with the recurrent state: packed prefill, a fused decode step, CUDA-graph decoding.

    generator = Generator.from_checkpoint("runs/lm-demo/checkpoints/last.ckpt")
    for completion in generator.generate(["def ", "class "], max_new_tokens=100, temperature=0.8, top_p=0.95):
        print(completion.text)

Prefill runs the prompts through the chunked scan, packed end to end with cu_seqlens when their lengths
differ, so no padding exists that could touch a state, and leaves each layer's final state (float32
[B, H, e, e]). Decoding then advances those states one token at a time, one fused Triton kernel per
layer (gate, state update in place, output); on CUDA the whole per-token model step is captured once
per batch size in a CUDA graph and replayed, so no Python runs between its kernels. A step costs the
same at token 10 and at token 100,000, and the memory does not grow with the length.
"""

import itertools
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from datamodules.tokenizers import Tokenizer, load_tokenizer
from hgrn2_lightning.interop import load_language_model
from hgrn2_lightning.lm import CausalLM


@dataclass
class Completion:
    """One prompt's continuation: its tokens (without the stop token), its text, and why it ended."""

    tokens: list[int] = field(default_factory=list)
    finish_reason: str = "length"
    """"stop" (a stop token came) or "length" (max_new_tokens reached)."""
    text: str = ""


@dataclass
class _Batch:
    """The static tensors of one batch size: per-layer states, the step's input tokens and, on the CUDA-graph
    path, the captured model step with the logits it writes. Allocated once, reused by every batch of that size."""

    states: list[Tensor]
    tokens: Tensor
    graph: torch.cuda.CUDAGraph | None = None
    logits: Tensor | None = None


class Generator:
    """Generates from a `CausalLM` (in eval mode): a batch of prompts of any lengths, sampled or greedy.

    `prefill` and `step` are the two halves of decoding, for callers with their own sampling loop;
    `generate_ids` and `generate` run the whole loop with stop tokens, per-sequence limits and streaming.
    """

    def __init__(
        self,
        model: CausalLM,
        tokenizer: Tokenizer | None = None,
        *,
        cuda_graph: bool = True,
        compile_step: bool = False,
        prefill_chunk: int = 2048,
        max_prompt_tokens: int | None = None,
    ):
        """
        Args:
            model: the language model, on the device and in the dtype to run.
            tokenizer: turns text into ids and back; only `generate` (text) needs it. It must be the model's:
                ids the tokenizer lacks (rows of a padded embedding) are never sampled.
            cuda_graph: replay each decode step as a CUDA graph (on CUDA); False runs it eagerly.
            compile_step: fuse the decode step's norms, activations and residual adds with torch.compile:
                fewer kernels per token, which is what a small batch's step time is made of. The first
                batch of each size waits for the compilation.
            prefill_chunk: prompts run through the model at most this many tokens each at a time (the state
                carries across), which bounds the prefill's activation memory for any prompt length.
            max_prompt_tokens: reject longer prompts (a server's limit); None accepts any length.
        """
        self.model = model
        self.device = model.head.weight.device
        self.vocab_size = model.embed.num_embeddings
        # An embedding may be padded beyond the tokenizer (imported checkpoints often are), never be smaller.
        if tokenizer is not None and tokenizer.vocab_size > self.vocab_size:
            raise ValueError(
                f"the tokenizer ({tokenizer.spec}) has {tokenizer.vocab_size} tokens but the model only "
                f"{self.vocab_size}: use the tokenizer the model was trained with"
            )
        if prefill_chunk < 1:
            raise ValueError(f"prefill_chunk must be at least 1 token, got {prefill_chunk}")
        self.tokenizer = tokenizer
        self.cuda_graph = cuda_graph and self.device.type == "cuda"
        self.prefill_chunk = prefill_chunk
        self.max_prompt_tokens = max_prompt_tokens
        self._batches: dict[int, _Batch] = {}
        self._step_fn = self._model_step
        if compile_step:
            self._step_fn = torch.compile(self._model_step, fullgraph=True)
        self._batch: _Batch | None = None  # the batch the last prefill started, which `step` continues

    @classmethod
    def from_checkpoint(
        cls, path: str | Path, *, tokenizer: str | None = None, device: str = "auto", dtype: str = "auto", **options
    ) -> "Generator":
        """A generator for a checkpoint written by `hgrn2 fit` with a LanguageModel (or an fla folder).

        tokenizer: 'bytes' or a tokenizer.json, instead of the one the checkpoint names. device: "auto"
        is CUDA when available. dtype: "auto" is bfloat16 on CUDA and float32 on the CPU. Other keyword
        arguments go to `Generator` (cuda_graph, compile_step, prefill_chunk, max_prompt_tokens).
        """
        device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError("device 'cuda' but this machine has no usable CUDA GPU: use device 'cpu' or 'auto'")
        dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
        if dtype == "auto":
            dtype = "bfloat16" if device.type == "cuda" else "float32"
        if dtype not in dtypes:
            raise ValueError(f"dtype must be 'auto' or one of {list(dtypes)}, got {dtype!r}")
        module = load_language_model(path, tokenizer)
        model = module.model.to(device, dtypes[dtype]).eval()
        return cls(model, load_tokenizer(module.hparams.tokenizer), **options)

    @torch.inference_mode()
    def prefill(self, prompts: Sequence[Sequence[int]]) -> Tensor:
        """Starts a batch: runs the prompts (token ids, any lengths) from zero states and returns the logits
        [B, vocab] that follow each one. `step` then continues these sequences."""
        self._check_prompts(prompts)
        B, lengths = len(prompts), [len(prompt) for prompt in prompts]
        batch = self._batch_of_size(B)
        for state in batch.states:
            state.zero_()
        head = self.model.head.weight
        last_hidden = torch.empty(B, head.shape[1], device=self.device, dtype=head.dtype)
        for start in range(0, max(lengths), self.prefill_chunk):
            running = [n for n in range(B) if lengths[n] > start]
            pieces = [list(prompts[n][start : start + self.prefill_chunk]) for n in running]
            index = torch.tensor(running, device=self.device)
            # Only the sequences whose prompts reach this far take part: the others' states stay as they are.
            states = batch.states if len(running) == B else [state[index] for state in batch.states]
            hidden = self._forward_pieces(pieces, states)
            if len(running) < B:
                for state, part in zip(batch.states, states):
                    state[index] = part
            last_hidden[index] = hidden  # a sequence that goes on is overwritten by a later window
        self._batch = batch
        return self.model.head(last_hidden)

    @torch.inference_mode()
    def step(self, tokens: Tensor) -> Tensor:
        """Feeds one token per sequence [B] to the batch of the last `prefill`; returns the next logits [B, vocab].

        On the CUDA-graph path the logits are a static buffer that the next step overwrites (clone to keep them).
        """
        batch = self._batch
        if batch is None:
            raise RuntimeError("step() continues the sequences of a prefill(): call prefill(prompts) first")
        if tokens.shape != batch.tokens.shape:
            raise ValueError(
                f"step() takes one token per sequence, shape {list(batch.tokens.shape)}, got {list(tokens.shape)}"
            )
        batch.tokens.copy_(tokens)
        if batch.graph is None:
            return self._step_fn(batch)
        with torch.cuda.device(self.device):
            batch.graph.replay()
        return batch.logits

    def generate_ids(
        self,
        prompts: Sequence[Sequence[int]],
        max_new_tokens: int | Sequence[int] = 128,
        *,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        seed: int | None = None,
        stop_tokens: Sequence[int] = (),
        on_token: Callable[[int, int], None] | None = None,
    ) -> list[Completion]:
        """Continues each prompt (token ids) until a stop token or its max_new_tokens (an int, or one per prompt).

        temperature 0 is greedy; top_k / top_p restrict sampling to the most likely tokens. A seed makes the
        samples reproducible; every sequence draws its own, so equal prompts in a batch still differ.
        on_token(index, token) is called for each new token of sequence `index` as it comes.
        """
        B = len(prompts)
        limits = [max_new_tokens] * B if isinstance(max_new_tokens, int) else list(max_new_tokens)
        if len(limits) != B:
            raise ValueError(f"max_new_tokens has {len(limits)} values for {B} prompts: give one int or one per prompt")
        if min(limits, default=1) < 1:
            raise ValueError(f"max_new_tokens must be at least 1, got {min(limits)}")
        _check_sampling(temperature, top_k, top_p)
        stop = set(stop_tokens)
        if any(not 0 <= token < self.vocab_size for token in stop):
            raise ValueError(f"stop tokens must be ids in [0, {self.vocab_size}), got {sorted(stop)}")
        generator = torch.Generator(self.device).manual_seed(seed) if seed is not None else None
        sampled_vocab = self.tokenizer.vocab_size if self.tokenizer is not None else self.vocab_size
        sample = lambda logits: sample_next(logits[:, :sampled_vocab], temperature, top_k, top_p, generator)

        tokens = sample(self.prefill(prompts))
        completions = [Completion() for _ in prompts]
        running = set(range(B))
        for step in range(max(limits)):
            drawn = _to_host(tokens)
            if step + 1 < max(limits):
                # The next step is queued before this one's tokens are read: the GPU computes while the host
                # looks for stop tokens. The step after the last one needed is wasted, a small price.
                tokens = sample(self.step(tokens))
            for n, token in enumerate(drawn()):
                if n not in running:
                    continue
                if token in stop:
                    completions[n].finish_reason = "stop"
                    running.discard(n)
                    continue
                completions[n].tokens.append(token)
                if on_token is not None:
                    on_token(n, token)
                if len(completions[n].tokens) == limits[n]:
                    running.discard(n)
            if not running:
                break
        return completions

    def generate(
        self,
        prompts: Sequence[str],
        max_new_tokens: int | Sequence[int] = 128,
        *,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        seed: int | None = None,
        stop_tokens: Sequence[int | str] | None = None,
        stream: Callable[[int, str], None] | None = None,
    ) -> list[Completion]:
        """Continues each text prompt; `generate_ids` with text in and out.

        stop_tokens: ids, or strings of one token each; None stops at the tokenizer's end-of-text token.
        stream(index, text) is called with each new piece of sequence `index`'s text as it comes.
        """
        if self.tokenizer is None:
            raise ValueError("this Generator has no tokenizer: pass one, or use generate_ids with token ids")
        if isinstance(prompts, str):
            raise TypeError("prompts is a list of strings: for one prompt, pass [prompt]")
        tokenizer = self.tokenizer
        for n, prompt in enumerate(prompts):
            if not prompt:
                raise ValueError(f"prompt {n} is empty: generation continues a text, so give each prompt some")
        stop = [tokenizer.eot_id] if stop_tokens is None else [self._stop_id(token) for token in stop_tokens]
        on_token = None
        if stream is not None:
            decoders = [tokenizer.stream_decoder() for _ in prompts]

            def on_token(n: int, token: int) -> None:
                if piece := decoders[n](token):
                    stream(n, piece)

        completions = self.generate_ids(
            [tokenizer.encode(prompt) for prompt in prompts], max_new_tokens, temperature=temperature, top_k=top_k,
            top_p=top_p, seed=seed, stop_tokens=stop, on_token=on_token,
        )
        for completion in completions:
            completion.text = tokenizer.decode(completion.tokens)
        return completions

    def _stop_id(self, token: int | str) -> int:
        if isinstance(token, int):
            return token
        ids = self.tokenizer.encode(token)
        if len(ids) != 1:
            raise ValueError(
                f"stop token {token!r} encodes to {len(ids)} tokens {ids}: give a one-token string or an id"
            )
        return ids[0]

    def _check_prompts(self, prompts: Sequence[Sequence[int]]) -> None:
        if len(prompts) == 0:
            raise ValueError("no prompts: give a list of at least one prompt")
        for n, prompt in enumerate(prompts):
            if len(prompt) == 0:
                raise ValueError(f"prompt {n} is empty: generation continues a prompt, so give it at least one token")
            if self.max_prompt_tokens is not None and len(prompt) > self.max_prompt_tokens:
                raise ValueError(
                    f"prompt {n} has {len(prompt)} tokens, more than max_prompt_tokens = {self.max_prompt_tokens}: "
                    f"shorten it or raise the limit"
                )
            if min(prompt) < 0 or max(prompt) >= self.vocab_size:
                raise ValueError(
                    f"prompt {n} has token ids outside the model's vocabulary [0, {self.vocab_size}) "
                    f"(from {min(prompt)} to {max(prompt)}): encode it with the model's tokenizer"
                )

    def _forward_pieces(self, pieces: list[list[int]], states: list[Tensor]) -> Tensor:
        """Advances `states` (one row per piece) through the pieces; returns the hidden state after each one's
        last token [N, d]. Pieces of one length form a plain batch; others are packed end to end."""
        lengths = [len(piece) for piece in pieces]
        if len(set(lengths)) == 1:
            tokens = torch.tensor(pieces, device=self.device)
            return self.model.features(tokens, states)[:, -1]
        tokens = torch.tensor(list(itertools.chain.from_iterable(pieces)), device=self.device)
        cu_seqlens = torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int32, device=self.device)
        hidden = self.model.features(tokens[None], states, cu_seqlens)[0]
        return hidden[cu_seqlens[1:] - 1]

    def _batch_of_size(self, B: int) -> _Batch:
        if B not in self._batches:
            batch = _Batch(self.model.new_states(B, self.device), torch.zeros(B, dtype=torch.long, device=self.device))
            if self.cuda_graph:
                self._capture(batch)
            self._batches[B] = batch
        return self._batches[B]

    def _model_step(self, batch: _Batch) -> Tensor:
        return self.model(batch.tokens[:, None], batch.states)[:, -1]

    def _capture(self, batch: _Batch) -> None:
        """Records one model step into a CUDA graph that reads batch.tokens, advances batch.states in place
        and writes batch.logits. Nothing in the step may wait on the GPU or depend on values (it does not)."""
        if self.model.training:
            raise RuntimeError("the model is in training mode: call model.eval() first (a graph would freeze dropout)")
        # A graph records kernels, so they must exist before the capture: warm-up steps on a side stream
        # compile the Triton kernels and let cuBLAS choose its algorithms. They scribble on the states,
        # which every prefill zeroes.
        with torch.cuda.device(self.device):  # the model's GPU, which need not be the current one
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(2):
                    self._step_fn(batch)
            torch.cuda.current_stream().wait_stream(side)
            batch.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(batch.graph):
                batch.logits = self._step_fn(batch)


def _to_host(tokens: Tensor) -> Callable[[], list[int]]:
    """Starts copying tokens to the host; the returned function waits for the copy and gives the ids."""
    if not tokens.is_cuda:
        return tokens.tolist
    host = tokens.to("cpu", non_blocking=True)  # pinned memory, so the copy is asynchronous
    copied = torch.cuda.Event()
    copied.record(torch.cuda.current_stream(tokens.device))

    def wait() -> list[int]:
        copied.synchronize()
        return host.tolist()

    return wait


def _check_sampling(temperature: float, top_k: int | None, top_p: float | None) -> None:
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 is greedy decoding), got {temperature}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be at least 1 (or None for no limit), got {top_k}")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1] (or None for no limit), got {top_p}")


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


def generate(
    model: CausalLM,
    prompt: Tensor,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> Iterator[Tensor]:
    """Yields the next tokens [B] of equal-length prompts [B, T], step by step, with no stop tokens: the
    tensor form of `Generator`, for loops that hold token tensors (evaluation, a sampling callback)."""
    if prompt.numel() == 0 or prompt.dim() != 2:
        raise ValueError(f"the prompt must be a non-empty [batch, tokens] tensor, got shape {tuple(prompt.shape)}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    engine = Generator(model, cuda_graph=False)
    logits = engine.prefill(prompt.tolist())
    for step in range(max_new_tokens):
        token = sample_next(logits, temperature, top_k, top_p, generator)
        yield token
        if step + 1 < max_new_tokens:
            logits = engine.step(token)


def generate_command(
    ckpt_path: str,
    prompt: str = "def ",
    max_new_tokens: int = 200,
    temperature: float = 0.8,
    top_k: int | None = None,
    top_p: float | None = 0.95,
    seed: int | None = None,
    stop_tokens: list[int | str] | None = None,
    tokenizer: str | None = None,
    device: str = "auto",
    dtype: str = "auto",
    cuda_graph: bool = True,
    compile_step: bool = False,
) -> str:
    """Sample a continuation of a prompt from a language-model checkpoint, streaming it to stdout.

    Stops after max_new_tokens or at a stop token (by default the end-of-text token). Returns the prompt
    and its continuation.

    Args:
        ckpt_path: a checkpoint written by `hgrn2 fit` with a LanguageModel.
        prompt: the text to continue.
        max_new_tokens: how many tokens to generate at most.
        temperature: 0 is greedy decoding; higher is more random.
        top_k: sample only among the k most likely tokens.
        top_p: sample only among the most likely tokens that hold this much probability.
        seed: seed of the sampler, for a reproducible sample.
        stop_tokens: token ids or one-token strings that end the text (default: end-of-text).
        tokenizer: 'bytes' or a tokenizer.json, instead of the one the checkpoint names.
        device: "auto" (CUDA when available), "cpu" or "cuda".
        dtype: "auto" (bfloat16 on CUDA, float32 on CPU), "float32", "bfloat16" or "float16".
        cuda_graph: replay each decode step as a CUDA graph; false runs it eagerly.
        compile_step: fuse the decode step with torch.compile (faster per token, slower to start).
    """
    if not prompt:
        raise ValueError("the prompt is empty: give some text to continue, e.g. --prompt 'def '")
    generator = Generator.from_checkpoint(
        ckpt_path, tokenizer=tokenizer, device=device, dtype=dtype, cuda_graph=cuda_graph, compile_step=compile_step
    )

    def stream(_: int, text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    sys.stdout.write(prompt)
    (completion,) = generator.generate(
        [prompt], max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed,
        stop_tokens=stop_tokens, stream=stream,
    )
    sys.stdout.write("\n")
    return prompt + completion.text
