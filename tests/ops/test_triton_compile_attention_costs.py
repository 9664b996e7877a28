"""The attention_costs Triton kernels compile to PTX and cubin for sm_80 and sm_90 without a GPU.

Runs in a subprocess without TRITON_INTERPRET (the interpreter replaces @triton.jit functions,
and conftest.py turns it on for this process). Configurations, with the block sizes and warps the
GPU launcher picks: the forward, dQ and dK kernels for scores in fp32 (full-precision products,
a TinyBERT-4-like student) and for probs with both masks and the floor, a bf16 student and an
fp16 teacher (tensor-core products, 8 student layers); the fp64 forward (about 1.5 s of CPU per
compile, so not every kernel in every dtype). Each must fit an A100's / H100's shared memory per
block (larger launches are split by the launcher on OutOfResources)."""

from __future__ import annotations

import textwrap

import pytest
from _triton_compile import assert_compiled, run_compile_script

pytest.importorskip("triton")


SCRIPT = textwrap.dedent(
    """
    import json
    import torch
    import triton.language as tl
    from _triton_compile import compile_for_targets
    from emd_kernels import attention_costs as K

    ACC_PTRS = ("part_ptr", "lse_ptr", "g_ptr", "c_ptr", "lse_x_ptr", "lse_y_ptr", "delta_ptr")

    def signature(fn, const, acc):
        sig = {}
        for a in fn.arg_names:
            if a in const:
                sig[a] = "constexpr"
            elif a == "tab":
                sig[a] = "*i64"
            elif a in ("am_ptr", "tm_ptr"):
                sig[a] = "*fp32"
            elif a == "box_ptr":
                sig[a] = "*i32"
            elif a in ACC_PTRS:
                sig[a] = "*" + acc
            elif a[:3] in ("xq_", "xk_", "yq_", "yk_") or a.startswith("g_s"):
                sig[a] = "i64"  # strides may exceed 2**31
            else:
                sig[a] = "i32"
        return sig

    def config(x, y, acc, m_pad, dx, dy, probs, masks, floor, n_pad=None):
        bq, bk, warps = K.block_sizes(128, m_pad, dx, torch.device("cuda"))
        c = dict(MX_PAD=m_pad, BQ=bq, BK=bk, DX_PAD=dx, DY_PAD=dy, X_DTYPE=x, Y_DTYPE=y, X_DOT=x, Y_DOT=y,
                 ACC=acc, PREC="ieee", PROBS=probs, HAS_AM=masks, HAS_TM=masks, HAS_FLOOR=floor)
        return c, warps

    f32, bf16, f16, f64 = tl.float32, tl.bfloat16, tl.float16, tl.float64
    # (name, X dtype, Y dtype, acc, M_PAD, DX_PAD, DY_PAD, probs, masks, floor, acc pointer type)
    setups = [
        ("scores_fp32", f32, f32, f32, 4, 32, 64, False, False, True, "fp32"),  # TinyBERT-4 student
        ("probs_bf16_fp16", bf16, f16, f32, 8, 64, 64, True, True, True, "fp32"),  # 6-layer student, fp16 teacher
        ("probs_fp64", f64, f64, f64, 2, 16, 16, True, True, False, "fp64"),
    ]
    out = []
    for name, x, y, acc, m_pad, dx, dy, probs, masks, floor, acc_ptr in setups:
        const, warps = config(x, y, acc, m_pad, dx, dy, probs, masks, floor)
        fwd_const = dict(const, NY_PAD=16)
        kernels = [(K._attention_costs_fwd_kernel, fwd_const), (K._attention_costs_bwd_dq_kernel, const),
                   (K._attention_costs_bwd_dk_kernel, const)]
        if acc == f64:  # compile time: fp64 (the test dtype) only for the forward
            kernels = kernels[:1]
        for fn, cst in kernels:
            out += compile_for_targets(fn, signature(fn, cst, acc_ptr), cst, warps, setup=name)
    print(json.dumps(out))
    """
)


@pytest.mark.slow  # real Triton compiles of every variant
def test_kernels_compile_for_sm80_and_sm90():
    results = run_compile_script(SCRIPT, timeout=600)
    # every launch fits a block's shared memory in one group of these layers: no OutOfResources
    # retry (``MAX_X_LAYERS``) for common students
    assert_compiled(results, 14, {"_attention_costs_fwd_kernel", "_attention_costs_bwd_dq_kernel",
                                  "_attention_costs_bwd_dk_kernel"})
    # bf16 and fp64 products run on the tensor cores (mma); fp32 uses full-precision FMA
    assert all(r["mma"] for r in results if r["setup"] != "scores_fp32")
