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

    #include "cuda/workspace.h"
    using namespace dmattn;
    // stdin per call: B H Hk D total_q total_k max_q max_k mask(0 absent, 1 key, 2 query) Hm bias Hb sms force tiles
    //                 window_left window_right key_range(0 absent, 1 given) sm90a_ctas(the override)
    //                 bias_dtype(0 float32, 2 bfloat16: q's) sched(DMATTN_SM90A_SCHED: 0 auto, 1 dynamic, 2 static)
    //                 combine_launch(the override) key_mask_map(the override) wide(DMATTN_SM90A_WIDE: 0 auto, 1 off)
    // stdout: kernel row_tiles splits tiles_per_split key_lists_heads workspace_bytes prefill_variant sm90a sm90a_ctas
    //         unit_order combine_finishes sm90a_slots sm90a_query slots_in_place block_map_heads sm90a_dynamic
    //         combine_in_kernel oom_map(the binding's fallback where this plan's workspace cannot be allocated: 1 the
    //         plan of key_mask_map_fallback, 0 none: the sm80 kernels) oom_bytes(its workspace) oom_query(its
    //         sm90a_query) sm90a_wide
    // (a cc 9.0 device; bf16 q / k / v packed (rows, heads, D) at null: aligned as TMA wants; a query-side bias
    // contiguous, (total_q, Hb, max_k))
    int main() {
      long long B, H, Hk, D, tq, tk, mq, mk, mask, hm, bias, hb, sms, force, tiles, wl, wr, kr, ctas, bdt, sched, launch,
          kmm, wide;
      static const int32_t some_range[2] = {0, 0};  // the plan reads only whether key_range is given
      while (std::scanf("%lld %lld %lld %lld %lld %lld %lld %lld %lld %lld %lld %lld %lld %lld %lld %lld %lld %lld "
                        "%lld %lld %lld %lld %lld %lld", &B, &H, &Hk, &D, &tq, &tk, &mq, &mk, &mask, &hm, &bias, &hb,
                        &sms, &force, &tiles, &wl, &wr, &kr, &ctas, &bdt, &sched, &launch, &kmm, &wide) == 24) {
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
        o.sm90a_sched = static_cast<cuda::PlanOverrides::Sched>(sched);
        o.combine_launch = launch != 0;
        o.key_mask_map = kmm != 0;
        o.sm90a_wide = static_cast<cuda::PlanOverrides::Wide>(wide);
        const cuda::DeviceInfo dev{90, static_cast<int>(sms)};
        const cuda::FwdPlan plan = cuda::plan_varlen_fwd(p, dev, o);
        cuda::FwdPlan fallback;
        const bool oom_map = cuda::key_mask_map_fallback(p, dev, o, plan, &fallback);
        std::printf("%s %d %d %d %d %zu %d %d %d %d %d %d %d %d %d %d %d %d %zu %d %d\\n",
                    plan.kernel == cuda::FwdKernel::kDecode ? "decode" : "prefill", plan.row_tiles, plan.num_splits,
                    plan.tiles_per_split, plan.key_lists_heads, cuda::workspace_bytes(plan, p),
                    static_cast<int>(plan.prefill), static_cast<int>(plan.sm90a), plan.sm90a_ctas,
                    static_cast<int>(plan.unit_order), static_cast<int>(plan.combine_finishes),
                    static_cast<int>(plan.sm90a_slots), static_cast<int>(plan.sm90a_query),
                    static_cast<int>(plan.slots_in_place), plan.block_map_heads, static_cast<int>(plan.sm90a_dynamic),
                    static_cast<int>(plan.combine_in_kernel), static_cast<int>(oom_map),
                    oom_map ? cuda::workspace_bytes(fallback, p) : size_t{0},
                    static_cast<int>(oom_map && fallback.sm90a_query), static_cast<int>(plan.sm90a_wide));
      }
    }
    """

ABSENT, KEY, QUERY = 0, 1, 2
F32, BF16 = 0, 2  # a bias's dtype (dmattn::ScalarType): float32, or q's (bfloat16 here)
AUTO, FORCE_PREFILL, FORCE_DECODE = 0, 1, 2
SCHEDS = ("auto", "dynamic", "static")  # DMATTN_SM90A_SCHED (cuda::PlanOverrides::Sched)
WIDES = ("auto", "off")  # DMATTN_SM90A_WIDE (cuda::PlanOverrides::Wide)
PREFILL_VARIANTS = ("plain", "window_left", "query_operands")  # cuda::PrefillVariant


@pytest.fixture(scope="module")
def planner(tmp_path_factory):
    exe = build_host_driver(tmp_path_factory.mktemp("plan"), _DRIVER, "plan", "heuristics.h")

    def line(B, H, Hk, D, total_q, total_k, max_q, max_k, mask=ABSENT, Hm=1, bias=ABSENT, Hb=1, sms=132,
             force=AUTO, tiles=0, window=(-1, -1), key_range=False, sm90a_ctas=0, bias_dtype=F32, sched="auto",
             combine_launch=False, key_mask_map=False, wide="auto"):
        return " ".join(str(x) for x in (B, H, Hk, D, total_q, total_k, max_q, max_k, mask, Hm, bias, Hb, sms,
                                         force, tiles, *window, int(key_range), sm90a_ctas, bias_dtype,
                                         SCHEDS.index(sched), int(combine_launch), int(key_mask_map),
                                         WIDES.index(wide)))

    def parse(out):
        (kernel, row_tiles, splits, per_split, lists, workspace, variant, sm90a, ctas, order, finishes, slots,
         query, in_place, map_heads, dynamic, in_kernel, oom_map, oom_bytes, oom_query, wide) = out.split()
        return dict(kernel=kernel, row_tiles=int(row_tiles), splits=int(splits), tiles_per_split=int(per_split),
                    key_lists_heads=int(lists), workspace=int(workspace), prefill=PREFILL_VARIANTS[int(variant)],
                    sm90a=bool(int(sm90a)), sm90a_ctas=int(ctas), unit_order=bool(int(order)),
                    combine_finishes=bool(int(finishes)), sm90a_slots=bool(int(slots)),
                    sm90a_query=bool(int(query)), slots_in_place=bool(int(in_place)),
                    block_map_heads=int(map_heads), sm90a_dynamic=bool(int(dynamic)),
                    combine_in_kernel=bool(int(in_kernel)), oom_map=bool(int(oom_map)), oom_workspace=int(oom_bytes),
                    oom_query=bool(int(oom_query)), sm90a_wide=bool(int(wide)))

    def plan(**call):
        out = subprocess.run([str(exe)], input=line(**call) + "\n", capture_output=True, text=True,
                             check=True).stdout
        return parse(out)

    def many(calls):  # one run of the driver for many calls
        out = subprocess.run([str(exe)], input="".join(line(**c) + "\n" for c in calls), capture_output=True,
                             text=True, check=True).stdout.splitlines()
        assert len(out) == len(calls)
        return [parse(o) for o in out]

    plan.many = many
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
    tickets = 4 * 64 * 8 + 4  # the kernel merges its own splits: a ticket per unit, and the contract's verdict
    assert plan["unit_order"] and plan["combine_in_kernel"]
    assert abs(plan["workspace"] - lists - partials - order - parts - tickets) < 7 * 256  # each piece 256-aligned


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


def _key_map_bytes(Hm, B, total_k, max_k):
    """A key-side mask's block map and bits by sequence (passes.h, BlockMap::by_sequence, sequence_layout): per mask
    head the smaller of two layouts, a segment of 4 ceil(k_len / 128) blocks per sequence from block
    4 ceil(k_start / 128) + 4 b, so 4 (ceil(total_k / 128) + B) blocks, or a stride of 4 ceil(key extent / 128) blocks
    per sequence (key extent = min(max_k, total_k)); a byte of state and a 32-bit word of bits per block, each
    256-aligned. O(total_k + B), whatever max_seqlen_k."""
    segments = 4 * (-(-total_k // 128) + B)
    strided = B * 4 * -(-min(max_k, total_k, 2**31 - 1) // 128)
    blocks = Hm * min(segments, strided)
    return -(-blocks // 256) * 256 + -(-(4 * blocks) // 256) * 256


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
        # lists compacted in parts, as these are (and split partials merged by a launch, as these are: no tickets)
        key_side = planner(**W, mask=KEY, Hm=Hm, combine_launch=True)["workspace"]
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
    # with a mask the kernel merges its own splits, unless the combine is forced to be a launch
    assert not planner(**WORKLOAD, mask=KEY, Hm=8)["combine_finishes"]
    assert planner(**WORKLOAD, mask=KEY, Hm=8, combine_launch=True)["combine_finishes"]
    unsplit = planner(**WORKLOAD, tiles=1000)
    assert unsplit["splits"] == 1 and not unsplit["combine_finishes"]
    assert not planner(**dict(WORKLOAD, max_q=200, total_q=12_800), force=FORCE_PREFILL)["combine_finishes"]
    # 1024 one-query sequences beside a million-key one: 32768 combining CTAs x 1025 entries, 33M reads
    many = dict(B=1024, H=32, Hk=8, D=128, total_q=1024, total_k=1023 * 64 + 2**20, max_q=1, max_k=2**20)
    plan = planner(**many)
    assert plan["splits"] > 1 and not plan["combine_finishes"]
    few = dict(many, B=64, total_q=64, total_k=64 * 8192, max_k=8192)  # 2048 CTAs x 65 entries
    assert planner(**few)["splits"] > 1 and planner(**few)["combine_finishes"]


def test_ordered_split_calls_merge_their_splits_in_the_kernel(planner):
    """A split decode call whose units are ordered (a key-side mask's lists) merges its splits in the kernel's last
    split CTA of each unit: its order pass zeroes the tickets and finishes the rows, so neither the combine nor
    finish_rows runs. The other split calls (no order pass before the kernel), the kernel with query-side terms, calls
    whose combine would take a CTA per pair, and DMATTN_DECODE_COMBINE=launch keep the combine launch."""
    masked = dict(mask=KEY, Hm=8, bias=KEY, Hb=8)
    plan = planner(**WORKLOAD, **masked)
    assert plan["splits"] > 1 and plan["unit_order"] and plan["combine_in_kernel"] and not plan["combine_finishes"]
    launch = planner(**WORKLOAD, **masked, combine_launch=True)
    assert not launch["combine_in_kernel"] and launch["combine_finishes"]
    assert launch["workspace"] < plan["workspace"]  # no tickets
    assert not planner(**WORKLOAD)["combine_in_kernel"]  # no mask: no order pass
    assert not planner(**WORKLOAD, **masked, tiles=1000)["combine_in_kernel"]  # one split: nothing to merge
    # query-side operands: the decode kernel's variant with terms keeps the combine
    query = planner(**WORKLOAD, mask=QUERY, Hm=8)
    assert query["kernel"] == "decode" and query["unit_order"] and not query["combine_in_kernel"]
    # a long context: 4 x 32 pairs over >= 16 splits take the combine's CTA per pair at D = 128
    long = dict(B=4, H=32, Hk=8, D=128, total_q=4, total_k=320_000, max_q=1, max_k=131_072)
    deep = planner(**long, mask=KEY, Hm=8)
    assert deep["splits"] >= 16 and deep["unit_order"] and not deep["combine_in_kernel"]
    # ... but at D = 64 the combine takes eight lanes per pair, which the kernel's merge takes too
    assert planner(**dict(long, D=64), mask=KEY, Hm=8)["combine_in_kernel"]
    # more units than one CTA orders: batch order, no order pass, so the combine launch
    many = planner(B=1024, H=32, Hk=8, D=128, total_q=1024, total_k=1 << 20, max_q=1, max_k=1 << 17, mask=KEY, Hm=8)
    assert many["splits"] > 1 and not many["unit_order"] and not many["combine_in_kernel"]
    # forced onto the decode kernel with many row tiles (512 one-query sequences and a max_seqlen_q to spare): past
    # 16,384 tickets the combine launch
    rows = dict(B=512, H=32, Hk=8, D=128, total_q=512, total_k=511 * 64 + 2**17, max_k=2**17, mask=KEY, Hm=8,
                force=FORCE_DECODE)
    fits = planner(**rows, max_q=16)  # 512 x 8 units x 2 row tiles
    assert fits["row_tiles"] == 2 and fits["splits"] > 1 and fits["combine_in_kernel"]
    over = planner(**rows, max_q=64)  # 512 x 8 x 8 = 32,768 tickets
    assert over["row_tiles"] == 8 and over["splits"] > 1 and over["unit_order"] and not over["combine_in_kernel"]


def test_key_side_lists_look_back_only_across_parts(planner):
    """A key-side mask's lists are compacted in parts of 2048 keys; only sequences of several parts need the
    look-back's statuses (one uint64 per sequence, list head and part) and its ticket in the workspace (the decode
    kernel's lists with query-side terms too: test_query_side_operands_in_the_decode_kernel_get_lists_and_terms)."""
    # D = 96 (no sm90a kernel): the sm80 kernels, so the lists are all the workspace (on the sm90a kernel the kept rows
    # are gathered too, at every head dim: test_key_side_masks_gather_their_kept_rows_for_the_sm90a_kernel)
    prefill = dict(B=8, H=64, Hk=8, D=96, total_q=16_000, total_k=16_000, max_q=4096, max_k=4096)
    lists = lambda Hm: Hm * 16_000 * 4 + -(-(Hm * 8 * 4) // 256) * 256  # noqa: E731  index + counts
    look_back = lambda Hm, parts: -(-(Hm * 8 * parts * 8 + 4) // 256) * 256  # noqa: E731
    for Hm in (1, 8, 64):
        assert planner(**prefill, mask=KEY, Hm=Hm)["workspace"] == lists(Hm) + look_back(Hm, 2)
        assert planner(**dict(prefill, max_k=10_000), mask=KEY, Hm=Hm)["workspace"] == lists(Hm) + look_back(Hm, 5)
        assert planner(**dict(prefill, max_k=2048), mask=KEY, Hm=Hm)["workspace"] == lists(Hm)


def test_query_side_mask_gets_a_block_map(planner):
    """A query-side mask is summarized first, one byte per (mask head, 64 packed query rows, 32 key positions) in
    the workspace (1 / 2048 of the mask), and v's blocks of 64 rows with an inf or NaN flagged beside it (one byte
    per KV head and block); a key-side one, a query-side bias alone, or no mask get neither. D = 96 (no sm90a
    kernel): the sm80 kernels (the sm90a kernel's bits beside the map: the tests below)."""
    prefill = dict(B=8, H=32, Hk=8, D=96, total_q=16_000, total_k=16_000, max_q=4096, max_k=4096)
    flags = _v_flags_bytes(8, 16_000)
    assert flags == 2048
    for Hm in (1, 8, 32):
        want = Hm * -(-16_000 // 64) * -(-4096 // 32)
        assert planner(**prefill, mask=QUERY, Hm=Hm)["workspace"] == -(-want // 256) * 256 + flags
    parts = -(-(8 * 8 * 2 * 8 + 4) // 256) * 256  # compact_keys in parts: 4096 keys, 2 parts per list
    # the lists alone (D = 96: the sm80 kernels; on the sm90a one the kept rows too)
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
    # workspace (a CTA per unit at D = 128: run DZ). A sequence of more than 1024 KV tiles: the sm80 kernel, no bits.
    for Hb in (1, 8, 32):
        for dtype in (BF16, F32):
            with_bias = planner(**prefill, mask=QUERY, Hm=Hm, bias=QUERY, Hb=Hb, bias_dtype=dtype)
            assert with_bias["sm90a_query"] and not with_bias["sm90a_slots"]
            assert with_bias["workspace"] == plan["workspace"]
            assert with_bias["sm90a_ctas"] == 0
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
        # 3865 keys make odd row starts); a CTA per unit (run DZ: 1.35x faster than persistent at D = 128; run EF:
        # as fast at D = 64, 1.06x faster at D = 256), windows persistent as without the bias
        (dict(mask=QUERY, Hm=8, bias=QUERY, Hb=8, bias_dtype=BF16), True, 0),
        (dict(mask=QUERY, Hm=8, bias=QUERY, Hb=8, bias_dtype=BF16, window=(255, 0)), True, 132),
        (dict(mask=QUERY, Hm=8, bias=QUERY, Hb=8, bias_dtype=BF16, D=64), True, 0),
        (dict(mask=QUERY, Hm=8, bias=QUERY, Hb=8, bias_dtype=BF16, D=256), True, 0),
        # a query-side mask alone at D = 64: a CTA per unit (run EF: 1.02x faster than persistent), windows persistent
        (dict(mask=QUERY, Hm=8, D=64), True, 0),
        (dict(mask=QUERY, Hm=8, D=64, window=(255, 0)), True, 132),
        (dict(mask=QUERY, Hm=8, D=64, bias=KEY, Hb=8), True, 132),  # beside a key-side bias: persistent (not measured)
        (dict(mask=QUERY, Hm=1, bias=QUERY, Hb=1, bias_dtype=BF16, key_range=True), True, 0),
        (dict(bias=QUERY, Hb=32, bias_dtype=BF16), True, 0),  # a query-side bias alone: a CTA per unit, as without it
        (dict(bias=QUERY, Hb=32, bias_dtype=BF16, window=(255, 0)), True, 132),
        (dict(bias=QUERY, Hb=32, bias_dtype=BF16, window=(127, 0)), False, 0),
        (dict(bias=QUERY, Hb=8, bias_dtype=BF16, D=256), True, 0),  # D = 256 too (64-key tiles: 18 KB of terms)
        (dict(mask=KEY, Hm=8, bias=QUERY, Hb=8, bias_dtype=BF16), True, 0),
        (dict(mask=KEY, Hm=32, bias=QUERY, Hb=1, bias_dtype=BF16, window=(255, 0)), True, 132),
        (dict(mask=KEY, Hm=1, bias=QUERY, Hb=32, bias_dtype=BF16, key_range=True), True, 0),
        (dict(mask=KEY, Hm=8, bias=QUERY, Hb=8, bias_dtype=BF16, D=256), True, 0),  # D = 256 too
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
        # D = 256 masks without a bias: a key-side one over its gathered kept rows, persistent as at D <= 128, with key
        # ranges (which the slots' limits do not know) mapped by sequence on the query-side variant, a CTA per unit; a
        # query-side one on the query-side variant, a CTA per unit (run EF: 1.08x faster than persistent) unless windowed
        (dict(D=256, mask=KEY, Hm=8), True, 132),
        (dict(D=256, mask=KEY, Hm=1, window=(-1, 0)), True, 132),
        (dict(D=256, mask=KEY, Hm=32, window=(255, 0)), True, 132),
        (dict(D=256, mask=KEY, Hm=8, window=(127, 0)), False, 0),  # a window of 128 keys or fewer: sm80
        (dict(D=256, mask=KEY, Hm=8, key_range=True), True, 0),  # key ranges: by sequence, a CTA per unit
        (dict(D=256, mask=KEY, Hm=8, sm90a_ctas=-1), True, 0),  # DMATTN_SM90A_CTAS=0: a CTA per unit
        (dict(D=256, mask=QUERY, Hm=8), True, 0),
        (dict(D=256, mask=QUERY, Hm=1, window=(-1, 0)), True, 0),
        (dict(D=256, mask=QUERY, Hm=32, window=(255, 0)), True, 132),
        (dict(D=256, mask=QUERY, Hm=8, key_range=True), True, 0),
        (dict(D=256, mask=QUERY, Hm=8, sm90a_ctas=5), True, 5),
        # D = 256 biases: a key-side one over slots in place, alone (persistent or not as without it) or beside a
        # query-side mask (persistent as masks are), over the gathered slots beside a key-side mask; a query-side one
        # in q's dtype as at D <= 128; float32 query-side biases, key ranges beside a key-side bias and windows of
        # 128 keys or fewer take the sm80 kernels
        (dict(D=256, bias=KEY, Hb=8), True, 0),
        (dict(D=256, bias=KEY, Hb=1, window=(255, 0)), True, 132),
        (dict(D=256, bias=KEY, Hb=32, window=(-1, 0)), True, 0),
        (dict(D=256, bias=KEY, Hb=8, key_range=True), False, 0),
        (dict(D=256, bias=KEY, Hb=8, window=(127, 0)), False, 0),
        (dict(D=256, mask=QUERY, Hm=8, bias=KEY, Hb=8), True, 132),
        (dict(D=256, mask=QUERY, Hm=8, bias=KEY, Hb=8, key_range=True), False, 0),
        (dict(D=256, mask=KEY, Hm=8, bias=KEY, Hb=8), True, 132),
        (dict(D=256, mask=KEY, Hm=32, bias=KEY, Hb=1, window=(255, 0)), True, 132),
        (dict(D=256, mask=KEY, Hm=1, bias=KEY, Hb=32, sm90a_ctas=-1), True, 0),
        (dict(D=256, mask=KEY, Hm=8, bias=KEY, Hb=8, key_range=True), False, 0),
        (dict(D=256, mask=QUERY, Hm=8, bias=QUERY, Hb=8, bias_dtype=BF16), True, 0),
        (dict(D=256, mask=KEY, Hm=32, bias=QUERY, Hb=1, bias_dtype=BF16, window=(255, 0)), True, 132),
        (dict(D=256, bias=QUERY, Hb=1, bias_dtype=BF16, key_range=True), True, 0),
        (dict(D=256, bias=QUERY, Hb=8), False, 0),  # float32: its terms do not fit beside D = 256's tiles
        (dict(D=256, mask=QUERY, Hm=8, bias=QUERY, Hb=8), False, 0),
        (dict(D=256, mask=KEY, Hm=8, bias=QUERY, Hb=8), False, 0),
        (dict(D=96), False, 0),  # other head dims: the sm80 kernels
    ],
)
def test_sm90a_choice(planner, change, sm90a, ctas):
    """Which prefill calls the sm90a kernel takes on a cc 9.0 device, and which of them run on a persistent grid
    under the static grids (DMATTN_SM90A_SCHED=static; test_dynamic_scheduler_plan has the default's grids)."""
    plan = planner(**{**PREFILL, **change}, sched="static")
    assert plan["kernel"] == "prefill"
    assert (plan["sm90a"], plan["sm90a_ctas"]) == (sm90a, ctas)


def test_dynamic_scheduler_plan(planner):
    """The dynamic scheduler, the default: the sm90a kernel's plain (dense, causal or not), windowed and kSlots (a
    key-side mask's gathered kept rows; a key-side bias alone, over slots in place) variants on a persistent grid of one
    CTA per SM (or DMATTN_SM90A_CTAS's count; its 0 keeps a CTA per unit) whose CTAs take units from a counter, a 4-byte
    counter per launch of 255 sequences in the workspace (one 256-byte aligned piece); the query-side variant
    (query-side masks and biases, a key-side bias beside a query-side mask) and key ranges keep their grids.
    DMATTN_SM90A_SCHED=static (sched="static" here) gives the static grids and nothing else changes."""
    for causal in (True, False):
        call = dict(PREFILL, window=(-1, 0) if causal else (-1, -1))
        base, dyn = planner(**call, sched="static"), planner(**call)
        assert (base["sm90a"], base["sm90a_ctas"], base["sm90a_dynamic"]) == (True, 0, False)
        assert (dyn["sm90a"], dyn["sm90a_ctas"], dyn["sm90a_dynamic"]) == (True, 132, True)
        assert dyn["workspace"] == base["workspace"] + 256
        assert planner(**call, sm90a_ctas=3)["sm90a_ctas"] == 3
        per_unit = planner(**call, sm90a_ctas=-1)
        assert (per_unit["sm90a_ctas"], per_unit["sm90a_dynamic"], per_unit["workspace"]) == (0, False,
                                                                                             base["workspace"])
    many = dict(PREFILL, B=600)  # three launches of at most 255 sequences: three counters, one aligned piece
    assert planner(**many)["workspace"] == planner(**many, sched="static")["workspace"] + 256
    # the windowed and kSlots variants: the same plan but for the grid and the counters (persistent already, or a CTA
    # per unit made persistent, as the plain kernel's)
    for other in (dict(window=(255, 0)), dict(window=(255, 0), mask=KEY, Hm=8, bias=KEY, Hb=32), dict(mask=KEY, Hm=8),
                  dict(mask=KEY, Hm=32, bias=KEY, Hb=8, bias_dtype=BF16), dict(bias=KEY, Hb=8, bias_dtype=BF16)):
        plain, dyn = planner(**PREFILL, **other, sched="static"), planner(**PREFILL, **other)
        assert dyn == {**plain, "sm90a_ctas": 132, "sm90a_dynamic": True, "workspace": plain["workspace"] + 256}, other
        assert planner(**PREFILL, **other, sm90a_ctas=3)["sm90a_ctas"] == 3
        per_unit = planner(**PREFILL, **other, sm90a_ctas=-1)
        assert (per_unit["sm90a_ctas"], per_unit["sm90a_dynamic"]) == (0, False), other
    for other in (dict(key_range=True), dict(mask=QUERY, Hm=8), dict(mask=QUERY, Hm=8, bias=KEY, Hb=8),
                  dict(bias=QUERY, Hb=8, bias_dtype=BF16)):
        plain, dyn = planner(**PREFILL, **other, sched="static"), planner(**PREFILL, **other)
        assert not dyn["sm90a_dynamic"] and dyn == {**plain, "sm90a_dynamic": False}, other
    # D = 256: by default a call whose static grid is a CTA per unit keeps it (a persistent CTA has one Q buffer there,
    # so no next unit's Q loads meanwhile: the dynamic grid measured slower, runs DE and DG); DMATTN_SM90A_SCHED=dynamic
    # or a CTA count still takes the counter, and the persistent kSlots and windowed kernels take it by default
    for other in (dict(window=(-1, 0)), dict(), dict(bias=KEY, Hb=8, bias_dtype=BF16)):
        call = dict(PREFILL, D=256, **other)
        auto = planner(**call)
        assert (auto["sm90a"], auto["sm90a_ctas"], auto["sm90a_dynamic"]) == (True, 0, False), other
        assert auto == planner(**call, sched="static"), other
        forced = planner(**call, sched="dynamic")
        assert (forced["sm90a_ctas"], forced["sm90a_dynamic"]) == (132, True), other
        assert planner(**call, sm90a_ctas=3)["sm90a_dynamic"], other
    for other in (dict(mask=KEY, Hm=8), dict(window=(255, 0))):
        auto = planner(**dict(PREFILL, D=256), **other)
        assert (auto["sm90a"], auto["sm90a_ctas"], auto["sm90a_dynamic"]) == (True, 132, True), other


def test_wide_tiles_plan(planner):
    """The plain sm90a kernel's wide KV tiles (FwdPlan::sm90a_wide, 192 keys at D = 64): by default every call at
    D = 64, causal or not, without a mask, a bias, a window, a key range or a softcap; DMATTN_SM90A_WIDE=off none.
    Every grid takes them (the one the narrow tiles would run, workspace and all); other head dims never."""
    d64, d64_causal = dict(PREFILL, D=64, window=(-1, -1)), dict(PREFILL, D=64, window=(-1, 0))
    assert planner(**d64)["sm90a_wide"] and planner(**d64_causal)["sm90a_wide"]
    assert not planner(**d64, wide="off")["sm90a_wide"] and not planner(**d64_causal, wide="off")["sm90a_wide"]
    for call in (d64, d64_causal):
        for grid in (dict(), dict(sched="static"), dict(sched="dynamic"), dict(sm90a_ctas=3), dict(sm90a_ctas=-1)):
            plan = planner(**call, **grid)
            assert plan == {**planner(**{**call, "wide": "off"}, **grid), "sm90a_wide": True}, (call, grid)
    # other head dims (D = 128's 176-key tiles measured slower: heuristics.h), and every other variant of the kernel,
    # even when asked for
    for other in (dict(D=128), dict(D=256), dict(D=96), dict(window=(255, 0)), dict(window=(255, 255)),
                  dict(key_range=True), dict(mask=KEY, Hm=8), dict(bias=KEY, Hb=8, bias_dtype=BF16),
                  dict(mask=QUERY, Hm=8), dict(bias=QUERY, Hb=8, bias_dtype=BF16)):
        plan = planner(**{**d64, **other})
        assert not plan["sm90a_wide"], other
        assert plan == planner(**{**d64, **other}, wide="off"), other


@pytest.mark.parametrize("D", [128, 256])
@pytest.mark.parametrize("Hm, Hb, causal", [(8, 8, True), (1, 32, True), (8, 0, False), (1, 1, True), (32, 8, True),
                                            (16, 0, False)])
def test_key_side_masks_gather_their_kept_rows_for_the_sm90a_kernel(planner, Hm, Hb, causal, D):
    """A key-side mask on cc 9.0: compact_keys' lists, then its kept K / V rows gathered into dense slots that the
    sm90a kernel reads with TMA (passes.h KeptRows). The workspace holds the lists, the K / V slots (k and v's packed
    shape with Hk heads, or a copy per list where lists are finer than KV heads: Hm > Hk), the slots' positions per
    list head and biases per bias head (the finer of the bias's and the lists'), each over total_k + 32 (B + 1) + 128
    slots rounded up to 32, and for causal calls four slot limits per (list head, sequence, 128-row query tile).
    D = 256 the same (64-key tiles of the same slots: only the K / V copy, D elements a row, doubles), persistent,
    with no map, no bits and no flags."""
    bias = dict(bias=KEY, Hb=Hb) if Hb else {}
    plan = planner(**dict(PREFILL, D=D), mask=KEY, Hm=Hm, window=(-1, 0) if causal else (-1, -1), **bias)
    assert plan["sm90a"] and plan["sm90a_slots"] and plan["key_lists_heads"] == Hm
    assert not plan["sm90a_query"] and not plan["slots_in_place"] and plan["block_map_heads"] == 0
    assert plan["sm90a_ctas"] == 132
    B, Hk, total_k = PREFILL["B"], PREFILL["Hk"], PREFILL["total_k"]
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
    four slot limits per (sequence, 128-row query tile), and the dynamic scheduler's counter."""
    plan = planner(**PREFILL, bias=KEY, Hb=Hb, window=(-1, 0) if causal else (-1, -1))
    assert plan["sm90a"] and plan["sm90a_slots"] and plan["key_lists_heads"] == 0
    B, total_k = PREFILL["B"], PREFILL["total_k"]
    extent = -(-(total_k + 32 * (B + 1) + 128) // 32) * 32
    aligned = lambda n: -(-n // 256) * 256  # noqa: E731
    expected = (aligned(4 * B) + aligned(4 * extent) + aligned(4 * Hb * extent)
                + (aligned(16 * B * -(-3865 // 128)) if causal else 0)
                + 256)  # the dynamic scheduler's unit counter (one launch)
    assert plan["workspace"] == expected
    # D = 256 (64-key tiles): the same slots and workspace but the counter (they hold no K / V, and the limits are per
    # 128-row query tile at every head dim); a query-side bias: no slots (its own variant)
    d256 = planner(**dict(PREFILL, D=256), bias=KEY, Hb=Hb, window=(-1, 0) if causal else (-1, -1))
    assert d256["sm90a"] and d256["sm90a_slots"] and d256["key_lists_heads"] == 0
    assert d256["workspace"] == expected - 256  # a CTA per unit there: no counter (test_dynamic_scheduler_plan)
    assert not planner(**PREFILL, bias=QUERY, Hb=Hb)["sm90a_slots"]


@pytest.mark.parametrize("Hb", [1, 8, 32])
def test_query_side_bias_alone_on_the_sm90a_kernel_gets_v_flags(planner, Hb):
    """A query-side bias in q's dtype without a mask runs on the sm90a kernel (its consumers read the bias per live
    tile; every tile live, no block map): the workspace holds v's flags alone, since a -inf bias hides its key and
    a tile whose V rows are finite then skips its V scan."""
    plan = planner(**PREFILL, bias=QUERY, Hb=Hb, bias_dtype=BF16)
    assert plan["sm90a"] and plan["sm90a_query"] and not plan["sm90a_slots"] and plan["key_lists_heads"] == 0
    assert plan["workspace"] == _v_flags_bytes(PREFILL["Hk"], PREFILL["total_k"])
    # float32: the same, on a CTA per unit; D = 256: the same in q's dtype, and float32 on the sm80 kernels (its
    # 64-key tile of terms does not fit), no workspace
    f32 = planner(**PREFILL, bias=QUERY, Hb=Hb)
    assert f32["sm90a_query"] and f32["sm90a_ctas"] == 0 and f32["workspace"] == plan["workspace"]
    d256 = planner(**dict(PREFILL, D=256), bias=QUERY, Hb=Hb, bias_dtype=BF16)
    assert d256["sm90a_query"] and d256["sm90a_ctas"] == 0 and d256["workspace"] == plan["workspace"]
    sm80 = planner(**dict(PREFILL, D=256), bias=QUERY, Hb=Hb)
    assert not sm80["sm90a"] and sm80["workspace"] == 0


@pytest.mark.parametrize("Hm", [1, 8, 32])
def test_key_side_mask_beside_a_query_side_bias_is_mapped_by_sequence(planner, Hm):
    """A key-side mask beside a query-side bias runs on the sm90a kernel's query-side variant: no kept-key lists
    (every tile reads its bias anyway), but a block map and bits of the mask by sequence (BlockMap::by_sequence):
    a byte and a word per (mask head, 32 key positions of a sequence's segment, four per 128-key tile), O(total_k +
    B), never O(total_q) nor O(B x max_seqlen_k); and v's flags. D = 256: the same in q's dtype; a float32 bias there
    takes the sm80 kernels and their lists."""
    B, total_k = PREFILL["B"], PREFILL["total_k"]
    mapped = _key_map_bytes(Hm, B, total_k, PREFILL["max_k"]) + _v_flags_bytes(PREFILL["Hk"], total_k)
    for dtype in (BF16, F32):
        plan = planner(**PREFILL, mask=KEY, Hm=Hm, bias=QUERY, Hb=8, bias_dtype=dtype)
        assert plan["sm90a"] and plan["sm90a_query"] and not plan["sm90a_slots"] and plan["key_lists_heads"] == 0
        assert plan["workspace"] == mapped
    d256 = planner(**dict(PREFILL, D=256), mask=KEY, Hm=Hm, bias=QUERY, Hb=8, bias_dtype=BF16)
    assert d256["sm90a_query"] and not d256["sm90a_slots"] and d256["key_lists_heads"] == 0
    assert d256["workspace"] == mapped
    sm80 = planner(**dict(PREFILL, D=256), mask=KEY, Hm=Hm, bias=QUERY, Hb=8)
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
    # At D = 256 a mask finer than the KV heads there takes the sm80 kernels and their lists instead
    # (sm90a_query_supports: the decode-shaped rule, with or without a bias; unmeasured), coarser ones the sm90a kernel.
    dec256 = planner(B=16, H=32, Hk=8, D=256, total_q=64, total_k=20_000, max_q=20, max_k=3000, mask=KEY, Hm=Hm,
                     bias=QUERY, Hb=8, bias_dtype=BF16)
    assert dec256["kernel"] == "prefill" and dec256["sm90a_query"] == (Hm != 32)
    assert dec256["key_lists_heads"] == (Hm if Hm == 32 else 0)


@pytest.mark.parametrize("D, bias, key_range", [(128, QUERY, False), (256, ABSENT, True), (256, QUERY, False)],
                         ids=["query_bias", "d256_key_ranges", "d256_query_bias"])
def test_skewed_batch_key_map_is_sized_by_the_keys(planner, D, bias, key_range):
    """A key-side mask mapped by sequence (beside a query-side bias; at D = 256 beside one or without one, ungathered:
    here beside key ranges) costs O(total_k + B) per mask head, not O(B x max_seqlen_k): one 100,000-key sequence
    beside 511 of 200 keys with 8 mask heads (a 1.6 MB bool mask) gets a map and bits of 335 KB, where a row of
    max_seqlen_k per sequence took 64 MB; and the workspace does not change with max_seqlen_k at a fixed total_k."""
    B, Hm, total_k = 512, 8, 100_000 + 511 * 200
    skewed = dict(B=B, H=32, Hk=8, D=D, total_q=total_k, total_k=total_k, max_q=100_000, max_k=100_000)
    operands = dict(mask=KEY, Hm=Hm, bias=bias, Hb=8, bias_dtype=BF16, key_range=key_range)
    plan = planner(**skewed, **operands)
    assert plan["sm90a"] and plan["sm90a_query"] and plan["key_lists_heads"] == 0 and not plan["sm90a_slots"]
    mapped = _key_map_bytes(Hm, B, total_k, 100_000)
    assert mapped == 334_848  # segments: 4 (ceil(202,200 / 128) + 512) = 8,368 blocks a head, a stride 512 x 3,128
    assert plan["workspace"] == mapped + _v_flags_bytes(skewed["Hk"], total_k)
    mask_bytes = total_k * Hm
    by_max_seqlen = Hm * B * -(-100_000 // 32) + Hm * B * -(-100_000 // 128) * 4 * 4  # the rows of max_seqlen_k
    assert by_max_seqlen > 64_000_000 and mapped < mask_bytes / 4 and 190 * mapped < by_max_seqlen
    for max_k in (4096, 131_072):  # the same keys, another max_seqlen_k: the same map
        assert planner(**dict(skewed, max_k=max_k), **operands)["workspace"] == plan["workspace"]
    # Linear in the keys: 128 more keys cost each mask head a 128-key tile's 4 state bytes and 4 words (and v's
    # flags their share); a sequence more costs each mask head a tile's blocks too (its segment's alignment).
    more_keys = dict(skewed, total_k=total_k + 128 * 1000, total_q=total_k + 128 * 1000)
    assert (planner(**more_keys, **operands)["workspace"] - _v_flags_bytes(8, total_k + 128_000)
            == _key_map_bytes(Hm, B, total_k + 128_000, 100_000))
    # One sequence more (of 200 keys, and so 200 keys more) costs each mask head one tile more, for the sequence's
    # slack, plus the tiles its keys add: 4 (ceil((total_k + 200) / 128) + B + 1) blocks a head, through the planner.
    more_seqs = dict(skewed, B=B + 1, total_k=total_k + 200, total_q=total_k + 200)
    blocks = Hm * 4 * (-(-(total_k + 200) // 128) + B + 1)
    assert (planner(**more_seqs, **operands)["workspace"] - _v_flags_bytes(8, total_k + 200)
            == -(-blocks // 256) * 256 + -(-(4 * blocks) // 256) * 256)


@pytest.mark.parametrize("D, bias, key_range", [(128, QUERY, False), (256, ABSENT, True), (256, QUERY, False)],
                         ids=["query_bias", "d256_key_ranges", "d256_query_bias"])
@pytest.mark.parametrize("B, k_len", [(16, 4096), (4096, 512), (4096, 128), (4096, 64)])
def test_key_map_takes_the_smaller_layout(planner, D, bias, key_range, B, k_len):
    """A batch of sequences of like length: the map by sequence takes a stride per sequence (4 ceil(max_seqlen_k /
    128) blocks), where the segments' slack tile per sequence costs more: 4096 x 128 keys, 4 blocks a sequence
    against 8; 4096 x 64 keys, 4 against 6; 4096 x 512, 16 against 20; 16 x 4096, 128 against 132. The skewed batch
    above keeps segments (8,368 blocks a head against a stride's 512 x 3,128)."""
    Hm, total_k = 8, B * k_len
    plan = planner(B=B, H=32, Hk=8, D=D, total_q=total_k, total_k=total_k, max_q=k_len, max_k=k_len,
                   mask=KEY, Hm=Hm, bias=bias, Hb=8, bias_dtype=BF16, key_range=key_range)
    assert plan["sm90a"] and plan["sm90a_query"] and plan["key_lists_heads"] == 0 and not plan["sm90a_slots"]
    segments = 4 * (-(-total_k // 128) + B)
    strided = B * 4 * -(-k_len // 128)
    blocks = Hm * min(segments, strided)
    assert plan["workspace"] == -(-blocks // 256) * 256 + -(-(4 * blocks) // 256) * 256 + _v_flags_bytes(8, total_k)
    assert plan["workspace"] == _key_map_bytes(Hm, B, total_k, k_len) + _v_flags_bytes(8, total_k)
    if (B, k_len) == (4096, 128):  # the review's case: 655,360 bytes, where segments took 1,310,720
        assert _key_map_bytes(Hm, B, total_k, k_len) == 655_360 and Hm * segments * 5 == 1_310_720
    assert strided < segments  # like lengths: a stride has no slack tile (and 64 keys fill half a tile either way)


_SEGMENT_DRIVER = """
    #include <cstdio>
    #include <vector>

    #include "cuda/passes.h"
    using namespace dmattn;
    // stdin per call: B total_k max_k used, then cu_seqlens_k (B + 1 ints), then seqused_k (B ints) where used is 1
    // stdout: seq_extent and seq_stride (sequence_layout), then per sequence: its clamped key start and length
    //         (key_seq) and its row's first block in mask head 1 (sequence_row(1, b, start))
    int main() {
      long long B, tk, mk, used;
      while (std::scanf("%lld %lld %lld %lld", &B, &tk, &mk, &used) == 4) {
        std::vector<int32_t> cu(B + 1), seqused(B);
        for (auto& c : cu) std::scanf("%d", &c);
        if (used) for (auto& u : seqused) std::scanf("%d", &u);
        VarlenFwdParams p;
        p.batch = B; p.total_k = tk; p.max_seqlen_k = mk; p.cu_seqlens_k = cu.data();
        p.seqused_k = used ? seqused.data() : nullptr;
        p.mask.layout = OperandLayout::kKeySide;
        cuda::BlockMap map;
        map.by_sequence = true;
        const cuda::BlockMap::SequenceLayout layout = cuda::BlockMap::sequence_layout(p);
        map.seq_extent = layout.extent;
        map.seq_stride = layout.stride;
        std::printf("%lld %d", static_cast<long long>(map.seq_extent), map.seq_stride);
        for (int32_t b = 0; b < B; ++b) {
          const SeqRange sk = key_seq(p, b);
          std::printf(" %lld %lld %lld", static_cast<long long>(sk.start), static_cast<long long>(sk.len),
                      static_cast<long long>(map.sequence_row(1, b, sk.start)));
        }
        std::printf("\\n");
      }
    }
    """


def test_key_map_segments_stay_in_bounds_and_apart(tmp_path):
    """BlockMap's by-sequence rows (passes.h), as the kernels compute them from the clamped key ranges (key_seq, with
    seqused_k or not), in both layouts (sequence_layout: the smaller of segments and a stride per sequence): each row
    starts on a 128-key tile's 4 blocks (aligned 16-byte loads of a tile's words), and the 4 ceil(k_len / 128) blocks
    its tiles read lie inside its mask head's seq_extent for any cu_seqlens, lying ones included (the kernels clamp
    ranges; two lying sequences may share segment blocks, never leave the map; strided rows never share); under the
    contract (non-decreasing cu_seqlens) no two rows share a block. Random batches, skewed ones, batches of like
    lengths (the stride) and the extremes of the bound."""
    import random

    exe = build_host_driver(tmp_path, _SEGMENT_DRIVER, "segments", "passes.h")
    rng = random.Random(5)
    calls = []  # (B, total_k, max_k, cu, used, honest)
    for _ in range(300):
        B = rng.choice([1, 2, 3, 7, 64, 300])
        same = rng.random() < 0.25  # like lengths: the stride wins
        one = rng.choice([1, 64, 128, 200])
        lens = [one if same else rng.choice([0, 1, 31, 127, 128, 129, 255, 257, rng.randrange(1, 5000)])
                for _ in range(B)]
        cu = [0]
        for n in lens:
            cu.append(cu[-1] + n)
        total_k = cu[-1] + rng.choice([0, 0, 5, 127])
        used = [rng.randrange(-50, 400) for _ in range(B)] if rng.random() < 0.3 else None
        calls.append((B, total_k, max(lens + [1]), cu, used, True))
        lie = list(cu)
        for _ in range(rng.randrange(1, 4)):  # entries moved anywhere, past the ends and below 0 included
            lie[rng.randrange(B + 1)] = rng.randrange(-300, total_k + 300)
        calls.append((B, total_k, rng.choice([max(lens + [1]), total_k, 2**31 - 1]), lie, used, False))
    # the bound's extremes: the last sequence from key 130 to the end (ceil(130 / 128) + ceil(578 / 128) =
    # ceil(708 / 128) + 1), alone and overlapping an honest first sequence of every key
    calls += [(3, 708, 578, [0, 100, 130, 708], None, True), (3, 708, 708, [0, 708, 130, 708], None, False),
              (3, 708, 708, [0, 708, 212, 708], None, False), (3, 708, 708, [0, 708, 1, 708], None, False)]
    stdin = "".join(f"{B} {tk} {mk} {int(used is not None)} {' '.join(map(str, cu))} "
                    f"{' '.join(map(str, used or []))}\n" for B, tk, mk, cu, used, _ in calls)
    out = subprocess.run([str(exe)], input=stdin, capture_output=True, text=True, check=True).stdout.splitlines()
    assert len(out) == len(calls)
    at_the_end = strided = 0
    for (B, total_k, max_k, cu, used, honest), line in zip(calls, out):
        values = [int(x) for x in line.split()]
        extent, stride, seqs = values[0], values[1], [values[2 + 3 * b: 5 + 3 * b] for b in range(B)]
        segments = 4 * (-(-total_k // 128) + B)
        words = 4 * -(-min(max_k, total_k, 2**31 - 1) // 128)
        assert extent == min(segments, B * words) and stride == (words if B * words < segments else 0)
        strided += stride > 0
        spans = []
        for b, (start, length, row) in enumerate(seqs):
            seg = row - extent  # mask head 1's row: head 0's
            assert 0 <= start and start + length <= total_k and seg % 4 == 0 and seg >= 0
            if used is not None:
                assert length <= max(used[b], 0)
            if stride:
                assert seg == b * stride and 4 * -(-length // 128) <= stride
            end = seg + 4 * -(-length // 128)
            assert end <= extent, (cu, start, length, seg, extent)
            at_the_end += end == extent
            if length:
                spans.append((seg, end))
        if honest or stride:
            spans.sort()
            assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:])), cu
    assert at_the_end >= 2  # the bound is tight: rows end exactly at the extent
    assert 50 < strided < len(calls) - 50  # both layouts


# A call of D = 256 whose kept K / V rows pass kMaxKeptRowBytes (4 GiB) for every mask head count: 600,000 keys of 8
# KV heads, 2 x 600,000 x 8 x 256 x 2 bytes (4.9 GB; with Hm = H, four times that; at D = 128 half, which fits but
# for Hm = H). Sequences of at most 100,000 keys, within the query-side variant's tile list.
PAST_THE_CAP_D256 = dict(B=8, H=32, Hk=8, D=256, total_q=16_000, total_k=600_000, max_q=4096, max_k=100_000)


@pytest.mark.parametrize("Hm", [1, 8, 32])
def test_d256_masks_on_the_sm90a_kernel_get_kept_rows_or_a_map(planner, Hm):
    """At D = 256 (64-key tiles) a key-side mask without a bias runs on the sm90a kernel over its kept rows gathered
    into dense slots (as at D <= 128: the lists, the K / V copy of D = 256 rows, no map, bits or flags), and a
    query-side one on its query-side variant with the workspace of D <= 128 (the block map, bits laid out per 128-key
    tile, a 64-key tile reading half of one, and v's flags). A key-side mask whose rows the slots cannot take is mapped
    by sequence on the query-side variant instead (BlockMap::by_sequence: its map, bits and v's flags, no lists):
    beside key ranges, or with kept rows past kMaxKeptRowBytes, where D <= 128 takes the sm80 kernels. Beside either
    mask a key-side bias or a query-side one in q's dtype keeps the sm90a kernel (the tests below), a float32
    query-side bias takes the sm80 kernels; so do query-side masks over sequences of more than 131,072 keys (2048
    64-key tiles, the kernel's tile list) and bits past 1 GB."""
    prefill = dict(B=8, H=32, Hk=8, D=256, total_q=16_000, total_k=16_000, max_q=4096, max_k=4000)
    B, total_q, total_k, max_k = prefill["B"], prefill["total_q"], prefill["total_k"], prefill["max_k"]
    aligned = lambda n: -(-n // 256) * 256  # noqa: E731
    flags = _v_flags_bytes(prefill["Hk"], total_k)
    query = planner(**prefill, mask=QUERY, Hm=Hm)
    assert query["sm90a"] and query["sm90a_query"] and not query["sm90a_slots"] and query["key_lists_heads"] == 0
    state = Hm * -(-total_q // 64) * -(-max_k // 32)
    bits = Hm * total_q * -(-max_k // 128) * 4 * 4
    assert query["workspace"] == aligned(state) + aligned(bits) + flags
    assert query["workspace"] == planner(**dict(prefill, D=128), mask=QUERY, Hm=Hm)["workspace"]
    # A key-side mask: its kept rows, persistent; D = 128's workspace but for the K / V copy's rows of 256 elements
    key = planner(**prefill, mask=KEY, Hm=Hm)
    assert key["sm90a"] and key["sm90a_slots"] and not key["sm90a_query"] and not key["slots_in_place"]
    assert key["key_lists_heads"] == Hm and key["block_map_heads"] == 0 and key["sm90a_ctas"] == 132
    d128 = planner(**dict(prefill, D=128), mask=KEY, Hm=Hm)
    assert d128["sm90a_slots"] and key["workspace"] - d128["workspace"] == 2 * total_k * max(8, Hm) * 128 * 2
    # ...with key ranges (the slots' limits know none): mapped by sequence, a CTA per unit
    ranged = planner(**prefill, mask=KEY, Hm=Hm, key_range=True)
    assert ranged["sm90a_query"] and not ranged["sm90a_slots"] and ranged["key_lists_heads"] == 0
    assert ranged["block_map_heads"] == Hm and ranged["sm90a_ctas"] == 0
    assert ranged["workspace"] == _key_map_bytes(Hm, B, total_k, max_k) + flags
    # ...with kept rows past the cap: mapped by sequence (D = 128 copies half as much: slots where that fits, else sm80)
    big = PAST_THE_CAP_D256
    past = planner(**big, mask=KEY, Hm=Hm)
    assert past["sm90a_query"] and not past["sm90a_slots"] and past["key_lists_heads"] == 0
    assert past["workspace"] == (_key_map_bytes(Hm, big["B"], big["total_k"], big["max_k"])
                                 + _v_flags_bytes(big["Hk"], big["total_k"]))
    big128 = planner(**dict(big, D=128), mask=KEY, Hm=Hm)
    assert big128["sm90a_slots"] == (Hm <= 8) and big128["sm90a"] == (Hm <= 8) and big128["key_lists_heads"] == Hm
    # Biases: a key-side one, beside a key-side mask over its gathered slots, beside a query-side one over slots in
    # place; a query-side one in q's dtype on the query-side variant (a key-side mask by sequence); a float32
    # query-side one on the sm80 kernels (a key-side mask's lists; a query-side mask's map without bits)
    for mask in (KEY, QUERY):
        for bias, dtype in ((KEY, F32), (QUERY, BF16)):
            plan = planner(**prefill, mask=mask, Hm=Hm, bias=bias, Hb=8, bias_dtype=dtype)
            gathered = mask == KEY and bias == KEY
            assert plan["sm90a"] and plan["sm90a_query"] != gathered and plan["sm90a_slots"] == (bias == KEY)
            assert plan["key_lists_heads"] == (Hm if gathered else 0) and plan["slots_in_place"] == (
                bias == KEY and not gathered)
        plan = planner(**prefill, mask=mask, Hm=Hm, bias=QUERY, Hb=8, bias_dtype=F32)
        assert not plan["sm90a"] and not plan["sm90a_query"]
        assert plan["key_lists_heads"] == (Hm if mask == KEY else 0)
    longest = dict(prefill, total_k=140_000, max_k=131_072, total_q=1000, max_q=1000)
    assert planner(**longest, mask=QUERY, Hm=Hm)["sm90a_query"]
    assert not planner(**dict(longest, max_k=131_073), mask=QUERY, Hm=Hm)["sm90a"]
    # A key-side mask's slots have no tile list: sequences of any length, where the copy fits (Hm = H past the cap
    # here: mapped by sequence up to the tile list's 131,072 keys, then the sm80 kernels over its lists)
    fits = 2 * 140_000 * max(8, Hm) * 256 * 2 <= 4 << 30
    for most in (131_072, 131_073):
        plan = planner(**dict(longest, max_k=most), mask=KEY, Hm=Hm)
        if fits:
            assert plan["sm90a_slots"] and plan["key_lists_heads"] == Hm
        elif most == 131_072:
            assert plan["sm90a_query"] and plan["key_lists_heads"] == 0
        else:
            assert not plan["sm90a"] and plan["key_lists_heads"] == Hm
    # Every call the sm80 kernels take keeps a key-side mask's lists (they apply it only through them): windows of 128
    # keys or fewer; DMATTN_SM90A_CTAS sends the narrow window to the sm90a kernel, over the gathered slots
    narrow = planner(**prefill, mask=KEY, Hm=Hm, window=(127, 0))
    assert not narrow["sm90a"] and narrow["key_lists_heads"] == Hm
    forced = planner(**prefill, mask=KEY, Hm=Hm, window=(127, 0), sm90a_ctas=-1)
    assert forced["sm90a_slots"] and forced["key_lists_heads"] == Hm and forced["sm90a_ctas"] == 0
    # Bits past 1 GB: the sm80 kernel (it reads the mask itself).
    assert not planner(**dict(longest, total_q=70_000, max_q=8000), mask=QUERY, Hm=Hm)["sm90a"]
    # A key-side mask finer than the KV heads over sequences of one query tile (a decode-shaped call the decode kernel
    # does not take): the sm80 kernels over its lists, as at D <= 128 (sm90a_slots_supports, and
    # sm90a_query_supports for the map by sequence); coarser masks, or more queries, take the sm90a kernel's slots.
    few = dict(B=16, H=32, Hk=8, D=256, total_q=64, total_k=65_536, max_q=4, max_k=4096)
    plan = planner(**few, mask=KEY, Hm=Hm)
    if Hm == 32:  # finer than the KV heads: not the decode kernel's
        assert plan["kernel"] == "prefill" and not plan["sm90a"] and plan["key_lists_heads"] == 32
    else:  # 1 or Hk: the decode kernel's
        assert plan["kernel"] == "decode"
    more = planner(**dict(few, total_q=3000, max_q=200), mask=KEY, Hm=Hm)
    assert more["sm90a_slots"] and more["key_lists_heads"] == Hm
    assert planner(**dict(few, total_q=3000, max_q=200), mask=KEY, Hm=Hm, key_range=True)["sm90a_query"]


@pytest.mark.parametrize("Hm, Hb, causal", [(1, 8, True), (8, 1, False), (32, 32, True), (8, 8, False)])
def test_d256_key_side_bias_beside_a_mask(planner, Hm, Hb, causal):
    """At D = 256 a key-side bias beside a key-side mask runs over the mask's gathered kept rows, as at D <= 128 (the
    lists, the K / V copy, positions, biases per bias head, slot limits), persistent; beside a query-side mask, on the
    sm90a kernel's query-side variant with slots in place for the bias (kQuery + kSlots, as at D <= 128): the mask's
    map and bits and v's flags, then the slots' workspace of a key-side bias alone (each sequence's key count, one
    list of positions, the float32 biases per bias head, and for causal calls the slot limits per 128-row query
    tile). A key-side mask whose kept rows pass the cap is mapped by sequence there too, the bias in place."""
    prefill = dict(B=8, H=32, Hk=8, D=256, total_q=16_000, total_k=16_000, max_q=4096, max_k=4000)
    B, total_q, total_k, max_k = prefill["B"], prefill["total_q"], prefill["total_k"], prefill["max_k"]
    aligned = lambda n: -(-n // 256) * 256  # noqa: E731
    window = (-1, 0) if causal else (-1, -1)
    extent = -(-(total_k + 32 * (B + 1) + 128) // 32) * 32
    slots = (aligned(4 * B) + aligned(4 * extent) + aligned(4 * Hb * extent)
             + (aligned(16 * B * -(-prefill["max_q"] // 128)) if causal else 0))
    flags = _v_flags_bytes(prefill["Hk"], total_k)
    key = planner(**prefill, mask=KEY, Hm=Hm, bias=KEY, Hb=Hb, window=window)
    assert key["sm90a"] and key["sm90a_slots"] and not key["sm90a_query"] and not key["slots_in_place"]
    assert key["key_lists_heads"] == Hm and key["sm90a_ctas"] == 132
    d128 = planner(**dict(prefill, D=128), mask=KEY, Hm=Hm, bias=KEY, Hb=Hb, window=window)
    assert d128["sm90a_slots"] and key["workspace"] - d128["workspace"] == 2 * total_k * max(8, Hm) * 128 * 2
    query = planner(**prefill, mask=QUERY, Hm=Hm, bias=KEY, Hb=Hb, window=window)
    assert query["sm90a"] and query["sm90a_query"] and query["sm90a_slots"] and query["key_lists_heads"] == 0
    assert query["slots_in_place"] and query["sm90a_ctas"] == 132
    state, bits = Hm * -(-total_q // 64) * -(-max_k // 32), Hm * total_q * -(-max_k // 128) * 4 * 4
    assert query["workspace"] == aligned(state) + aligned(bits) + flags + slots
    # the same workspace as D = 128's query-side mask beside a key-side bias (the slots know no head dim)
    assert query["workspace"] == planner(**dict(prefill, D=128), mask=QUERY, Hm=Hm, bias=KEY, Hb=Hb,
                                         window=window)["workspace"]
    # Past the cap: the key-side mask by sequence, the bias over slots in place
    big = PAST_THE_CAP_D256
    past = planner(**big, mask=KEY, Hm=Hm, bias=KEY, Hb=Hb, window=window)
    assert past["sm90a_query"] and past["sm90a_slots"] and past["slots_in_place"] and past["key_lists_heads"] == 0
    # Every call the sm80 kernels take keeps a key-side mask's lists: key ranges (the slots' limits know none),
    # windows of 128 keys or fewer, a mask finer than the KV heads over sequences of one query tile (decode-shaped;
    # the decode kernel takes Hm in {1, Hk} there), and past the cap a sequence past the tile list.
    longest = dict(prefill, total_k=140_000, max_k=131_073, total_q=1000, max_q=1000)
    for fallback in (planner(**prefill, mask=KEY, Hm=Hm, bias=KEY, Hb=Hb, key_range=True),
                     planner(**prefill, mask=KEY, Hm=Hm, bias=KEY, Hb=Hb, window=(127, 0))):
        assert not fallback["sm90a"] and fallback["key_lists_heads"] == Hm
    long_plan = planner(**longest, mask=KEY, Hm=Hm, bias=KEY, Hb=Hb)  # slots know no tile list; Hm = H is past the cap
    assert long_plan["sm90a_slots"] == (Hm != 32) and long_plan["key_lists_heads"] == Hm
    few = dict(B=16, H=32, Hk=8, D=256, total_q=64, total_k=65_536, max_q=4, max_k=4096)
    plan = planner(**few, mask=KEY, Hm=Hm, bias=KEY, Hb=Hb)
    if Hm == 32:  # finer than the KV heads: not the decode kernel's, and not the sm90a kernel's either
        assert plan["kernel"] == "prefill" and not plan["sm90a"] and plan["key_lists_heads"] == 32
    elif Hb != 32:  # mask and bias heads group whole KV groups: the decode kernel's
        assert plan["kernel"] == "decode"
    more = planner(**dict(few, total_q=3000, max_q=200), mask=KEY, Hm=Hm, bias=KEY, Hb=Hb)
    assert more["sm90a_slots"] and more["key_lists_heads"] == Hm and not more["slots_in_place"]


def test_every_operand_reaches_a_kernel_that_reads_it(planner):
    """Every mask and bias layout, head broadcast and bias dtype, beside key ranges, windows (narrow ones included),
    the DMATTN_SM90A_CTAS and DMATTN_KERNEL overrides, at D 64 / 128 / 256 and in prefill, one-query-tile,
    decode-shaped and long shapes: the plan reaches a kernel that reads each operand (sm90a/launch.cuh launch_fwd and
    sm80/launch.cuh launch_attention, which answer cudaErrorInvalidValue to a plan outside these rules): a key-side
    mask through kept-key lists (the sm80 kernels, or the sm90a kernel's gathered slots, at every head dim) or through
    its map and bits by sequence (the sm90a kernel's query-side variant: beside a query-side bias, or at D = 256
    where its kept rows are not gathered: key ranges, a copy past kMaxKeptRowBytes, DMATTN_KEY_MASK=map); on the sm90a
    kernel without a query-side bias, gathered wherever the slots take it unless DMATTN_KEY_MASK=map (then never); the
    plan the binding falls back to where a gathered copy cannot be allocated (key_mask_map_fallback) as well; a
    key-side bias over slots (in place where no lists are gathered) and never with key ranges; a query-side bias on
    the query-side variant, float32 only at D <= 128 (the one call sm90a/launch.cuh launch_attention's guard would
    send to the sm80 kernels); a query-side mask's map and bits there."""
    H, Hk = 8, 2
    shapes = [dict(B=4, total_q=4096, total_k=4096, max_q=1024, max_k=1024),
              dict(B=16, total_q=1600, total_k=32_000, max_q=100, max_k=2000),  # one query tile, not decode's
              dict(B=64, total_q=64, total_k=64 * 4096, max_q=1, max_k=4096),  # decode-shaped
              dict(B=2, total_q=2048, total_k=600_000, max_q=1024, max_k=300_000),  # past the tile list
              # within the tile list, kept rows past the cap at D = 256 for Hm = H (2 x 600,000 x 8 x 256 x 2 bytes)
              dict(B=8, total_q=4096, total_k=600_000, max_q=512, max_k=100_000)]
    calls = [dict(shape, H=H, Hk=Hk, D=D, mask=mask, Hm=Hm, bias=bias, Hb=Hb, bias_dtype=dtype, key_range=kr,
                  window=window, sm90a_ctas=ctas, force=force, key_mask_map=kmm)
             for D in (64, 128, 256) for shape in shapes
             for mask, Hm in ((ABSENT, 1), (KEY, 1), (KEY, Hk), (KEY, H), (QUERY, 1), (QUERY, Hk), (QUERY, H))
             for bias, Hb, dtype in ((ABSENT, 1, F32),) + tuple((b, h, t) for b in (KEY, QUERY) for h in (1, Hk, H)
                                                                for t in (F32, BF16))
             for kr in (False, True) for window in ((-1, -1), (-1, 0), (255, 0), (64, 0), (-1, 300))
             for ctas in (0, -1, 3) for force in (AUTO, FORCE_PREFILL) for kmm in (False, True)]
    plans = planner.many(calls)
    for call, plan in zip(calls, plans):
        D, mask, bias = call["D"], call["mask"], call["bias"]
        by_sequence = plan["sm90a_query"] and mask == KEY
        if mask == KEY:  # lists, or the map and bits by sequence (no lists: the sm80 kernels would refuse the call)
            assert (plan["key_lists_heads"] > 0) != by_sequence, (call, plan)
            # the mask's heads (the decode kernel's lists: the finer of the mask's and a query-side bias's)
            assert by_sequence or plan["key_lists_heads"] == call["Hm"] or plan["kernel"] == "decode", (call, plan)
            assert not by_sequence or plan["block_map_heads"] == call["Hm"], (call, plan)
            assert not by_sequence or D > 128 or bias == QUERY, (call, plan)  # the kernels that read by sequence
            # on the sm90a kernel without a query-side bias: its kept rows gathered wherever the slots take them
            if plan["sm90a"] and bias != QUERY:
                gathers = (not call["key_range"] and not call["key_mask_map"]
                           and 2 * call["total_k"] * max(Hk, call["Hm"]) * D * 2 <= 4 << 30)
                assert by_sequence != gathers, (call, plan)
                assert not gathers or (plan["sm90a_slots"] and not plan["slots_in_place"]), (call, plan)
        if plan["sm90a_query"] and mask == QUERY:
            assert plan["block_map_heads"] == call["Hm"], (call, plan)
        if not plan["sm90a"]:
            continue
        assert plan["kernel"] == "prefill", (call, plan)
        if bias == KEY:
            assert plan["sm90a_slots"] and not call["key_range"], (call, plan)
            assert plan["slots_in_place"] == (plan["key_lists_heads"] == 0), (call, plan)
        if bias == QUERY:
            assert plan["sm90a_query"] and not plan["sm90a_slots"], (call, plan)
            assert call["bias_dtype"] != F32 or D <= 128, (call, plan)
        if mask == ABSENT and bias == ABSENT:
            assert not plan["sm90a_slots"] and not plan["sm90a_query"], (call, plan)
    # The binding's fallback where a gathered copy cannot be allocated is the same call under DMATTN_KEY_MASK=map
    # (checked above with every operand): offered only for a plan that gathered a key-side mask's kept rows, and only
    # where the map runs on the sm90a kernel (so D = 256) in less workspace.
    by_call = {tuple(sorted((k, v) for k, v in c.items() if k != "key_mask_map")): p
               for c, p in zip(calls, plans) if c["key_mask_map"]}
    for call, plan in zip(calls, plans):
        if call["key_mask_map"]:
            assert not plan["oom_map"], (call, plan)
            continue
        gathered = call["mask"] == KEY and plan["sm90a_slots"] and not plan["slots_in_place"]
        assert not plan["oom_map"] or (gathered and call["D"] == 256), (call, plan)
        if gathered:
            flagged = by_call[tuple(sorted((k, v) for k, v in call.items() if k != "key_mask_map"))]
            assert plan["oom_map"] == (flagged["sm90a"] and flagged["workspace"] < plan["workspace"]), (call, plan)
            assert not plan["oom_map"] or (plan["oom_workspace"] == flagged["workspace"] and plan["oom_query"])
    assert any(plan["oom_map"] for plan in plans)  # the fallback is offered somewhere (D = 256)


def test_per_head_key_side_masks_keep_their_copies_within_the_cap(planner):
    """Lists finer than KV heads (Hm = H) each get a kept copy of their rows: H / Hk times a shared list's bytes. Past
    kMaxKeptRowBytes (4 GB) the call takes the sm80 kernels, which gather the kept rows where they are; at D = 256
    (rows twice as long, so half the keys fit) the sm90a kernel's map by sequence, within its tile list."""
    fits = dict(B=8, H=32, Hk=8, D=128, total_q=16_000, total_k=100_000, max_q=4096, max_k=20_000)
    assert 2 * 100_000 * 32 * 128 * 2 < 4 << 30
    assert planner(**fits, mask=KEY, Hm=32)["sm90a_slots"]
    big = dict(fits, total_k=300_000, max_k=60_000)
    assert 2 * 300_000 * 32 * 128 * 2 > 4 << 30 > 2 * 300_000 * 8 * 128 * 2
    assert not planner(**big, mask=KEY, Hm=32)["sm90a"]
    assert planner(**big, mask=KEY, Hm=8)["sm90a_slots"]  # a shared list's copy still fits
    # D = 256: 140,000 keys' per-head copies (4.6 GB) pass the cap, 120,000 keys' (3.9 GB) fit
    assert 2 * 140_000 * 32 * 256 * 2 > 4 << 30 > 2 * 120_000 * 32 * 256 * 2
    mapped = planner(**dict(fits, D=256, total_k=140_000), mask=KEY, Hm=32)
    assert mapped["sm90a_query"] and not mapped["sm90a_slots"] and mapped["key_lists_heads"] == 0
    assert planner(**dict(fits, D=256, total_k=140_000), mask=KEY, Hm=8)["sm90a_slots"]
    assert planner(**dict(fits, D=256, total_k=120_000), mask=KEY, Hm=32)["sm90a_slots"]


@pytest.mark.parametrize("D", [64, 256])
@pytest.mark.parametrize("max_q", [1, 8, 128, 129])
def test_per_head_copies_only_for_sequences_of_several_query_tiles(planner, max_q, D):
    """A list's copy is read by its one head's query tiles: with a single 128-row tile per sequence the copy costs
    more than it saves (and would allocate O(total_k x Hm x D) for a decode-shaped batch), so such calls read the kept
    rows in place on the sm80 kernels, at every head dim (D = 256 maps no such mask by sequence either). Shared lists
    (Hm <= Hk) keep their one copy per KV head whatever the rows."""
    shape = dict(B=1, H=8, Hk=2, D=D, total_q=max_q, total_k=50_000, max_q=max_q, max_k=50_000, force=FORCE_PREFILL)
    per_head = planner(**shape, mask=KEY, Hm=8)
    assert per_head["sm90a_slots"] == (max_q > 128)
    assert per_head["sm90a"] == (max_q > 128)
    assert planner(**shape, mask=KEY, Hm=2)["sm90a_slots"]


def _without_fallback(plan):
    return {k: v for k, v in plan.items() if not k.startswith("oom_")}


@pytest.mark.parametrize("D", [64, 128, 256])
@pytest.mark.parametrize("Hm", [1, 8, 32])
@pytest.mark.parametrize("Hb", [0, 1, 8, 32])
@pytest.mark.parametrize("key_range", [False, True])
def test_key_mask_map_flag_never_gathers_a_key_side_mask(planner, D, Hm, Hb, key_range):
    """PlanOverrides::key_mask_map (DMATTN_KEY_MASK=map; the binding's first fallback where the kept rows' copy cannot
    be allocated): a key-side mask's kept rows are never gathered into slots. At D = 256 the sm90a kernel maps the mask
    by sequence instead (its map, bits and v's flags, no lists; a key-side bias beside it over slots in place,
    persistent unless key ranges ask a CTA per unit), as it does past kMaxKeptRowBytes; beside key ranges and a
    key-side bias (which slots in place do not take) and at D <= 128 (whose kernels read a map by sequence only beside
    a query-side bias) the sm80 kernels over the mask's lists, as DMATTN_ARCH=sm80 gives."""
    bias = dict(bias=KEY, Hb=Hb) if Hb else {}
    call = dict(PREFILL, D=D, mask=KEY, Hm=Hm, key_range=key_range, **bias)
    flagged = planner(**call, key_mask_map=True)
    auto = planner(**call)
    B, Hk, total_k, max_k = PREFILL["B"], PREFILL["Hk"], PREFILL["total_k"], PREFILL["max_k"]
    assert flagged["kernel"] == "prefill" and not flagged["oom_map"]
    assert not (flagged["sm90a_slots"] and not flagged["slots_in_place"])  # nothing gathered
    if D == 256 and not (key_range and Hb):
        assert flagged["sm90a"] and flagged["sm90a_query"] and flagged["key_lists_heads"] == 0
        assert flagged["block_map_heads"] == Hm and flagged["sm90a_slots"] == flagged["slots_in_place"] == bool(Hb)
        assert flagged["sm90a_ctas"] == (0 if key_range else 132)
        if not Hb:
            assert flagged["workspace"] == _key_map_bytes(Hm, B, total_k, max_k) + _v_flags_bytes(Hk, total_k)
        # the same plan as where the copy is refused anyway: key ranges (DMATTN_KEY_MASK changes nothing there)
        if key_range:
            assert _without_fallback(flagged) == _without_fallback(auto)
        else:  # the auto plan gathers; where its copy cannot be allocated the binding takes the flagged plan first
            assert auto["sm90a_slots"] and not auto["sm90a_query"] and auto["key_lists_heads"] == Hm
            assert auto["oom_map"] and auto["oom_query"] and auto["oom_workspace"] == flagged["workspace"]
            assert flagged["workspace"] < auto["workspace"]
        # The query-side variant keeps its grid whatever DMATTN_SM90A_SCHED says; the gathered plan it replaces may be
        # on the dynamic scheduler (its unit counters in the workspace) or not, and falls back to it either way.
        assert not flagged["sm90a_dynamic"]
        for sched in ("dynamic", "static"):
            assert planner(**call, key_mask_map=True, sched=sched) == flagged
            assert key_range or planner(**call, sched=sched)["oom_workspace"] == flagged["workspace"]
    else:
        assert not flagged["sm90a"] and flagged["key_lists_heads"] == Hm
        assert not flagged["sm90a_query"] and flagged["block_map_heads"] == 0
        assert not auto["oom_map"]  # the binding's fallback stays the sm80 kernels
        if key_range:  # refused by the slots anyway: the flag changes nothing
            assert _without_fallback(flagged) == _without_fallback(auto)


@pytest.mark.parametrize("D", [64, 128, 256])
def test_key_mask_map_flag_leaves_other_calls_alone(planner, D):
    """The flag concerns a key-side mask alone: no mask, a query-side mask (beside any bias), a key-side bias alone, a
    key-side mask beside a query-side bias (mapped by sequence already), decode-shaped calls (the decode kernel's own
    gathers) and calls forced off the sm90a kernel plan as without it; no such plan gathers a copy, so the binding's
    fallback is the sm80 kernels (or none)."""
    bf16 = dict(bias_dtype=BF16)
    changes = [dict(), dict(window=(255, 0)), dict(bias=KEY, Hb=8), dict(bias=QUERY, Hb=8, **bf16),
               dict(mask=QUERY, Hm=8), dict(mask=QUERY, Hm=1, bias=KEY, Hb=32),
               dict(mask=QUERY, Hm=32, bias=QUERY, Hb=8, **bf16), dict(mask=KEY, Hm=8, bias=QUERY, Hb=8, **bf16),
               dict(mask=KEY, Hm=1, bias=QUERY, Hb=32, **bf16, key_range=True),
               dict(mask=KEY, Hm=8, window=(127, 0))]  # a narrow window: the sm80 kernels either way
    for change in changes:
        call = {**PREFILL, "D": D, **change}
        auto, flagged = planner(**call), planner(**call, key_mask_map=True)
        assert _without_fallback(auto) == _without_fallback(flagged), change
        assert not auto["oom_map"] and not flagged["oom_map"], change
    for Hm in (1, 8):  # decode-shaped: the decode kernel either way
        auto = planner(**dict(WORKLOAD, D=D), mask=KEY, Hm=Hm, bias=KEY, Hb=8)
        flagged = planner(**dict(WORKLOAD, D=D), mask=KEY, Hm=Hm, bias=KEY, Hb=8, key_mask_map=True)
        assert auto["kernel"] == "decode" and _without_fallback(auto) == _without_fallback(flagged)


def test_key_mask_map_fallback_needs_a_map_the_kernel_takes(planner):
    """The binding's fallback maps a D = 256 key-side mask only where sm90a_query_supports takes the map: over sequences
    of at most 131,072 keys (the kernel's tile list), not a mask finer than the KV heads over sequences of one query
    tile (the slots refuse that too); past the list the flag leaves the sm80 kernels and the fallback is theirs, as
    before."""
    longest = dict(B=8, H=32, Hk=8, D=256, total_q=1000, total_k=140_000, max_q=1000)
    for Hm in (1, 8):
        within = planner(**longest, max_k=131_072, mask=KEY, Hm=Hm)
        assert within["sm90a_slots"] and within["oom_map"] and within["oom_query"]
        past = planner(**longest, max_k=131_073, mask=KEY, Hm=Hm)
        assert past["sm90a_slots"] and not past["oom_map"]  # the slots have no tile list; the map does
        assert not planner(**longest, max_k=131_073, mask=KEY, Hm=Hm, key_mask_map=True)["sm90a"]
    few = dict(B=16, H=32, Hk=8, D=256, total_q=64, total_k=65_536, max_q=4, max_k=4096)
    for key_mask_map in (False, True):
        plan = planner(**few, mask=KEY, Hm=32, key_mask_map=key_mask_map)
        assert not plan["sm90a"] and plan["key_lists_heads"] == 32 and not plan["oom_map"]


_CTA_ORDER_DRIVER = """
    #include <cstdio>

    #include "cuda/bwd/bwd_params.h"
    using namespace dmattn;
    // stdin per call: B Hk total_k max_k sms
    // stdout: units(...), bytes and pays(units, sms), then where units > 0 each unit's coordinates (coords: hk b tile)
    int main() {
      long long B, Hk, tk, mk, sms;
      while (std::scanf("%lld %lld %lld %lld %lld", &B, &Hk, &tk, &mk, &sms) == 5) {
        VarlenFwdParams p;
        p.batch = static_cast<int32_t>(B); p.num_heads_k = static_cast<int32_t>(Hk);
        p.total_k = tk; p.max_seqlen_k = mk;
        const int64_t units = cuda::bwd::CtaOrder::units(p);
        std::printf("%lld %lld %d", static_cast<long long>(units), static_cast<long long>(cuda::bwd::CtaOrder::bytes(p)),
                    static_cast<int>(cuda::bwd::CtaOrder::pays(units, sms)));
        for (int u = 0; u < units; ++u) {
          int hk, b, tile;
          cuda::bwd::CtaOrder::coords(p, u, hk, b, tile);
          std::printf(" %d %d %d", hk, b, tile);
        }
        std::printf("\\n");
      }
    }
    """


def test_sm90a_backward_cta_order_is_sized_from_host_ints(tmp_path):
    """bwd::CtaOrder (csrc/cuda/bwd/bwd_params.h): the sm90a backward's ordered units, one per (sequence, KV head, key
    tile of 128 slots) over the longest key range a clamped sequence can have (min(max_seqlen_k, total_k)), an int32
    each in the backward's order array; 0 (the grid's order) past 16,384 units or with nothing to run. coords is the
    inverse of u = (tile B + b) Hk + hk: every unit once, inside the grid the kernel would otherwise launch. The
    binding orders only calls of more units than the device's SMs (pays: one CTA per SM, so one wave starts them all
    at once and the order pass would be a launch for nothing)."""
    exe = build_host_driver(tmp_path, _CTA_ORDER_DRIVER, "cta_order", "bwd_params.h")
    calls = [  # (B, Hk, total_k, max_k, SMs, expected units, ordered)
        (8, 8, 16_056, 3865, 132, 8 * 8 * 31, True),  # the prefill bench batch: 1,984 CTAs
        (3, 2, 500, 10**12, 132, 3 * 2 * 4, False),  # max_seqlen_k past total_k: total_k's tiles; one wave
        (5, 1, 129, 128, 4, 5, True),
        (5, 1, 129, 129, 10, 10, False),  # exactly one wave
        (11, 1, 129, 129, 10, 22, True),
        (12, 2, 8_000, 1500, 132, 12 * 2 * 12, True),  # tests/test_backward.py's order batch
        (5, 2, 1_100, 700, 132, 5 * 2 * 6, False),  # and its one-wave batch
        (1, 8, 2048 * 128, 2048 * 128, 132, 16_384, True),  # exactly the cap
        (1, 8, 2048 * 128 + 1, 2048 * 128 + 1, 132, 0, False),  # one tile past it
        (16_385, 1, 16_385, 1, 132, 0, False),  # more (sequence, KV head) pairs than the cap
        (70_000, 4, 10**6, 2**31 - 1, 132, 0, False),  # past the grid's y limit: the grid order's chunks
        (0, 8, 100, 100, 0, 0, False), (4, 8, 0, 100, 0, 0, False), (4, 8, 100, 0, 0, 0, False),
    ]
    stdin = "".join(f"{B} {Hk} {tk} {mk} {sms}\n" for B, Hk, tk, mk, sms, _, _ in calls)
    out = subprocess.run([str(exe)], input=stdin, capture_output=True, text=True, check=True).stdout.splitlines()
    assert len(out) == len(calls)
    for (B, Hk, tk, mk, sms, expected, ordered), line in zip(calls, out):
        values = [int(x) for x in line.split()]
        units, nbytes, pays, coords = values[0], values[1], values[2], values[3:]
        assert (units, nbytes, pays) == (expected, 4 * expected, int(ordered)), (B, Hk, tk, mk, sms)
        tiles = -(-min(tk, mk) // 128)
        seen = set()
        for u in range(units):
            hk, b, tile = coords[3 * u: 3 * u + 3]
            assert 0 <= hk < Hk and 0 <= b < B and 0 <= tile < tiles
            assert (tile * B + b) * Hk + hk == u
            seen.add((hk, b, tile))
        assert len(seen) == units


_CTA_RUNS_DRIVER = """
    #include <cstdio>

    #include "cuda/bwd/bwd_params.h"
    using namespace dmattn;
    // stdin per call: units pairs band; stdout: runs, then per run its width and units
    int main() {
      int units, pairs, band;
      while (std::scanf("%d %d %d", &units, &pairs, &band) == 3) {
        const int runs = cuda::bwd::CtaOrder::runs(units, pairs, band);
        std::printf("%d", runs);
        for (int r = 0; r < runs; ++r) {
          const int width = cuda::bwd::CtaOrder::run_width(r, units, pairs, band);
          std::printf(" %d", width);
          for (int k = 0; k < width; ++k) std::printf(" %d", cuda::bwd::CtaOrder::run_unit(r, k, pairs, band));
        }
        std::printf("\\n");
      }
    }
    """


def test_sm90a_backward_cta_bands_cover_every_unit_once(tmp_path):
    """bwd::CtaOrder's runs (DMATTN_BWD_ORDER=banded, run_varlen_bwd.cu's order pass): each run holds 1 to `band`
    consecutive key tiles of one (sequence, KV head) pair in tile order, and the runs together hold every unit
    u = tile pairs + pair exactly once; band 1 is one run per unit (the longest-first order)."""
    exe = build_host_driver(tmp_path, _CTA_RUNS_DRIVER, "cta_runs", "bwd_params.h")
    calls = [(8 * 8 * 31, 64, 8), (8 * 8 * 31, 64, 1), (12 * 2 * 12, 24, 8), (12 * 2 * 12, 24, 16),
             (12 * 2 * 12, 24, 5), (5, 5, 4), (16_384, 8, 64), (16_384, 16_384, 2)]
    stdin = "".join(f"{u} {p} {b}\n" for u, p, b in calls)
    out = subprocess.run([str(exe)], input=stdin, capture_output=True, text=True, check=True).stdout.splitlines()
    assert len(out) == len(calls)
    for (units, pairs, band), line in zip(calls, out):
        values = [int(x) for x in line.split()]
        runs, at, seen = values[0], 1, []
        tiles = units // pairs
        assert runs == -(-tiles // band) * pairs
        for r in range(runs):
            width = values[at]
            members = values[at + 1: at + 1 + width]
            at += 1 + width
            assert 1 <= width <= band
            first = r // pairs * band
            assert members == [(first + k) * pairs + r % pairs for k in range(width)]
            seen += members
        assert at == len(values)
        assert sorted(seen) == list(range(units)), (units, pairs, band)


_ROW_STATS_DRIVER = """
    #include <cstdio>

    #include "cuda/bwd/bwd_params.h"
    using dmattn::cuda::bwd::RowStatsTma;
    // stdin per call: key_range H total_q; stdout: RowStatsTma::fits, stride(total_q)
    // then per line of "row": window_start(row) window_offset(row)
    int main() {
      long long kr, h, tq;
      while (std::scanf("%lld %lld %lld", &kr, &h, &tq) == 3 && kr >= 0) {
        std::printf("%d %lld\\n", static_cast<int>(RowStatsTma::fits(kr != 0, h, tq)),
                    static_cast<long long>(RowStatsTma::stride(tq)));
      }
      long long row;
      while (std::scanf("%lld", &row) == 1) {
        std::printf("%lld %d\\n", static_cast<long long>(RowStatsTma::window_start(row)),
                    RowStatsTma::window_offset(row));
      }
    }
    """


def test_sm90a_backward_row_stats_windows(tmp_path):
    """bwd::RowStatsTma (csrc/cuda/bwd/bwd_params.h): the sm90a backward bulk-copies lse2 and delta (delta_kernel's
    padded copy, a row of stride(total_q) floats per head) wherever the call has no per-row key ranges. A copy is
    kWindow = 68 floats (272 bytes, a multiple of 16) from the 16-byte boundary at or below the tile's first row: for
    every first row < total_q the window starts 16-byte aligned and ends inside its head's row, and holds the tile's 64
    rows from its offset on."""
    exe = build_host_driver(tmp_path, _ROW_STATS_DRIVER, "row_stats", "bwd_params.h")
    calls = [(0, 32, 16_056, True), (1, 32, 16_056, False), (0, 1, 1, True), (0, 0, 100, False), (0, 4, 0, False),
             (0, 65_535, 2**31 - 2, True)]  # int64 offsets: the bound on total_q is the binding's (int32 rows)
    total_qs = [1, 2, 3, 4, 5, 63, 64, 65, 494, 999, 16_056]
    lines = [f"{kr} {h} {tq}" for kr, h, tq, _ in calls] + [f"0 1 {tq}" for tq in total_qs] + ["-1 0 0"]
    rows = sorted(set(range(1100)) | {tq - 1 for tq in total_qs})
    stdin = "\n".join(lines + [str(r) for r in rows]) + "\n"
    out = subprocess.run([str(exe)], input=stdin, capture_output=True, text=True, check=True).stdout.splitlines()
    head = [line.split() for line in out[: len(calls) + len(total_qs)]]
    assert [bool(int(f)) for f, _ in head[: len(calls)]] == [c[-1] for c in calls]
    stride = {tq: int(x) for tq, (_, x) in zip(total_qs, head[len(calls):])}
    window = dict(zip(rows, (tuple(int(v) for v in line.split()) for line in out[len(calls) + len(total_qs):])))
    assert len(window) == len(rows)
    for tq, st in stride.items():
        assert st % 4 == 0  # each head's row starts 16-byte aligned
        for row in (r for r in rows if r < tq):
            start, offset = window[row]
            assert start % 4 == 0 and start + offset == row and offset < 4
            assert start + 68 <= st  # the 68-float window (the tile's 64 rows from its offset) inside the head's row


_DQ_TILES_DRIVER = """
    #include <cstdio>

    #include "cuda/bwd/bwd_params.h"
    using dmattn::cuda::bwd::DqTiles;
    // stdout: for rows 0..3, the position of each column and the column at each position; then offset() of a few rows
    int main() {
      for (int row = 0; row < 4; ++row) {
        for (int c = 0; c < DqTiles::kCols; ++c) std::printf("%d ", DqTiles::position(c, row));
        for (int i = 0; i < DqTiles::kCols; ++i) std::printf("%d ", DqTiles::column(i, row));
        std::printf("\\n");
      }
      std::printf("%lld %lld %lld\\n", static_cast<long long>(DqTiles::offset(0, 0, 1, 2, 100)),
                  static_cast<long long>(DqTiles::offset(3, 1, 7, 2, 100)),
                  static_cast<long long>(DqTiles::offset(31, 1, (1ll << 31) - 2, 2, (1ll << 31) - 1)));
    }
    """


def test_sm90a_backward_dq_tiles_layout(tmp_path):
    """bwd::DqTiles (csrc/cuda/bwd/bwd_params.h): the sm90a backward's dq_accum rows in tiles. Inside a row, position
    and column are inverse permutations of its 64 floats (dq_convert undoes what the consumers store); a consumer
    thread's chunk j (quad lane t: columns 16 j + 2 t, + 1, 16 j + 8 + 2 t, + 1) is 4 consecutive floats from a 16-byte
    boundary (one st.shared.v4); the 8 lanes of each quarter-warp (rows g = 2 k, 2 k + 1, t < 4) of each such store hit
    8 different 16-byte bank groups whatever the tile's first row (no bank conflict, no padding); rows of a (head,
    column block) are contiguous, past int32 offsets too."""
    exe = build_host_driver(tmp_path, _DQ_TILES_DRIVER, "dq_tiles", "bwd_params.h")
    lines = subprocess.run([str(exe)], capture_output=True, text=True, check=True).stdout.splitlines()
    assert len(lines) == 5
    position, column = {}, {}
    for row, line in enumerate(lines[:4]):
        values = [int(x) for x in line.split()]
        position[row], column[row] = values[:64], values[64:]
        assert sorted(position[row]) == list(range(64))
        assert all(column[row][position[row][c]] == c for c in range(64))
    assert position[0] == position[2] and position[1] == position[3]  # the row's parity only
    for row in range(4):
        for t in range(4):
            for j in range(4):
                first = position[row][16 * j + 2 * t]
                cols = (16 * j + 2 * t, 16 * j + 2 * t + 1, 16 * j + 8 + 2 * t, 16 * j + 8 + 2 * t + 1)
                assert first % 4 == 0 and [position[row][c] for c in cols] == [first + i for i in range(4)]
    for m0 in range(2):  # the tile's first row's parity
        for j in range(4):
            for half in range(2):
                for k in range(4):  # quarter-warp k: lanes 8 k .. 8 k + 7
                    groups = set()
                    for lane in range(8 * k, 8 * k + 8):
                        g, t = lane // 4, lane % 4
                        r = g + 8 * half  # warp 0's rows; other warps add 16 rows (4 KiB: the same banks)
                        byte = r * 256 + 4 * position[(m0 + r) % 2][16 * j + 2 * t]
                        groups.add(byte % 128 // 16)
                    assert len(groups) == 8, (m0, j, half, k)
    assert [int(x) for x in lines[4].split()] == [64, ((3 * 2 + 1) * 100 + 7) * 64,
                                                   ((31 * 2 + 1) * (2**31 - 1) + 2**31 - 2) * 64]
