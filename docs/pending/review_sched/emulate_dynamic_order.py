#!/usr/bin/env python3
"""Host emulation of the sm90a dynamic scheduler's unit numbering (fwd_kernel.cuh: dynamic_unit) and of the static
persistent numbering (fwd_kernel.cuh: work), over random batches.

Checks, per launch of <= 255 sequences:
  * dynamic_unit is a permutation of [0, units) onto the (z, m_block, h) of the sequences' own query tiles;
  * every decoded unit is in bounds (z < seqs, m_block < tiles(z) <= KeptRows query tiles, h < H);
  * windows (section_keys = INT32_MAX) give exactly the static grid's numbering;
  * within a (sequence, section) the query tile does not grow with the unit number (longest first);
  * the counter protocol: CTA c takes c, then grid + counter; every unit taken exactly once, every CTA ends on u >=
    units (the sentinel), with atomics in any interleaving.
Pure Python; run: python3 emulate_dynamic_order.py [--trials N]
"""
import argparse
import random

INT32_MAX = 2**31 - 1
K_BLOCK_M = 128
TABLE_SEQS = 255


def cdiv(a, b):
    return (a + b - 1) // b


def clamp_seq(cu, b, total, max_seqlen):
    start, end = cu[b], cu[b + 1]
    start = 0 if start < 0 else min(start, total)
    end = start if end < start else min(end, total)
    return start, min(end - start, max_seqlen)


def cdiv_trunc(a, b):  # C++ int division of non-negative ints
    assert a >= 0 and b > 0
    return a // b


def dynamic_unit(u, H, Hk, unit_tiles, k_lens, section_keys, group):
    j, r = divmod(u, H)
    lo, hi = 0, len(unit_tiles) - 1
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if unit_tiles[mid] <= j:
            lo = mid
        else:
            hi = mid
    z = lo
    tiles = unit_tiles[lo + 1] - unit_tiles[lo]
    l = u - unit_tiles[lo] * H
    kv_heads = min(max(cdiv_trunc(section_keys, max(k_lens[lo], 1)), 1), Hk)
    width = kv_heads * group
    c = l // (tiles * width)
    rest = l - c * tiles * width
    here = min(width, H - c * width)
    i = rest // here
    m_block = tiles - 1 - i
    h = c * width + (rest - i * here)
    return z, m_block, h, c


def static_unit(u, H, unit_tiles):
    j, h = divmod(u, H)
    lo, hi = 0, len(unit_tiles) - 1
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if unit_tiles[mid] <= j:
            lo = mid
        else:
            hi = mid
    return lo, unit_tiles[lo + 1] - 1 - j, h


def random_batch(rng):
    kind = rng.random()
    if kind < 0.2:
        B = rng.randint(256, 700)  # several launches
    elif kind < 0.5:
        B = rng.randint(1, 40)
    else:
        B = rng.randint(1, 8)
    max_len = rng.choice([1, 64, 128, 129, 300, 1000, 4096])
    lens_q = [rng.choice([0, 0, rng.randint(0, max_len)]) if rng.random() < 0.3 else rng.randint(0, max_len)
              for _ in range(B)]
    lens_k = [rng.randint(0, 2 * max_len) for _ in range(B)]
    cu_q = [0]
    for n in lens_q:
        cu_q.append(cu_q[-1] + n)
    cu_k = [0]
    for n in lens_k:
        cu_k.append(cu_k[-1] + n)
    total_q, total_k = cu_q[-1], cu_k[-1]
    max_q, max_k = max(lens_q + [0]), max(lens_k + [0])
    if rng.random() < 0.25:  # lying cu_seqlens: out of order, past the totals, max_seqlen too small
        for _ in range(rng.randint(1, 4)):
            cu_q[rng.randrange(len(cu_q))] = rng.randint(-50, total_q + 500)
            cu_k[rng.randrange(len(cu_k))] = rng.randint(-50, total_k + 500)
        if rng.random() < 0.5:
            max_q = max(1, max_q // 2)
    Hk = rng.choice([1, 2, 3, 4, 8])
    H = Hk * rng.choice([1, 2, 4, 5])
    D = rng.choice([64, 128, 256])
    section_mb = rng.choice([1, 8, 16, 1024])
    return dict(cu_q=cu_q, cu_k=cu_k, total_q=total_q, total_k=total_k, max_q=max(max_q, 1), max_k=max(max_k, 1),
                B=B, H=H, Hk=Hk, D=D, section_mb=section_mb)


def check_launch(c, seq0, seqs, kind, rng):
    H, Hk = c["H"], c["Hk"]
    unit_tiles, k_lens = [0], []
    for z in range(seqs):
        _, qlen = clamp_seq(c["cu_q"], seq0 + z, c["total_q"], c["max_q"])
        _, klen = clamp_seq(c["cu_k"], seq0 + z, c["total_k"], c["max_k"])
        unit_tiles.append(unit_tiles[-1] + cdiv(qlen, K_BLOCK_M))
        k_lens.append(klen)
    units = unit_tiles[-1] * H
    query_tiles = cdiv(c["max_q"], K_BLOCK_M)  # launch_units / KeptRows::tiles_of
    per_key = 2 * c["D"] * 2
    if kind == "window":
        section_keys = INT32_MAX
    else:
        section_keys = max(1, min(c["section_mb"] * 2**20 // per_key, INT32_MAX))
    group = H // Hk
    if kind == "masked_per_list":  # kSlots with a kept copy per list: lists finer than KV heads
        mask_heads = H  # one list per query head
        group = H // mask_heads  # heads_per_list
    seen = {}
    last = {}
    for u in range(units):
        z, m, h, sec = dynamic_unit(u, H, Hk, unit_tiles, k_lens, section_keys, group)
        tiles = unit_tiles[z + 1] - unit_tiles[z]
        assert 0 <= z < seqs and 0 <= m < tiles <= query_tiles and 0 <= h < H, (u, z, m, h, tiles)
        assert (z, m, h) not in seen, ("duplicate", u, seen[(z, m, h)])
        seen[(z, m, h)] = u
        key = (z, sec)
        if key in last:
            assert m <= last[key], ("not longest first in a section", u)
        last[key] = m
        if kind == "window":
            assert (z, m, h) == static_unit(u, H, unit_tiles), ("window order differs from static", u)
        # z | m_block << 8 and its decode (published_work)
        word = (z | (m << 8)) & 0xFFFFFFFF
        assert word != 0xFFFFFFFF and (word & 0xFF) == z and (word >> 8) == m
    assert len(seen) == units
    # The counter: any interleaving of the CTAs' atomics.
    grid = min(query_tiles * H * seqs, rng.choice([1, 3, 132]))
    counter, taken, done = 0, [], 0
    nxt = list(range(grid))
    alive = set(range(grid))
    while alive:
        cta = rng.choice(sorted(alive))
        u = nxt[cta]
        if u >= units:
            alive.discard(cta)  # the sentinel
            continue
        taken.append(u)
        nxt[cta] = grid + counter
        counter += 1
    assert sorted(taken) == list(range(units)), "every unit exactly once"
    assert counter <= units + grid and grid + counter <= 2**32
    return units


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--trials", type=int, default=400)
    ap.add_argument("--seed", type=int, default=1)
    a = ap.parse_args()
    rng = random.Random(a.seed)
    total_units = 0
    for t in range(a.trials):
        c = random_batch(rng)
        for kind in ("dense", "window", "masked", "masked_per_list"):
            for seq0 in range(0, c["B"], TABLE_SEQS):
                total_units += check_launch(c, seq0, min(c["B"] - seq0, TABLE_SEQS), kind, rng)
    print(f"ok: {a.trials} batches x 4 orders, {total_units} units: permutations, in bounds, windows = static, "
          f"longest first per section, counter covers each unit once")


if __name__ == "__main__":
    main()
