"""csrc/cuda/heuristics.h: what a CUDA call runs (prefill or decode kernel, packed row tiles, key splits) and the
workspace it needs, decided on the host from host-known ints only.

CPU only, no nvcc: the header is compiled with the host compiler (with stand-ins for the CUDA toolkit headers, as
test_kernel_matrix.py does) into a small driver that prints the plan of each call described on stdin.
"""

import math
import subprocess

import pytest

from test_kernel_matrix import build_host_driver


_DRIVER = """
    #include <cstdio>

    #include "cuda/heuristics.h"
    using namespace dmattn;
    // stdin per call: B H Hk D total_q total_k max_q max_k mask(0 absent, 1 key, 2 query) Hm bias Hb sms force tiles
    //                 window_left window_right key_range(0 absent, 1 given) sm90a_ctas(the override)
    //                 bias_dtype(0 float32, 2 bfloat16: q's)
    // stdout: kernel row_tiles splits tiles_per_split key_lists_heads workspace_bytes prefill_variant sm90a sm90a_ctas
    //         unit_order combine_finishes sm90a_slots sm90a_query
    // (a cc 9.0 device; bf16 q / k / v packed (rows, heads, D) at null: aligned as TMA wants; a query-side bias
    // contiguous, (total_q, Hb, max_k))
    int main() {
      long long B, H, Hk, D, tq, tk, mq, mk, mask, hm, bias, hb, sms, force, tiles, wl, wr, kr, ctas, bdt;
      static const int32_t some_range[2] = {0, 0};  // the plan reads only whether key_range is given
      while (std::scanf("%lld %lld %lld %lld %lld %lld %lld %lld %lld %lld %lld %lld %lld %lld %lld %lld %lld %lld "
                        "%lld %lld", &B, &H, &Hk, &D, &tq, &tk, &mq, &mk, &mask, &hm, &bias, &hb, &sms, &force,
                        &tiles, &wl, &wr, &kr, &ctas, &bdt) == 20) {
        VarlenFwdParams p;
        p.batch = B; p.num_heads = H; p.num_heads_k = Hk; p.head_dim = D;
        p.dtype = ScalarType::kBFloat16;
        p.q_row_stride = H * D; p.q_head_stride = D;
        p.k_row_stride = p.v_row_stride = Hk * D; p.k_head_stride = p.v_head_stride = D;
        p.total_q = tq; p.total_k = tk; p.max_seqlen_q = mq; p.max_seqlen_k = mk;
        p.mask.layout = static_cast<OperandLayout>(mask); p.mask.head_group = H / hm;
        p.bias.layout = static_cast<OperandLayout>(bias); p.bias.head_group = H / hb;
        p.bias.dtype = static_cast<ScalarType>(bdt);
        if (p.bias.layout == OperandLayout::kQuerySide) {
          p.bias.row_stride = hb * mk; p.bias.head_stride = mk; p.bias.col_stride = 1;
        }
        p.window_left = wl; p.window_right = wr;
        p.key_range = kr ? some_range : nullptr;
        cuda::PlanOverrides o;
        o.kernel = static_cast<cuda::PlanOverrides::Kernel>(force);
        o.tiles_per_split = tiles;
        o.sm90a_ctas = static_cast<int32_t>(ctas);
        const cuda::FwdPlan plan = cuda::plan_varlen_fwd(p, cuda::DeviceInfo{90, static_cast<int>(sms)}, o);
        std::printf("%s %d %d %d %d %zu %d %d %d %d %d %d %d\\n",
                    plan.kernel == cuda::FwdKernel::kDecode ? "decode" : "prefill", plan.row_tiles, plan.num_splits,
                    plan.tiles_per_split, plan.key_lists_heads, cuda::workspace_bytes(plan, p),
                    static_cast<int>(plan.prefill), static_cast<int>(plan.sm90a), plan.sm90a_ctas,
                    static_cast<int>(plan.unit_order), static_cast<int>(plan.combine_finishes),
                    static_cast<int>(plan.sm90a_slots), static_cast<int>(plan.sm90a_query));
      }
    }
    """

ABSENT, KEY, QUERY = 0, 1, 2
F32, BF16 = 0, 2  # a bias's dtype (dmattn::ScalarType): float32, or q's (bfloat16 here)
AUTO, FORCE_PREFILL, FORCE_DECODE = 0, 1, 2
PREFILL_VARIANTS = ("plain", "window_left", "query_operands")  # cuda::PrefillVariant


@pytest.fixture(scope="module")
def planner(tmp_path_factory):
    exe = build_host_driver(tmp_path_factory.mktemp("plan"), _DRIVER, "plan", "heuristics.h")

    def plan(B, H, Hk, D, total_q, total_k, max_q, max_k, mask=ABSENT, Hm=1, bias=ABSENT, Hb=1, sms=132,
             force=AUTO, tiles=0, window=(-1, -1), key_range=False, sm90a_ctas=0, bias_dtype=F32):
        line = " ".join(str(x) for x in (B, H, Hk, D, total_q, total_k, max_q, max_k, mask, Hm, bias, Hb, sms,
                                         force, tiles, *window, int(key_range), sm90a_ctas, bias_dtype))
        out = subprocess.run([str(exe)], input=line + "\n", capture_output=True, text=True, check=True).stdout
        (kernel, row_tiles, splits, per_split, lists, workspace, variant, sm90a, ctas, order, finishes, slots,
         query) = out.split()
        return dict(kernel=kernel, row_tiles=int(row_tiles), splits=int(splits), tiles_per_split=int(per_split),
                    key_lists_heads=int(lists), workspace=int(workspace), prefill=PREFILL_VARIANTS[int(variant)],
                    sm90a=bool(int(sm90a)), sm90a_ctas=int(ctas), unit_order=bool(int(order)),
                    combine_finishes=bool(int(finishes)), sm90a_slots=bool(int(slots)),
                    sm90a_query=bool(int(query)))

    return plan


# The benchmark's decode workload: B = 64, 1-8 queries, 1024-8192 keys (about 290k), H = 32, Hk = 8, D = 128.
WORKLOAD = dict(B=64, H=32, Hk=8, D=128, total_q=288, total_k=290_000, max_q=8, max_k=8192)


def test_decode_workload_is_packed_and_split(planner):
    plan = planner(**WORKLOAD, mask=KEY, Hm=8, bias=KEY, Hb=8)
    partials = 4 * plan["splits"] * 32 * 288 * (2 + 128)  # max, sum and O
    assert plan["kernel"] == "decode"
    assert plan["row_tiles"] == 1  # 4 query heads x 8 queries = 32 packed rows, one tile
    # ~36.8k (sequence, KV head) KV tiles over 132 SMs x 2 CTAs x 4 waves: 35 tiles (2240 keys) per split
    assert plan["tiles_per_split"] == 35
    assert plan["splits"] == math.ceil(128 / 35)
    lists = 4 * 8 * 290_000 + 4 * 8 * 64
    order = 4 * 64 * 8  # the (sequence, KV head) units, longest first
    parts = 8 * 64 * 8 * 4 + 4  # compact_keys in parts: 8192 keys = 4 parts of 2048 per list, and the ticket
    assert plan["unit_order"]
    assert abs(plan["workspace"] - lists - partials - order - parts) < 6 * 256  # each piece 256-byte aligned


def test_units_are_ordered_only_when_split_and_few_enough(planner):
    """order_decode_units orders every (sequence, KV head) unit in one CTA: only split calls with kept-key lists (a
    key-side mask: work the host cannot see) and at most 4096 units."""
    masked = dict(mask=KEY, Hm=8)
    assert planner(**WORKLOAD, **masked)["unit_order"]
    assert not planner(**WORKLOAD)["unit_order"]  # no mask: the splits bound the spread of the units' work
    short = dict(B=64, H=32, Hk=8, D=128, total_q=64, total_k=64 * 200, max_q=1, max_k=200)
    assert not planner(**short, **masked)["unit_order"]  # one split
    # One long sequence beside many short ones: split, and 8192 / 4096 units.
    many = planner(B=1024, H=32, Hk=8, D=128, total_q=1024, total_k=1 << 20, max_q=1, max_k=1 << 17, **masked)
    assert many["kernel"] == "decode" and many["splits"] > 1 and not many["unit_order"]
    fewer = planner(B=512, H=32, Hk=8, D=128, total_q=512, total_k=1 << 20, max_q=1, max_k=1 << 17, **masked)
    assert fewer["splits"] > 1 and fewer["unit_order"]


def test_long_context_gets_many_splits(planner):
    plan = planner(B=4, H=32, Hk=8, D=128, total_q=4, total_k=320_000, max_q=1, max_k=131_072)
    assert plan["kernel"] == "decode"
    assert 16 <= plan["splits"] <= 128 and plan["splits"] == math.ceil(2048 / plan["tiles_per_split"])


def test_short_keys_need_no_split(planner):
    plan = planner(B=64, H=32, Hk=8, D=128, total_q=64, total_k=64 * 200, max_q=1, max_k=200)
    assert plan["kernel"] == "decode" and plan["splits"] == 1 and plan["workspace"] == 0


def test_split_count_is_bounded(planner):
    plan = planner(B=1, H=8, Hk=8, D=64, total_q=1, total_k=1 << 24, max_q=1, max_k=1 << 24, tiles=1)
    assert plan["splits"] <= 128 and plan["splits"] * plan["tiles_per_split"] * 64 >= 1 << 24


def test_split_partials_are_bounded(planner):
    """A million-key sequence beside 63 short ones: fewer, longer splits instead of gigabytes of partials."""
    plan = planner(**{**WORKLOAD, "total_k": 1_200_000, "max_k": 1_000_000})
    assert plan["kernel"] == "decode" and plan["splits"] > 1
    assert plan["splits"] * 32 * 288 * 130 * 4 <= 64 << 20
    assert plan["workspace"] <= (64 << 20) + 4096
    assert plan["splits"] * plan["tiles_per_split"] * 64 >= 1_000_000


@pytest.mark.parametrize(
    "change, kernel",
    [
        (dict(), "decode"),
        (dict(mask=KEY, Hm=1), "decode"),
        (dict(mask=KEY, Hm=8), "decode"),  # Hm = Hk
        (dict(mask=KEY, Hm=32), "prefill"),  # Hm = H: each query head its own kept keys
        (dict(bias=KEY, Hb=32), "prefill"),
        (dict(bias=KEY, Hb=16), "prefill"),  # 2 query heads per bias head: a KV group (4 heads) spans two
        (dict(bias=KEY, Hb=4), "decode"),  # 8 query heads per bias head: two whole KV groups each
        (dict(mask=QUERY, Hm=8), "decode"),  # its kept-key list: the keys some query of the sequence may see
        (dict(mask=QUERY, Hm=1), "decode"),
        (dict(mask=QUERY, Hm=32), "prefill"),  # Hm = H, as key-side
        (dict(bias=QUERY, Hb=1), "decode"),
        (dict(bias=QUERY, Hb=32), "prefill"),
        (dict(max_q=16), "decode"),  # 4 x 16 = 64 packed rows
        (dict(max_q=17), "prefill"),
        (dict(H=8, Hk=8, max_q=64), "decode"),  # MHA: 64 queries
        (dict(H=32, Hk=1, max_q=2), "decode"),  # MQA: 32 heads x 2 queries
        (dict(H=32, Hk=1, max_q=3), "prefill"),
    ],
)
def test_automatic_choice(planner, change, kernel):
    assert planner(**{**WORKLOAD, **change})["kernel"] == kernel


def test_forcing(planner):
    assert planner(**WORKLOAD, force=FORCE_PREFILL)["kernel"] == "prefill"
    forced = planner(**{**WORKLOAD, "max_q": 4000, "total_q": 8000}, force=FORCE_DECODE)
    assert forced["kernel"] == "decode" and forced["row_tiles"] == math.ceil(4 * 4000 / 32)
    # where it cannot run, forcing the decode kernel leaves the prefill kernel
    assert planner(**WORKLOAD, mask=QUERY, Hm=32, force=FORCE_DECODE)["kernel"] == "prefill"
    assert planner(**WORKLOAD, mask=KEY, Hm=32, force=FORCE_DECODE)["kernel"] == "prefill"
    small = {**WORKLOAD, "total_q": 64, "max_q": 1, "max_k": 2048}
    assert planner(**small, force=FORCE_DECODE, tiles=1)["tiles_per_split"] == 1
    assert planner(**WORKLOAD, force=FORCE_DECODE, tiles=1)["tiles_per_split"] == 10  # the partials cap holds


def test_zero_heads(planner):
    """H = 0 is a valid call (empty outputs); planning it must not divide by the empty KV group."""
    assert planner(**{**WORKLOAD, "H": 0, "Hk": 1}, mask=KEY, Hm=1, bias=KEY, Hb=1)["kernel"] == "prefill"


def test_d256_tiles_take_sixteen_rows(planner):
    assert planner(**{**WORKLOAD, "D": 256})["row_tiles"] == 2  # 32 packed rows, 16 per tile


def test_prefill_variant_choice(planner):
    """A window's left edge needs per-row lower key bounds: its own prefill variant keeps them, so the plain one has
    the registers of a kernel without windows; a right side alone (causal) stays plain. Per-query key ranges are
    per-row bounds too: the windowed variant. Query-side operands take their variant, windowed or not, with key
    ranges or not."""
    prefill = dict(B=8, H=32, Hk=8, D=128, total_q=16_000, total_k=16_000, max_q=4096, max_k=4096)
    assert planner(**prefill)["prefill"] == "plain"
    assert planner(**prefill, window=(-1, 0))["prefill"] == "plain"
    assert planner(**prefill, window=(255, 0))["prefill"] == "window_left"
    assert planner(**prefill, window=(255, -1))["prefill"] == "window_left"
    assert planner(**prefill, mask=KEY, Hm=8, window=(255, 0))["prefill"] == "window_left"
    assert planner(**prefill, mask=QUERY)["prefill"] == "query_operands"
    assert planner(**prefill, bias=QUERY, Hb=32, window=(255, 0))["prefill"] == "query_operands"
    assert planner(**prefill, key_range=True)["prefill"] == "window_left"
    assert planner(**prefill, mask=KEY, Hm=8, window=(-1, 0), key_range=True)["prefill"] == "window_left"
    assert planner(**prefill, mask=QUERY, key_range=True)["prefill"] == "query_operands"


def _v_flags_bytes(Hk, total_k):
    """Beside a block map, v's blocks with an inf or NaN flagged (passes.h, BlockMap::v_nonfinite): one byte per (KV
    head, 64 rows of v); 256-aligned."""
    return -(-(Hk * -(-total_k // 64)) // 256) * 256


def _terms_bytes(B, total_k, max_q, heads, f32=False):
    """The decode kernel's query-side terms (passes.h, QueryTerms): (list heads, max_q, extent) elements, extent the
    least multiple of 64 >= total_k + 64 (B + 1); 16-bit, or float32 for a float32 query-side bias; 256-aligned."""
    extent = -(-(total_k + 64 * (B + 1)) // 64) * 64
    return -(-(heads * max_q * extent * (4 if f32 else 2)) // 256) * 256


def test_query_side_operands_in_the_decode_kernel_get_lists_and_terms(planner):
    """The decode kernel walks the keys some query of a sequence may see (a query-side mask's rows ORed; every key
    without a mask) as a key-side mask's, and reads each query's operands gathered along those lists: list heads
    are the finer of the mask's and the query-side bias's heads. No block map; the prefill kernel gets the map
    instead."""
    W = WORKLOAD
    lists = lambda heads: heads * W["total_k"] * 4 + -(-(heads * W["B"] * 4) // 256) * 256  # noqa: E731
    for Hm in (1, 8):
        plan = planner(**W, mask=QUERY, Hm=Hm)
        assert plan["kernel"] == "decode" and plan["key_lists_heads"] == Hm
        key_side = planner(**W, mask=KEY, Hm=Hm)["workspace"]  # lists compacted in parts, as these are
        assert plan["workspace"] == key_side + _terms_bytes(W["B"], W["total_k"], W["max_q"], Hm)
    # a query-side bias (float32 here: float32 terms) with a mask of fewer heads, key-side or query-side, or alone
    for mask, Hm in ((KEY, 1), (QUERY, 1), (ABSENT, 1)):
        plan = planner(**W, mask=mask, Hm=Hm, bias=QUERY, Hb=8)
        assert plan["kernel"] == "decode" and plan["key_lists_heads"] == 8
        partials = planner(**W)["workspace"]
        order = 4 * W["B"] * W["Hk"]  # the units, longest first: the call has lists
        parts = -(-(8 * W["B"] * 4 * 8 + 4) // 256) * 256  # the lists' look-back: 8192 keys are 4 parts
        assert plan["workspace"] == lists(8) + parts + partials + order + _terms_bytes(W["B"], W["total_k"], W["max_q"], 8,
                                                                               f32=True)
    # a key-side bias beside a query-side mask leaves the terms 16-bit
    assert planner(**W, mask=QUERY, Hm=8, bias=KEY, Hb=1)["workspace"] == planner(**W, mask=QUERY, Hm=8)["workspace"]
    prefill = planner(**W, mask=QUERY, Hm=8, force=FORCE_PREFILL)  # on sm90a: the map and the mask's bits
    assert prefill["kernel"] == "prefill" and prefill["key_lists_heads"] == 0 and prefill["sm90a_query"]
    assert prefill["workspace"] == (-(-(8 * -(-288 // 64) * -(-8192 // 32)) // 256) * 256 +
                                    -(-(8 * 288 * (8192 // 128) * 4 * 4) // 256) * 256 +
                                    _v_flags_bytes(W["Hk"], W["total_k"]))


def test_query_terms_past_their_cap_take_the_prefill_kernel(planner):
    """Terms of more than 1 GB (a call forced onto the decode kernel with many queries per sequence) are not built:
    the prefill kernel runs it, with its block map."""
    big = dict(B=8, H=8, Hk=8, D=128, total_q=8 * 4096, total_k=8 * 4096, max_q=4096, max_k=4096)
    assert 8 * 4096 * (8 * 4096 + 64 * 9) * 2 > 1 << 30
    plan = planner(**big, mask=QUERY, Hm=8, force=FORCE_DECODE)
    assert plan["kernel"] == "prefill" and plan["key_lists_heads"] == 0
    small = planner(**dict(big, max_q=64, total_q=8 * 64), mask=QUERY, Hm=8, force=FORCE_DECODE)
    assert small["kernel"] == "decode" and small["key_lists_heads"] == 8


def test_split_combine_finishes_the_rows_where_its_check_is_cheap(planner):
    """A split decode call's combine also does finish_rows' work (the contract check, the rows no sequence owns), one
    launch fewer, as long as its combining CTAs' reads of cu_seqlens (B + 1 each, one CTA per (row, head) pair at
    most) stay within 2M entries; an unsplit call, or a batch too large for that, keeps finish_rows."""
    assert planner(**WORKLOAD)["combine_finishes"]  # 6 splits; at most 9216 combining CTAs x 65 entries
    assert planner(**WORKLOAD, mask=KEY, Hm=8)["combine_finishes"]
    unsplit = planner(**WORKLOAD, tiles=1000)
    assert unsplit["splits"] == 1 and not unsplit["combine_finishes"]
    assert not planner(**dict(WORKLOAD, max_q=200, total_q=12_800), force=FORCE_PREFILL)["combine_finishes"]
    # 1024 one-query sequences beside a million-key one: 32768 combining CTAs x 1025 entries, 33M reads
    many = dict(B=1024, H=32, Hk=8, D=128, total_q=1024, total_k=1023 * 64 + 2**20, max_q=1, max_k=2**20)
    plan = planner(**many)
    assert plan["splits"] > 1 and not plan["combine_finishes"]
    few = dict(many, B=64, total_q=64, total_k=64 * 8192, max_k=8192)  # 2048 CTAs x 65 entries
    assert planner(**few)["splits"] > 1 and planner(**few)["combine_finishes"]


def test_key_side_lists_look_back_only_across_parts(planner):
    """A key-side mask's lists are compacted in parts of 2048 keys; only sequences of several parts need the
    look-back's statuses (one uint64 per sequence, list head and part) and its ticket in the workspace (the decode
    kernel's lists with query-side terms too: test_query_side_operands_in_the_decode_kernel_get_lists_and_terms)."""
    # D = 256: the sm80 kernels, so the lists are all the workspace (on the sm90a kernel the kept rows are gathered
    # too: test_key_side_masks_gather_their_kept_rows_for_the_sm90a_kernel)
    prefill = dict(B=8, H=64, Hk=8, D=256, total_q=16_000, total_k=16_000, max_q=4096, max_k=4096)
    lists = lambda Hm: Hm * 16_000 * 4 + -(-(Hm * 8 * 4) // 256) * 256  # noqa: E731  index + counts
    look_back = lambda Hm, parts: -(-(Hm * 8 * parts * 8 + 4) // 256) * 256  # noqa: E731
    for Hm in (1, 8, 64):
        assert planner(**prefill, mask=KEY, Hm=Hm)["workspace"] == lists(Hm) + look_back(Hm, 2)
        assert planner(**dict(prefill, max_k=10_000), mask=KEY, Hm=Hm)["workspace"] == lists(Hm) + look_back(Hm, 5)
        assert planner(**dict(prefill, max_k=2048), mask=KEY, Hm=Hm)["workspace"] == lists(Hm)


def test_query_side_mask_gets_a_block_map(planner):
    """A query-side mask is summarized first, one byte per (mask head, 64 packed query rows, 32 key positions) in
    the workspace (1 / 2048 of the mask), and v's blocks of 64 rows with an inf or NaN flagged beside it (one byte
    per KV head and block); a key-side one, a query-side bias alone, or no mask get neither. D = 256: the sm80
    kernels (the sm90a kernel's bits beside the map: the test below)."""
    prefill = dict(B=8, H=32, Hk=8, D=256, total_q=16_000, total_k=16_000, max_q=4096, max_k=4096)
    flags = _v_flags_bytes(8, 16_000)
    assert flags == 2048
    for Hm in (1, 8, 32):
        want = Hm * -(-16_000 // 64) * -(-4096 // 32)
        assert planner(**prefill, mask=QUERY, Hm=Hm)["workspace"] == -(-want // 256) * 256 + flags
    parts = -(-(8 * 8 * 2 * 8 + 4) // 256) * 256  # compact_keys in parts: 4096 keys, 2 parts per list
    # the lists alone (D = 256: the sm80 kernels; on the sm90a one the kept rows too)
    assert planner(**prefill, mask=KEY, Hm=8)["workspace"] == 8 * 16_000 * 4 + 256 + parts
    assert planner(**prefill, bias=QUERY, Hb=32)["workspace"] == 0
    assert planner(**prefill)["workspace"] == 0
    # Columns only as far as a key position can reach (an expanded mask may be 2^40 wide): min(max_k, total_k).
    huge = dict(prefill, max_k=2**40)
    assert planner(**huge, mask=QUERY)["workspace"] == -(-(-(-16_000 // 64) * -(-16_000 // 32)) // 256) * 256 + flags
    # Past 64 MB the map is left out (the kernel scans its tiles instead).
    big = dict(prefill, total_q=200_000, total_k=200_000, max_q=200_000, max_k=200_000)
    assert planner(**big, mask=QUERY, Hm=1)["workspace"] == (-(-(3_125 * 6_250) // 256) * 256 +  # 19.5 MB
                                                             _v_flags_bytes(8, 200_000))
    assert planner(**big, mask=QUERY, Hm=8)["workspace"] == 0  # 156 MB


@pytest.mark.parametrize("Hm", [1, 8, 32])
def test_query_side_masks_on_the_sm90a_kernel_get_their_bits(planner, Hm):
    """On cc 9.0 (D <= 128, no bias) a query-side mask gets the block map, v's flags and the mask's bits (passes.h,
    BlockMap::bits): a 32-bit word per (mask head, query row, 32 key positions), four per 128-key tile, an eighth
    of the mask's bytes."""
    prefill = dict(B=8, H=32, Hk=8, D=128, total_q=16_000, total_k=16_000, max_q=4096, max_k=4000)
    plan = planner(**prefill, mask=QUERY, Hm=Hm)
    assert plan["sm90a"] and plan["sm90a_query"] and not plan["sm90a_slots"]
    aligned = lambda n: -(-n // 256) * 256
    state = Hm * -(-16_000 // 64) * -(-4000 // 32)
    bits = Hm * 16_000 * -(-4000 // 128) * 4 * 4
    assert plan["workspace"] == aligned(state) + aligned(bits) + _v_flags_bytes(8, 16_000)
    # A key-side bias beside it: its values per key over slots in place (no K / V copy)
    biased = planner(**prefill, mask=QUERY, Hm=Hm, bias=KEY, Hb=32)
    assert biased["sm90a_query"] and biased["sm90a_slots"] and biased["key_lists_heads"] == 0
    B, total_k = prefill["B"], prefill["total_k"]
    extent = -(-(total_k + 32 * (B + 1) + 128) // 32) * 32
    slots = aligned(4 * B) + aligned(4 * extent) + aligned(4 * 32 * extent)  # counts, positions, biases; no limits
    assert biased["workspace"] == plan["workspace"] + slots
    # A query-side bias beside it, in q's dtype or float32: read by the kernel's consumers, nothing more in the
    # workspace (float32: a CTA per unit). A sequence of more than 1024 KV tiles: the sm80 kernel, no bits.
    for Hb in (1, 8, 32):
        for dtype in (BF16, F32):
            with_bias = planner(**prefill, mask=QUERY, Hm=Hm, bias=QUERY, Hb=Hb, bias_dtype=dtype)
            assert with_bias["sm90a_query"] and not with_bias["sm90a_slots"]
            assert with_bias["workspace"] == plan["workspace"]
            assert with_bias["sm90a_ctas"] == (132 if dtype == BF16 else 0)
    longer = dict(prefill, total_k=140_000, max_k=140_000)
    assert not planner(**longer, mask=QUERY, Hm=Hm)["sm90a"]
    assert planner(**dict(longer, max_k=131_072, total_q=1000, max_q=1000), mask=QUERY, Hm=Hm)["sm90a_query"]
    # Bits past 1 GB: the sm80 kernel (it reads the mask itself).
    assert not planner(**dict(longer, max_k=131_072, total_q=70_000, max_q=8000), mask=QUERY, Hm=Hm)["sm90a"]


def test_decode_splits_cover_only_the_windows_reach(planner):
    """With a left window edge a row tile reaches at most window_left + max_seqlen_q (+ a tile) keys, so a long
    sequence gets the splits of that reach, not of its whole length."""
    long_decode = dict(B=4, H=32, Hk=8, D=128, total_q=32, total_k=500_000, max_q=8, max_k=126_000)
    whole = planner(**long_decode)
    windowed = planner(**long_decode, window=(4095, 0))
    assert whole["kernel"] == windowed["kernel"] == "decode"
    reach_tiles = -(-(4095 + 8) // 64) + 1  # the window's keys, plus a tile where they straddle a boundary
    assert windowed["splits"] == -(-reach_tiles // windowed["tiles_per_split"])
    assert windowed["splits"] < whole["splits"]


# The prefill batch of the benchmarks: B = 8, up to 3865 tokens (16,056 in all), H = 32, Hk = 8, D = 128.
PREFILL = dict(B=8, H=32, Hk=8, D=128, total_q=16_056, total_k=16_056, max_q=3865, max_k=3865)


@pytest.mark.parametrize(
    "change, sm90a, ctas",
    [
        (dict(window=(-1, 0)), True, 0),  # plain causal: a CTA per unit
        (dict(), True, 0),
        (dict(window=(255, 0)), True, 132),  # a 256-key window: persistent, a CTA per SM
        (dict(window=(255, 0), sms=0), True, 132),  # SM count unknown: an H100's / H200's
        (dict(window=(100, 40)), True, 132),  # 141 keys
        (dict(window=(127, 0)), False, 0),  # 128 keys or fewer: the sm80 kernel (kSm90aMinWindow)
        (dict(window=(0, 0)), False, 0),
        (dict(window=(-1, 70)), True, 0),  # no left edge: every unit reaches key 0
        (dict(key_range=True), True, 0),  # key ranges: a CTA per unit (their bounds reduced per CTA)
        (dict(key_range=True, window=(255, 0)), True, 0),
        (dict(window=(127, 0), sm90a_ctas=-1), True, 0),  # DMATTN_SM90A_CTAS=0: sm90a, a CTA per unit
        (dict(window=(127, 0), sm90a_ctas=3), True, 3),
        (dict(sm90a_ctas=5), True, 5),
        (dict(key_range=True, sm90a_ctas=5), True, 0),
        (dict(mask=KEY, Hm=8), True, 132),  # a key-side mask: over its gathered kept rows, persistent (run BQ)
        (dict(mask=KEY, Hm=1, bias=KEY, Hb=32), True, 132),
        (dict(mask=KEY, Hm=8, sm90a_ctas=-1), True, 0),  # DMATTN_SM90A_CTAS=0: a CTA per unit
        (dict(mask=KEY, Hm=8, sm90a_ctas=7), True, 7),
        (dict(mask=KEY, Hm=32), True, 132),  # a list per query head: a kept copy per list
        (dict(mask=KEY, Hm=8, window=(255, 0)), True, 132),  # masks with windows: slots too
        (dict(mask=KEY, Hm=8, window=(127, 0)), False, 0),  # not a window of 128 keys or fewer (kSm90aMinWindow)
        (dict(mask=KEY, Hm=8, key_range=True), False, 0),  # masks with key ranges: sm80
        # a key-side mask beside a query-side bias: its map and bits by sequence, a CTA per unit as the bias alone
        (dict(mask=KEY, Hm=8, bias=QUERY, Hb=8), True, 0),  # float32
        (dict(mask=KEY, Hm=8, bias=QUERY, Hb=8, window=(255, 0)), True, 0),  # float32 windowed: a CTA per unit too
        (dict(mask=QUERY, Hm=8), True, 132),  # a query-side mask: its bits, persistent as key-side masks
        (dict(mask=QUERY, Hm=1, window=(-1, 0)), True, 132),
        (dict(mask=QUERY, Hm=32, window=(255, 0)), True, 132),
        (dict(mask=QUERY, Hm=8, key_range=True), True, 0),  # key ranges: a CTA per unit
        (dict(mask=QUERY, Hm=8, sm90a_ctas=5), True, 5),
        (dict(mask=QUERY, Hm=8, sm90a_ctas=-1), True, 0),  # DMATTN_SM90A_CTAS=0: a CTA per unit
        (dict(mask=QUERY, Hm=8, bias=QUERY, Hb=8), True, 0),  # with a float32 query-side bias: a CTA per unit
        (dict(mask=QUERY, Hm=8, bias=QUERY, Hb=8, sm90a_ctas=5), True, 0),  # whatever DMATTN_SM90A_CTAS asks
        # with a query-side bias in q's dtype: its elements read per live tile (rows of any stride: this batch's
        # 3865 keys make odd row starts)
        (dict(mask=QUERY, Hm=8, bias=QUERY, Hb=8, bias_dtype=BF16), True, 132),
        (dict(mask=QUERY, Hm=1, bias=QUERY, Hb=1, bias_dtype=BF16, key_range=True), True, 0),
        (dict(bias=QUERY, Hb=32, bias_dtype=BF16), True, 0),  # a query-side bias alone: a CTA per unit, as without it
        (dict(bias=QUERY, Hb=32, bias_dtype=BF16, window=(255, 0)), True, 132),
        (dict(bias=QUERY, Hb=32, bias_dtype=BF16, window=(127, 0)), False, 0),
        (dict(bias=QUERY, Hb=8, bias_dtype=BF16, D=256), False, 0),
        (dict(mask=KEY, Hm=8, bias=QUERY, Hb=8, bias_dtype=BF16), True, 0),
        (dict(mask=KEY, Hm=32, bias=QUERY, Hb=1, bias_dtype=BF16, window=(255, 0)), True, 132),
        (dict(mask=KEY, Hm=1, bias=QUERY, Hb=32, bias_dtype=BF16, key_range=True), True, 0),
        (dict(mask=KEY, Hm=8, bias=QUERY, Hb=8, bias_dtype=BF16, D=256), False, 0),  # D = 256: sm80
        (dict(mask=QUERY, Hm=8, bias=KEY, Hb=8), True, 132),  # with a key-side bias: its values over slots in place
        (dict(mask=QUERY, Hm=8, bias=KEY, Hb=8, key_range=True), False, 0),  # which know no key ranges
        (dict(bias=KEY, Hb=8), True, 0),  # a key-side bias alone: slots in place, a CTA per unit as without it
        (dict(bias=KEY, Hb=32, window=(255, 0)), True, 132),
        (dict(bias=KEY, Hb=1, key_range=True), False, 0),  # with key ranges: sm80
        (dict(bias=QUERY, Hb=1), True, 0),  # float32, alone
        (dict(bias=QUERY, Hb=1, window=(255, 0)), True, 0),  # windowed too: float32 takes a CTA per unit
        (dict(bias=QUERY, Hb=1, key_range=True), True, 0),
        (dict(D=256), True, 0),  # head dims 64, 128 and 256 (64-key tiles)
        (dict(D=256, window=(255, 0)), True, 132),
        (dict(D=256, mask=KEY, Hm=8), False, 0),  # the kept rows' gather: D <= 128
        (dict(D=96), False, 0),  # other head dims: the sm80 kernels
    ],
)
def test_sm90a_choice(planner, change, sm90a, ctas):
    """Which prefill calls the sm90a kernel takes on a cc 9.0 device, and which of them run on a persistent grid."""
    plan = planner(**{**PREFILL, **change})
    assert plan["kernel"] == "prefill"
    assert (plan["sm90a"], plan["sm90a_ctas"]) == (sm90a, ctas)


@pytest.mark.parametrize("Hm, Hb, causal", [(8, 8, True), (1, 32, True), (8, 0, False), (1, 1, True), (32, 8, True),
                                            (16, 0, False)])
def test_key_side_masks_gather_their_kept_rows_for_the_sm90a_kernel(planner, Hm, Hb, causal):
    """A key-side mask on cc 9.0: compact_keys' lists, then its kept K / V rows gathered into dense slots that the
    sm90a kernel reads with TMA (passes.h KeptRows). The workspace holds the lists, the K / V slots (k and v's packed
    shape with Hk heads, or a copy per list where lists are finer than KV heads: Hm > Hk), the slots' positions per
    list head and biases per bias head (the finer of the bias's and the lists'), each over total_k + 32 (B + 1) + 128
    slots rounded up to 32, and for causal calls four slot limits per (list head, sequence, 128-row query tile)."""
    bias = dict(bias=KEY, Hb=Hb) if Hb else {}
    plan = planner(**PREFILL, mask=KEY, Hm=Hm, window=(-1, 0) if causal else (-1, -1), **bias)
    assert plan["sm90a"] and plan["sm90a_slots"] and plan["key_lists_heads"] == Hm
    B, Hk, D, total_k = PREFILL["B"], PREFILL["Hk"], PREFILL["D"], PREFILL["total_k"]
    extent = -(-(total_k + 32 * (B + 1) + 128) // 32) * 32
    parts = 8 * B * Hm * 2 + 4  # 3865 keys: two compaction parts per list, and the ticket
    expected = (4 * Hm * total_k + 4 * Hm * B + parts  # the lists
                + 2 * total_k * max(Hk, Hm) * D * 2  # K and V slots, bf16
                + 4 * Hm * extent + (4 * max(Hb, Hm) * extent if Hb else 0)
                + (16 * Hm * B * -(-3865 // 128) if causal else 0))
    assert 0 <= plan["workspace"] - expected < 7 * 256  # each piece 256-byte aligned


def test_key_side_masks_keep_the_sm80_kernels_for_decode(planner):
    """The decode kernel keeps key-side masks (its own token-level gathers); the sm90a slots are prefill only."""
    plan = planner(**WORKLOAD, mask=KEY, Hm=8, bias=KEY, Hb=8)
    assert plan["kernel"] == "decode" and not plan["sm90a_slots"]


@pytest.mark.parametrize("Hb, causal", [(1, True), (8, False), (32, True)])
def test_key_side_bias_alone_runs_over_slots_in_place(planner, Hb, causal):
    """A key-side bias without a mask takes the sm90a kernel's slots variant over slots that are the keys themselves:
    no kept-key lists, no K / V copy; the workspace holds each sequence's key count, one list of positions and the
    float32 biases per bias head (each over total_k + 32 (B + 1) + 128 slots rounded up to 32), and for causal calls
    four slot limits per (sequence, 128-row query tile)."""
    plan = planner(**PREFILL, bias=KEY, Hb=Hb, window=(-1, 0) if causal else (-1, -1))
    assert plan["sm90a"] and plan["sm90a_slots"] and plan["key_lists_heads"] == 0
    B, total_k = PREFILL["B"], PREFILL["total_k"]
    extent = -(-(total_k + 32 * (B + 1) + 128) // 32) * 32
    aligned = lambda n: -(-n // 256) * 256  # noqa: E731
    expected = (aligned(4 * B) + aligned(4 * extent) + aligned(4 * Hb * extent)
                + (aligned(16 * B * -(-3865 // 128)) if causal else 0))
    assert plan["workspace"] == expected
    # D = 256: the sm80 kernels; a query-side bias: no slots (its own variant)
    assert not planner(**dict(PREFILL, D=256), bias=KEY, Hb=Hb)["sm90a_slots"]
    assert not planner(**PREFILL, bias=QUERY, Hb=Hb)["sm90a_slots"]


@pytest.mark.parametrize("Hb", [1, 8, 32])
def test_query_side_bias_alone_on_the_sm90a_kernel_gets_v_flags(planner, Hb):
    """A query-side bias in q's dtype without a mask runs on the sm90a kernel (its consumers read the bias per live
    tile; every tile live, no block map): the workspace holds v's flags alone, since a -inf bias hides its key and
    a tile whose V rows are finite then skips its V scan."""
    plan = planner(**PREFILL, bias=QUERY, Hb=Hb, bias_dtype=BF16)
    assert plan["sm90a"] and plan["sm90a_query"] and not plan["sm90a_slots"] and plan["key_lists_heads"] == 0
    assert plan["workspace"] == _v_flags_bytes(PREFILL["Hk"], PREFILL["total_k"])
    # float32: the same, on a CTA per unit; D = 256: the sm80 kernels, no workspace
    f32 = planner(**PREFILL, bias=QUERY, Hb=Hb)
    assert f32["sm90a_query"] and f32["sm90a_ctas"] == 0 and f32["workspace"] == plan["workspace"]
    sm80 = planner(**dict(PREFILL, D=256), bias=QUERY, Hb=Hb, bias_dtype=BF16)
    assert not sm80["sm90a"] and sm80["workspace"] == 0


@pytest.mark.parametrize("Hm", [1, 8, 32])
def test_key_side_mask_beside_a_query_side_bias_is_mapped_by_sequence(planner, Hm):
    """A key-side mask beside a query-side bias runs on the sm90a kernel's query-side variant: no kept-key lists
    (every tile reads its bias anyway), but a block map and bits of the mask by sequence (BlockMap::by_sequence):
    a byte per (mask head, sequence, 32 key positions) and a word per (mask head, sequence, 32 key positions, four
    per 128-key tile), O(B), never O(total_q); and v's flags. D = 256: the sm80 kernels and their lists."""
    B, total_k, max_k = PREFILL["B"], PREFILL["total_k"], PREFILL["max_k"]
    aligned = lambda n: -(-n // 256) * 256
    state = Hm * B * -(-max_k // 32)
    bits = Hm * B * -(-max_k // 128) * 4 * 4
    for dtype in (BF16, F32):
        plan = planner(**PREFILL, mask=KEY, Hm=Hm, bias=QUERY, Hb=8, bias_dtype=dtype)
        assert plan["sm90a"] and plan["sm90a_query"] and not plan["sm90a_slots"] and plan["key_lists_heads"] == 0
        assert plan["workspace"] == aligned(state) + aligned(bits) + _v_flags_bytes(PREFILL["Hk"], total_k)
    sm80 = planner(**dict(PREFILL, D=256), mask=KEY, Hm=Hm, bias=QUERY, Hb=8, bias_dtype=BF16)
    assert not sm80["sm90a"] and sm80["key_lists_heads"] == Hm
    # Every call the sm80 kernels take keeps its lists (they apply a key-side mask only through them): sequences past
    # the sm90a query-side variant's 1024 tiles, and windows of 128 keys or fewer...
    longer = dict(PREFILL, total_k=140_000, max_k=140_000)
    for fallback in (planner(**longer, mask=KEY, Hm=Hm, bias=QUERY, Hb=8, bias_dtype=BF16),
                     planner(**PREFILL, mask=KEY, Hm=Hm, bias=QUERY, Hb=8, bias_dtype=BF16, window=(127, 0))):
        assert not fallback["sm90a"] and fallback["key_lists_heads"] == Hm
    # ...unless DMATTN_SM90A_CTAS sends the narrow window to the sm90a kernel: by sequence, no lists
    forced = planner(**PREFILL, mask=KEY, Hm=Hm, bias=QUERY, Hb=8, bias_dtype=BF16, window=(127, 0), sm90a_ctas=-1)
    assert forced["sm90a_query"] and forced["key_lists_heads"] == 0
    # A decode-shaped call that the decode kernel does not take (H / Hk x 4 queries > 64 packed rows) takes it too.
    dec = planner(B=16, H=32, Hk=8, D=128, total_q=64, total_k=20_000, max_q=20, max_k=3000, mask=KEY, Hm=Hm,
                  bias=QUERY, Hb=8, bias_dtype=BF16)
    assert dec["kernel"] == "prefill" and dec["sm90a_query"] and dec["key_lists_heads"] == 0


def test_per_head_key_side_masks_keep_their_copies_within_the_cap(planner):
    """Lists finer than KV heads (Hm = H) each get a kept copy of their rows: H / Hk times a shared list's bytes. Past
    kMaxKeptRowBytes (4 GB) the call takes the sm80 kernels, which gather the kept rows where they are."""
    fits = dict(B=8, H=32, Hk=8, D=128, total_q=16_000, total_k=100_000, max_q=4096, max_k=20_000)
    assert 2 * 100_000 * 32 * 128 * 2 < 4 << 30
    assert planner(**fits, mask=KEY, Hm=32)["sm90a_slots"]
    big = dict(fits, total_k=300_000, max_k=60_000)
    assert 2 * 300_000 * 32 * 128 * 2 > 4 << 30 > 2 * 300_000 * 8 * 128 * 2
    assert not planner(**big, mask=KEY, Hm=32)["sm90a"]
    assert planner(**big, mask=KEY, Hm=8)["sm90a_slots"]  # a shared list's copy still fits


@pytest.mark.parametrize("max_q", [1, 8, 128, 129])
def test_per_head_copies_only_for_sequences_of_several_query_tiles(planner, max_q):
    """A list's copy is read by its one head's query tiles: with a single 128-row tile per sequence the copy costs
    more than it saves (and would allocate O(total_k x Hm x D) for a decode-shaped batch), so such calls read the kept
    rows in place on the sm80 kernels. Shared lists (Hm <= Hk) keep their one copy per KV head whatever the rows."""
    shape = dict(B=1, H=8, Hk=2, D=64, total_q=max_q, total_k=50_000, max_q=max_q, max_k=50_000, force=FORCE_PREFILL)
    per_head = planner(**shape, mask=KEY, Hm=8)
    assert per_head["sm90a_slots"] == (max_q > 128)
    assert per_head["sm90a"] == (max_q > 128)
    assert planner(**shape, mask=KEY, Hm=2)["sm90a_slots"]
