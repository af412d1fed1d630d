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


# A `cuobjdump -sass` text: two kernels for sm_90, one for sm_80, instruction lines with and without a predicate, and
# the encoding lines between them (no opcode) that must not count.
SASS = textwrap.dedent("""
    Fatbin elf code:
    ================
    arch = sm_90
    \tcode for sm_90
    \t\tFunction : first
    \t.headerflags\t@"EF_CUDA_SM90 EF_CUDA_VIRTUAL_SM(EF_CUDA_SM90)"
            /*0000*/                   LDC R1, c[0x0][0x28] ;                 /* 0x00000a00ff017b82 */
                                                                              /* 0x000ff00000000800 */
            /*0010*/                   HMMA.16816.F32.BF16 R4, R8, R12, R4 ;  /* 0x000000000c04723c */
            /*0020*/              @!P0 BRA 0x80 ;                             /* 0x0000000000008947 */
            /*0030*/                   LDGSTS.E.BYPASS.128 [R2], desc[UR4][R6.64] ;
            /*0040*/                   BAR.SYNC.DEFER_BLOCKING 0x0 ;
            /*0050*/              @UP1 BRA 0x10 ;
    \t\tFunction : second
            /*0000*/                   EXIT ;
    \tcode for sm_80
    \t\tFunction : first
            /*0000*/                   HGMMA.64x128x16.F32.BF16 R24, gdesc[UR4], RZ ;
            /*0010*/                   SYNCS.ARRIVE.TRANS64 RZ, [UR4] ;
    """)


def test_sass_counts_per_arch_and_kernel():
    counts = ccc.sass_counts(SASS)
    assert counts[("sm_90", "first")] == {"instructions": 6, "mma": 1, "cp.async": 1, "branch": 2, "barrier": 1}
    assert counts[("sm_90", "second")] == {"instructions": 1, "mma": 0, "cp.async": 0, "branch": 0, "barrier": 0}
    assert counts[("sm_80", "first")] == {"instructions": 2, "mma": 1, "cp.async": 0, "branch": 0, "barrier": 1}


def test_serialized_wgmma_names_each_kernel_and_its_reason():
    # ptxas' advisory as it printed it for a pending sm90a patch (kernel names shortened), between lines that are not
    log = textwrap.dedent("""\
        ptxas info    : 0 bytes gmem
        ptxas info    : (C7518) Potential Performance Loss: wgmma.mma_async instructions are serialized due to program dependence on compiler-inserted WG.DP in divergent path in the function '_ZN6dmattn4cuda5sm90a10fwd_kernelILb1EEEv'
        ptxas info    : Compiling entry function '_ZN6dmattn4cuda5sm90a10fwd_kernelILb0EEEv' for 'sm_90a'
        ptxas info    : (C7518) Potential Performance Loss: wgmma.mma_async instructions are serialized due to the presence of Extern calls in the function '_Z5otherv'
        """)
    assert ccc.serialized_wgmma(log) == [
        ("_ZN6dmattn4cuda5sm90a10fwd_kernelILb1EEEv",
         "due to program dependence on compiler-inserted WG.DP in divergent path"),
        ("_Z5otherv", "due to the presence of Extern calls"),
    ]
    assert ccc.serialized_wgmma("ptxas info    : Used 168 registers, 0 bytes spill stores, 0 bytes spill loads") == []


def test_spill_lines_count_any_nonzero_spill():
    """A spill count that merely ends in 0 ("40 bytes spill loads") is a spill; zero spills are not."""
    stderr = textwrap.dedent("""
        ptxas info    : Used 168 registers, 0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
        ptxas info    : Used 168 registers, 40 bytes stack frame, 36 bytes spill stores, 40 bytes spill loads
        ptxas info    : Used 168 registers, 8 bytes stack frame, 8 bytes spill stores, 0 bytes spill loads
        ptxas warning : Registers are spilled to local memory in function 'k', 20 bytes spill stores, 20 bytes spill loads
        """)
    assert [line.split(",")[-2].strip() for line in ccc.spill_lines(stderr)] == [
        "36 bytes spill stores", "8 bytes spill stores", "20 bytes spill stores"]
