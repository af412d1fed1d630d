"""tools/check_cuda_compile.py's PTX reading (no nvcc needed): --divisions lists the integer divisions that sit inside
a kernel's loops, with their source lines, and none outside them."""

import textwrap

import check_cuda_compile as ccc

# Two kernels, as nvcc -lineinfo writes PTX: `looped` divides once before its loop (line 10), twice inside it (line 20,
# a 32- and a 64-bit remainder) and once after it; `straight` divides, but has no loop.
PTX = textwrap.dedent("""
    .file 1 "/src/csrc/cuda/a.cu"
    .file 2 "/src/csrc/varlen_fwd_params.h"
    .visible .entry looped(
        .param .u64 looped_param_0
    )
    {
        .loc 1 10 3
        div.s32 %r1, %r2, %r3;
    $L__BB0_1:
        .loc 2 20 5
        rem.u32 %r4, %r5, %r6;
        rem.s64 %rd1, %rd2, %rd3;
        .loc 1 30 1
        add.s32 %r7, %r7, 1;
        setp.lt.s32 %p1, %r7, %r8;
        @%p1 bra $L__BB0_1;
        .loc 1 40 1
        div.u64 %rd4, %rd5, %rd6;
        ret;
    }
    .entry straight(
        .param .u64 straight_param_0
    )
    {
        .loc 1 50 1
        div.s32 %r1, %r2, %r3;
        bra.uni $L__BB1_2;
    $L__BB1_2:
        ret;
    }
    """)


def test_divisions_inside_loops_are_listed_by_source_line():
    assert ccc.loop_divisions(PTX) == {"looped": {"varlen_fwd_params.h:20": 2}}


def test_ptx_flags_keep_one_virtual_arch():
    flags = ["-O3", "-gencode=arch=compute_90a,code=sm_90a", "-gencode=arch=compute_80,code=sm_80", "-Icsrc"]
    assert ccc.ptx_flags(flags) == ["-O3", "-Icsrc", "-arch=compute_90a"]
