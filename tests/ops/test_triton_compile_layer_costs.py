"""The layer_costs Triton kernels compile to PTX and cubin for sm_80 and sm_90 without a GPU.

Runs in a subprocess without TRITON_INTERPRET (the interpreter replaces @triton.jit functions,
and conftest.py turns it on for this process)."""

from __future__ import annotations

import textwrap

import pytest
from _triton_compile import assert_compiled, run_compile_script

pytest.importorskip("triton")


SCRIPT = textwrap.dedent(
    """
    import json, sys
    import triton.language as tl
    from _triton_compile import compile_for_targets
    from emd_kernels import layer_costs as K

    PTRS = {"ptr_tab": "*i64", "mask_ptr": "*fp32"}

    def signature(fn, const, acc):
        sig = {}
        for a in fn.arg_names:
            if a in const:
                sig[a] = "constexpr"
            elif a in PTRS:
                sig[a] = PTRS[a]
            elif a in ("part_ptr", "out_ptr", "cnt_ptr", "g_ptr", "scale_ptr"):
                sig[a] = "*" + acc
            elif a == "floor":
                sig[a] = "fp32"
            elif a.startswith(("s_s", "t_s")) or a in ("n_all", "g_bstride", "rows", "rows_per_out"):
                sig[a] = "i64"  # strides and counts may exceed 2**31
            else:
                sig[a] = "i32"
        return sig

    common = dict(M_PAD=4, N_PAD=16, BLOCK=128, S_DTYPE=tl.float32, T_DTYPE=tl.float32, ACC=tl.float32,
                  S_CONTIG=True, T_CONTIG=True, MASK_Q=False, MASK_K=False, HAS_FLOOR=False, ALIGNED=True)
    masked = dict(M_PAD=8, N_PAD=8, BLOCK=128, S_DTYPE=tl.bfloat16, T_DTYPE=tl.float16, ACC=tl.float32,
                  S_CONTIG=False, T_CONTIG=True, MASK_Q=True, MASK_K=True, HAS_FLOOR=True, ALIGNED=False)
    wide = dict(M_PAD=2, N_PAD=4, BLOCK=256, S_DTYPE=tl.float64, T_DTYPE=tl.float64, ACC=tl.float64,
                S_CONTIG=True, T_CONTIG=False, MASK_Q=True, MASK_K=False, HAS_FLOOR=False, ALIGNED=True)
    configs = [  # (kernel, constexprs, accumulator dtype, num_warps)
        (K._layer_costs_fwd_kernel, common, "fp32", 4),
        (K._layer_costs_fwd_kernel, masked, "fp32", 4),
        (K._layer_costs_bwd_kernel, dict(common, NEED_T=False, PER_SCALE=False), "fp32", 4),
        (K._layer_costs_bwd_kernel, dict(masked, NEED_T=True, PER_SCALE=True), "fp32", 4),
        (K._layer_costs_bwd_kernel, dict(wide, NEED_T=True, PER_SCALE=True), "fp64", 4),
        (K._layer_costs_reduce_kernel, dict(N_PAD=16, RB=1024, ACC=tl.float32, HAS_CNT=False), "fp32", 4),
        (K._layer_costs_reduce_kernel, dict(N_PAD=16, RB=8, ACC=tl.float64, HAS_CNT=True), "fp64", 4),
    ]
    out = []
    for fn, const, acc, warps in configs:
        out += compile_for_targets(fn, signature(fn, const, acc), const, warps)
    print(json.dumps(out))
    """
)


@pytest.mark.slow  # real Triton compiles of every variant
def test_kernels_compile_for_sm80_and_sm90():
    results = run_compile_script(SCRIPT, timeout=300)
    assert_compiled(results, 14, {"_layer_costs_fwd_kernel", "_layer_costs_bwd_kernel", "_layer_costs_reduce_kernel"})
