// varlen_fwd_cuda.cpp: registers the CUDA kernels of dmattn::varlen_fwd.
//
// Validates once (tensors_to_params.cpp: the same shape / dtype / device rules as the CPU path; no cu_seqlens data
// checks on the host, which would need a device sync: the kernels clamp lying cu_seqlens to the tensor extents and
// return NaN everywhere when they break the contract, see unowned_rows.cu), prepares q / k / v for the kernels
// (zero-padded to a compiled head dim, 16-byte aligned rows), allocates out, lse and the one workspace the call
// needs through torch, and runs everything on the current stream (api.h). Which kernels run and what their scratch
// holds is decided below api.h.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <limits>
#include <mutex>
#include <string>
#include <string_view>

#include "../blockwise_bwd.h"
#include "../env_choice.h"
#include "../tensors_to_params.h"
#include "api.h"

namespace dmattn {
namespace {

constexpr const char* kOp = "dmattn.varlen_fwd: ";
constexpr int64_t kMaxGridDim = 65535;  // query heads are a grid dimension

// Compute capability and SM count of a device: three attribute queries the first time, then a cached word (the
// decode hot path pays no driver call for them).
cuda::DeviceInfo device_info(int device) {
  constexpr int kCachedDevices = 64;
  static std::atomic<int64_t> cache[kCachedDevices];  // (cc << 32) | sm_count; 0: not queried yet
  if (device >= 0 && device < kCachedDevices) {
    if (const int64_t word = cache[device].load(std::memory_order_relaxed); word != 0) {
      return {static_cast<int32_t>(word >> 32), static_cast<int32_t>(word & 0xffffffff)};
    }
  }
  int major = 0, minor = 0, sms = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  const cuda::DeviceInfo info{major * 10 + minor, sms};
  if (device >= 0 && device < kCachedDevices) {
    cache[device].store((static_cast<int64_t>(info.cc) << 32) | static_cast<uint32_t>(info.sm_count),
                        std::memory_order_relaxed);
  }
  return info;
}

// DMATTN_ARCH=sm80: the sm80 kernels even where the sm90a ones could run, forward and backward (auto: the plan's).
// op names the caller in the error a bad value gets.
bool sm80_forced(const char* op) { return env_choice(op, "DMATTN_ARCH", {"auto", "sm80"}) == "sm80"; }

// The documented debug overrides of the plan (README, "Debug variables"), read per call so a test can switch them:
//   DMATTN_KERNEL=prefill|decode          force a kernel (decode only where it can run: Hm in {1, Hk}, no
//                                         query-side operands; elsewhere the prefill kernel runs)
//   DMATTN_DECODE_TILES_PER_SPLIT=N       the decode kernel's KV tiles (64 keys each) per split
//   DMATTN_ARCH=sm80                      the sm80 kernels even where the sm90a one could run (auto: the plan's)
//   DMATTN_SM90A_CTAS=N                   the sm90a kernel wherever it can run (narrow windows too), persistent on
//                                         N CTAs (calls with key ranges excepted); 0: a CTA per work unit
//   DMATTN_SM90A_SCHED=auto|dynamic|static  dynamic: the sm90a kernel's plain, windowed and key-side (kSlots)
//                                         variants (not the query-side one, nor key ranges) persistent, one CTA per
//                                         SM (or DMATTN_SM90A_CTAS), each taking its next unit from a counter,
//                                         longest first within L2 sections (windows: a section a sequence); static:
//                                         the plan's grids (a CTA per unit for the plain kernel); auto, the default:
//                                         dynamic but where D = 256 would otherwise take a CTA per unit
//   DMATTN_SM90A_SECTION_MB=N             the dynamic scheduler's sections: a sequence's heads whose K / V take at
//                                         most N MB (default 8; at least one KV head)
//   DMATTN_DECODE_COMBINE=launch          the decode kernel's split combine as a launch of its own even where the
//                                         kernel could merge its own splits (the same bits; auto: the plan's)
//   DMATTN_KEY_COMPACTION=chunks          key-side lists longer than one part compacted by the chunk kernel (a
//                                         thread's 8 consecutive keys, parts of 2048) instead of the warps' (the same
//                                         lists; auto: the warps')
//   DMATTN_KEY_MASK=map                   a key-side mask's kept rows never gathered into slots: mapped by
//                                         sequence on the sm90a kernel where it can (D = 256, or beside a
//                                         query-side bias), else the sm80 kernels (auto: the plan's)
//   DMATTN_DEPENDENT_LAUNCH=off           the decode call's order pass and kernel launched as ordinary launches, not
//                                         as programmatic dependents of the launch before each (auto: on cc >= 9.0)
//   DMATTN_LOG_PLAN=1                     print each call's plan to stderr
cuda::PlanOverrides plan_overrides() {
  cuda::PlanOverrides o;
  const std::string kernel = env_choice(kOp, "DMATTN_KERNEL", {"auto", "prefill", "decode"});
  o.kernel = kernel == "prefill"  ? cuda::PlanOverrides::Kernel::kPrefill
             : kernel == "decode" ? cuda::PlanOverrides::Kernel::kDecode
                                  : cuda::PlanOverrides::Kernel::kAuto;
  o.sm80_only = sm80_forced(kOp);
  o.combine_launch = env_choice(kOp, "DMATTN_DECODE_COMBINE", {"auto", "launch"}) == "launch";
  o.compaction_chunks = env_choice(kOp, "DMATTN_KEY_COMPACTION", {"auto", "chunks"}) == "chunks";
  o.key_mask_map = env_choice(kOp, "DMATTN_KEY_MASK", {"auto", "map"}) == "map";
  o.no_dependent_launch = env_choice(kOp, "DMATTN_DEPENDENT_LAUNCH", {"auto", "off"}) == "off";
  if (const char* tiles = std::getenv("DMATTN_DECODE_TILES_PER_SPLIT"); tiles != nullptr && *tiles != '\0') {
    char* end = nullptr;
    const long n = std::strtol(tiles, &end, 10);
    TORCH_CHECK_VALUE(*end == '\0' && n > 0 && n <= INT32_MAX, kOp,
                      "the environment variable DMATTN_DECODE_TILES_PER_SPLIT must be a positive integer, got '",
                      tiles, "'");
    o.tiles_per_split = static_cast<int32_t>(n);
  }
  if (const char* ctas = std::getenv("DMATTN_SM90A_CTAS"); ctas != nullptr && *ctas != '\0') {
    char* end = nullptr;
    const long n = std::strtol(ctas, &end, 10);
    TORCH_CHECK_VALUE(*end == '\0' && n >= 0 && n <= 65535, kOp,
                      "the environment variable DMATTN_SM90A_CTAS must be an integer in [0, 65535], got '", ctas,
                      "'");
    o.sm90a_ctas = n > 0 ? static_cast<int32_t>(n) : -1;
  }
  const std::string sched = env_choice(kOp, "DMATTN_SM90A_SCHED", {"auto", "dynamic", "static"});
  o.sm90a_sched = sched == "dynamic"  ? cuda::PlanOverrides::Sched::kDynamic
                  : sched == "static" ? cuda::PlanOverrides::Sched::kStatic
                                      : cuda::PlanOverrides::Sched::kAuto;
  o.sm90a_wide = env_choice(kOp, "DMATTN_SM90A_WIDE", {"auto", "off"}) == "off" ? cuda::PlanOverrides::Wide::kOff
                                                                                : cuda::PlanOverrides::Wide::kAuto;
  if (const char* mb = std::getenv("DMATTN_SM90A_SECTION_MB"); mb != nullptr && *mb != '\0') {
    char* end = nullptr;
    const long n = std::strtol(mb, &end, 10);
    TORCH_CHECK_VALUE(*end == '\0' && n > 0 && n <= 1024, kOp,
                      "the environment variable DMATTN_SM90A_SECTION_MB must be an integer in [1, 1024], got '", mb,
                      "'");
    o.sm90a_section_bytes = static_cast<int64_t>(n) << 20;
  }
  return o;
}

// DMATTN_LOG_PLAN: set, not empty and not 0.
bool log_plan_requested() {
  const char* flag = std::getenv("DMATTN_LOG_PLAN");
  return flag != nullptr && *flag != '\0' && std::string(flag) != "0";
}

void log_plan(const cuda::FwdPlan& plan, const VarlenFwdParams& p) {
  if (!log_plan_requested()) return;
  if (plan.kernel == cuda::FwdKernel::kDecode) {
    std::fprintf(stderr, "dmattn.varlen_fwd plan: kernel=decode row_tiles=%d splits=%d tiles_per_split=%d key_lists_heads=%d compact_by_warps=%d query_terms=%d unit_order=%d combine_finishes=%d combine_in_kernel=%d dependent_launch=%d (B=%d H=%d Hk=%d D=%d max_seqlen_q=%lld max_seqlen_k=%lld)\n",
                 plan.row_tiles, plan.num_splits, plan.tiles_per_split, plan.key_lists_heads,
                 static_cast<int>(plan.compact_by_warps),
                 static_cast<int>(plan.query_terms), static_cast<int>(plan.unit_order),
                 static_cast<int>(plan.combine_finishes), static_cast<int>(plan.combine_in_kernel),
                 static_cast<int>(plan.dependent_launch), p.batch,
                 p.num_heads, p.num_heads_k, p.head_dim, static_cast<long long>(p.max_seqlen_q),
                 static_cast<long long>(p.max_seqlen_k));
  } else {
    static const char* const kVariants[] = {"plain", "windowed", "query_operands"};  // cuda::PrefillVariant
    std::fprintf(stderr, "dmattn.varlen_fwd plan: kernel=prefill variant=%s key_lists_heads=%d compact_by_warps=%d block_map_heads=%d sm90a=%d sm90a_slots=%d sm90a_query=%d sm90a_ctas=%d sm90a_sched=%s slots_in_place=%d sm90a_wide=%d (B=%d H=%d Hk=%d D=%d max_seqlen_q=%lld max_seqlen_k=%lld)\n",
                 kVariants[static_cast<int>(plan.prefill)], plan.key_lists_heads,
                 static_cast<int>(plan.compact_by_warps), plan.block_map_heads,
                 static_cast<int>(plan.sm90a), static_cast<int>(plan.sm90a_slots),
                 static_cast<int>(plan.sm90a_query), plan.sm90a_ctas, plan.sm90a_dynamic ? "dynamic" : "static",
                 static_cast<int>(plan.slots_in_place), static_cast<int>(plan.sm90a_wide), p.batch,
                 p.num_heads, p.num_heads_k, p.head_dim, static_cast<long long>(p.max_seqlen_q),
                 static_cast<long long>(p.max_seqlen_k));
  }
}

#if DMATTN_UNIT_STAMPS
// The measuring build (DMATTN_UNIT_STAMPS=1 at build time; sm90a/unit_stamps.cuh): every call the sm90a forward kernel
// runs writes its units' records into a zeroed buffer of its own, kept as the last call's (per process) for
// torch.ops.dmattn.unit_stamps() to return (tools/unit_stamps.py). Calls whose records would pass 256 MB write none.
std::mutex unit_stamps_mutex;
at::Tensor* last_unit_stamps = new at::Tensor();  // never freed: no CUDA free at process exit

void record_unit_stamps(const cuda::FwdPlan& plan, const VarlenFwdParams& p, const at::Tensor& q) {
  constexpr int64_t kMaxWords = int64_t{1} << 25;
  const int64_t words = cuda::unit_stamp_words(p);
  at::Tensor records;
  if (plan.sm90a && plan.kernel == cuda::FwdKernel::kPrefill && words > 0 && words <= kMaxWords) {
    records = at::zeros({words / cuda::kUnitStampWords, cuda::kUnitStampWords}, q.options().dtype(at::kLong));
    cuda::set_unit_stamps(reinterpret_cast<unsigned long long*>(records.data_ptr<int64_t>()));
  }
  const std::lock_guard<std::mutex> lock(unit_stamps_mutex);
  *last_unit_stamps = records;
}

// The last sm90a forward call's records, (sequences * H * query tiles * 2, kUnitStampWords) int64 (unit_stamps.cuh),
// or an empty tensor.
at::Tensor unit_stamps() {
  const std::lock_guard<std::mutex> lock(unit_stamps_mutex);
  return last_unit_stamps->defined() ? *last_unit_stamps : at::empty({0, cuda::kUnitStampWords}, at::kLong);
}
#endif

// cp.async moves 16-byte chunks: the base and the token / head strides must keep every row 16-byte aligned.
bool rows_aligned(const at::Tensor& t) {
  const int64_t vec = 16 / t.element_size();
  return reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0 && t.stride(0) % vec == 0 && t.stride(1) % vec == 0;
}

// q / k / v (and the backward's out / dout) as the kernels read them: the head dim zero-padded to a compiled one
// (zero columns add nothing to any q . k, and the padded output columns are dropped), or a contiguous copy of a view
// whose rows are not 16-byte aligned or whose D elements are not adjacent (check_args requires that of q / k / v; a
// dout need not have it: autograd's gradient of out.sum() is an expanded view, every stride 0, one element).
at::Tensor for_kernel(const at::Tensor& t, int64_t head_dim) {
  if (t.size(2) != head_dim) return at::constant_pad_nd(t, {0, head_dim - t.size(2)}, 0);
  if (t.numel() > 0 && (!rows_aligned(t) || (t.size(2) > 1 && t.stride(2) != 1))) {
    return at::empty_like(t, at::MemoryFormat::Contiguous).copy_(t);
  }
  return t;
}

std::tuple<at::Tensor, at::Tensor> varlen_fwd_cuda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                   const at::Tensor& cu_seqlens_q, const at::Tensor& cu_seqlens_k,
                                                   int64_t max_seqlen_q, int64_t max_seqlen_k,
                                                   const std::optional<at::Tensor>& mask,
                                                   const std::optional<at::Tensor>& bias,
                                                   std::optional<double> softmax_scale, bool is_causal,
                                                   int64_t window_left, int64_t window_right,
                                                   std::optional<double> softcap_arg,
                                                   const std::optional<at::Tensor>& sinks,
                                                   const std::optional<at::Tensor>& seqused_k,
                                                   const std::optional<at::Tensor>& kv_slots,
                                                   const std::optional<at::Tensor>& key_range) {
  const double softcap = softcap_arg.value_or(0.0);
  check_args({q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, mask, bias, softmax_scale, is_causal,
              window_left, window_right, softcap, sinks, seqused_k, kv_slots, key_range},
             c10::DeviceType::CUDA);
  TORCH_CHECK_TYPE(q.scalar_type() != at::kFloat, kOp,
                   "float32 q, k, v are not supported on CUDA (the kernels run float16 / bfloat16 tensor cores), "
                   "got q of dtype float32; convert q, k and v to float16 or bfloat16, or run on the CPU");
  TORCH_CHECK_VALUE(q.size(1) <= kMaxGridDim, kOp, "at most ", kMaxGridDim, " query heads on CUDA, got H = ",
                    q.size(1));

  const c10::cuda::CUDAGuard guard(q.device());
  const cuda::DeviceInfo device = device_info(q.get_device());
  const cuda::ComputeCapability cc = device.cc;
  const ScalarType dtype = q.scalar_type() == at::kHalf ? ScalarType::kFloat16 : ScalarType::kBFloat16;
  const int64_t head_dim = q.size(2);
  const int32_t kernel_dim =
      cuda::kernel_head_dim(cc, dtype, static_cast<int32_t>(std::min<int64_t>(head_dim, 1 << 20)));
  TORCH_CHECK_VALUE(kernel_dim > 0, kOp, "head_dim D must be at most ", cuda::max_kernel_head_dim(cc, dtype),
                    " on this GPU (sm_", cc, "; the largest head dim compiled for it), got ", head_dim);
  const double scale = resolve_softmax_scale(softmax_scale, head_dim);  // of the real D, not the padded one
  const at::Tensor qk = for_kernel(q, kernel_dim), kk = for_kernel(k, kernel_dim), vk = for_kernel(v, kernel_dim);
  const VarlenFwdArgs args = sinks_as_float32({qk, kk, vk, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                               mask, bias, scale, is_causal, window_left, window_right, softcap,
                                               sinks, seqused_k, kv_slots, key_range});
  auto [out, lse] = allocate_outputs(args);
  VarlenFwdParams p = make_params(args, out, lse);
  cuda::PlanOverrides overrides = plan_overrides();
  // The plan chooses the sm90a kernel's variants only where this build has them for (dtype, kernel_dim): a plan made
  // for them can drop what the sm80 kernels need (a key-side mask's kept-key lists beside a query-side bias).
  const char* path = cuda::attention_path(cc, dtype, kernel_dim);
  if (path == nullptr || std::string_view(path) != "sm90a") overrides.sm80_only = true;
  cuda::FwdPlan plan = cuda::plan_varlen_fwd(p, device, overrides);

  // The decode kernel reads a kv_slots pool in place; the prefill kernel reads packed keys, so for it the rows the
  // call names are gathered first (one copy of its keys and key-side operands; prefill is compute-bound).
  at::Tensor k_rows, v_rows;
  std::optional<at::Tensor> mask_rows, bias_rows;
  if (kv_slots && plan.kernel != cuda::FwdKernel::kDecode) {
    const at::Tensor slots = kv_slots->clamp(0, std::max<int64_t>(k.size(0) - 1, 0));  // lying slots, as the kernels
    auto rows = [&](const at::Tensor& t) { return t.index_select(0, slots); };
    auto key_side_rows = [&](const std::optional<at::Tensor>& op) -> std::optional<at::Tensor> {
      if (op && op->dim() == 2) return rows(*op);
      return op;
    };
    k_rows = rows(kk);
    v_rows = rows(vk);
    mask_rows = key_side_rows(mask);
    bias_rows = key_side_rows(bias);
    const VarlenFwdArgs packed = sinks_as_float32({qk, k_rows, v_rows, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                                                   max_seqlen_k, mask_rows, bias_rows, scale, is_causal, window_left,
                                                   window_right, softcap, sinks, seqused_k, std::nullopt,
                                                   key_range});
    p = make_params(packed, out, lse);
    plan = cuda::plan_varlen_fwd(p, device, overrides);
  }
  // A plan's workspace (undefined where it needs none): torch's caching allocator, 512-byte aligned, as
  // run_varlen_fwd needs (256).
  auto workspace_for = [&](const cuda::FwdPlan& of) {
    const size_t bytes = cuda::workspace_bytes(of, p);
    return bytes > 0 ? uninitialized({static_cast<int64_t>(bytes)}, q.options().dtype(at::kByte)) : at::Tensor();
  };
  at::Tensor workspace;
  try {
    workspace = workspace_for(plan);
  } catch (const c10::OutOfMemoryError&) {
    if (!plan.sm90a_slots && !plan.sm90a_query) throw;
    // The sm90a kernel's copy of the kept K / V rows (as large as k and v, or a copy per list) or a query-side
    // mask's bits (up to 1 GB) do not fit. First, where it exists, the plan that maps a key-side mask by sequence
    // instead of gathering its kept rows (D = 256: its map and bits, no copy; key_mask_map_fallback); if that
    // workspace does not fit either, the sm80 kernels, which gather the kept rows where they are, from a workspace
    // of the lists alone, and read a query-side mask where it is beside its block map. Nothing here runs unless
    // the first allocation failed, and nothing reads the device.
    bool placed = false;
    cuda::FwdPlan mapped;
    if (cuda::key_mask_map_fallback(p, device, overrides, plan, &mapped)) {
      try {
        workspace = workspace_for(mapped);
        plan = mapped;
        placed = true;
      } catch (const c10::OutOfMemoryError&) {
        // the map's workspace does not fit either: the sm80 kernels' below
      }
    }
    if (!placed) {
      cuda::PlanOverrides sm80 = overrides;
      sm80.sm80_only = true;
      plan = cuda::plan_varlen_fwd(p, device, sm80);
      workspace = workspace_for(plan);
    }
  }
  log_plan(plan, p);
#if DMATTN_UNIT_STAMPS
  record_unit_stamps(plan, p, q);
#endif
  C10_CUDA_CHECK(cuda::run_varlen_fwd(p, plan, cc, workspace.defined() ? workspace.data_ptr() : nullptr,
                                      c10::cuda::getCurrentCUDAStream()));

  if (kernel_dim != head_dim) out = out.narrow(2, 0, head_dim).contiguous();
  return {out, lse};
}

// How the fused backward sums dQ (DMATTN_BWD_DQ): `auto` (the default) by the sm90a backward's reduce-adds where it
// runs the call (sm90a_backward; run CA on the H200: 0.70x the sm80 pair's time on the masked prefill batch, 0.68x on
// the dense one), else like `ordered`; `ordered` by the sm80 path's own dQ kernel in a fixed order (deterministic; on
// the H200 as fast or faster than its atomics: run AK measured them 15% slower on the dense prefill batch, equal on
// the masked one); `atomic`: with float32 atomics inside the sm80 dK / dV kernel. Under torch's deterministic mode
// every call is summed in order (the variable is still checked).
std::string dq_summation() {
  const std::string chosen = env_choice("dmattn.varlen_bwd: ", "DMATTN_BWD_DQ", {"auto", "ordered", "atomic"});
  return at::globalContext().deterministicAlgorithms() ? "ordered" : chosen;
}

// Whether the sm90a backward (sm90a/bwd_kernel.cuh) runs a call of the fused backward: a device of cc 9.0 for which
// this build has it at the kernel's head dim (64 or 128: every head dim up to 128, padded), dQ summed as `auto`, and
// DMATTN_ARCH not sm80 (a key-side mask goes through kept-key lists where it has them, else it is read per key).
bool sm90a_backward(const VarlenFwdArgs& a, int32_t kernel_dim, cuda::ComputeCapability cc, const std::string& dq) {
  return !sm80_forced("dmattn.varlen_bwd: ") && dq == "auto" && a.q.size(0) < INT32_MAX &&
         cuda::has_backward_kernel(cc, a.q.scalar_type() == at::kHalf ? ScalarType::kFloat16 : ScalarType::kBFloat16,
                                   kernel_dim);
}

// The order of the sm90a backward's CTAs (DMATTN_BWD_ORDER), by an order pass over the call's (sequence, KV head, key
// tile) units (bwd::CtaOrder; calls of more units than it sorts, or of no more than the device's SMs, one wave that
// the order cannot change, keep the grid order): `banded` (the default) in bands of DMATTN_BWD_BAND key tiles of one
// (sequence, KV head), which read the same query rows, the bands longest first; `longest` each CTA longest first;
// `grid` the grid's own order (key tile slowest), for A/B timing. The gradients' bits are the same in all three but
// dQ's, whose reduce-adds run in an order that varies anyway. Returns the band: 0 grid, 1 longest.
int bwd_order_band() {
  const std::string order = env_choice("dmattn.varlen_bwd: ", "DMATTN_BWD_ORDER", {"banded", "longest", "grid"});
  if (order != "banded") return order == "longest" ? 1 : 0;
  // DMATTN_BWD_BAND: the band's key tiles (8, tools/model_bwd_l2_order.py's choice for the prefill batch), for A/B
  const std::string band = env_choice("dmattn.varlen_bwd: ", "DMATTN_BWD_BAND", {"8", "2", "4", "6", "12", "16"});
  return std::stoi(band);
}

// How the sm90a backward's CTAs walk their query tiles (DMATTN_BWD_WALK): `tile_major` (the default where the KV group
// has at most bwd::TileMajorWalk::kMaxGroup query heads) from the last tile down with the group's heads inside each
// tile, so that a band's CTAs read the same rows together; `head_major` head by head, for A/B timing (and the walk of
// bigger groups). dk, dv and the bias gradient are summed over the items in walk order, so their last bits differ
// between the two (each walk is deterministic).
bool bwd_walk_tile_major(int64_t heads, int64_t heads_k) {
  const bool tile = env_choice("dmattn.varlen_bwd: ", "DMATTN_BWD_WALK", {"tile_major", "head_major"}) == "tile_major";
  return tile && cuda::bwd::TileMajorWalk::fits(heads, heads_k);
}

// How the sm90a backward brings each query tile's lse and delta (DMATTN_BWD_ROW_STATS): `auto` (the default) by bulk
// copies on the Q / dO barrier where bwd::RowStatsTma fits the call (no per-row key ranges), from a padded copy that
// delta_kernel writes, else by its producer threads; `threads` by the threads always, for A/B timing. The
// gradients' bits are the same either way but dQ's (reduce-adds in a varying order).
bool bwd_row_stats_by_threads() {
  return env_choice("dmattn.varlen_bwd: ", "DMATTN_BWD_ROW_STATS", {"auto", "threads"}) == "threads";
}

// The L2 policy of the sm90a backward's query-tile traffic (DMATTN_BWD_L2): `evict_last` (the default) on its Q, dO,
// lse and delta loads and dq_accum's reduce-adds, which a KV head's key tiles read in turn; `normal` the default
// policy, for A/B timing. No gradient changes with it but dQ's last bits (reduce-adds in a varying order).
bool bwd_l2_evict_normal() {
  return env_choice("dmattn.varlen_bwd: ", "DMATTN_BWD_L2", {"evict_last", "normal"}) == "normal";
}

// How the sm90a backward adds its dQ (DMATTN_BWD_DQ_STORE): `tile` (the default) each consumer warpgroup's part of a
// query tile with one bulk reduce-add from a producer warp, into a float32 buffer in tiles (bwd::DqTiles, the same
// size as the rows' one), which a conversion pass scales into dq; `rows` one bulk reduce-add per row from the consumer
// threads into (total_q, H, D), converted by ATen, for A/B runs. dQ's bits may differ between the two and between
// runs of either (reduce-adds in a varying order; the scale applied before or after the sum).
bool bwd_dq_tiles() {
  return env_choice("dmattn.varlen_bwd: ", "DMATTN_BWD_DQ_STORE", {"tile", "rows"}) == "tile";
}

// Whether the fused backward walks kept-key lists (BwdParams::keys): a key-side mask whose heads the query heads of
// each KV group share (Hm divides Hk), so that one list serves a dkdv_kernel CTA's whole group.
bool bwd_key_lists(const VarlenFwdArgs& a) {
  return a.mask && a.mask->dim() == 2 && a.mask->size(1) > 0 && a.k.size(1) % a.mask->size(1) == 0;
}

// The fused backward (bwd/bwd_traits.h) for a call it covers: dq, dk, dv (q's dtype) and, for a key-side bias that
// requires grad, its gradient in the bias's layout, head broadcast and dtype; the sinks' gradient from the rows' lse
// and delta. Nothing here synchronises the device.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> fused_varlen_bwd(
    const VarlenFwdArgs& a, const at::Tensor& dout, const at::Tensor& dlse, const at::Tensor& out,
    const at::Tensor& lse, bool bias_grad, int32_t kernel_dim, bool sm90a, bool atomic_dq, int order_band,
    bool walk_tile_major, bool row_stats_threads, bool l2_evict_normal, bool dq_tiles) {
  const int64_t head_dim = a.q.size(2), H = a.q.size(1);
  const double scale = resolve_softmax_scale(a.softmax_scale, head_dim);  // of the real D, not the padded one
  // The sm90a backward reads q and dout by TMA, which needs the row and head strides positive (a view expanded over
  // rows or heads is copied).
  auto for_tma = [&](const at::Tensor& t) {
    return !sm90a || (t.stride(0) > 0 && t.stride(1) > 0) ? t : t.contiguous();
  };
  const at::Tensor qk = for_tma(for_kernel(a.q, kernel_dim)), kk = for_kernel(a.k, kernel_dim);
  const at::Tensor vk = for_kernel(a.v, kernel_dim), dok = for_tma(for_kernel(dout, kernel_dim));
  const VarlenFwdArgs args = sinks_as_float32({qk, kk, vk, a.cu_seqlens_q, a.cu_seqlens_k, a.max_seqlen_q,
                                               a.max_seqlen_k, a.mask, a.bias, scale, a.is_causal, a.window_left,
                                               a.window_right, a.softcap, a.sinks, a.seqused_k, std::nullopt,
                                               a.key_range});
  at::Tensor lse_in = lse.contiguous(), out_k = for_kernel(out, kernel_dim);
  const at::Tensor dlse_in = dlse.numel() > 0 ? dlse.contiguous() : dlse;
  const auto f32 = qk.options().dtype(at::kFloat);
  const at::Tensor delta = uninitialized({qk.size(1), qk.size(0)}, f32);  // (H, total_q): delta_kernel writes it
  // The sm90a backward's bulk-copied statistics (bwd::RowStatsTma): (2, H, stride) float32, lse2 and delta, written by
  // delta_kernel too; the padding past each head's last row is never written (its rows see nothing).
  const int64_t stats_stride = cuda::bwd::RowStatsTma::stride(qk.size(0));
  const at::Tensor row_stats = !row_stats_threads ? uninitialized({2, qk.size(1), stats_stride}, f32) : at::Tensor();
  // dQ's float32 buffer where dQ is added (atomic_dq): (total_q, H, D), zero-filled, converted into dq below; or with
  // dq_tiles (sm90a only) (H, D / 64, total_q, 64) in bwd::DqTiles' order, as many floats, from which run_varlen_bwd's
  // conversion pass writes every element of dq. Else dq itself, zero-filled (the sm80 pair's dq_kernel).
  at::Tensor dq_accum, dq;
  if (dq_tiles) {
    constexpr int64_t kCols = cuda::bwd::DqTiles::kCols;
    dq_accum = at::zeros({qk.size(1), kernel_dim / kCols, qk.size(0), kCols}, f32);
    // run_varlen_bwd runs nothing for a call of no sequence (cu_seqlens of one entry), the conversion pass included:
    // dq is then the zeros it would have written
    dq = a.cu_seqlens_q.size(0) > 1 ? uninitialized(qk.sizes(), qk.options()) : at::zeros(qk.sizes(), qk.options());
  } else if (atomic_dq) {
    dq_accum = at::zeros(qk.sizes(), f32);
  } else {
    dq = at::zeros_like(qk, at::MemoryFormat::Contiguous);
  }
  at::Tensor dk = at::zeros(kk.sizes(), qk.options()), dv = at::zeros(vk.sizes(), qk.options());
  const bool want_dbias = a.bias && bias_grad;
  at::Tensor dbias_heads = want_dbias ? at::zeros({kk.size(0), H}, f32) : at::Tensor();

  cuda::bwd::BwdParams p;
  p.f = make_params(args, out_k, lse_in);
  p.dout = dok.data_ptr();
  p.dout_row_stride = dok.stride(0);
  p.dout_head_stride = dok.stride(1);
  p.dlse = dlse_in.numel() > 0 ? dlse_in.data_ptr<float>() : nullptr;
  p.delta = delta.data_ptr<float>();
  if (row_stats.defined()) {
    p.row_stats = row_stats.data_ptr<float>();
    p.row_stats_stride = stats_stride;
  }
  p.dq = atomic_dq && !dq_tiles ? nullptr : dq.data_ptr();
  p.dq_accum = atomic_dq ? dq_accum.data_ptr<float>() : nullptr;
  p.dk = dk.data_ptr();
  p.dv = dv.data_ptr();
  p.dbias = want_dbias ? dbias_heads.data_ptr<float>() : nullptr;
  p.walk_tile_major = walk_tile_major;
  p.row_stats_threads = row_stats_threads;
  p.l2_evict_normal = l2_evict_normal;
  p.dq_tiles = dq_tiles;
  at::Tensor key_index, key_count;  // the kept-key lists, (Hm, total_k) and (B, Hm) int32, filled by compact_keys
  if (bwd_key_lists(a)) {
    const int64_t hm = a.mask->size(1);
    const auto i32 = qk.options().dtype(at::kInt);
    key_index = uninitialized({hm, kk.size(0)}, i32);
    key_count = uninitialized({p.f.batch, hm}, i32);
    p.keys.index = key_index.data_ptr<int32_t>();
    p.keys.count = key_count.data_ptr<int32_t>();
    p.keys.mask_heads = static_cast<int32_t>(hm);
    p.keys.heads_per_list = static_cast<int32_t>(H / hm);
  }
  at::Tensor cta_order;  // (units) int32: the sm90a backward's CTAs in launch order, written by its order pass
  if (const int64_t units = order_band > 0 ? cuda::bwd::CtaOrder::units(p.f) : 0; units > 0) {
    cta_order = uninitialized({units}, qk.options().dtype(at::kInt));
    p.cta_order = cta_order.data_ptr<int32_t>();
    p.order_band = order_band;
  }
  const cuda::ComputeCapability cc = device_info(qk.get_device()).cc;
  C10_CUDA_CHECK(cuda::run_varlen_bwd(p, cc, sm90a, c10::cuda::getCurrentCUDAStream()));
  if (atomic_dq && !dq_tiles) dq = dq_accum.to(qk.scalar_type());  // the kernels added dQ already scaled
  // (dq_tiles: run_varlen_bwd's conversion pass wrote dq)

  // The bias's gradient: query head h reads bias head h / (H / Hm), so each bias head sums a run of query heads.
  at::Tensor dbias = at::empty({0}, a.q.options().dtype(at::kFloat));
  if (want_dbias) {
    const int64_t hm = a.bias->size(1);
    dbias = dbias_heads.view({kk.size(0), hm, H / hm}).sum(-1).to(a.bias->scalar_type());
  }
  // The sinks' gradient: the sink is one more score with dP = 0, so d sink_h = -sum_i P_sink(i) delta_i over the
  // rows that saw something (lse finite), with P_sink = exp(sink_h - lse).
  at::Tensor dsinks = at::empty({0}, a.q.options().dtype(at::kFloat));
  if (a.sinks) {
    const at::Tensor sink = a.sinks->to(at::kFloat).view({H, 1});
    const at::Tensor live = lse_in != -std::numeric_limits<float>::infinity();
    const at::Tensor term = at::where(live, at::exp(sink - lse_in) * delta, at::zeros({}, lse_in.options()));
    dsinks = (-term.sum(1)).to(a.sinks->scalar_type());
  }
  auto real = [&](const at::Tensor& t) { return kernel_dim != head_dim ? t.narrow(2, 0, head_dim) : t; };
  return {real(dq), real(dk), real(dv), dbias, dsinks};
}

// The backward: the fused kernels where they cover the call (float16 / bfloat16, head dims up to 128, no query-side
// mask or bias, DMATTN_BWD not blockwise); elsewhere blockwise_varlen_bwd (ATen operations a block of query rows at a
// time, float32), which reads cu_seqlens on the host (a synchronisation) and clamps them as the forward does.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> varlen_bwd_cuda(
    const at::Tensor& dout, const at::Tensor& dlse, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& out, const at::Tensor& lse, const at::Tensor& cu_seqlens_q, const at::Tensor& cu_seqlens_k,
    int64_t max_seqlen_q, int64_t max_seqlen_k, const std::optional<at::Tensor>& mask,
    const std::optional<at::Tensor>& bias, std::optional<double> softmax_scale, bool is_causal, bool bias_grad,
    int64_t window_left, int64_t window_right, std::optional<double> softcap,
    const std::optional<at::Tensor>& sinks, const std::optional<at::Tensor>& seqused_k,
    const std::optional<at::Tensor>& key_range) {
  const VarlenFwdArgs args{q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, mask, bias,
                           softmax_scale, is_causal, window_left, window_right, softcap.value_or(0.0), sinks,
                           seqused_k, std::nullopt, key_range};
  check_args(args, c10::DeviceType::CUDA);
  check_bwd_args(args, dout, dlse, out, lse);
  const c10::cuda::CUDAGuard guard(q.device());
  const bool query_side = (mask && mask->dim() == 3) || (bias && bias->dim() == 3);
  const int32_t kernel_dim = cuda::bwd::bwd_head_dim(static_cast<int32_t>(std::min<int64_t>(q.size(2), 1 << 20)));
  const bool fused = q.scalar_type() != at::kFloat && !query_side && kernel_dim > 0 && q.size(1) <= kMaxGridDim &&
                     !blockwise_backward_requested();
  const std::string dq = fused ? dq_summation() : "blockwise";
  const bool key_lists = fused && bwd_key_lists(args);
  const bool sm90a = fused && sm90a_backward(args, kernel_dim, device_info(q.get_device()).cc, dq);
  // dQ in float32 by reduce-adds (sm90a) or atomics (sm80, `atomic`); `auto` off sm90a is `ordered`.
  const std::string dq_mode = sm90a ? "reduce_add" : dq == "auto" ? "ordered" : dq;
  // The sm90a backward's CTAs longest first where it runs, the units fit the order pass (max_seqlen_k as the params
  // clamp it: to total_k) and they are more than one wave on this device (CtaOrder::pays: host ints, no sync).
  const int64_t order_units =
      sm90a ? cuda::bwd::CtaOrder::units(cu_seqlens_q.size(0) - 1, k.size(1), k.size(0), max_seqlen_k) : 0;
  const int32_t sms = sm90a ? device_info(q.get_device()).sm_count : 0;
  // The debug variables are read (and a bad value refused) on every call, whichever path it takes.
  const int chosen_band = bwd_order_band();
  const int order_band = sm90a && cuda::bwd::CtaOrder::pays(order_units, sms) ? chosen_band : 0;
  const bool walk_tile_major = bwd_walk_tile_major(q.size(1), k.size(1)) && sm90a;
  // The sm90a backward's row statistics by bulk copies or by its threads (bwd::RowStatsTma). This decision is the one
  // the kernel takes (passed down as !row_stats_tma: fused_varlen_bwd allocates row_stats only then, and the
  // launcher's own RowStatsTma::fits is a safety net), so the plan line cannot say tma where the kernel ran the
  // threads' ring.
  const bool row_stats_threads = bwd_row_stats_by_threads() && sm90a;
  const bool l2_evict_normal = bwd_l2_evict_normal() && sm90a;
  const bool dq_tiles = bwd_dq_tiles() && sm90a;
  const bool row_stats_tma =
      sm90a && !row_stats_threads &&
      cuda::bwd::RowStatsTma::fits(key_range.has_value(), q.size(1), q.size(0));
  if (log_plan_requested()) {
    std::fprintf(stderr,
                 "dmattn.varlen_bwd plan: path=%s arch=%s dq=%s key_lists=%d order=%s band=%d order_units=%lld sms=%d "
                 "walk=%s row_stats=%s l2=%s dq_store=%s (H=%lld Hk=%lld D=%lld query_side=%d)\n",
                 fused ? "fused" : "blockwise", !fused ? "none" : sm90a ? "sm90a" : "sm80", dq_mode.c_str(),
                 static_cast<int>(key_lists), order_band > 1 ? "banded" : order_band == 1 ? "longest" : "grid",
                 order_band, static_cast<long long>(order_units), static_cast<int>(sms),
                 !sm90a ? "none" : walk_tile_major ? "tile_major" : "head_major",
                 !sm90a ? "none" : row_stats_tma ? "tma" : "threads",
                 !sm90a ? "none" : l2_evict_normal ? "normal" : "evict_last",
                 !sm90a ? "none" : dq_tiles ? "tile" : "rows",
                 static_cast<long long>(q.size(1)), static_cast<long long>(k.size(1)), static_cast<long long>(q.size(2)),
                 static_cast<int>(query_side));
  }
  if (fused) {
    return fused_varlen_bwd(args, dout, dlse, out, lse, bias_grad, kernel_dim, sm90a,
                            dq_mode == "reduce_add" || dq_mode == "atomic", order_band, walk_tile_major,
                            !row_stats_tma, l2_evict_normal, dq_tiles);
  }
  return blockwise_varlen_bwd(args, dout, dlse, out, lse, bias_grad);
}

}  // namespace
}  // namespace dmattn

#if DMATTN_UNIT_STAMPS
// The measuring build's op (no tensor argument: a catch-all kernel).
TORCH_LIBRARY_FRAGMENT(dmattn, m) { m.def("unit_stamps() -> Tensor", &dmattn::unit_stamps); }
#endif

TORCH_LIBRARY_IMPL(dmattn, CUDA, m) {
  m.impl("varlen_fwd", &dmattn::varlen_fwd_cuda);
  m.impl("varlen_bwd", &dmattn::varlen_bwd_cuda);
}
