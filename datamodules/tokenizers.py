"""Tokenizers from local files only: raw bytes, or a Hugging Face `tokenizer.json`."""

import codecs
from pathlib import Path
from typing import Protocol


class Tokenizer(Protocol):
    vocab_size: int
    eot_id: int
    """The end-of-text token that separates documents."""
    spec: str
    """What `load_tokenizer` takes to build this tokenizer again (it is stored in checkpoints)."""

    def encode(self, text: str) -> list[int]: ...
    def decode(self, ids: list[int]) -> str: ...


class ByteTokenizer:
    """UTF-8 bytes 0..255, plus 256 as end-of-text. Works on any text, needs no file."""

    vocab_size = 257
    eot_id = 256
    spec = "bytes"

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")

    def stream_decoder(self):
        """A function from one token id to the text it completes (bytes of a character may span tokens)."""
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        return lambda token: decoder.decode(bytes([token])) if token < 256 else ""


class HFTokenizer:
    """A local Hugging Face `tokenizer.json` (GPT-2 BPE, Llama, ...), through the `tokenizers` library."""

    def __init__(self, path: str, eot_token: str | None = None):
        from tokenizers import Tokenizer as _HFTokenizer

        if not Path(path).is_file():
            raise FileNotFoundError(
                f"tokenizer file {path} does not exist: give the path of a Hugging Face tokenizer.json, "
                f"or 'bytes' for the byte-level tokenizer"
            )
        self.spec = str(path)
        self._tokenizer = _HFTokenizer.from_file(str(path))
        self.vocab_size = self._tokenizer.get_vocab_size(with_added_tokens=True)
        self.eot_id = self._find_eot(eot_token)

    def _find_eot(self, eot_token: str | None) -> int:
        candidates = [eot_token] if eot_token else ["<|endoftext|>", "</s>", "<eos>", "<|end_of_text|>"]
        for token in candidates:
            token_id = self._tokenizer.token_to_id(token)
            if token_id is not None:
                return token_id
        raise ValueError(f"tokenizer {self.spec} has none of the end-of-text tokens {candidates}")

    def encode(self, text: str) -> list[int]:
        return self._tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids)

    def stream_decoder(self):
        """A function from one token id to the new text. It decodes the tokens since the last line
        break together (merges and multi-byte characters span tokens), so the work per token stays small."""
        ids: list[int] = []
        emitted = ""

        def step(token: int) -> str:
            nonlocal ids, emitted
            ids.append(token)
            text = self.decode(ids)
            if text.endswith("\ufffd"):  # an unfinished multi-byte character: wait for the next token
                return ""
            new, emitted = text[len(emitted) :], text
            if text.endswith("\n"):
                ids, emitted = [], ""
            return new

        return step


def canonical_spec(spec: str) -> str:
    """'bytes', or a tokenizer.json's absolute path: the same tokenizer however the path was written."""
    return spec if spec == "bytes" else str(Path(spec).resolve())


def load_tokenizer(spec: str) -> ByteTokenizer | HFTokenizer:
    """'bytes' or the path of a tokenizer.json."""
    return ByteTokenizer() if spec == "bytes" else HFTokenizer(spec)
