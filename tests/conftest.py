import os

import pytest
import torch

# Without a GPU the Triton kernels run in Triton's interpreter (numpy on the CPU): that is how CI tests them.
# It must be set before the kernels are defined, i.e. before kernels.triton_scan is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture
def compile_through_aot_eager(monkeypatch):
    """Module.compile (what compile_blocks calls) runs Dynamo's graphs through aot_eager: Inductor's C++ build of
    them takes minutes on CI's two cores, and on the GPU Inductor emits Triton instead (tests/model/test_generate.py
    covers Inductor). Dynamo starts afresh: earlier tests' compiled blocks would count against its recompile
    limit, past which it silently runs eager."""
    compile_module = torch.nn.Module.compile
    monkeypatch.setattr(torch.nn.Module, "compile", lambda module: compile_module(module, backend="aot_eager"))
    torch._dynamo.reset()


def pytest_addoption(parser):
    parser.addoption("--shard", metavar="I/N", help="run the I-th of N interleaved parts of the selected tests "
                                                    "(`make test-gpu` runs its parts in parallel processes)")


def shard(items: list, spec: str) -> tuple[list, list]:
    """The tests of part I of N (`spec` "I/N", from 1), every N-th from the I-th so that each parametrized matrix
    spreads over all parts, and the others."""
    index, _, count = spec.partition("/")
    if not (index.isdigit() and count.isdigit() and 1 <= int(index) <= int(count)):
        raise pytest.UsageError(f"--shard {spec!r}: expected I/N with 1 <= I <= N, e.g. --shard 1/3")
    in_part = [position % int(count) == int(index) - 1 for position in range(len(items))]
    return ([item for item, kept in zip(items, in_part) if kept],
            [item for item, kept in zip(items, in_part) if not kept])


@pytest.hookimpl(trylast=True)  # after -m and -k have deselected theirs
def pytest_collection_modifyitems(config, items):
    if spec := config.getoption("--shard"):
        items[:], deselected = shard(items, spec)
        config.hook.pytest_deselected(items=deselected)
