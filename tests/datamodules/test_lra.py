"""The LRA DataModules on small fixtures written in the release formats, the ListOps generator, and every
LRA config running two steps on those fixtures."""

import csv
import json
import pickle
import random
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from datamodules.listops import ListOpsRecipe, draw_examples, generate_tree, tree_source, tree_value, write_listops
from datamodules.lra import AANDataModule, IMDBDataModule, ListOpsDataModule
from datamodules.lra_images import PathfinderDataModule, SequentialCIFAR10DataModule
from hgrn2_lightning.cli import main

ROOT = Path(__file__).resolve().parents[2]


# ---------------------------------------------------------------------------------------------------
# Fixtures in the release formats


def write_listops_tsv(path: Path, rows: list[tuple[str, str]], line_end: str = "\r\n") -> None:
    path.write_text(line_end.join(["Source\tTarget", *(f"{s}\t{t}" for s, t in rows)]) + line_end)


@pytest.fixture
def listops_root(tmp_path) -> Path:
    """listops-1000 with a few hand-written rows per split (LRA's csv.writer line ends)."""
    root = tmp_path / "listops-1000"
    root.mkdir()
    rows = [
        ("( ( ( [MAX 2 ) 9 ) ] )", "9"),
        ("( ( ( ( [MIN 4 ) ( ( ( [SM 3 ) 8 ) ] ) ) 7 ) ] )", "1"),
        ("( ( ( ( [MED 1 ) 8 ) 3 ) ] )", "3"),
    ]
    for split in ("train", "val", "test"):
        write_listops_tsv(root / f"basic_{split}.tsv", rows)
    return root


REVIEWS = {
    ("train", "pos"): ["A gem. Naïve and lovely!", "Loved it <br /><br />truly."],
    ("train", "neg"): ["Dull.", "Two hours I will never get back — awful."],
    ("test", "pos"): ["Great acting."],
    ("test", "neg"): ["Bad plot, worse dialogue."],
}


@pytest.fixture
def imdb_root(tmp_path) -> Path:
    """aclImdb/{train,test}/{pos,neg}/<id>_<rating>.txt, plus the unlabelled train/unsup that LRA ignores."""
    root = tmp_path / "aclImdb"
    for (split, sentiment), texts in REVIEWS.items():
        folder = root / split / sentiment
        folder.mkdir(parents=True)
        for n, text in enumerate(texts):
            (folder / f"{n}_{8 if sentiment == 'pos' else 2}.txt").write_text(text, encoding="utf-8")
    (root / "train" / "unsup").mkdir()
    (root / "train" / "unsup" / "0_0.txt").write_text("unlabelled")
    return root


AAN_ROWS = [
    ("1.0", "P00-1001", "P98-2002", "Parsing with the CKY algorithm.", "Statistical parsing – a survey."),
    ("0.0", "P00-1002", "W05-0003", "Machine translation of speech.", "Word sense induction."),
    ("1", "P00-1003", "J93-2004", "A long paper " * 20, "Penn Treebank."),
]


@pytest.fixture
def aan_root(tmp_path) -> Path:
    """tsv_data/new_aan_pairs.{train,eval,test}.tsv: no header, label id1 id2 text1 text2."""
    root = tmp_path / "tsv_data"
    root.mkdir()
    for name in ("train", "eval", "test"):
        (root / f"new_aan_pairs.{name}.tsv").write_text("".join("\t".join(row) + "\n" for row in AAN_ROWS))
    return root


def cifar_batch(n: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    return {
        b"batch_label": b"fixture",
        b"labels": rng.integers(0, 10, n).tolist(),
        b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
        b"filenames": [f"img_{k}.png".encode() for k in range(n)],
    }


@pytest.fixture
def cifar_root(tmp_path) -> Path:
    """cifar-10-batches-py with 4 images per training batch (20 in all) and 6 test images."""
    root = tmp_path / "cifar-10-batches-py"
    root.mkdir()
    for n in range(1, 6):
        (root / f"data_batch_{n}").write_bytes(pickle.dumps(cifar_batch(4, n), protocol=2))
    (root / "test_batch").write_bytes(pickle.dumps(cifar_batch(6, 0), protocol=2))
    return root


def write_pathfinder(root: Path, resolution: int, count: int, empty: int | None = None) -> Path:
    """pathfinder<res>/curv_contour_length_14: metadata/<n>.npy text lines and imgs/<n>/sample_<k>.png.

    Image k is filled with the value k and has label k % 2; two metadata files of count / 2 lines each.
    """
    base = root / f"pathfinder{resolution}" / "curv_contour_length_14"
    (base / "metadata").mkdir(parents=True)
    for batch in range(2):
        lines = []
        (base / "imgs" / str(batch)).mkdir(parents=True)
        for k in range(batch * count // 2, (batch + 1) * count // 2):
            path = base / "imgs" / str(batch) / f"sample_{k}.png"
            if k == empty:
                path.write_bytes(b"")
            else:
                Image.fromarray(np.full((resolution, resolution), k, dtype=np.uint8)).save(path)
            lines.append(f"imgs/{batch} sample_{k}.png {k} {k % 2} 1.0 6 2 2 0.5 1 1")
        (base / "metadata" / f"{batch}.npy").write_text("\n".join(lines) + "\n")
    return base.parent


# ---------------------------------------------------------------------------------------------------
# The ListOps generator


def median_of(args: list[int]) -> int:
    """LRA's MED: the middle value, or the floor of the mean of the two middle values."""
    ordered = sorted(args)
    middle = len(ordered) // 2
    return ordered[middle] if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) // 2


def evaluate_tokens(tokens: list[str]) -> int:
    """An evaluator of the model's view of the text (parentheses dropped), written apart from the generator's."""
    stack: list[list] = []
    for token in tokens:
        if token.startswith("["):
            stack.append([token])
        elif token == "]":
            op, *args = stack.pop()
            value = {
                "[MIN": min(args),
                "[MAX": max(args),
                "[MED": median_of(args),
                "[SM": sum(args) % 10,
            }[op]
            if not stack:
                return value
            stack[-1].append(value)
        else:
            stack[-1].append(int(token))
    raise AssertionError(f"unbalanced expression: {tokens[:20]}")


def model_tokens(source: str) -> list[str]:
    return source.replace("(", "").replace(")", "").split()


@pytest.mark.parametrize(
    "tree, value",
    [
        (("[MAX", (2, 9)), 9),
        (("[MIN", (4, ("[SM", (3, 8)), 7)), 1),
        (("[MED", (1, 8, 3, 6)), 4),  # even count: (3 + 6) / 2 truncated
        (("[MED", (7, 1, 5)), 5),
        (("[SM", (9, 8, ("[MED", (2, 7, 5)))), 2),  # 9 + 8 + 5 = 22
        (("[MAX", (("[MIN", (9, 0)), ("[SM", (5, 5)))), 0),
    ],
)
def test_tree_values_worked_by_hand(tree, value):
    assert tree_value(tree) == value
    assert evaluate_tokens(model_tokens(tree_source(tree))) == value


def test_tree_text_is_the_release_format():
    assert tree_source(("[MAX", (2, 9))) == "( ( ( [MAX 2 ) 9 ) ] )"
    assert tree_source(("[MIN", (4, ("[SM", (3, 8)), 7))) == "( ( ( ( [MIN 4 ) ( ( ( [SM 3 ) 8 ) ] ) ) 7 ) ] )"


def test_generate_tree_draws_in_lra_order():
    """With r > VALUE_P the first draw is a leaf whose digit is the second draw, as in LRA's code."""
    rng, twin = random.Random(5), random.Random(5)
    tree, length = generate_tree(rng, 1, 10, 10)
    if twin.random() > 0.25:
        assert (tree, length) == (twin.choice(range(10)), 1)
    else:
        assert isinstance(tree, tuple) and length == len(model_tokens(tree_source(tree)))
    assert generate_tree(random.Random(0), 10, 10, 10)[1] == 1  # at the maximum depth always a leaf


def test_generated_files_are_right_in_bounds_distinct_and_deterministic(tmp_path):
    recipe = ListOpsRecipe(num_train=40, num_val=8, num_test=8, min_length=20, max_length=120, seed=3)
    paths = write_listops(tmp_path / "a", recipe)
    assert [p.name for p in paths] == ["basic_train.tsv", "basic_val.tsv", "basic_test.tsv"]
    sources = []
    for path, count in zip(paths, (40, 8, 8)):
        with path.open(newline="") as file:
            rows = list(csv.reader(file, delimiter="\t"))
        assert rows[0] == ["Source", "Target"] and len(rows) == count + 1
        for source, target in rows[1:]:
            tokens = model_tokens(source)
            assert 20 < len(tokens) < 120
            assert evaluate_tokens(tokens) == int(target)
            sources.append(source)
    assert len(set(sources)) == len(sources)
    assert json.loads((tmp_path / "a" / "recipe.json").read_text())["seed"] == 3
    write_listops(tmp_path / "b", recipe)
    write_listops(tmp_path / "c", ListOpsRecipe(**{**recipe.__dict__, "seed": 4}))
    train = lambda folder: (tmp_path / folder / "basic_train.tsv").read_bytes()
    assert train("a") == train("b") and train("a") != train("c")


def test_lra_defaults_give_lengths_strictly_between_500_and_2000():
    examples = draw_examples(ListOpsRecipe(num_train=6, num_val=1, num_test=1, seed=1))
    lengths = [len(model_tokens(source)) for source, _ in examples]
    assert len(examples) == 8 and all(500 < n < 2000 for n in lengths)
    assert all(evaluate_tokens(model_tokens(source)) == value for source, value in examples)


def test_make_listops_command(tmp_path, capsys):
    out = tmp_path / "set"
    main(["lra", "make-listops", "--out", str(out), "--seed", "7", "--num_train", "5", "--num_val", "2",
          "--num_test", "2", "--min_length", "10", "--max_length", "50"])
    assert "wrote" in capsys.readouterr().out
    assert len((out / "basic_test.tsv").read_text().splitlines()) == 3


def test_impossible_recipes_are_refused():
    with pytest.raises(ValueError, match="longest has 17 tokens"):
        ListOpsRecipe(max_depth=3, max_args=3)
    with pytest.raises(ValueError, match="strictly between"):
        ListOpsRecipe(min_length=100, max_length=101)


# ---------------------------------------------------------------------------------------------------
# ListOps


def test_listops_tokens_vocabulary_and_padding(listops_root):
    data = ListOpsDataModule(str(listops_root), max_length=16, batch_size=3)
    data.setup()
    assert data.vocab_size == 18 and data.num_classes == 10
    ids = data.ids
    inputs, length, label = data.datasets["train"][0]
    expected = [ids["[MAX"], ids["2"], ids["9"], ids["X"], ids["<eos>"]]
    assert inputs.shape == (16,) and length == 5 and label == 9
    assert inputs[:5].tolist() == expected and not inputs[5:].any()
    inputs, lengths, labels = next(iter(data.train_dataloader()))
    assert inputs.shape == (3, 16) and sorted(lengths.tolist()) == [5, 6, 9] and sorted(labels.tolist()) == [1, 3, 9]
    truncated = ListOpsDataModule(str(listops_root), max_length=4)
    truncated.setup()
    assert truncated.datasets["val"][1][0].tolist() == [ids["[MIN"], ids["4"], ids["[SM"], ids["<eos>"]]


def test_listops_majority_baseline(listops_root):
    write_listops_tsv(listops_root / "basic_train.tsv", [("( ( [SM 1 ) 2 ] )", "3")] * 3 + [("( ( [SM 1 ) 1 ] )", "2")])
    write_listops_tsv(listops_root / "basic_test.tsv", [("( ( [SM 1 ) 2 ] )", "3"), ("( ( [SM 1 ) 1 ] )", "2")])
    assert ListOpsDataModule(str(listops_root)).majority_baseline("test") == (3, 0.5)


def test_listops_bad_files_are_named(listops_root, tmp_path):
    with pytest.raises(FileNotFoundError, match="basic_train.tsv.*make-listops"):
        ListOpsDataModule(str(tmp_path / "nowhere")).setup()
    (listops_root / "basic_val.tsv").unlink()
    with pytest.raises(FileNotFoundError, match="basic_val.tsv does not exist.*listops-1000"):
        ListOpsDataModule(str(listops_root)).setup()
    write_listops_tsv(listops_root / "basic_val.tsv", [("( ( [SM 1 ) 2 ] )", "3"), ("( ( [SM 1 ) 2 ] )", "3\textra")])
    with pytest.raises(ValueError, match=r"basic_val.tsv, line 3: expected 2 tab-separated columns"):
        ListOpsDataModule(str(listops_root)).setup()
    write_listops_tsv(listops_root / "basic_val.tsv", [("( ( [SM 1 ) 2 ] )", "12")])
    with pytest.raises(ValueError, match=r"basic_val.tsv, line 2: the label must be an integer in 0..9"):
        ListOpsDataModule(str(listops_root)).setup()
    (listops_root / "basic_val.tsv").write_text("source\ttarget\n")
    with pytest.raises(ValueError, match="line 1: expected the header Source<tab>Target"):
        ListOpsDataModule(str(listops_root)).setup()


def test_listops_generated_on_demand_and_cached(tmp_path, listops_root):
    recipe = ListOpsRecipe(num_train=12, num_val=4, num_test=4, min_length=5, max_length=30, max_depth=4, max_args=4)
    data = ListOpsDataModule(str(tmp_path / "generated"), max_length=32, generate=recipe)
    data.prepare_data()
    data.setup()
    assert [len(data.datasets[s]) for s in ("train", "val", "test")] == [12, 4, 4]
    stamp = (tmp_path / "generated" / "basic_train.tsv").stat().st_mtime_ns
    ListOpsDataModule(str(tmp_path / "generated"), generate=recipe).prepare_data()
    assert (tmp_path / "generated" / "basic_train.tsv").stat().st_mtime_ns == stamp
    with pytest.raises(ValueError, match="did not write"):  # the CLI's user-error type: the message alone
        ListOpsDataModule(str(listops_root), generate=recipe).prepare_data()


def test_listops_set_of_another_recipe_is_refused_not_overwritten(tmp_path):
    """Runs and their checkpoints may have used the set there: asking for another recipe names the differences."""
    recipe = ListOpsRecipe(num_train=12, num_val=4, num_test=4, min_length=5, max_length=30, max_depth=4, max_args=4)
    root = tmp_path / "generated"
    ListOpsDataModule(str(root), generate=recipe).prepare_data()
    before = {path.name: path.read_bytes() for path in root.iterdir()}
    other = ListOpsRecipe(**{**recipe.__dict__, "num_train": 16, "seed": 1})
    with pytest.raises(ValueError) as refused:
        ListOpsDataModule(str(root), generate=other).prepare_data()
    message = str(refused.value)
    assert message.startswith(f"{root} holds a ListOps set generated with another recipe")
    assert "num_train 12 -> 16, seed 0 -> 1)" in message and "max_depth" not in message
    assert "choose another data.root" in message and f"delete {root} to regenerate it" in message
    assert {path.name: path.read_bytes() for path in root.iterdir()} == before


def test_an_interrupted_listops_generation_is_done_again(tmp_path, monkeypatch):
    """recipe.json, written last, means a complete set: a generation that crashed (or a split deleted since) is
    done again, and one crashing again leaves no recipe.json."""
    import datamodules.lra

    recipe = ListOpsRecipe(num_train=12, num_val=4, num_test=4, min_length=5, max_length=30, max_depth=4, max_args=4)
    root = tmp_path / "generated"

    def torn_write(out, recipe):
        out.mkdir(parents=True, exist_ok=True)
        (out / "basic_train.tsv").write_text("Source\tTarget\r\n( ( [MAX 2")
        raise OSError("disk full")

    monkeypatch.setattr(datamodules.lra, "write_listops", torn_write)
    with pytest.raises(OSError, match="disk full"):
        ListOpsDataModule(str(root), generate=recipe).prepare_data()
    assert not (root / "recipe.json").exists()
    monkeypatch.undo()
    data = ListOpsDataModule(str(root), max_length=32, generate=recipe)
    data.prepare_data()
    data.setup()
    assert [len(data.datasets[s]) for s in ("train", "val", "test")] == [12, 4, 4]
    assert sorted(p.name for p in root.iterdir()) == ["basic_test.tsv", "basic_train.tsv", "basic_val.tsv",
                                                      "recipe.json"]
    complete = {path.name: path.read_bytes() for path in root.iterdir()}
    (root / "basic_val.tsv").unlink()
    monkeypatch.setattr(datamodules.lra, "write_listops", torn_write)
    with pytest.raises(OSError, match="disk full"):
        ListOpsDataModule(str(root), generate=recipe).prepare_data()
    assert not (root / "recipe.json").exists()  # not a complete-looking folder
    monkeypatch.undo()
    ListOpsDataModule(str(root), generate=recipe).prepare_data()
    assert {path.name: path.read_bytes() for path in root.iterdir()} == complete


# ---------------------------------------------------------------------------------------------------
# Text, Retrieval


def test_imdb_bytes_labels_and_validation_is_test(imdb_root):
    data = IMDBDataModule(str(imdb_root), max_length=20, batch_size=2)
    data.setup()
    assert len(data.datasets["train"]) == 4 and data.datasets["val"] is data.datasets["test"]
    texts = {label: [t.encode() for t in REVIEWS[("train", s)]] for label, s in enumerate(("neg", "pos"))}
    seen = []
    for n in range(len(data.datasets["train"])):
        inputs, length, label = data.datasets["train"][n]
        text = next(t for t in texts[label] if t[:20] == bytes((inputs[:length] - 1).tolist()))
        assert length == min(len(text), 20) and not inputs[length:].any()
        seen.append(text)
    assert sorted(seen) == sorted(texts[0] + texts[1])  # "Naïve" and "—" are several bytes each
    assert data.vocab_size == 257


def test_imdb_layout_errors(imdb_root):
    with pytest.raises(FileNotFoundError, match="set data.root to .*aclImdb"):
        IMDBDataModule(str(imdb_root.parent)).setup()
    for file in (imdb_root / "test" / "neg").iterdir():
        file.unlink()
    with pytest.raises(FileNotFoundError, match="holds no .txt reviews.*train/pos"):
        IMDBDataModule(str(imdb_root)).setup()


def test_aan_pairs(aan_root):
    data = AANDataModule(str(aan_root), max_length=64, batch_size=3)
    data.setup()
    assert data.paired and data.num_classes == 2
    inputs, lengths, label = data.datasets["val"][2]
    assert inputs.shape == (2, 64) and label == 1
    first, second = AAN_ROWS[2][3].encode()[:64], AAN_ROWS[2][4].encode()
    assert lengths.tolist() == [64, len(second)]
    assert bytes((inputs[0] - 1).tolist()) == first
    assert bytes((inputs[1, : len(second)] - 1).tolist()) == second and not inputs[1, len(second) :].any()
    batch = next(iter(data.train_dataloader()))
    assert batch[0].shape == (3, 2, 64) and batch[1].shape == (3, 2) and sorted(batch[2].tolist()) == [0, 1, 1]


def test_aan_malformed_rows_name_file_and_line(aan_root):
    path = aan_root / "new_aan_pairs.test.tsv"
    path.write_text("1\tA\tB\tonly one text\n")
    with pytest.raises(ValueError, match=r"new_aan_pairs.test.tsv, line 1: expected 5 tab-separated columns"):
        AANDataModule(str(aan_root)).setup()
    path.write_text("\t".join(AAN_ROWS[0]) + "\n" + "\t".join(("yes", *AAN_ROWS[0][1:])) + "\n")
    with pytest.raises(ValueError, match=r"line 2: the label must be an integer in 0..1"):
        AANDataModule(str(aan_root)).setup()
    path.unlink()
    with pytest.raises(FileNotFoundError, match="new_aan_pairs.test.tsv does not exist.*tsv_data"):
        AANDataModule(str(aan_root)).setup()


# ---------------------------------------------------------------------------------------------------
# Image, Pathfinder, Path-X


def test_cifar_grayscale_sequences_and_split(cifar_root):
    data = SequentialCIFAR10DataModule(str(cifar_root), batch_size=4)
    data.setup()
    assert [len(data.datasets[s]) for s in ("train", "val", "test")] == [18, 2, 6]
    assert data.input_channels == 1 and data.grid == (32, 32)
    batch = pickle.loads((cifar_root / "test_batch").read_bytes())
    pixels, length, label = data.datasets["test"][0]
    assert pixels.shape == (1024, 1) and length == 1024 and label == batch[b"labels"][0]
    rgb = batch[b"data"][0].reshape(3, 32, 32).transpose(1, 2, 0)
    gray = np.asarray(Image.fromarray(rgb).convert("L"), dtype=np.float64).flatten()  # what S4's Grayscale does
    expected = torch.tensor((gray / 255 - 122.6 / 255) / (61.0 / 255), dtype=torch.float32)
    torch.testing.assert_close(pixels[:, 0], expected)
    again = SequentialCIFAR10DataModule(str(cifar_root))
    again.setup()
    assert np.array_equal(again.datasets["val"].labels, data.datasets["val"].labels)


def test_cifar_rgb_with_augmentation(cifar_root):
    data = SequentialCIFAR10DataModule(str(cifar_root), grayscale=False, augment=True)
    data.setup()
    assert data.input_channels == 3
    pixels = data.datasets["test"][0][0]
    batch = pickle.loads((cifar_root / "test_batch").read_bytes())
    red = torch.tensor(batch[b"data"][0, :1024] / 255, dtype=torch.float32)
    torch.testing.assert_close(pixels[:, 0], (red - 0.4914) / 0.2470)
    assert pixels.shape == (1024, 3) and data.datasets["val"][0][0].shape == (1024, 3)
    torch.manual_seed(0)
    augmented = [data.datasets["train"][0][0] for _ in range(4)]
    assert augmented[0].shape == (1024, 3) and any(not torch.equal(augmented[0], a) for a in augmented[1:])
    assert not data.datasets["val"].augment and data.datasets["train"].augment


def test_pathfinder_split_pixels_and_empty_images(tmp_path):
    root = write_pathfinder(tmp_path, resolution=32, count=22, empty=5)
    data = PathfinderDataModule(str(root), batch_size=2)
    with pytest.warns(UserWarning, match="left out 1 empty"):
        data.setup()
    sizes = [len(data.datasets[s]) for s in ("train", "val", "test")]
    assert sizes == [16, 2, 3]
    names = [p.name for s in ("train", "val", "test") for p in data.datasets[s].paths]
    assert sorted(names) == sorted(f"sample_{k}.png" for k in range(22) if k != 5)
    pixels, length, label = data.datasets["val"][0]
    k = int(data.datasets["val"].paths[0].stem.split("_")[1])
    assert pixels.shape == (1024, 1) and length == 1024 and label == k % 2
    torch.testing.assert_close(pixels, torch.full((1024, 1), k / 255))


def test_pathfinder_errors_name_the_problem(tmp_path):
    root = write_pathfinder(tmp_path, resolution=32, count=4)
    (root / "curv_contour_length_14" / "imgs" / "1" / "sample_3.png").unlink()
    with pytest.raises(FileNotFoundError, match=r"1.npy, line 2 names .*sample_3.png, which does not exist"):
        PathfinderDataModule(str(root)).setup()
    with pytest.raises(FileNotFoundError, match="curv_contour_length_14/metadata/<n>.npy"):
        PathfinderDataModule(str(tmp_path)).setup()
    write_pathfinder(tmp_path / "x", resolution=32, count=10)
    wrong = PathfinderDataModule(str(tmp_path / "x" / "pathfinder32"), resolution=128)
    wrong.setup()
    with pytest.raises(ValueError, match="is 32 x 32 px but data.resolution is 128"):
        wrong.datasets["train"][0]


def test_pathfinder_unreadable_image_is_named(tmp_path):
    root = write_pathfinder(tmp_path, resolution=32, count=4)
    broken = root / "curv_contour_length_14" / "imgs" / "0" / "sample_1.png"
    broken.write_bytes(b"not a png")
    data = PathfinderDataModule(str(root))
    data.setup()
    split, index = next((s, n) for s in ("train", "val", "test") for n, p in enumerate(data.datasets[s].paths)
                        if p == broken)
    with pytest.raises(ValueError, match=r"cannot read image .*sample_1\.png.*its line in the metadata file"):
        data.datasets[split][index]


def test_a_training_split_smaller_than_a_batch_is_refused(listops_root):
    data = ListOpsDataModule(str(listops_root), batch_size=4)
    data.setup()
    with pytest.raises(ValueError, match=r"training split has 3 examples, 3 per device, and data.batch_size is 4"):
        data.train_dataloader()


# ---------------------------------------------------------------------------------------------------
# Every LRA config, shrunk, runs two training steps on the fixtures


@pytest.fixture
def fixture_roots(tmp_path, listops_root, imdb_root, aan_root, cifar_root) -> dict[str, Path]:
    return {
        "listops": listops_root,
        "imdb": imdb_root,
        "aan": aan_root,
        "cifar": cifar_root,
        "pathfinder": write_pathfinder(tmp_path / "pf", resolution=32, count=20),
        "pathx": write_pathfinder(tmp_path / "px", resolution=128, count=20),
    }


PAPER_CONFIGS = ["listops", "imdb", "aan", "cifar", "pathfinder", "pathx"]


@pytest.mark.parametrize("task", PAPER_CONFIGS)
def test_paper_config_runs_two_steps_on_fixtures(task, fixture_roots, tmp_path, compile_through_aot_eager):
    """Each paper config, shrunk, trains two steps through the CLI on fixtures in the release's format. The
    configs compile their blocks, here through aot_eager (`compile_through_aot_eager`; Inductor's Triton build
    runs on the GPU: benchmarks/lra.py --compile-blocks)."""
    config = yaml.safe_load((ROOT / f"configs/lra/{task}.yaml").read_text())
    run = tmp_path / "run"
    config["trainer"].update(
        max_steps=2, max_epochs=None, limit_val_batches=1, num_sanity_val_steps=0, precision="32-true",
        accelerator="cpu", devices=1, enable_progress_bar=False, enable_model_summary=False,
        default_root_dir=str(run), log_every_n_steps=1,
    )
    config["trainer"]["logger"]["init_args"]["save_dir"] = str(run)
    config["trainer"]["callbacks"][0]["init_args"] = {"dirpath": str(run / "checkpoints"), "save_last": True,
                                                      "every_n_train_steps": 1}
    backbone = config["model"]["init_args"]["backbone"]
    backbone.update(d_model=8, n_layers=1, expand_ratio=min(backbone["expand_ratio"], 4), mlp_hidden=8)
    config["data"]["init_args"].update(root=str(fixture_roots[task]), batch_size=2, num_workers=0)
    if "max_length" in config["data"]["init_args"]:  # the reviews and papers of the fixtures are short anyway
        config["data"]["init_args"]["max_length"] = 256
    path = tmp_path / f"{task}.yaml"
    path.write_text(yaml.safe_dump(config))
    main(["fit", "--config", str(path)])
    state = torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)
    assert state["global_step"] == 2
