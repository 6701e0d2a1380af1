"""The text DataModule, token files, tokenizers and the resumable sharded sampler."""

import json

import numpy as np
import pytest
import torch

from datamodules.sampling import ResumableLoader, ShardedSampler, resumable_loader
from datamodules.text import TextDataModule, prepare_text, split_stream, stdlib_files
from datamodules.tokenizers import ByteTokenizer, HFTokenizer


@pytest.fixture
def corpus(tmp_path):
    """A few text documents with non-ASCII characters."""
    folder = tmp_path / "corpus"
    folder.mkdir()
    for n in range(6):
        (folder / f"doc{n}.txt").write_text(f"Document {n}: naïve café — " + "lorem ipsum dolor sit amet " * 40)
    return folder


@pytest.fixture
def word_tokenizer(tmp_path, corpus):
    """A real tokenizer.json, built here with the tokenizers library (nothing downloaded)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.WordLevelTrainer(special_tokens=["<unk>", "<|endoftext|>"])
    tokenizer.train([str(p) for p in sorted(corpus.iterdir())], trainer)
    path = tmp_path / "tokenizer.json"
    tokenizer.save(str(path))
    return path


def test_stdlib_corpus_is_found_and_excludes_tests():
    files = stdlib_files()
    names = {f.name for f in files}
    assert {"os.py", "functools.py"} <= names
    assert not any("site-packages" in f.parts or "test" in f.parts for f in files)


def test_bytes_split_is_deterministic_disjoint_and_interleaved():
    stream = np.arange(1_000_000, dtype=np.uint32)
    train, val = split_stream(stream, 0.05)
    assert len(train) + len(val) == len(stream)
    assert not np.intersect1d(train, val).size
    assert len(val) == pytest.approx(0.05 * len(stream), rel=0.1)
    assert val.min() < len(stream) * 0.1 and val.max() > len(stream) * 0.9  # spread over the whole stream
    assert np.array_equal(split_stream(stream, 0.05)[1], val)


def test_text_source_batches_are_next_token_pairs(corpus):
    data = TextDataModule(source=str(corpus / "*.txt"), seq_len=16, batch_size=4, val_fraction=0.2)
    data.setup("fit")
    assert data.vocab_size == 257 and data.tokenizer_spec == "bytes"
    inputs, targets = next(iter(data.train_dataloader()))
    assert inputs.shape == (4, 16) and inputs.dtype == torch.int64
    assert torch.equal(inputs[:, 1:], targets[:, :-1])
    text = b"".join((corpus / f"doc{n}.txt").read_bytes() for n in range(6))
    assert 0.9 < data.bytes_per_token <= 1.0
    assert 3.0 < data.unigram_entropy() < 5.0
    assert set(np.unique(data.splits["train"])) <= set(text) | {256}


def test_prepare_text_round_trip_with_a_tokenizer_json(tmp_path, corpus, word_tokenizer):
    out = tmp_path / "tokens"
    prepare_text(train=[str(corpus / "doc[0-4].txt")], val=[str(corpus / "doc5.txt")], out=str(out),
                 tokenizer=str(word_tokenizer))
    meta = json.loads((out / "meta.json").read_text())
    assert meta["dtype"] == "uint16" and meta["tokenizer"] == str(word_tokenizer)
    tokenizer = HFTokenizer(str(word_tokenizer))
    val = np.fromfile(out / "val.bin", dtype=np.uint16)
    assert val[-1] == tokenizer.eot_id
    assert tokenizer.decode(val[:-1].tolist()).startswith("Document 5")
    data = TextDataModule(source=str(out), seq_len=8, batch_size=2)
    data.setup("fit")
    assert data.vocab_size == tokenizer.vocab_size
    assert data.bytes_per_token == pytest.approx(meta["val_bytes_per_token"])
    # The spec the model is given must equal the data's logged hparam, or Lightning refuses to log them.
    assert data.hparams.tokenizer == data.tokenizer_spec == str(word_tokenizer)
    with pytest.raises(ValueError, match="was tokenized with"):
        TextDataModule(source=str(out), tokenizer="bytes")


def test_prepare_text_command_as_the_readme_gives_it(tmp_path, corpus, word_tokenizer, monkeypatch):
    """`hgrn2 prepare-text --train 'glob' --tokenizer relative/tokenizer.json`: a glob string (not a list) is
    accepted, the tokenizer's path is stored absolute so the folder works from any directory, and the demo config
    (data.tokenizer null) then takes the folder's tokenizer."""
    from hgrn2_lightning.cli import main

    monkeypatch.chdir(tmp_path)
    main(["prepare-text", "--train", "corpus/doc*.txt", "--tokenizer", "tokenizer.json", "--out", "tokens"])
    meta = json.loads((tmp_path / "tokens" / "meta.json").read_text())
    assert meta["tokenizer"] == str(word_tokenizer.resolve())
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    data = TextDataModule(source=str(tmp_path / "tokens"), tokenizer=None, seq_len=8, batch_size=2)
    assert data.vocab_size == HFTokenizer(str(word_tokenizer)).vocab_size
    with pytest.raises(SystemExit, match="^error: --train 'nothing/\\*.txt' matches no file"):
        main(["prepare-text", "--train", "nothing/*.txt", "--out", "unused"])


def test_byte_tokenizer_streams_multibyte_characters():
    tokenizer = ByteTokenizer()
    ids = tokenizer.encode("é—x")
    decode = tokenizer.stream_decoder()
    assert "".join(decode(t) for t in ids) == "é—x"
    assert tokenizer.decode(ids + [tokenizer.eot_id]) == "é—x"


def test_missing_source_says_what_to_give(tmp_path):
    with pytest.raises(FileNotFoundError, match="matches no file"):
        TextDataModule(source=str(tmp_path / "nothing*.txt")).setup("fit")
    (tmp_path / "folder").mkdir()
    with pytest.raises(FileNotFoundError, match="lacks train.bin, val.bin"):
        TextDataModule(source=str(tmp_path / "folder"))


def test_token_files_with_the_wrong_dtype_are_caught(tmp_path):
    folder = tmp_path / "tokens"
    folder.mkdir()
    ids = np.random.default_rng(0).integers(1, 200, 5000)
    ids.astype(np.uint32).tofile(folder / "train.bin")
    ids.astype(np.uint32).tofile(folder / "val.bin")
    with pytest.raises(ValueError, match="looks like uint32"):
        TextDataModule(source=str(folder), token_dtype="uint16").setup("fit")
    ids.astype(np.uint16).tofile(folder / "train.bin")
    ids.astype(np.uint16).tofile(folder / "val.bin")
    with pytest.raises(ValueError, match="holds token id .*uint16 ids read as uint32"):
        TextDataModule(source=str(folder), token_dtype="uint32").setup("fit")
    np.append(ids, 300).astype(np.uint16).tofile(folder / "val.bin")
    with pytest.raises(ValueError, match="holds token id 300 but the vocabulary has 257"):
        TextDataModule(source=str(folder), token_dtype="uint16").setup("fit")


def test_sequence_longer_than_the_data_is_refused(corpus):
    with pytest.raises(ValueError, match="fewer than seq_len"):
        TextDataModule(source=str(corpus / "doc0.txt"), seq_len=100_000).setup("fit")


def test_sharded_sampler_splits_ranks_and_reshuffles_each_epoch():
    shards = [ShardedSampler(103, shuffle=True, seed=7, rank=r, world_size=3) for r in range(3)]
    epoch0 = [list(s) for s in shards]
    assert all(len(e) == 34 for e in epoch0)
    assert len(set(sum(epoch0, []))) == 102  # disjoint, one sample dropped to keep ranks even
    for s in shards:
        s.set_epoch(1)
    assert [list(s) for s in shards] != epoch0
    evaluation = [ShardedSampler(103, shuffle=False, rank=r, world_size=2, drop_last=False) for r in range(2)]
    assert set(sum([list(s) for s in evaluation], [])) == set(range(103))


def test_resumable_loader_continues_mid_epoch():
    dataset = torch.arange(40)
    full = resumable_loader(dataset, batch_size=4, shuffle=True, seed=3)
    full.sampler.set_epoch(2)
    expected = [b.tolist() for b in full]
    first = resumable_loader(dataset, batch_size=4, shuffle=True, seed=3)
    first.sampler.set_epoch(2)
    iterator = iter(first)
    seen = [next(iterator).tolist() for _ in range(3)]
    state = first.state_dict()
    assert state == {"epoch": 2, "samples_seen": 12}
    resumed = resumable_loader(dataset, batch_size=4, shuffle=True, seed=3)
    assert isinstance(resumed, ResumableLoader)
    resumed.load_state_dict(state)
    resumed.sampler.set_epoch(2)
    assert seen + [b.tolist() for b in resumed] == expected
    assert resumed.served == len(expected)


def test_resuming_on_another_number_of_devices_continues_the_global_stream():
    """Two ranks of 4 per batch, stopped after 3 steps, resume on one rank of 8: the next batch is the
    next 8 samples of the epoch's order, with nothing skipped twice or seen twice."""

    class Trainer:
        def __init__(self, rank, world_size):
            self.global_rank, self.world_size = rank, world_size

    dataset = torch.arange(64)
    order = resumable_loader(dataset, batch_size=64, shuffle=True, seed=5).sampler.indices()
    ranks = [resumable_loader(dataset, batch_size=4, shuffle=True, seed=5, trainer=Trainer(r, 2)) for r in range(2)]
    streams = [iter(loader) for loader in ranks]
    seen = {i for _ in range(3) for stream in streams for i in next(stream).tolist()}
    assert seen == set(order[:24])
    resumed = resumable_loader(dataset, batch_size=8, shuffle=True, seed=5, trainer=Trainer(0, 1))
    resumed.load_state_dict(ranks[0].state_dict())
    assert next(iter(resumed)).tolist() == order[24:32]
