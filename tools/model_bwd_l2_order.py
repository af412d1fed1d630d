"""A model of the sm90a backward's launch order and walk against L2 (csrc/cuda/sm90a/bwd_kernel.cuh; the study is
docs/pending/fa3_bwd_study.md, section 3.2; the design docs/pending/bwd_l2_order.md). No device: it ranks orders.

What it models:
- CTAs: one per (sequence b, KV head hk, key tile of 128 slots), as bwd::CtaOrder numbers them (u = (tile B + b) Hk +
  hk). A CTA's query tiles per head = ceil((q_len - span.begin) / 64), span.begin = the first slot's key position
  (causal, q_len = k_len, bwd::key_tile); its items = that times the group (4 query heads), each one 64-row query
  tile of one head.
- Walks (DMATTN_BWD_WALK): head_major, item j = tile j % T of head j / T (from span.begin up); tile_major, item j =
  tile T - 1 - j / G of head j % G (from the last tile down, the heads inside each tile).
- Orders (DMATTN_BWD_ORDER): grid (hk fastest, then the sequence, the key tile slowest); longest (longest_first.cuh:
  64 classes of equal width between 0 and the longest count, longest class first, within a class in unit order);
  banded (runs of `band` key tiles of one (sequence, KV head) pair, the band's tiles in order; the bands sorted like
  longest by the band's key: its longest tile ('max') or its summed tiles ('sum')).
- Dispatch: SMS SMs, one CTA each (the kernel's ~220 KiB of shared memory), CTAs in launch order to the SM free first;
  a CTA costs START items of prologue (gather, pipeline fill) plus one per item. Uniform item cost: partial and
  diagonal tiles are not cheaper here, and misses do not slow an item (the order of events is the dispatch's).
- L2: an LRU of L2_MIB over 16-row chunks of one head's Q + dO + dq_accum rows (bf16 256 B + 256 B, float32 512 B: 16
  KiB a chunk); each item touches the chunks its 64 rows cover (a tile starts at any row), at its start time.
  K / V gathers, dK / dV stores and lse / delta are left out (once per CTA, or small).
- The batch: the prefill bench's lengths (seed 186), B = 8, H = 32, Hk = 8, D = 128; masked = a key-side mask keeping
  50% of each (sequence, KV head)'s keys at random (the bench keeps the top half of a random score per mask head, Hm =
  Hk: the same thing), dense = every key.

Output per (call, order, walk): makespan / ideal (the items and prologues spread evenly over the SMs) and the L2 hit
rate of the modeled streams. Run CR measured a 30% L2 hit rate for the whole masked kernel in grid order and head-major
walk; the model gives ~0.29 there.

    python3 tools/model_bwd_l2_order.py                 # the table of docs/pending/bwd_l2_order.md
    python3 tools/model_bwd_l2_order.py --bands 2 4 8 16 --l2-mib 25 40 50
"""
import argparse
import collections
import heapq
import random

LENGTHS = [3312, 3865, 2630, 836, 538, 1300, 737, 2838]  # bench_gpu.sizes("prefill", seed 186)
HK, GROUP, SMS, START = 8, 4, 132, 3.0
TILE_ROWS, TILE_KEYS, CHUNK_ROWS = 64, 128, 16
CHUNK_BYTES = CHUNK_ROWS * (256 + 256 + 512)
BUCKETS = 64  # longest_first.cuh's classes


def key_tiles(masked, seed):
    """Per (b, hk): the span.begin of each key tile (the first slot's key position)."""
    rnd = random.Random(seed)
    out = {}
    for b, n in enumerate(LENGTHS):
        for hk in range(HK):
            keys = sorted(rnd.sample(range(n), n // 2)) if masked else list(range(n))
            out[b, hk] = [keys[c] for c in range(0, len(keys), TILE_KEYS)]
    return out


def tiles_per_head(begins, b, tile):
    n = LENGTHS[b]
    return (n - begins[tile] + TILE_ROWS - 1) // TILE_ROWS if tile < len(begins) else 0


def units(tiles):
    max_tiles = max(len(v) for v in tiles.values())
    return [(tile, b, hk) for tile in range(max_tiles) for b in range(len(LENGTHS)) for hk in range(HK)]


def bucket_order(keys):
    """longest_first.cuh: ids sorted into BUCKETS classes of equal width, the longest class first (ties: id order)."""
    width = max(keys) + 1
    return sorted(range(len(keys)), key=lambda i: (BUCKETS - 1 - keys[i] * BUCKETS // width, i))


def launch_order(tiles, order, band, band_key):
    us = units(tiles)
    count = [tiles_per_head(tiles[b, hk], b, t) for t, b, hk in us]
    if order == "grid":
        return us
    if order == "longest":
        return [us[i] for i in bucket_order(count)]
    max_tiles = max(len(v) for v in tiles.values())
    bands = [(z, b, hk) for z in range((max_tiles + band - 1) // band) for b in range(len(LENGTHS)) for hk in range(HK)]
    members = [[(t, b, hk) for t in range(z * band, min(max_tiles, z * band + band))] for z, b, hk in bands]
    keys = []
    for m in members:
        c = [tiles_per_head(tiles[b, hk], b, t) for t, b, hk in m]
        keys.append(max(c) if band_key == "max" else sum(c))
    return [u for i in bucket_order(keys) for u in members[i]]


def walk_items(begin, t_count, walk):
    rows = [begin + TILE_ROWS * i for i in range(t_count)]
    if walk == "head_major":
        return [(hh, m) for hh in range(GROUP) for m in rows]
    return [(hh, m) for m in reversed(rows) for hh in range(GROUP)]


def simulate(tiles, order, walk, band, band_key, l2_mib, miss_cost=0.0):
    """Event by event: the SM free first takes its next item (or its next CTA's prologue); an item touches its chunks
    in the LRU then lasts 1 + miss_cost x its missed fraction. Returns makespan / ideal (ideal: the items and prologues
    at cost 1, spread evenly) and the hit rate."""
    lin = [u for u in launch_order(tiles, order, band, band_key)]
    todo = collections.deque(lin)
    cap = (l2_mib << 20) // CHUNK_BYTES
    lru = collections.OrderedDict()
    hits = total = 0
    work = 0.0
    heap = [(0.0, sm, None) for sm in range(SMS)]  # (time, sm, the items left of its CTA)
    heapq.heapify(heap)
    end = 0.0
    while heap:
        now, sm, left = heapq.heappop(heap)
        if not left:
            while todo:  # the next CTA with work (the kernel returns at once for the others)
                t, b, hk = todo.popleft()
                begins = tiles[b, hk]
                tc = tiles_per_head(begins, b, t)
                if tc:
                    left = collections.deque((b, hk * GROUP + hh, m) for hh, m in walk_items(begins[t], tc, walk))
                    break
            if not left:
                end = max(end, now)
                continue
            work += START
            heapq.heappush(heap, (now + START, sm, left))
            continue
        b, h, m = left.popleft()
        last = min(LENGTHS[b], m + TILE_ROWS) - 1
        missed = n = 0
        for c in range(m // CHUNK_ROWS, last // CHUNK_ROWS + 1):
            k = (b, h, c)
            n += 1
            if k in lru:
                lru.move_to_end(k)
            else:
                missed += 1
                lru[k] = None
                if len(lru) > cap:
                    lru.popitem(last=False)
        hits += n - missed
        total += n
        work += 1.0
        heapq.heappush(heap, (now + 1.0 + miss_cost * missed / n, sm, left))
    return end / (work / SMS), hits / total


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bands", type=int, nargs="+", default=[4, 8])
    ap.add_argument("--band-keys", nargs="+", default=["max"], choices=["max", "sum"])
    ap.add_argument("--l2-mib", type=int, nargs="+", default=[40])
    ap.add_argument("--miss-costs", type=float, nargs="+", default=[0.0, 0.5],
                    help="an item's extra time when all its chunks miss (0: time independent of L2)")
    ap.add_argument("--seed", type=int, default=1, help="the masked call's random kept keys")
    args = ap.parse_args()
    costs = " | ".join(f"time, miss cost {c:g}" for c in args.miss_costs)
    print(f"| call | L2 MiB | order | walk | L2 hit rate | {costs} |")
    print("| --- | --- | --- | --- | --- |" + " --- |" * len(args.miss_costs))
    for masked in (True, False):
        tiles = key_tiles(masked, args.seed)
        for l2 in args.l2_mib:
            configs = [("grid", 1, "max"), ("longest", 1, "max")]
            configs += [("banded", band, key) for band in args.bands for key in args.band_keys]
            for order, band, key in configs:
                for walk in ("head_major", "tile_major"):
                    runs = [simulate(tiles, order, walk, band, key, l2, c) for c in args.miss_costs]
                    name = order if order != "banded" else f"banded {band} ({key})"
                    times = " | ".join(f"{span:.3f}" for span, _ in runs)
                    print(f"| {'masked' if masked else 'dense'} | {l2} | {name} | {walk} | {runs[0][1]:.2f} | {times} |")


if __name__ == "__main__":
    main()
