"""The Gluon forward (kernels/gluon_scan_forward.py) compiles for the H100 (sm_90a) as it was measured: within
shared memory, the state partition at 256 registers, no spills, and no wait ptxas had to add after the products,
without grad and keeping the chunk states and scores for a backward.
Checked on the CPU, where the interpreter cannot run Gluon; the GPU tests run it."""

import json
import os
import subprocess
import sys
from pathlib import Path

from kernels import gluon_scan_forward
from tests.kernels.gluon_compile import VARIANTS
from tests.kernels.sm90_launches import SHARED_MEMORY_LIMIT

ROOT = Path(__file__).resolve().parents[2]


def test_gluon_forward_compiles_for_sm90_without_spills_or_injected_waits():
    env = {name: value for name, value in os.environ.items() if name != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-m", "tests.kernels.gluon_compile"], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=600, check=False)
    assert result.returncode == 0, result.stderr[-4000:]
    *variants, with_bound, without_bound = [json.loads(line) for line in result.stdout.splitlines()]
    assert [variant["variant"] for variant in variants] == list(VARIANTS)
    # The grads kernel (opt-in, `triton_scan_dispatch.GLUON_GRADS`) spills today (about 1.7 KB, thirty-second
    # session): it is held to its shared memory and to the wgmmas' registers untouched while they run.
    for grads in (with_bound, without_bound):
        assert grads["shared_bytes"] <= SHARED_MEMORY_LIMIT and grads["injected_waits"] == 0, grads
    for variant in variants:
        assert variant["shared_bytes"] <= SHARED_MEMORY_LIMIT, variant
        # the loader's 24, the gate partitions' own, the state partition's 256 (S^T alone takes 128)
        assert {24, gluon_scan_forward.GATE_REGISTERS, 256} <= set(variant["registers"]), variant
        assert variant["spilled_bytes"] == 0 and variant["injected_waits"] == 0, variant
