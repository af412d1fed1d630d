"""csrc/cuda/passes.h, KeptRows: where the sm90a kernel's gathered kept-key slots live, checked as C++ computes it.

The gather (kept_rows.cu) writes sequence b's slot positions and biases from KeptRows::segment(k_start, b), and the
kernel bulk-copies them a whole KV tile (128 slots) at a time, so a tile that starts below a list's end may read up
to 127 slots past it. Those reads must stay inside the buffer of `extent_of` slots per head for every clamped
sequence (clamp_seq / key_seq, as every kernel clamps them), lying cu_seqlens included; each segment must start
128-byte aligned (the bulk copy's rule); and for honest cu_seqlens the sequences' segments must not overlap.

CPU only, no nvcc: the header is compiled with the host compiler (with the stand-ins for the CUDA toolkit headers
that test_kernel_matrix.py uses) into a driver that prints each sequence's clamped range and segment.
"""

import subprocess

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from test_kernel_matrix import build_host_driver

_DRIVER = """
    #include <cstdio>
    #include <vector>

    #include "cuda/passes.h"
    using namespace dmattn;
    // stdin per call: B total_k max_seqlen_k cu_seqlens_k[0..B]
    // stdout: extent, then per sequence: start len segment
    int main() {
      long long B, tk, mk;
      while (std::scanf("%lld %lld %lld", &B, &tk, &mk) == 3) {
        std::vector<int32_t> cu(B + 1);
        for (auto& c : cu) std::scanf("%d", &c);
        VarlenFwdParams p;
        p.batch = static_cast<int32_t>(B);
        p.total_k = tk;
        p.max_seqlen_k = mk;
        p.cu_seqlens_k = cu.data();
        std::printf("%lld\\n", static_cast<long long>(cuda::KeptRows::extent_of(p)));
        for (int32_t b = 0; b < B; ++b) {
          const SeqRange s = key_seq(p, b);
          std::printf("%lld %lld %lld\\n", static_cast<long long>(s.start), static_cast<long long>(s.len),
                      static_cast<long long>(cuda::KeptRows::segment(s.start, b)));
        }
      }
    }
    """

TILE = 128  # the sm90a kernel's KV tile: the slots one bulk copy reads
ALIGN = 32  # slots: 128 bytes of int32 / float32


@pytest.fixture(scope="module")
def layout(tmp_path_factory):
    exe = build_host_driver(tmp_path_factory.mktemp("kept_rows"), _DRIVER, "layout", "passes.h")

    def run(cu, total_k, max_k):
        line = " ".join(str(x) for x in (len(cu) - 1, total_k, max_k, *cu))
        out = subprocess.run([str(exe)], input=line + "\n", capture_output=True, text=True, check=True).stdout
        rows = [tuple(int(x) for x in r.split()) for r in out.splitlines()]
        return rows[0][0], rows[1:]

    return run


def _check_in_bounds(extent, seqs, total_k):
    for b, (start, length, seg) in enumerate(seqs):
        assert 0 <= start and start + length <= total_k, (b, start, length)
        assert seg % ALIGN == 0, (b, seg)
        # The last tile a list of at most `length` slots starts, read whole.
        tiles = -(-length // TILE)
        assert seg + tiles * TILE <= extent, (b, seg, length, extent)
    assert extent % ALIGN == 0


@settings(max_examples=200, deadline=None)
@given(lens=st.lists(st.integers(0, 700), min_size=1, max_size=12), slack=st.integers(0, 300))
def test_honest_sequences_get_aligned_disjoint_segments_inside_the_buffer(layout, lens, slack):
    cu = [0]
    for n in lens:
        cu.append(cu[-1] + n)
    total_k = cu[-1] + slack  # rows past the last sequence, as the op allows
    extent, seqs = layout(cu, total_k, max(lens))
    _check_in_bounds(extent, seqs, total_k)
    for (s0, l0, g0), (_, _, g1) in zip(seqs, seqs[1:]):
        assert g0 + l0 <= g1, "two sequences' slots would share a segment"


@settings(max_examples=300, deadline=None)
@given(cu=st.lists(st.integers(-(2**31), 2**31 - 1) | st.integers(-50, 3000), min_size=2, max_size=10),
       total_k=st.integers(1, 4000), max_k=st.integers(0, 5000))
def test_lying_cu_seqlens_keep_every_tile_read_inside_the_buffer(layout, cu, total_k, max_k):
    """Any cu_seqlens at all (decreasing, negative, past total_k, longer than max_seqlen_k): the clamped sequences'
    segments are aligned and every tile the kernel may read lies inside the buffer (they may overlap: the call's
    output is NaN then, but nothing is read or written out of bounds)."""
    extent, seqs = layout(cu, total_k, max_k)
    _check_in_bounds(extent, seqs, total_k)


_BIAS_SLOT_DRIVER = """
    #include <cstdio>

    #include "cuda/passes.h"
    // stdout: KeptRows::bias_slot(c) for c in [0, 256)
    int main() {
      for (long long c = 0; c < 256; ++c) {
        std::printf("%lld\\n", static_cast<long long>(dmattn::cuda::KeptRows::bias_slot(c)));
      }
    }
    """


def test_bias_slots_are_the_order_the_sm90a_kernel_reads(tmp_path):
    """KeptRows::bias_slot permutes each 16 slots (segments start on multiples of 32, tiles on multiples of 64), and
    puts the column pair a consumer thread t reads for fragment nt (columns 8 nt + 2 t and the next) where
    sm90a/tile_operands.cuh's slot_bias_pair reads it: 16 (nt / 2) + 4 t + 2 (nt % 2), so that slot_bias_pairs reads
    fragments 2 k and 2 k + 1 as the 16 bytes at 16 k + 4 t."""
    exe = build_host_driver(tmp_path, _BIAS_SLOT_DRIVER, "bias_slot", "passes.h")
    perm = [int(x) for x in subprocess.run([str(exe)], capture_output=True, text=True, check=True).stdout.split()]
    for group in range(0, 256, 16):
        assert sorted(perm[group:group + 16]) == list(range(group, group + 16)), group
    for nt in range(16):  # a 128-slot tile's fragments (D <= 128; D = 256's 64-slot tile: the first 8)
        for t in range(4):
            for e in range(2):
                assert perm[8 * nt + 2 * t + e] == 16 * (nt // 2) + 4 * t + 2 * (nt % 2) + e, (nt, t, e)
