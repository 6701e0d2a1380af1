"""The Long Range Arena (Tay et al. 2021): DataModules for its six tasks, read from the release's files.

    task        DataModule                  reads (under data.root)                          length
    ListOps     ListOpsDataModule           basic_{train,val,test}.tsv (listops-1000/)        2048 tokens
    Text        IMDBDataModule              {train,test}/{pos,neg}/*.txt (aclImdb/)           4096 bytes
    Retrieval   AANDataModule               new_aan_pairs.{train,eval,test}.tsv (tsv_data/)   2 x 4000 bytes
    Image       SequentialCIFAR10DataModule data_batch_{1..5}, test_batch (cifar-10-batches-py/) 1024 pixels
    Pathfinder  PathfinderDataModule        curv_contour_length_14/{metadata,imgs} (pathfinder32/) 1024 pixels
    Path-X      PathfinderDataModule        the same, resolution 128 (pathfinder128/)          16384 pixels

The pixel tasks (the last three) live in datamodules/lra_images.py.

A batch is (inputs, lengths, labels). Token tasks give inputs [B, L] int64, padded with id 0 to the
task's fixed length L (fixed, so no step changes shape); `lengths` counts the real tokens, which is
all the model pools over. Retrieval gives [B, 2, L] and [B, 2]: the two documents of each pair.
Pixel tasks give [B, L, channels] floats and lengths L. Vocabularies follow the reference loaders:
ListOps is S4's (<pad>, <unk>, <eos> and the 15 ListOps symbols, <eos> appended to every sequence),
Text and Retrieval are LRA's byte level (id = byte + 1, 0 is padding, 257 ids).
"""

import json
import math
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from datamodules.listops import END, OPERATORS, SPLITS, ListOpsRecipe, write_listops
from datamodules.sampling import ShardedDataModule, resumable_loader


class TokenSequences(Dataset):
    """Token sequences of varying length, stored end to end, each padded with 0 to `length` when read.

    With `docs_per_example` 2 (Retrieval) item n holds documents 2n and 2n + 1. `id_shift` is added to
    the stored values: byte tasks store raw bytes (one byte each) and read them as ids byte + 1.
    """

    def __init__(self, docs: list[np.ndarray], labels: np.ndarray, length: int, docs_per_example: int = 1,
                 id_shift: int = 0):
        if len(docs) != docs_per_example * len(labels):
            raise ValueError(f"{len(docs)} documents for {len(labels)} examples of {docs_per_example} each")
        self.tokens = np.concatenate(docs) if docs else np.zeros(0, np.uint8)
        self.offsets = np.concatenate([[0], np.cumsum([len(doc) for doc in docs])])
        self.labels, self.length, self.docs_per_example, self.id_shift = labels, length, docs_per_example, id_shift

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        k = self.docs_per_example
        inputs = torch.zeros(k, self.length, dtype=torch.int64)
        lengths = torch.zeros(k, dtype=torch.int64)
        for j in range(k):
            start, end = self.offsets[index * k + j], self.offsets[index * k + j + 1]
            inputs[j, : end - start] = torch.from_numpy(self.tokens[start:end].astype(np.int64)) + self.id_shift
            lengths[j] = end - start
        if k == 1:
            return inputs[0], lengths[0], int(self.labels[index])
        return inputs, lengths, int(self.labels[index])


class LRADataModule(ShardedDataModule):
    """What the six tasks share: the root folder, fixed-shape batches, resumable sharded loaders.

    Subclasses set the class attributes the CLI links into the model and implement `load_splits`.
    """

    num_classes: int
    vocab_size: int | None = None
    """Token tasks: the embedding's size. None for pixel tasks."""
    input_channels: int | None = None
    """Pixel tasks: values per position (1 gray, 3 RGB). None for token tasks."""
    paired: bool = False
    """Retrieval: two documents per example."""
    grid: tuple[int, int] | None = None
    """Pixel tasks: (rows, columns) of the image, for the model's 2D scans."""
    layout: str
    """The files the task reads, for error messages."""

    def __init__(self, root: str, batch_size: int, num_workers: int, seed: int):
        super().__init__()
        self.save_hyperparameters()
        if batch_size < 1:
            raise ValueError(f"data.batch_size must be positive, got {batch_size}")
        self.root = Path(root).expanduser()
        self.batch_size, self.num_workers, self.seed = batch_size, num_workers, seed
        self.datasets: dict[str, Dataset] = {}

    def setup(self, stage: str | None = None) -> None:
        if not self.datasets:
            self.datasets = self.load_splits()

    def load_splits(self) -> dict[str, Dataset]:
        """The "train", "val" and "test" datasets."""
        raise NotImplementedError

    def require(self, path: Path) -> Path:
        """`path`, or an error that names the expected layout."""
        if not path.exists():
            raise FileNotFoundError(
                f"{path} does not exist. {type(self).__name__} expects data.root ({self.root}) to hold {self.layout}"
            )
        return path

    def majority_baseline(self, split: str) -> tuple[int, float]:
        """The most frequent training label, and the accuracy on `split` of always predicting it."""
        self.setup()
        majority = int(np.bincount(self.datasets["train"].labels).argmax())
        return majority, float(np.mean(self.datasets[split].labels == majority))

    def _loader(self, split: str, train: bool):
        return resumable_loader(
            self.datasets[split],
            batch_size=self.batch_size,
            shuffle=train,
            seed=self.seed,
            trainer=self.trainer,
            train=train,
            num_workers=self.num_workers,
        )



def read_tsv(path: Path, columns: tuple[str, ...], header: bool):
    """(line number, fields) of each row; a row with the wrong number of columns fails naming file and line.

    Read as bytes: the documents of the byte-level tasks stay the bytes on disk. LRA's files have no
    quoting, so a plain split on tabs is the format (csv.writer wrote ListOps' header, hence its \\r\\n).
    """
    with path.open("rb") as file:
        for number, line in enumerate(file, start=1):
            fields = line.rstrip(b"\r\n").split(b"\t")
            if header and number == 1:
                if tuple(f.decode("utf-8", "replace") for f in fields) != columns:
                    raise ValueError(f"{path}, line 1: expected the header {'<tab>'.join(columns)}, got {line[:80]!r}")
                continue
            if fields == [b""]:
                continue  # a blank line, at the end of the file
            if len(fields) != len(columns):
                raise ValueError(
                    f"{path}, line {number}: expected {len(columns)} tab-separated columns "
                    f"({', '.join(columns)}), got {len(fields)}"
                )
            yield number, fields


def parse_label(field: bytes, path: Path, line: int, classes: int) -> int:
    """An integer label in [0, classes); written "1" or, as in the AAN files, "1.0"."""
    try:
        value = float(field)
    except ValueError:
        value = math.nan
    if not (value.is_integer() and 0 <= value < classes):  # NaN and infinities are not integers
        raise ValueError(f"{path}, line {line}: the label must be an integer in 0..{classes - 1}, got {field[:20]!r}")
    return int(value)


class ListOpsDataModule(LRADataModule):
    """ListOps: the value (0-9) of a nested list of MIN, MAX, MED and SM operations, up to 2000 tokens.

    Tokenised as S4 does: parentheses dropped, "]" written "X", split on spaces, <eos> appended; S4's 18
    ids, in a fixed order (S4 numbers the symbols by their training frequency), <unk> for anything else. Given
    `generate`, the files are made by the LRA generator (in `prepare_data`, once) unless data.root
    already holds the set that recipe makes; a set of another recipe there is refused, not overwritten.
    """

    VOCABULARY = ("<pad>", "<unk>", "<eos>", *OPERATORS, "X", *(str(v) for v in range(10)))
    num_classes = 10
    vocab_size = len(VOCABULARY)
    layout = "basic_train.tsv, basic_val.tsv and basic_test.tsv (the release's listops-1000 folder)"

    def __init__(
        self,
        root: str,
        max_length: int = 2048,
        batch_size: int = 32,
        num_workers: int = 0,
        seed: int = 0,
        generate: ListOpsRecipe | None = None,
    ):
        """
        Args:
            root: the folder of basic_{train,val,test}.tsv (listops-1000 in the release), or where to
                generate them.
            max_length: tokens per sequence (<eos> included), the fixed padded length; longer ones are cut.
            batch_size: sequences per batch on each device.
            num_workers: DataLoader worker processes.
            seed: seed of the per-epoch shuffle.
            generate: make the set with the LRA generator instead of reading the release
                (`hgrn2 lra make-listops` does the same by hand).
        """
        super().__init__(root, batch_size, num_workers, seed)
        if max_length < 2:
            raise ValueError(f"data.max_length must be at least 2 (a token and <eos>), got {max_length}")
        self.max_length, self.generate = max_length, generate
        self.ids = {token: n for n, token in enumerate(self.VOCABULARY)}

    def prepare_data(self) -> None:
        """Generates the set unless data.root holds it. A set of another recipe, which runs and their checkpoints
        may have used, or files the generator did not write, are refused, not overwritten. write_listops writes
        recipe.json after the three files, and generating.json, written before it and removed after, marks a
        generation that did not finish (a crash): it is done again. So recipe.json alone means a complete set.
        (ValueError: the CLI reports a user's input error as its message alone, without a traceback.)"""
        if self.generate is None:
            return
        recipe_file, unfinished = self.root / "recipe.json", self.root / "generating.json"
        wanted = asdict(self.generate)
        if recipe_file.exists() and not unfinished.exists():
            made = json.loads(recipe_file.read_text())
            if made != wanted:
                changed = ", ".join(f"{key} {made.get(key)} -> {wanted.get(key)}" for key in sorted({*made, *wanted})
                                    if made.get(key) != wanted.get(key))
                raise ValueError(
                    f"{self.root} holds a ListOps set generated with another recipe (recipe.json there -> "
                    f"data.generate: {changed}); runs that read it would no longer match their checkpoints: choose "
                    f"another data.root for this recipe, or delete {self.root} to regenerate it"
                )
            if all((self.root / f"basic_{split}.tsv").exists() for split in SPLITS):
                return
        elif any(self.root.glob("basic_*.tsv")) and not unfinished.exists():
            raise ValueError(
                f"{self.root} holds ListOps files that the generator did not write (no recipe.json): to read them, "
                f"drop data.generate; to generate a set, choose another data.root"
            )
        print(f"generating ListOps into {self.root}: {self.generate}")
        self.root.mkdir(parents=True, exist_ok=True)
        unfinished.touch()
        recipe_file.unlink(missing_ok=True)  # the same recipe with a file missing: incomplete until rewritten
        write_listops(self.root, self.generate)
        unfinished.unlink()

    def load_splits(self) -> dict[str, Dataset]:
        if not self.root.is_dir():
            hint = " or set data.generate to make a set" if self.generate is None else " (prepare_data makes it)"
            raise FileNotFoundError(
                f"data.root {self.root} is not a folder: ListOps reads {self.layout}; "
                f"write one with `hgrn2 lra make-listops --out {self.root}`{hint}"
            )
        return {split: self.read_split(self.require(self.root / f"basic_{split}.tsv")) for split in SPLITS}

    def read_split(self, path: Path) -> TokenSequences:
        docs, labels = [], []
        unknown = self.ids["<unk>"]
        for line, (source, target) in read_tsv(path, ("Source", "Target"), header=True):
            tokens = source.decode("utf-8").translate({ord("("): None, ord(")"): None, ord(END): "X"}).split()
            if not tokens:
                raise ValueError(f"{path}, line {line}: the Source column is empty")
            ids = [self.ids.get(token, unknown) for token in tokens[: self.max_length - 1]] + [self.ids["<eos>"]]
            docs.append(np.array(ids, dtype=np.uint8))
            labels.append(parse_label(target, path, line, self.num_classes))
        return TokenSequences(docs, np.array(labels, dtype=np.int64), self.max_length)


class IMDBDataModule(LRADataModule):
    """Text: the sentiment (0 negative, 1 positive) of an IMDB review, read as up to 4096 bytes.

    Validation uses the test set, as LRA does (IMDB has no validation split).
    """

    num_classes = 2
    vocab_size = 257
    layout = "train/pos, train/neg, test/pos and test/neg folders of <id>_<rating>.txt reviews (aclImdb)"

    def __init__(self, root: str, max_length: int = 4096, batch_size: int = 32, num_workers: int = 0, seed: int = 0):
        """
        Args:
            root: the aclImdb folder.
            max_length: bytes per review, the fixed padded length; longer reviews are cut.
            batch_size: reviews per batch on each device.
            num_workers: DataLoader worker processes.
            seed: seed of the per-epoch shuffle.
        """
        super().__init__(root, batch_size, num_workers, seed)
        self.max_length = max_length

    def load_splits(self) -> dict[str, Dataset]:
        if (self.root / "aclImdb").is_dir():
            raise FileNotFoundError(
                f"data.root {self.root} holds an aclImdb folder: set data.root to {self.root / 'aclImdb'}"
            )
        train, test = self.read_split("train"), self.read_split("test")
        return {"train": train, "val": test, "test": test}

    def read_split(self, split: str) -> TokenSequences:
        docs, labels = [], []
        for label, sentiment in enumerate(("neg", "pos")):
            folder = self.require(self.root / split / sentiment)
            files = sorted(folder.glob("*.txt"))
            if not files:
                raise FileNotFoundError(f"{folder} holds no .txt reviews; {type(self).__name__} expects {self.layout}")
            for file in files:
                docs.append(np.frombuffer(file.read_bytes()[: self.max_length], dtype=np.uint8))
                labels.append(label)
        return TokenSequences(docs, np.array(labels, dtype=np.int64), self.max_length, id_shift=1)


class AANDataModule(LRADataModule):
    """Retrieval: do two papers of the ACL Anthology Network cite one another? Each read as up to 4000 bytes.

    Rows are `label, id1, id2, text1, text2`, tab-separated, no header; the eval file is validation.
    """

    num_classes = 2
    vocab_size = 257
    paired = True
    layout = "new_aan_pairs.train.tsv, new_aan_pairs.eval.tsv and new_aan_pairs.test.tsv (the release's tsv_data)"
    COLUMNS = ("label", "id1", "id2", "text1", "text2")

    def __init__(self, root: str, max_length: int = 4000, batch_size: int = 32, num_workers: int = 0, seed: int = 0):
        """
        Args:
            root: the folder of new_aan_pairs.{train,eval,test}.tsv (tsv_data in the release).
            max_length: bytes per document, the fixed padded length; longer documents are cut.
            batch_size: pairs per batch on each device.
            num_workers: DataLoader worker processes.
            seed: seed of the per-epoch shuffle.
        """
        super().__init__(root, batch_size, num_workers, seed)
        self.max_length = max_length

    def load_splits(self) -> dict[str, Dataset]:
        files = {"train": "train", "val": "eval", "test": "test"}
        return {split: self.read_split(self.require(self.root / f"new_aan_pairs.{name}.tsv"))
                for split, name in files.items()}

    def read_split(self, path: Path) -> TokenSequences:
        docs, labels = [], []
        for line, (label, _, _, text1, text2) in read_tsv(path, self.COLUMNS, header=False):
            labels.append(parse_label(label, path, line, self.num_classes))
            docs += [np.frombuffer(text[: self.max_length], dtype=np.uint8) for text in (text1, text2)]
        return TokenSequences(docs, np.array(labels, dtype=np.int64), self.max_length, docs_per_example=2, id_shift=1)
