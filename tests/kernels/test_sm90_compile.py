"""Every Triton launch of the scan, decode and cross-entropy ops compiles for the H100 (sm_90a) within its
shared memory, checked on the CPU: the interpreter that runs the kernels elsewhere in CI accepts code the
compiler refuses."""

import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from tests.kernels.sm90_launches import CASES, GRID_LIMITS, SHARED_MEMORY_LIMIT, wgmma_refill_races

ROOT = Path(__file__).resolve().parents[2]
BACKWARD_KERNELS = {"_bwd_dh_kernel", "_bwd_kernel"}


def compile_every_launch() -> list[dict]:
    """`sm90_launches` in one process per core (at most 4: each holds torch), each compiling a share of the cases:
    on a cold Triton cache (CI) one process took 4 min 12 s on this 2-core machine, two 2 min 17 s."""
    env = {name: value for name, value in os.environ.items() if name != "TRITON_INTERPRET"}
    count = min(len(os.sched_getaffinity(0)), 4)

    def compile_shard(shard: int) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "tests.kernels.sm90_launches", str(shard), str(count)], cwd=ROOT,
                              env=env, capture_output=True, text=True, timeout=900, check=False)

    launches = []
    with ThreadPoolExecutor(count) as pool:
        for result in pool.map(compile_shard, range(count)):
            assert result.returncode == 0, result.stderr[-4000:]
            launches += [json.loads(line) for line in result.stdout.splitlines()]
    return launches


def test_every_launch_compiles_for_sm90_within_limits_moving_16bit_tiles_in_vectors():
    launches = compile_every_launch()
    per_case = {case: [launch for launch in launches if launch["case"] == case] for case in CASES}
    for case, compiled in per_case.items():
        names = [launch["kernel"] for launch in compiled]
        if case.startswith(("decode", "cross entropy")):
            assert names == ["_decode_kernel" if case.startswith("decode") else "_loss_and_grad_kernel"], (case, names)
            continue
        if "small heads" in case or "Path-X" in case:  # their own two kernels (kernels/triton_scan_small.py)
            assert names == ["_small_fwd_kernel", "_small_bwd_kernel"], (case, names)
            continue
        # Their T (100, 200) is not a multiple of 16: a tile of 16-bit values whose alignment or mask Triton cannot
        # prove moves element by element. The backward's copies of q and f did (its dh walk 2x slower at the ViT's
        # T 196; kernels/HISTORY.md, eleventh session).
        element_by_element = [(launch["kernel"], launch["global_16bit_accesses"]) for launch in compiled
                              if launch["global_16bit_accesses"]]
        assert not element_by_element, (case, element_by_element)
        one_pass = "many heads" in case and case.startswith("bf16")  # the forward's one kernel (`_fused_forward`)
        if "inference" in case:  # bfloat16 heads of 128 take chunks of 64, whose output kernel runs twice
            carry = [] if "packed" in case else ["_segment_carry_kernel"]  # packed walks are never cut
            outputs = 2 if case.startswith("bf16 K128") else 1
            expected = ["_fwd_states_kernel", *carry] + ["_fwd_output_kernel"] * outputs
            if one_pass:
                expected = ["_fwd_fused_kernel"]
            elif case == "bf16 K128 inference":  # 4 walks: the one-pass forward, cut (`_one_pass_segments`)
                expected = ["_fwd_fused_kernel", "_segment_carry_kernel", "_fwd_seed_kernel"]
            assert names == expected, (case, names)
            continue
        if case.startswith("bf16 K128 few heads"):  # 4 walks: the one-pass forward, cut and seeded in training
            recomputed = ["_fwd_states_kernel"] if "recomputed" in case else []
            seeds = ["_segment_ends_kernel", "_segment_carry_kernel"]  # each seeded walk's seeds
            expected = (seeds + ["_fwd_fused_kernel", *recomputed] + seeds + ["_bwd_dh_kernel"]
                        + ["_bwd_kernel"] * 2)
            assert names == expected, (case, names)
            continue
        # A training step launches each scan kernel once (the states walk twice when the backward recomputes
        # the states); with few (sequence, head) walks (segmented) the forward's states walk and the dh walk
        # are each followed by their carry pass, and the recomputation starts from the forward's seeds.
        states_walks = ("recomputed" in case) + (not one_pass)
        forward_kernels = {"_fwd_fused_kernel"} if one_pass else {"_fwd_states_kernel", "_fwd_output_kernel"}
        kernels = BACKWARD_KERNELS | forward_kernels | ({"_fwd_states_kernel"} if states_walks else set())
        assert sorted(set(names) - {"_segment_carry_kernel"}) == sorted(kernels), (case, names)
        assert names.count("_fwd_states_kernel") == states_walks, (case, names)
        assert names.count("_segment_carry_kernel") == (2 if "few heads" in case else 0), (case, names)
    # An async wgmma reading a pipelined slot that the loop refills before waiting for it: undefined in PTX, and
    # it showed as wrong or run-to-run different gradients (`wgmma_refill_races`).
    racy = [(launch["case"], launch["kernel"], launch["wgmma_refill_races"]) for launch in launches
            if launch["wgmma_refill_races"]]
    assert not racy, racy
    too_big = [launch for launch in launches if launch["shared_bytes"] > SHARED_MEMORY_LIMIT]
    assert not too_big, too_big
    # The GPU refuses a grid past these ("invalid argument"); the interpreter does not check them.
    too_wide = [launch for launch in launches if any(n > limit for n, limit in zip(launch["grid"], GRID_LIMITS))]
    assert not too_wide, too_wide


def _pipelined_loop(slots: int, pendings: int) -> str:
    """The TTGIR lines `wgmma_refill_races` reads, of a loop with one load in flight (a prologue fill) whose tile
    an async wgmma reads before the loop refills it."""
    return f"""
    %tile = ttg.local_alloc : () -> !ttg.memdesc<{slots}x64x32xbf16, #shared, #smem, mutable>
    %first = ttg.memdesc_index %tile[%c0_i32] : !ttg.memdesc<{slots}x64x32xbf16>
    %fill = ttg.async_copy_global_to_local %ptrs, %first mask %m : tensor<64x32x!tt.ptr<bf16>>
    scf.for %i = %c0_i32 to %c2_i32 step %c1_i32 {{
      %read = ttg.memdesc_index %tile[%slot] : !ttg.memdesc<{slots}x64x32xbf16>
      %acc = ttng.warp_group_dot %read, %other, %acc0 {{inputPrecision = 0 : i32, isAsync = true}}
      %done = ttng.warp_group_dot_wait %acc {{pendings = {pendings} : i32}}
      %next = ttg.memdesc_index %tile[%next_slot] : !ttg.memdesc<{slots}x64x32xbf16>
      %refill = ttg.async_copy_global_to_local %ptrs2, %next mask %m2 : tensor<64x32x!tt.ptr<bf16>>
    }}"""


def test_a_refill_under_a_pending_wgmma_is_a_race():
    assert wgmma_refill_races(_pipelined_loop(slots=1, pendings=1)) == ["%tile"]
    assert wgmma_refill_races(_pipelined_loop(slots=1, pendings=0)) == []  # waited for before the refill
    assert wgmma_refill_races(_pipelined_loop(slots=2, pendings=1)) == []  # the refill takes the other slot
