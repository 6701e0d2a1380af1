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
