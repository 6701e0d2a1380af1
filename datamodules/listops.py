"""The ListOps generator of the Long Range Arena (Tay et al. 2021), deterministic from a seed.

A ListOps example is a nested list of operations on the digits 0-9, written with brackets, and its
value, itself a digit. The algorithm is LRA's (`lra_benchmarks/data/listops.py`): a node is a leaf
with probability 1 - VALUE_P (always at the maximum depth), otherwise one of MIN, MAX, MED and SM
(sum modulo 10) over 2 to max_args children. Trees are drawn until enough distinct ones have a length
(operators, digits and closing brackets, the tokens a model sees) strictly between min_length and
max_length. Unlike LRA, whose splits come out of a Python set in hash order, the draws here are kept
in the order they were made, so a seed gives the same files on every machine.

    hgrn2 lra make-listops --out data/listops-1000 --seed 0
"""

import csv
import json
import random
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

OPERATORS = ("[MIN", "[MAX", "[MED", "[SM")
END = "]"
VALUES = tuple(range(10))
VALUE_P = 0.25
"""Probability that a node above the maximum depth is an operator rather than a digit."""
SPLITS = ("train", "val", "test")
STALL_DRAWS = 1_000_000
"""Draws without a new tree after which the generator gives up (LRA's defaults need about 12 per tree)."""

Tree = int | tuple[str, tuple["Tree", ...]]
"""A digit, or (operator, children)."""


@dataclass(frozen=True)
class ListOpsRecipe:
    """How many trees of which sizes to draw; the defaults are LRA's ListOps-1000 release."""

    num_train: int = 96_000
    num_val: int = 2_000
    num_test: int = 2_000
    min_length: int = 500
    """Trees must be longer than this (in tokens: operators, digits and closing brackets)."""
    max_length: int = 2_000
    """... and shorter than this."""
    max_depth: int = 10
    max_args: int = 10
    seed: int = 0

    def __post_init__(self) -> None:
        if min(self.num_train, self.num_val, self.num_test) < 1:
            raise ValueError("num_train, num_val and num_test must each be at least 1")
        if self.max_args < 2 or self.max_depth < 2:
            raise ValueError(f"max_args and max_depth must be at least 2, got {self.max_args} and {self.max_depth}")
        # The shortest operator node is [OP d d ] (4 tokens); lengths are kept when strictly inside the bounds.
        if self.min_length < 3 or self.max_length - self.min_length < 2:
            raise ValueError(
                f"need 3 <= min_length and min_length + 2 <= max_length (lengths are kept when strictly between), "
                f"got min_length {self.min_length} and max_length {self.max_length}"
            )
        if self.longest_tree() <= self.min_length:
            raise ValueError(
                f"no tree of depth {self.max_depth} with {self.max_args} arguments per operator is longer than "
                f"min_length {self.min_length} (the longest has {self.longest_tree()} tokens): lower min_length or "
                f"raise max_depth or max_args"
            )

    def longest_tree(self) -> int:
        """Tokens of the fullest tree: every node above the maximum depth an operator with max_args arguments."""
        length = 1
        for _ in range(self.max_depth - 1):
            length = 2 + self.max_args * length
        return length

    @property
    def total(self) -> int:
        return self.num_train + self.num_val + self.num_test


def generate_tree(rng: random.Random, depth: int, max_depth: int, max_args: int) -> tuple[Tree, int]:
    """One random tree and its length in tokens. The draws come in LRA's order, from `rng`."""
    r = rng.random() if depth < max_depth else 1.0
    if r > VALUE_P:
        return rng.choice(VALUES), 1
    length = 2  # the operator and its closing bracket
    children = []
    for _ in range(rng.randint(2, max_args)):
        child, child_length = generate_tree(rng, depth + 1, max_depth, max_args)
        children.append(child)
        length += child_length
    return (rng.choice(OPERATORS), tuple(children)), length


def tree_source(tree: Tree) -> str:
    """The release's text form. LRA nests the arguments as pairs, one pair of parentheses per argument:
    [MAX 2 9 ] is written `( ( ( [MAX 2 ) 9 ) ] )`."""
    if isinstance(tree, int):
        return str(tree)
    op, children = tree
    text = f"( {op} {tree_source(children[0])} )"
    for child in children[1:]:
        text = f"( {text} {tree_source(child)} )"
    return f"( {text} {END} )"


def tree_value(tree: Tree) -> int:
    """The digit a tree evaluates to. MED of an even count is the mean of the two middle values, truncated."""
    if isinstance(tree, int):
        return tree
    op, children = tree
    values = [tree_value(child) for child in children]
    if op == "[MIN":
        return min(values)
    if op == "[MAX":
        return max(values)
    if op == "[MED":
        return int(statistics.median(values))
    return sum(values) % 10


def draw_examples(recipe: ListOpsRecipe) -> list[tuple[str, int]]:
    """`recipe.total` distinct (source, value) pairs whose lengths lie strictly inside the bounds."""
    rng = random.Random(recipe.seed)
    examples: dict[str, int] = {}  # insertion-ordered: the same seed gives the same order everywhere
    draws_without_news = 0
    while len(examples) < recipe.total:
        tree, length = generate_tree(rng, 1, recipe.max_depth, recipe.max_args)
        draws_without_news += 1
        if recipe.min_length < length < recipe.max_length:
            source = tree_source(tree)
            if source not in examples:
                examples[source] = tree_value(tree)
                draws_without_news = 0
        if draws_without_news == STALL_DRAWS:
            raise RuntimeError(
                f"{STALL_DRAWS:,} draws in a row gave no new tree with a length in ({recipe.min_length}, "
                f"{recipe.max_length}) after {len(examples):,} of {recipe.total:,}: there are too few such trees; "
                f"widen the length bounds or ask for fewer examples"
            )
    return list(examples.items())


def write_listops(out: Path, recipe: ListOpsRecipe) -> list[Path]:
    """Writes `basic_{train,val,test}.tsv` in the release format (header Source, Target; tab-separated)
    and `recipe.json`, which records how the files were made."""
    examples = draw_examples(recipe)
    out.mkdir(parents=True, exist_ok=True)
    bounds = [0, recipe.num_train, recipe.num_train + recipe.num_val, recipe.total]
    paths = []
    for split, start, end in zip(SPLITS, bounds[:-1], bounds[1:]):
        path = out / f"basic_{split}.tsv"
        with path.open("w", newline="") as file:
            writer = csv.writer(file, delimiter="\t")  # LRA writes with csv.writer too (its \r\n line ends)
            writer.writerow(["Source", "Target"])
            writer.writerows(examples[start:end])
        paths.append(path)
    (out / "recipe.json").write_text(json.dumps(asdict(recipe), indent=2) + "\n")
    return paths


def make_listops(
    out: str,
    seed: int = 0,
    num_train: int = 96_000,
    num_val: int = 2_000,
    num_test: int = 2_000,
    min_length: int = 500,
    max_length: int = 2_000,
    max_depth: int = 10,
    max_args: int = 10,
) -> None:
    """Generate a ListOps set in the LRA release format (the defaults make LRA's ListOps-1000).

    Args:
        out: folder to write basic_train.tsv, basic_val.tsv and basic_test.tsv to (the names of the release).
        seed: the same seed gives the same files.
        num_train: training examples.
        num_val: validation examples.
        num_test: test examples.
        min_length: keep trees longer than this many tokens (operators, digits, closing brackets).
        max_length: keep trees shorter than this.
        max_depth: deepest nesting of operators.
        max_args: most arguments of an operator.
    """
    recipe = ListOpsRecipe(num_train, num_val, num_test, min_length, max_length, max_depth, max_args, seed)
    start = time.perf_counter()
    paths = write_listops(Path(out), recipe)
    print(f"wrote {', '.join(str(p) for p in paths)} in {time.perf_counter() - start:.0f} s")
