// block_map.cu: a query-side mask -> its block summary (passes.h, BlockMap), read once at the start of a call in the
// 512-key chunks some row can see (a causal call's triangle, a window's band, not the whole rectangle) so the prefill
// kernel skips the tiles it hides whole and runs the tiles it shows whole without reading it, and for the sm90a kernel
// the mask as bits in the same read (and a key-side mask beside a query-side bias, or at D = 256 where its kept rows
// are not gathered, by sequence); and v's blocks that hold an inf or NaN, so its tiles that hide keys scan their V only
// there.
#include <cuda_runtime.h>

#include <climits>

#include "../packed_rows.h"
#include "bit_span.cuh"
#include "nonfinite_bits.cuh"
#include "passes.h"

namespace dmattn::cuda {
namespace {

constexpr int kMapWarps = 8;
constexpr int kMapThreads = kMapWarps * 32;
// key_map_kernel's CTAs, at most, where the batch is large (build_block_map): 2^16 CTAs of 8 warps, about 62 waves
// of a 132-SM GPU at 8 CTAs an SM (65,536 / (132 x 8)), each walking its sequence's chunks; past that the batch x mask
// heads get kMinKeyMapChunks CTAs each (fewer where the longest sequence has fewer chunks).
constexpr int64_t kMaxKeyMapCtas = int64_t{1} << 16;
// key_map_kernel's CTAs per (sequence, mask head), at least (the longest sequence's chunks permitting): with
// B x Hm >= 2^16, one CTA a row would walk a long sequence's chunks alone (a sequence of 2^20 keys beside 2^16 short
// ones: 4,096 chunks one after another, the whole launch waiting on that CTA). 8 bounds the grid by 8 B x Hm CTAs; it
// costs up to 7 B x Hm CTAs that find no chunk of their short sequence and exit at once (about 2^19 of them at
// B x Hm = 2^16: tens of microseconds of launch slots), against a map of 4 B x Hm bytes or more.
constexpr int64_t kMinKeyMapChunks = 8;
static_assert(BlockMap::kCols == 32, "a warp's lanes are the key positions of one block");

// block_map_kernel's chunk: kChunkBlocks blocks of kCols key positions (512 keys), a CTA's at a time. A warp reads a
// row's chunk as kChunkBlocks loads of 32 consecutive bytes, all issued before the first is voted on, so that each
// warp has 512 bytes of one row in flight. On an H100, over the prefill batch's 0.5 GB query-side mask: with one block
// a warp, a row at a time (a load, then the ballot that needed it: one 32-byte load in flight a warp), 1.03 ms, a
// third of the call (run DZ); with sixteen rows' loads of that block in flight but each under its own branch, 1.45 ms;
// as written, 0.79 ms (run EA). It is now issue-bound, not waiting on memory (ncu: SM throughput 93%, DRAM 17%): a
// byte a lane per load, two votes per 32 bytes.
constexpr int kChunkBlocks = 16;
static_assert(kChunkBlocks <= 32, "a lane per block of the chunk: its word and its state");
// block_map_kernel's CTAs, at least where the chunks allow: about eight waves of a 132-SM GPU at four CTAs an SM, so
// that no CTA walks many chunks at the launch's tail. The prefill batch's map (251 row blocks x 8 mask heads) gets 3
// CTAs a row block, each walking at most 3 of its 8 chunks and finding its rows' visible keys once.
constexpr int64_t kBlockMapCtas = 4096;

// The vector path of block_map_kernel (a mask whose keys are contiguous from a 16-byte aligned pointer): a row's
// chunk of 512 keys as 16-byte loads, a lane each, the bytes' nonzero tests packed with integer arithmetic, where the
// byte path takes a load and a vote per 32 bytes (issue-bound: run EA). kVecRows rows of a warp are loaded at once.
constexpr int kVecRows = 4;
static_assert(BlockMap::kRows % (kMapWarps * kVecRows) == 0, "a warp's rows of a row block in whole batches");

// Bit i: whether byte i of v is nonzero (any nonzero byte is True: ScoreOperand::mask_allows). A byte's top bit after
// adding 0x7f to its low seven bits is set where those are nonzero; OR its own top bit. The multiply gathers the four
// top bits (moved to bits 0, 8, 16, 24) into bits 24-27 in byte order.
__device__ __forceinline__ uint32_t nonzero_bytes(uint32_t v) {
  const uint32_t tops = (((v & 0x7f7f7f7fu) + 0x7f7f7f7fu) | v) & 0x80808080u;
  return ((tops >> 7) * 0x01020408u) >> 24;
}
__device__ __forceinline__ uint32_t nonzero_bytes(const uint4& v) {
  return nonzero_bytes(v.x) | nonzero_bytes(v.y) << 4 | nonzero_bytes(v.z) << 8 | nonzero_bytes(v.w) << 12;
}

// The mask word of block `lane` (< kChunkBlocks) of a row's 512-key chunk, whose first key lies `off` bytes into the
// 16-byte chunk that lane 0 loaded: lane l loaded 16-byte chunk l (body), lane 0 also chunk 32 (tail). Block w's 32
// keys are bytes [off + 32 w, off + 32 w + 32) of chunks 2 w, 2 w + 1 and 2 w + 2. Every lane takes part in the
// shuffles; lanes past kChunkBlocks get a word nobody stores.
__device__ __forceinline__ uint32_t block_word(const uint4& body, const uint4& tail, int off, int lane) {
  const uint32_t bits = nonzero_bytes(body), tail_bits = nonzero_bytes(tail);
  const uint32_t lo = __shfl_sync(0xffffffffu, bits, (2 * lane) % 32);
  const uint32_t mid = __shfl_sync(0xffffffffu, bits, (2 * lane + 1) % 32);
  const uint32_t next = __shfl_sync(0xffffffffu, bits, (2 * lane + 2) % 32);
  const uint32_t last = __shfl_sync(0xffffffffu, tail_bits, 0);
  const uint64_t keys = lo | mid << 16 | static_cast<uint64_t>(lane == kChunkBlocks - 1 ? last : next) << 32;
  return static_cast<uint32_t>(keys >> off);
}

// The key positions [begin, end) packed query row `row` can see, as the attention kernels bound it (row_keys: its
// window, the causal limit, its key_range, within its sequence's clamped keys; empty for a row no sequence owns):
// its sequence found as dmattn::packed_rows finds it (owning_sequence, in bounds and ending for any cu_seqlens).
// Where the contract holds that sequence is the row's only one; where it is broken finish_rows makes every output
// NaN, so a row that two clamped sequences share may be summarized for either.
__device__ KeyRange row_reach(const VarlenFwdParams& p, int64_t row) {
  if (p.batch <= 0) return {0, 0};
  const int32_t b = static_cast<int32_t>(owning_sequence(p.cu_seqlens_q, p.batch, row));
  const SeqRange sq = clamp_seq(p.cu_seqlens_q, b, p.total_q, p.max_seqlen_q);
  if (row < sq.start || row >= sq.start + sq.len) return {0, 0};
  const KeyRange r = row_keys(p, row, row - sq.start, sq.len, key_seq(p, b).len);
  return r.begin < r.end ? r : KeyRange{0, 0};
}

// Grid (row blocks, chunk CTAs, mask heads); a CTA takes every gridDim.y-th chunk of its row block. First its rows'
// visible keys (row_reach, into shared memory), and their union: a chunk no row can see is not read, its words
// written 0 and its blocks' states 0, so a causal call reads about half of its rows' bytes and a window a band, not
// the (total_q, max_seqlen_k) rectangle. Warp w takes rows w, w + kMapWarps, ... of its row block; lane l loads the
// chunk's key position 32 i + l of the row for every block i (one row's 512 consecutive bytes a warp where the mask's
// keys are contiguous). Per block i the warp's ballot, cut to the row's visible keys, is the row's word, which lane i
// stores (with map.bits: the chunk's words of a row, one store of consecutive words) and whose votes (a shown key,
// a hidden visible key) it ORs into the block's state over the warp's rows; the warps' states meet in shared memory.
// kBits: map.bits is set. The sm80 kernels' map has no bits, and its loop is compiled on its own: with a runtime
// branch between the two loops the map alone ran 0.29 ms slower on the H200's query-side prefill call (run BX). Four
// CTAs an SM: 64 registers hold a row's sixteen loads in flight (at eight CTAs, 32 registers, ptxas spilled).
template <bool kBits>
__global__ void __launch_bounds__(kMapThreads, 4)
block_map_kernel(const __grid_constant__ VarlenFwdParams p, const __grid_constant__ BlockMap map) {
  __shared__ uint32_t chunk_state[kChunkBlocks];  // the chunk's block states, ORed over the CTA's warps
  __shared__ int2 reach[BlockMap::kRows];         // each row's visible keys [x, y) (row_reach; empty: 0, 0)
  __shared__ int reach_lo, reach_hi;              // their union's bounds (empty: reach_lo >= reach_hi)
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int64_t rb = blockIdx.x;
  const int hm = blockIdx.z;
  const int64_t row0 = rb * BlockMap::kRows;
  const int rows = static_cast<int>(min(static_cast<int64_t>(BlockMap::kRows), p.total_q - row0));
  const int64_t extent = BlockMap::key_extent(p);
  const int h = hm * p.mask.head_group;  // any query head of mask head hm reads the same elements
  uint8_t* line = map.state + (static_cast<int64_t>(hm) * map.row_blocks + rb) * map.col_blocks;
  // With bits, the blocks run on to bit_words (>= col_blocks): the words past the extent are written 0.
  const int64_t blocks = kBits ? map.bit_words : map.col_blocks;
  const int64_t chunks = BlockMap::blocks(blocks, kChunkBlocks);
  const bool contiguous = p.mask.col_stride == 1;
  const bool vectors = contiguous && reinterpret_cast<uintptr_t>(p.mask.ptr) % 16 == 0;
  if (threadIdx.x == 0) {
    reach_lo = INT_MAX;
    reach_hi = 0;
  }
  __syncthreads();
  if (threadIdx.x < BlockMap::kRows) {
    // Positions are below 2^31 (row_keys clips them to the clamped key count).
    const KeyRange r = threadIdx.x < rows ? row_reach(p, row0 + threadIdx.x) : KeyRange{0, 0};
    reach[threadIdx.x] = make_int2(static_cast<int>(r.begin), static_cast<int>(r.end));
    if (r.begin < r.end) {
      atomicMin(&reach_lo, static_cast<int>(r.begin));
      atomicMax(&reach_hi, static_cast<int>(r.end));
    }
  }
  __syncthreads();
  auto store_word = [&](int64_t cb0, int r, uint32_t word) {
    if (kBits && lane < kChunkBlocks && cb0 + lane < blocks) {
      map.bits[(static_cast<int64_t>(hm) * p.total_q + row0 + r) * map.bit_words + cb0 + lane] = word;
    }
  };
  for (int64_t chunk = blockIdx.y; chunk < chunks; chunk += gridDim.y) {  // the same bound for every thread
    const int64_t cb0 = chunk * kChunkBlocks;
    const int64_t key0 = cb0 * BlockMap::kCols, key_end = key0 + kChunkBlocks * BlockMap::kCols;
    if (key0 >= reach_hi || key_end <= reach_lo) {  // no row sees a key of the chunk: nothing read (CTA-wide)
      for (int r = warp; r < rows; r += kMapWarps) store_word(cb0, r, 0u);
      if (threadIdx.x < kChunkBlocks && cb0 + threadIdx.x < map.col_blocks) line[cb0 + threadIdx.x] = 0;
      continue;
    }
    if (threadIdx.x < kChunkBlocks) chunk_state[threadIdx.x] = 0;
    __syncthreads();
    uint32_t state = 0;  // lane i < kChunkBlocks: block cb0 + i's votes over this warp's rows
    // Whether row r sees a key of the chunk.
    auto meets = [&](int r) { return reach[r].x < key_end && reach[r].y > key0 && reach[r].x < reach[r].y; };
    // Row r's visible keys among the 32 of block cb0 + lane as the bits of its word. Some row sees a key of the
    // chunk, so key0 < 2^31 and a position minus key0 fits 32 bits; cut to the chunk's span, it stays there after
    // the block's offset.
    auto span = [&](int r) {
      const int2 v = reach[r];
      const int k0 = static_cast<int>(key0), end = kChunkBlocks * BlockMap::kCols;
      auto from_block = [&](int x) { return min(max(x - k0, -1), end + 1) - lane * BlockMap::kCols; };
      return shown_span(from_block(v.x), from_block(v.y));
    };
    // The vector path: 16 bytes past the chunk still in the row (the tail chunk's reads stay among the row's keys).
    const bool vector_chunk = vectors && (cb0 + kChunkBlocks) * BlockMap::kCols + 16 <= extent;
    if (vector_chunk) {
      const uint8_t* mask = static_cast<const uint8_t*>(p.mask.ptr);
      for (int r0 = warp; r0 < rows; r0 += kMapWarps * kVecRows) {  // rows r0 + kMapWarps u
        uint4 body[kVecRows], tail[kVecRows];
        int off[kVecRows];
#pragma unroll
        for (int u = 0; u < kVecRows; ++u) {
          // Every load unconditional (a row past the block's, or one that sees no key of the chunk, reads row r0
          // again, its word unused), lane 0's tail beside the others' second read of their own chunk: no load waits
          // under a branch.
          const int ru = r0 + kMapWarps * u;
          const int r = ru < rows && meets(ru) ? ru : r0;
          const uint8_t* at = mask + p.mask.row_start(row0 + r, h) + key0;
          off[u] = static_cast<int>(reinterpret_cast<uintptr_t>(at) % 16);
          const uint4* chunks16 = reinterpret_cast<const uint4*>(at - off[u]);
          body[u] = chunks16[lane];
          tail[u] = chunks16[lane == 0 ? 32 : lane];
        }
#pragma unroll
        for (int u = 0; u < kVecRows; ++u) {
          const int r = r0 + kMapWarps * u;
          if (r >= rows) break;  // the warp's own condition
          // A row that sees no key of the chunk loaded row r0's bytes: its span is empty, so its word is 0.
          const uint32_t seen = span(r);  // (lanes past kChunkBlocks: unused)
          const uint32_t word = block_word(body[u], tail[u], off[u], lane) & seen;
          if (lane < kChunkBlocks) {
            state |= (word != 0 ? BlockMap::kSomeTrue : 0) | (word != seen ? BlockMap::kSomeFalse : 0);
          }
          store_word(cb0, r, word);
        }
      }
    } else {  // the byte path: a load of 32 consecutive bytes (or positions) and a vote per block
      for (int r = warp; r < rows; r += kMapWarps) {  // a whole warp's condition: its votes stay converged
        if (!meets(r)) {
          store_word(cb0, r, 0u);
          continue;
        }
        const int64_t start = p.mask.row_start(row0 + r, h);
        const int2 v = reach[r];
        bool keep[kChunkBlocks];
        if (contiguous && (cb0 + kChunkBlocks) * BlockMap::kCols <= extent) {
          // The common case, keys contiguous and the chunk inside the extent: the loads at fixed offsets of one
          // address, so that all of them are in flight within few registers.
          const int64_t first = p.mask.column(start, key0 + lane);  // key stride 1
#pragma unroll
          for (int i = 0; i < kChunkBlocks; ++i) keep[i] = p.mask.mask_allows(first + i * BlockMap::kCols);
        } else {
#pragma unroll
          for (int i = 0; i < kChunkBlocks; ++i) {
            // A position past the extent reads the row's first element (the extent is at least 1) and keeps nothing:
            // a load under a branch (`j < extent && ...`) is waited for before the branch joins, one load in flight.
            const int64_t j = key0 + i * BlockMap::kCols + lane;
            const bool in = j < extent;
            keep[i] = p.mask.mask_allows(p.mask.column(start, in ? j : 0)) & in;
          }
        }
        uint32_t word = 0;
#pragma unroll
        for (int i = 0; i < kChunkBlocks; ++i) {
          const int64_t j = key0 + i * BlockMap::kCols + lane;
          const bool in = j >= v.x && j < v.y;  // a key the row sees (below the extent: row_reach)
          const uint32_t shown = __ballot_sync(0xffffffffu, keep[i] && in);
          const uint32_t hidden = __ballot_sync(0xffffffffu, in && !keep[i]);
          if (lane == i) {
            word = shown;
            state |= (shown != 0 ? BlockMap::kSomeTrue : 0) | (hidden != 0 ? BlockMap::kSomeFalse : 0);
          }
        }
        store_word(cb0, r, word);
      }
    }
    if (lane < kChunkBlocks && state != 0) atomicOr(&chunk_state[lane], state);
    __syncthreads();
    // (the next chunk's zeroing is these threads' own, after these reads; the others' ORs wait for its barrier)
    if (threadIdx.x < kChunkBlocks && cb0 + threadIdx.x < map.col_blocks) {
      line[cb0 + threadIdx.x] = static_cast<uint8_t>(chunk_state[threadIdx.x]);
    }
  }
}

// A key-side mask by sequence (BlockMap::by_sequence, for the sm90a kernel beside a query-side bias, or ungathered at
// D = 256). Grid (batch, chunks of kMapWarps key blocks, mask heads), sequences in place of block_map_kernel's row
// blocks: lane l of warp w reads the mask byte of key position (chunk * kMapWarps + w) * kCols + l of sequence b (its
// clamped keys, key_seq, as the kernel reads them; nothing past them), and the warp's ballot is the sequence's bit
// word and its votes the block's state. A warp's loads are 32 consecutive keys of one mask column. Each sequence
// writes its own segment's blocks (BlockMap::sequence_row), the 4 ceil(k_len / 128) that its tiles can read (a
// 128-key tile n reads blocks [4 n, 4 n + 4), a 64-key one [2 n, 2 n + 2), n below its sequence's tiles), the blocks
// past its keys as 0: every word and state byte a kernel reads is written, and nothing outside the segment (passes.h
// BlockMap: in bounds and disjoint for any cu_seqlens the contract allows, in bounds for any others). A CTA takes
// every gridDim.y-th chunk: the grid's chunks cover the longest sequence, or fewer (build_block_map).
__global__ void __launch_bounds__(kMapThreads)
key_map_kernel(const __grid_constant__ VarlenFwdParams p, const __grid_constant__ BlockMap map) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int b = blockIdx.x, hm = blockIdx.z;
  const SeqRange sk = key_seq(p, b);
  const int h = hm * p.mask.head_group;  // any query head of mask head hm reads the same elements
  const int64_t row = map.sequence_row(hm, b, sk.start);
  const int64_t blocks = BlockMap::blocks(sk.len, BlockMap::kBitTileKeys) * BlockMap::kTileBlocks;
  for (int64_t cb = static_cast<int64_t>(blockIdx.y) * kMapWarps + warp; cb < blocks;
       cb += static_cast<int64_t>(gridDim.y) * kMapWarps) {  // a whole warp's condition: its votes stay converged
    const int64_t j = cb * BlockMap::kCols + lane;
    const bool in = j < sk.len;
    const bool keep = in && p.mask.mask_allows(p.mask.offset(sk.start + j, h, 0));
    const uint32_t word = __ballot_sync(0xffffffffu, keep);
    const bool any_false = __any_sync(0xffffffffu, in && !keep);
    if (lane == 0) {
      map.bits[row + cb] = word;
      map.state[row + cb] = (word != 0 ? BlockMap::kSomeTrue : 0) | (any_false ? BlockMap::kSomeFalse : 0);
    }
  }
}

// Grid (v blocks, KV heads): a CTA ORs NonfiniteBits::tops over the 16-byte vectors of its kVRows rows of v (the
// head's D elements each, 16-byte aligned rows as the attention kernels load them) and one thread writes the flag.
constexpr int kVThreads = 128;
__global__ void __launch_bounds__(kVThreads)
v_flags_kernel(const __grid_constant__ VarlenFwdParams p, const __grid_constant__ BlockMap map) {
  const NonfiniteBits bits = NonfiniteBits::of(p.dtype);
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * BlockMap::kVRows;
  const int64_t rows = min(static_cast<int64_t>(BlockMap::kVRows), p.total_k - row0);
  const int hk = blockIdx.y;
  const int vecs = p.head_dim / 8;  // 16-byte vectors per row (head dims are multiples of 8)
  const char* v = static_cast<const char*>(p.v) + 2 * (row0 * p.v_row_stride + hk * p.v_head_stride);
  uint32_t tops = 0;
  for (int e = threadIdx.x; e < static_cast<int>(rows) * vecs; e += kVThreads) {  // at most 64 rows x 32 vectors
    const int r = e / vecs;
    const uint4 w = *reinterpret_cast<const uint4*>(v + 2 * (r * p.v_row_stride) + 16 * (e - r * vecs));
    tops |= bits.tops(w.x) | bits.tops(w.y) | bits.tops(w.z) | bits.tops(w.w);
  }
  const bool bad = __syncthreads_or(NonfiniteBits::any(tops)) != 0;
  if (threadIdx.x == 0) map.v_nonfinite[static_cast<int64_t>(hk) * map.v_blocks + blockIdx.x] = bad ? 1 : 0;
}

}  // namespace

cudaError_t build_block_map(const VarlenFwdParams& p, const BlockMap& map, cudaStream_t stream) {
  if (map.v_nonfinite != nullptr && map.v_blocks > 0 && p.num_heads_k > 0) {
    v_flags_kernel<<<dim3(map.v_blocks, p.num_heads_k), kVThreads, 0, stream>>>(p, map);
    if (const cudaError_t err = cudaGetLastError(); err != cudaSuccess) return err;
  }
  if (map.state == nullptr || map.row_blocks == 0 || map.col_blocks == 0 || map.mask_heads == 0) return cudaSuccess;
  const int64_t blocks = map.bits != nullptr ? map.bit_words : map.col_blocks;
  if (map.by_sequence) {  // a key-side mask: the sm90a kernel's, always with bits (row_blocks: the batch)
    const int64_t chunks = BlockMap::blocks(blocks, kMapWarps);
    dim3 grid(map.row_blocks, static_cast<unsigned>(chunks < 65535 ? chunks : 65535), map.mask_heads);
    if (map.bits == nullptr || map.seq_extent <= 0) return cudaErrorInvalidValue;
    // The chunks cover the longest sequence (bit_words); with many sequences, at most max(kMaxKeyMapCtas,
    // kMinKeyMapChunks x rows) CTAs in all, each striding over its sequence's chunks: a skewed batch (one long
    // sequence beside many short ones) would otherwise launch B x Hm x (the long one's chunks) CTAs, nearly all with
    // no block of their short sequence.
    // At least min(chunks, kMinKeyMapChunks) a row however large the batch (above).
    const int64_t rows = static_cast<int64_t>(map.row_blocks) * map.mask_heads;
    const int64_t least = chunks < kMinKeyMapChunks ? chunks : kMinKeyMapChunks;
    const int64_t most = kMaxKeyMapCtas / rows > least ? kMaxKeyMapCtas / rows : least;
    grid.y = static_cast<unsigned>(grid.y < most ? grid.y : most);
    key_map_kernel<<<grid, kMapThreads, 0, stream>>>(p, map);
  } else {
    const int64_t chunks = BlockMap::blocks(blocks, kChunkBlocks);  // as block_map_kernel counts them
    // kBlockMapCtas CTAs or more, each (row block, mask head) taking an equal share, at most one CTA per chunk: a CTA
    // walks its share of the row block's chunks, its rows' visible keys found once.
    const int64_t lines = static_cast<int64_t>(map.row_blocks) * map.mask_heads;
    int64_t per_line = (kBlockMapCtas + lines - 1) / lines;
    per_line = per_line < chunks ? per_line : chunks;
    const dim3 grid(map.row_blocks, static_cast<unsigned>(per_line < 65535 ? per_line : 65535), map.mask_heads);
    if (map.bits != nullptr) {
      block_map_kernel<true><<<grid, kMapThreads, 0, stream>>>(p, map);
    } else {
      block_map_kernel<false><<<grid, kMapThreads, 0, stream>>>(p, map);
    }
  }
  return cudaGetLastError();
}

}  // namespace dmattn::cuda
