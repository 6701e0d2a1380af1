"""Text for causal language modelling: the embedded default corpus, local text files, or token files.

Sources (`data.source`):
- "stdlib": the Python standard library's own source files, read as bytes. Every machine with Python
  has them, so the demo needs no download and the repository ships no data.
- text files: paths or globs (`data/*.txt`, `corpus/**/*.md`), tokenized when the run starts.
- a folder of token files in nanoGPT's layout: `train.bin`, `val.bin` (and `test.bin`), flat uint16 or
  uint32 token ids, with the `meta.json` that `hgrn2 prepare-text` writes beside them.
Documents are separated by the tokenizer's end-of-text token. Training samples are consecutive
blocks of seq_len + 1 tokens, shuffled per epoch with the seed.
"""

import glob
import json
import math
import sysconfig
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from datamodules.sampling import ShardedDataModule, resumable_loader
from datamodules.tokenizers import ByteTokenizer, canonical_spec, load_tokenizer

TOKEN_DTYPES = {"uint16": np.uint16, "uint32": np.uint32}
SPLIT_SEGMENT_TOKENS = 1 << 16
"""The token stream is cut into segments of at most this many tokens (and at least 20 go to validation)."""


class TokenBlocks(Dataset):
    """Consecutive blocks of a flat token array: item j is (tokens[jL : jL+L], tokens[jL+1 : jL+L+1])."""

    def __init__(self, tokens: np.ndarray, seq_len: int):
        self.tokens, self.seq_len = tokens, seq_len

    def __len__(self) -> int:
        return (len(self.tokens) - 1) // self.seq_len

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        start = index * self.seq_len
        block = torch.from_numpy(self.tokens[start : start + self.seq_len + 1].astype(np.int64))
        return block[:-1], block[1:]


class TextDataModule(ShardedDataModule):
    """Next-token batches [batch_size, seq_len] from the embedded corpus, text files or token files."""

    def __init__(
        self,
        source: str | list[str] = "stdlib",
        tokenizer: str | None = None,
        seq_len: int = 256,
        batch_size: int = 32,
        val_fraction: float = 0.02,
        token_dtype: str | None = None,
        num_workers: int = 0,
        seed: int = 1234,
    ):
        """
        Args:
            source: "stdlib", text file paths or globs, or a folder with train.bin and val.bin.
            tokenizer: "bytes" or the path of a tokenizer.json; None takes the token folder's meta.json,
                or "bytes" for text.
            seq_len: tokens per training sample.
            batch_size: samples per batch on each device.
            val_fraction: share of the token stream held out for validation (text sources only).
            token_dtype: "uint16" or "uint32" for token folders without meta.json (nanoGPT writes uint16).
            num_workers: DataLoader worker processes.
            seed: seed of the per-epoch shuffle.
        """
        super().__init__()
        self.save_hyperparameters()
        if seq_len < 1 or batch_size < 1:
            raise ValueError(f"data.seq_len and data.batch_size must be positive, got {seq_len} and {batch_size}")
        if not 0 < val_fraction < 1:
            raise ValueError(f"data.val_fraction must be in (0, 1), got {val_fraction}")
        self.token_folder = _token_folder(source)
        self.meta = _read_meta(self.token_folder) if self.token_folder else {}
        spec = tokenizer or self.meta.get("tokenizer", "bytes")
        if "tokenizer" in self.meta and canonical_spec(self.meta["tokenizer"]) != canonical_spec(spec):
            raise ValueError(
                f"{self.token_folder} was tokenized with {self.meta['tokenizer']!r} but data.tokenizer is {spec!r}: "
                f"drop data.tokenizer to use the folder's, or prepare the data again with this tokenizer"
            )
        self.tokenizer = load_tokenizer(spec)
        self.tokenizer_spec = spec
        # Record the resolved spec: the model stores the same (linked by the CLI), and Lightning refuses to
        # log two different values of one name.
        self.save_hyperparameters({**self.hparams, "tokenizer": spec})
        self.vocab_size = self.tokenizer.vocab_size
        self.splits: dict[str, np.ndarray] = {}

    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        if self.token_folder:
            self.splits = self._read_token_folder()
        else:
            stream = tokenize_documents(read_documents(self.hparams.source), self.tokenizer)
            train, val = split_stream(stream, self.hparams.val_fraction)
            self.splits = {"train": train, "val": val, "test": val}
        for split, tokens in self.splits.items():
            if len(tokens) < self.hparams.seq_len + 1:
                raise ValueError(
                    f"the {split} split has {len(tokens)} tokens, fewer than seq_len + 1 = {self.hparams.seq_len + 1}: "
                    f"lower data.seq_len, raise data.val_fraction or give more text"
                )

    def _read_token_folder(self) -> dict[str, np.ndarray]:
        dtype_name = self.meta.get("dtype") or self.hparams.token_dtype or "uint16"
        if self.hparams.token_dtype and self.hparams.token_dtype != dtype_name:
            raise ValueError(f"data.token_dtype is {self.hparams.token_dtype} but meta.json says {dtype_name}")
        if dtype_name not in TOKEN_DTYPES:
            raise ValueError(f"token dtype must be one of {sorted(TOKEN_DTYPES)}, got {dtype_name!r}")
        splits = {}
        for split in ("train", "val", "test"):
            path = self.token_folder / f"{split}.bin"
            if path.exists():
                splits[split] = load_token_file(path, TOKEN_DTYPES[dtype_name], self.vocab_size)
        return splits

    @property
    def bytes_per_token(self) -> float | None:
        """UTF-8 bytes per validation token, to turn bits per token into bits per byte."""
        if isinstance(self.tokenizer, ByteTokenizer):
            val = self.splits["val"]
            return float(np.count_nonzero(val < 256)) / len(val)
        return self.meta.get("val_bytes_per_token")

    def unigram_entropy(self) -> float | None:
        """Entropy in bits of the validation bytes' unigram distribution: what a model of no context gets."""
        if not isinstance(self.tokenizer, ByteTokenizer):
            return None
        counts = np.bincount(self.splits["val"], minlength=257)[:256].astype(np.float64)
        p = counts[counts > 0] / counts.sum()
        return float(-(p * np.log2(p)).sum())

    @property
    def predict_split(self) -> str:
        return "test" if "test" in self.splits else "val"

    def _loader(self, split: str, train: bool):
        if split not in self.splits:
            raise FileNotFoundError(f"no {split} split: add {split}.bin to {self.token_folder}")
        return resumable_loader(
            TokenBlocks(self.splits[split], self.hparams.seq_len),
            batch_size=self.hparams.batch_size,
            shuffle=train,
            seed=self.hparams.seed,
            trainer=self.trainer,
            train=train,
            num_workers=self.hparams.num_workers,
        )



def stdlib_files() -> list[Path]:
    """The standard library's .py files, tests and installed packages left out (they are not the stdlib)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}
    files = sorted(p for p in root.rglob("*.py") if not skip & set(p.relative_to(root).parts))
    if not files:
        raise FileNotFoundError(
            f"no Python standard library sources under {root} (some installs ship only .pyc files): "
            f"point data.source at your own text files instead"
        )
    return files


def read_documents(source: str | list[str], name: str = "data.source") -> list[bytes]:
    """The raw bytes of every document of a text source ("stdlib", or paths and globs); `name` is the setting
    that gave it, for the error message."""
    patterns = [source] if isinstance(source, str) else source
    if patterns == ["stdlib"]:
        return [path.read_bytes() for path in stdlib_files()]
    files = []
    for pattern in patterns:
        matches = sorted(glob.glob(pattern, recursive=True))
        if not matches:
            folder_hint = ", or a folder with train.bin and val.bin from `hgrn2 prepare-text`"
            raise FileNotFoundError(
                f"{name} {pattern!r} matches no file: give text files or globs (data/*.txt) or 'stdlib'"
                f"{folder_hint if name == 'data.source' else ''}"
            )
        files += [Path(m) for m in matches if Path(m).is_file()]
    return [path.read_bytes() for path in files]


def tokenize_documents(documents: list[bytes], tokenizer) -> np.ndarray:
    """One flat token stream, every document followed by end-of-text."""
    dtype = np.uint16 if tokenizer.vocab_size <= 1 << 16 else np.uint32
    eot = np.array([tokenizer.eot_id], dtype=dtype)
    pieces = []
    for document in documents:
        if isinstance(tokenizer, ByteTokenizer):
            ids = np.frombuffer(document, dtype=np.uint8).astype(dtype)
        else:
            ids = np.asarray(tokenizer.encode(document.decode("utf-8", errors="replace")), dtype=dtype)
        pieces += [ids, eot]
    return np.concatenate(pieces) if pieces else np.zeros(0, dtype)


def split_stream(tokens: np.ndarray, val_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic split: of every round(1 / val_fraction) segments of the stream, the last is validation.

    Interleaving keeps the validation text representative of the whole corpus, not of its last files.
    """
    period = max(round(1 / val_fraction), 2)
    segments = np.array_split(tokens, max(math.ceil(len(tokens) / SPLIT_SEGMENT_TOKENS), 20 * period))
    val = [s for n, s in enumerate(segments) if n % period == period - 1]
    train = [s for n, s in enumerate(segments) if n % period != period - 1]
    return np.concatenate(train), np.concatenate(val)


def load_token_file(path: Path, dtype: type, vocab_size: int) -> np.ndarray:
    """Memory-map a flat token file and check that its dtype and ids fit the vocabulary."""
    itemsize = np.dtype(dtype).itemsize
    size = path.stat().st_size
    if size % itemsize:
        raise ValueError(f"{path} has {size} bytes, not a whole number of {np.dtype(dtype).name} tokens: wrong dtype?")
    tokens = np.memmap(path, dtype=dtype, mode="r")
    sample = np.asarray(tokens[: 1 << 22])
    if sample.size and sample.max() >= vocab_size:
        hint = " (uint16 ids read as uint32?)" if dtype == np.uint32 else ""
        raise ValueError(
            f"{path} holds token id {int(sample.max())} but the vocabulary has {vocab_size} tokens{hint}: "
            f"check data.token_dtype and data.tokenizer"
        )
    if dtype == np.uint16 and sample.size >= 64 and not sample[1::2].any() and sample[0::2].any():
        raise ValueError(
            f"{path} looks like uint32 token ids (every other uint16 is zero): set data.token_dtype uint32"
        )
    return tokens


def prepare_text(
    train: list[str] | str,
    out: str,
    tokenizer: str = "bytes",
    val: list[str] | str | None = None,
    test: list[str] | str | None = None,
    val_fraction: float = 0.01,
) -> None:
    """Tokenize local text files into a token folder (train.bin, val.bin, test.bin, meta.json).

    Args:
        train: text files or globs for training (or for everything, when val is not given); "stdlib" works too.
        out: the folder to write.
        tokenizer: "bytes" or the path of a tokenizer.json.
        val: text files or globs for validation; without them, val_fraction of train is held out.
        test: text files or globs for the test split.
        val_fraction: share held out for validation when val is not given.
    """
    tok = load_tokenizer(tokenizer)
    splits = {"train": tokenize_documents(read_documents(train, "--train"), tok)}
    if val:
        splits["val"] = tokenize_documents(read_documents(val, "--val"), tok)
    else:
        splits["train"], splits["val"] = split_stream(splits["train"], val_fraction)
    if test:
        splits["test"] = tokenize_documents(read_documents(test, "--test"), tok)
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    dtype = "uint16" if tok.vocab_size <= 1 << 16 else "uint32"
    for split, tokens in splits.items():
        tokens.astype(dtype).tofile(folder / f"{split}.bin")
    val_bytes = len(tok.decode(splits["val"].tolist()).encode("utf-8"))
    meta = {
        "tokenizer": canonical_spec(tok.spec),  # absolute: the folder works from any directory
        "vocab_size": tok.vocab_size,
        "dtype": dtype,
        "eot_id": tok.eot_id,
        "tokens": {split: int(len(tokens)) for split, tokens in splits.items()},
        "val_bytes_per_token": val_bytes / max(len(splits["val"]), 1),
    }
    (folder / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    print(f"wrote {', '.join(f'{s}: {n:,} tokens' for s, n in meta['tokens'].items())} to {folder}")


def _token_folder(source: str | list[str]) -> Path | None:
    if isinstance(source, str) and Path(source).is_dir():
        folder = Path(source)
        missing = [name for name in ("train.bin", "val.bin") if not (folder / name).exists()]
        if missing:
            raise FileNotFoundError(
                f"{folder} is a folder but lacks {', '.join(missing)}: a token folder holds train.bin and val.bin "
                f"(flat token ids, nanoGPT's layout); make one with `hgrn2 prepare-text`, or give text files as globs"
            )
        return folder
    return None


def _read_meta(folder: Path) -> dict:
    path = folder / "meta.json"
    return json.loads(path.read_text()) if path.exists() else {}
