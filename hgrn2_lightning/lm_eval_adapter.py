"""lm-evaluation-harness adapter: evaluate a checkpoint of this app, or an fla HGRN2 folder, with our kernels.

Importing this module registers the model name "hgrn2" with lm-eval. From the shell:

    python -m hgrn2_lightning.lm_eval_adapter --model hgrn2 \\
        --model_args pretrained=runs/lm/checkpoints/last.ckpt,dtype=bfloat16 --tasks lambada_openai,piqa

From Python:

    import lm_eval, hgrn2_lightning.lm_eval_adapter
    lm_eval.simple_evaluate(model="hgrn2", model_args={"pretrained": "last.ckpt"}, tasks=["piqa"])

Log-likelihoods run through the chunked scan; generation through the recurrent decode step. A long input
is cut into segments of `max_length` tokens that pass the recurrent state on, so every score sees its
whole context: an RNN needs no sliding windows, and perplexity tasks score each document in one piece.
"""

import torch
from tqdm import tqdm

try:
    from lm_eval.api.model import TemplateLM
    from lm_eval.api.registry import register_model
except ImportError as error:
    raise ImportError(
        "the lm-eval adapter needs lm-evaluation-harness: pip install lm-eval (the version in pyproject's test extra)"
    ) from error

from datamodules.tokenizers import load_tokenizer
from hgrn2_lightning.generate import generate
from hgrn2_lightning.interop import load_language_model

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@register_model("hgrn2")
class HGRN2EvalLM(TemplateLM):
    """lm-eval's model interface over our CausalLM: loglikelihood, loglikelihood_rolling, generate_until."""

    def __init__(
        self,
        pretrained: str,
        tokenizer: str | None = None,
        device: str = "auto",
        dtype: str = "float32",
        batch_size: int | str = 8,
        max_length: int = 2048,
        max_batch_size: int | None = None,
    ):
        """
        Args:
            pretrained: a checkpoint of this app (`hgrn2 fit`, `hgrn2 import-fla`) or an fla HGRN2 folder.
            tokenizer: "bytes" or a tokenizer.json; by default the checkpoint's (or the folder's) own.
            device: "auto" (CUDA when available), "cpu", "cuda", "cuda:1", ...
            dtype: weights and activations: "float32", "bfloat16" or "float16" (states stay float32).
            batch_size: requests scored together.
            max_length: tokens per forward pass; longer inputs go through in segments (no truncation).
            max_batch_size: lm-eval passes it for batch_size "auto"; batches here have a fixed size.
        """
        super().__init__()
        if dtype not in DTYPES:
            raise ValueError(f"dtype {dtype!r} is not one of {sorted(DTYPES)}")
        if not str(batch_size).isdigit() or int(batch_size) < 1:
            raise ValueError(f"batch_size must be a positive number, got {batch_size!r} ('auto' is not supported)")
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        module = load_language_model(pretrained, tokenizer)
        self.model = module.model.to(device=device, dtype=DTYPES[dtype]).eval()
        self.tok = load_tokenizer(module.hparams.tokenizer)
        self._device = torch.device(device)  # lm-eval's LM exposes it as the `device` property
        self.batch_size = int(batch_size)
        self.max_length = max_length

    @property
    def eot_token_id(self) -> int:
        return self.tok.eot_id

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        # Our tokenizers add no special tokens; a document boundary is the end-of-text token lm-eval prefixes.
        return self.tok.encode(string)

    def tok_decode(self, tokens: list[int], **kwargs) -> str:
        return self.tok.decode(tokens)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        """requests: ((context, continuation), context ids, continuation ids) -> (log p(continuation), greedy?)."""
        sequences = [context + continuation for _, context, continuation in requests]
        scored = [len(continuation) for _, _, continuation in requests]
        return self._score(sequences, scored, disable_tqdm)

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """log p(text) of whole documents, each token conditioned on everything before it."""
        documents = [self.tok_encode(request.args[0]) for request in requests]
        sequences = [[self.prefix_token_id, *tokens] for tokens in documents]
        results = self._score(sequences, [len(tokens) for tokens in documents], disable_tqdm)
        return [logprob for logprob, _ in results]

    @torch.inference_mode()
    def _score(self, sequences: list[list[int]], scored: list[int], disable_tqdm: bool) -> list[tuple[float, bool]]:
        """For each sequence, the log-probability of its last `scored[i]` tokens given the tokens before them,
        and whether greedy decoding would have produced exactly those tokens."""
        results: list[tuple[float, bool]] = [(0.0, True)] * len(sequences)
        # Longest first: the sequences of a batch have similar lengths, so little of the padding is computed.
        order = sorted(range(len(sequences)), key=lambda n: -len(sequences[n]))
        batches = [order[at : at + self.batch_size] for at in range(0, len(order), self.batch_size)]
        for batch in tqdm(batches, disable=disable_tqdm, desc="hgrn2 log-likelihoods"):
            logprobs, greedy = self._score_batch([sequences[n] for n in batch], [scored[n] for n in batch])
            for n, logprob, is_greedy in zip(batch, logprobs, greedy):
                results[n] = (logprob, is_greedy)
        return results

    def _score_batch(self, sequences: list[list[int]], scored: list[int]) -> tuple[list[float], list[bool]]:
        B, T = len(sequences), max(len(s) for s in sequences) - 1
        # Right padding: a causal model never lets a padded step reach an earlier real one.
        tokens = torch.full((B, T + 1), self.eot_token_id, dtype=torch.long)
        is_scored = torch.zeros(B, T, dtype=torch.bool)  # input position t predicts token t + 1
        for row, (sequence, n) in enumerate(zip(sequences, scored)):
            if n >= len(sequence):
                raise ValueError(f"cannot score {n} tokens of a {len(sequence)}-token sequence: nothing precedes them")
            tokens[row, : len(sequence)] = torch.tensor(sequence)
            is_scored[row, len(sequence) - 1 - n : len(sequence) - 1] = True
        tokens, is_scored = tokens.to(self.device), is_scored.to(self.device)
        logprob = torch.zeros(B, dtype=torch.float64, device=self.device)
        mistakes = torch.zeros(B, dtype=torch.long, device=self.device)
        states = self.model.new_states(B, self.device)
        for start in range(0, T, self.max_length):
            end = min(start + self.max_length, T)
            hidden = self.model.backbone(self.model.embed(tokens[:, start:end]), states)
            mask = is_scored[:, start:end]
            if not mask.any():
                continue
            # The head only where a token is scored: [T, vocab] logits for every position would dwarf the model.
            logits = self.model.head(hidden[mask]).float().log_softmax(dim=-1)
            targets = tokens[:, start + 1 : end + 1][mask]
            rows = mask.nonzero()[:, 0]
            logprob.index_add_(0, rows, logits.gather(-1, targets[:, None])[:, 0].double())
            mistakes.index_add_(0, rows, (logits.argmax(dim=-1) != targets).long())
        return logprob.tolist(), (mistakes == 0).tolist()

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy (or sampled, with do_sample) continuations, cut before the first stop string."""
        outputs = []
        for request in tqdm(requests, disable=disable_tqdm, desc="hgrn2 generation"):
            context, gen_kwargs = request.args
            outputs.append(self._generate_one(context, dict(gen_kwargs)))
        return outputs

    def _generate_one(self, context: str, gen_kwargs: dict) -> str:
        until = gen_kwargs.pop("until", None) or []
        until = [until] if isinstance(until, str) else list(until)
        max_new_tokens = gen_kwargs.pop("max_gen_toks", 256)
        temperature = gen_kwargs.pop("temperature", 0.0) if gen_kwargs.pop("do_sample", False) else 0.0
        prompt = torch.tensor([self.tok_encode(context) or [self.prefix_token_id]], device=self.device)
        ids: list[int] = []
        text = ""
        with torch.inference_mode():
            for token in generate(self.model, prompt, max_new_tokens, temperature, gen_kwargs.get("top_k"),
                                  gen_kwargs.get("top_p")):
                if int(token[0]) == self.eot_token_id:
                    break
                ids.append(int(token[0]))
                text = self.tok_decode(ids)
                if any(stop in text for stop in until):
                    break
        cut = min((text.index(stop) for stop in until if stop in text), default=len(text))
        return text[:cut]


if __name__ == "__main__":
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()
