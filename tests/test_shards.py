"""`--shard I/N` (tests/conftest.py), which splits `make test-gpu` into parts that run in parallel processes."""

import pytest

from tests.conftest import shard


def test_shards_interleave_and_cover_every_test_once():
    items = [f"case {n}" for n in range(10)]
    parts = [shard(items, f"{index}/3") for index in (1, 2, 3)]
    assert [kept for kept, _ in parts] == [items[0::3], items[1::3], items[2::3]]
    assert sorted(sum((kept for kept, _ in parts), [])) == sorted(items)
    for kept, deselected in parts:
        assert sorted(kept + deselected) == sorted(items) and not set(kept) & set(deselected)


@pytest.mark.parametrize("spec", ["0/3", "4/3", "1", "a/3", "1/0", "-1/3"])
def test_a_shard_outside_its_count_is_refused(spec):
    with pytest.raises(pytest.UsageError, match="expected I/N"):
        shard(["a", "b"], spec)
