"""benchmarks/scan_shapes.py's option parsing and its comparison of variants (the timing itself needs a GPU)."""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import scan_shapes  # noqa: E402
from scan_shapes import tile_overrides, variants  # noqa: E402


def test_tile_overrides_group_options_by_kernel_as_literals():
    overrides = tile_overrides(["dh:num_stages=3", "dh:BK=64", "grads:OWN_MMA_LOADS=True", "states:num_warps=2"])
    assert overrides == {"dh": {"num_stages": 3, "BK": 64}, "grads": {"OWN_MMA_LOADS": True},
                         "states": {"num_warps": 2}}


@pytest.mark.parametrize("item", ["dh", "dh:num_stages", "dh:num_stages=three", ":num_stages=3", "dh:=3"])
def test_tile_overrides_refuse_malformed_items(item):
    with pytest.raises(ValueError, match="KERNEL:NAME=VALUE"):
        tile_overrides([item])


def test_variants_split_each_name_from_its_options():
    assert variants(["base=--kernels-from base_kernels", "tree=", "dh3=--tiles 'dh:num_stages=3'"]) == {
        "base": ["--kernels-from", "base_kernels"], "tree": [], "dh3": ["--tiles", "dh:num_stages=3"]}


@pytest.mark.parametrize("items", [["base"], ["=--kernels-from b"], ["tree=", "tree=--tiles dh:BK=64"]])
def test_variants_refuse_unnamed_or_repeated_items(items):
    with pytest.raises(ValueError, match="--variant"):
        variants(items)


def test_compare_alternates_the_variants_every_round_and_tables_the_rounds(monkeypatch, capsys):
    """Each variant runs as its own process in turn, round after round; the table sets the rounds side by side."""
    commands = []

    def fake_run(command, check):
        commands.append(command)
        out = Path(command[command.index("--json-lines") + 1])
        variant_ms = 1.0 if "--kernels-from" in command else 2.0
        out.write_text("".join(json.dumps({"shape": shape, "fb_ms": variant_ms + len(commands) / 10,
                                           "forward_ms": variant_ms / 4, "kernels_ms": {}}) + "\n"
                               for shape in ("record", "vit-tiny")))

    monkeypatch.setattr(scan_shapes.subprocess, "run", fake_run)
    scan_shapes.compare({"base": ["--kernels-from", "b"], "tree": []}, rounds=2, common=["--shapes", "record"])
    assert [("--kernels-from" in command) for command in commands] == [True, False, True, False]
    assert all(command[2:4] == ["--shapes", "record"] for command in commands)
    table = capsys.readouterr().out.splitlines()[-4:]
    assert table[0] == "| shape | base f+b | tree f+b | base no-grad | tree no-grad |"
    assert table[2] == "| record | 1.100 / 1.300 | 2.200 / 2.400 | 0.250 / 0.250 | 0.500 / 0.500 |"
    assert table[3].startswith("| vit-tiny | 1.100 / 1.300 |")
