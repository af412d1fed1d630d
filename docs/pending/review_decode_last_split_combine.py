"""Review evidence for docs/pending/decode_last_split_combine.patch (review_decode_last_split_combine.md): a host
emulation of the patch's decode-kernel merge on random calls, checking
  A. the tickets: the splits that take one are exactly the splits with KV tiles (DecodeTile::busy_splits against the
     scheduler's tile_begin / tile_end), in any arrival order exactly one CTA merges each (sequence, KV head, row
     tile) unit, it is the last participant (all partials written before), a unit with no busy split is merged by
     split 0 alone; ticket indices are within ticket_count and the zeroing loop covers all of them;
  B. the staged maxima / sums: merge_pair run on the staged copy (splits past busy_splits as (-inf, 0), split
     sums never written read as NaN garbage) gives the bits merge_pair gives on what combine_splits reads from
     global memory (empty splits wrote max -inf and nothing else), for 8 and 32 lanes, with NaN / -inf rows, sinks;
  C. the rows: with a valid contract the merges write every (row, head) of [0, cu_q[B]) once and the order pass's
     finishing CTAs (1024 threads, finish_blocks(p, 1024)) every row of [cu_q[B], total_q) once, disjoint; with a
     broken contract the merges write nothing and the finishing CTAs every row once.
The emulated merge_pair is one Python function run on both inputs, so B checks that the inputs are equivalent under
the code's read rules (what the patch's bitwise claim needs beyond "the same inlined code compiles to the same
operations", which only the GPU tests can show). Run: python3 <this file> (numpy needed; ~1 min)."""
import itertools
import random

import numpy as np

F = np.float32
NINF = F(-np.inf)
NAN = F(np.nan)
LOG2E = F(1.4426950408889634)


# ---------------------------------------------------------------------------------------------------------------
# A. tickets
def split_range(first, tiles, k, per):  # DecodeTileScheduler::tile
    begin = first + k * per
    tb = begin if begin < tiles else tiles
    te = begin + per if begin + per < tiles else tiles
    return tb, te


def busy_of(first, tiles, per, n):  # the patch's DecodeTile::busy_splits
    rest = tiles - first
    return 0 if rest <= 0 else min(1 + (rest - 1) // per, n)


def emulate_unit(r, first, tiles, per, n):
    busy = busy_of(first, tiles, per, n)
    with_tiles = [k for k in range(n) if split_range(first, tiles, k, per)[0] < split_range(first, tiles, k, per)[1]]
    assert with_tiles == list(range(busy)), (first, tiles, per, n, busy, with_tiles)
    # The CTAs: each split runs its path of decode_kernel; a participant writes its partials, then (busy > 1) takes
    # a ticket; merge when the ticket drawn is participants - 1 (or at once: participants == 1).
    participants = busy if busy > 1 else 1
    ticket = 0
    written = set()
    mergers = []
    order = list(range(n))
    r.shuffle(order)  # arrival order of the CTAs at their end (the tickets are atomics in that order)
    for k in order:
        tb, te = split_range(first, tiles, k, per)
        if tb >= te:  # the empty path
            if k == 0 and busy == 0:
                mergers.append((k, set(written)))
            continue
        written.add(k)  # store_decode_tile, then the fence
        if participants > 1:
            drawn, ticket = ticket, ticket + 1
            if drawn == participants - 1:
                mergers.append((k, set(written)))
        else:
            mergers.append((k, set(written)))
    assert len(mergers) == 1, (first, tiles, per, n, busy, mergers)
    k, seen = mergers[0]
    assert seen == set(range(busy)), "merged before every participant's partials"
    assert ticket == (participants if participants > 1 else 0)
    return busy


def check_tickets(r, calls=20000):
    hist = {}
    for _ in range(calls):
        n = r.randint(2, 128)
        per = r.choice([1, 2, 3, 4, 8, 35, r.randint(1, 100)])
        tiles = r.choice([0, 1, per, per + 1, n * per, n * per + 5, r.randint(0, 200 * per)])  # past n x per: a lie
        first = r.choice([0, 0, 1, tiles, tiles + 3, r.randint(0, max(tiles, 1))])  # a window's first tile
        busy = emulate_unit(r, first, tiles, per, n)
        hist[min(busy, 2)] = hist.get(min(busy, 2), 0) + 1
    # ticket indices: (b * Hk + hk) * row_tiles + m0 / kBlockM over the grid, against ticket_count and the zeroing
    for _ in range(2000):
        B, Hk, row_tiles = r.randint(1, 64), r.choice([1, 2, 4, 8]), r.randint(1, 8)
        count = B * Hk * row_tiles
        used = {(b * Hk + hk) * row_tiles + rt for b in range(B) for hk in range(Hk) for rt in range(row_tiles)}
        zeroed = {i for t in range(1024) for i in range(t, count, 1024)}
        assert used == zeroed == set(range(count))
    return hist


# ---------------------------------------------------------------------------------------------------------------
# B. merge_pair on staged vs global partials (split_merge.cuh, lane groups emulated)
def split_weight(m_s, l_s, m):
    if m_s == NINF:
        return F(0)
    e = F(1) if m_s == m else F(np.exp2(F((m_s - m) * LOG2E)))
    return F(e * l_s)


def group_reduce(vals, op, g):  # xor butterfly over a group of g lanes, every lane's result
    vals = list(vals)
    off = g // 2
    while off > 0:
        vals = [op(vals[i], vals[i ^ off]) for i in range(g)]
        off //= 2
    return vals


def fmax(a, b):  # fmaxf: NaN dropped
    if a != a:
        return b
    if b != b:
        return a
    return F(max(a, b))


def merge_pair(max_at, sum_at, o_at, n, g, sink, d):
    """One pair by g lanes, as merge_pair<Elem, g, kVecs>: max_at(s) / sum_at(s) / o_at(s) read split s (a read of
    memory nobody wrote returns NaN: any such read shows in the result)."""
    ms, nans = [], []
    for gl in range(g):  # pass 1
        m, nan = NINF, False
        for s in range(gl, n, g):
            m_s = max_at(s)
            l_s = F(0) if m_s == NINF else sum_at(s)
            nan |= (m_s != m_s) or (l_s != l_s)
            m = fmax(m, m_s)
        ms.append(m)
        nans.append(F(1) if nan else F(0))
    m = group_reduce(ms, fmax, g)[0]
    nan = group_reduce(nans, fmax, g)[0] != 0 or sink != sink or sink == np.inf
    m = fmax(m, sink)
    totals = []
    for gl in range(g):  # pass 2
        total = F(0)
        if not nan:
            for s in range(gl, n, g):
                m_s = max_at(s)
                total = F(total + split_weight(m_s, F(0) if m_s == NINF else sum_at(s), m))
        totals.append(total)
    total = F(group_reduce(totals, lambda a, b: F(a + b), g)[0] + split_weight(sink, F(1), m))
    lse = NAN if nan else (NINF if m == NINF else F(m + F(np.log(total))))
    inv_total = F(0) if m == NINF else F(F(1) / total)
    x = np.zeros(d, F)
    for s0 in range(0, n, g):  # pass 3: chunks of g splits, ascending, one FMA chain per column
        for gl in range(g):
            own = s0 + gl
            m_own = max_at(own) if (not nan and own < n) else NINF
            l_own = F(0) if m_own == NINF else sum_at(own)
            w = F(split_weight(m_own, l_own, m) * inv_total)
            if l_own != 0:
                x = (x + w * o_at(own)).astype(F)  # numpy: mul then add (the GPU's FMA is the same on both paths)
    if nan:
        x[:] = NAN
    return x, lse


def bits(a):
    return np.asarray(a, F).view(np.uint32).tolist()


def check_staging(r, pairs=3000):
    for _ in range(pairs):
        n = r.randint(2, 128)
        busy = r.choice([0, 1, 2, n, r.randint(0, n)])
        g = r.choice([8, 32])
        d = 4 * g
        # what each busy split wrote for this row: (max, sum, O) or a row it saw nothing of (max -inf, sum, no O)
        wrote = []
        for _s in range(busy):
            kind = r.random()
            if kind < 0.15:
                wrote.append((NINF, F(r.choice([0.0, 1.0])), None))  # saw nothing (lse -inf): O not written
            elif kind < 0.2:
                wrote.append((NAN, F(np.nan), None))  # a NaN score: max NaN
            else:
                mx = F(r.uniform(-30, 30)) if r.random() < 0.9 else F(-3.0e38)
                o = np.array([r.gauss(0, 1) for _ in range(d)], F)
                if r.random() < 0.05:
                    o[r.randrange(d)] = NAN  # a poisoned row
                wrote.append((mx, F(r.uniform(1, 200)), o))
        sink = r.choice([NINF, F(r.uniform(-5, 5)), NINF, NAN if r.random() < 0.05 else NINF])
        garbage_o = np.full(d, NAN, F)

        # combine_splits' view: busy splits as written; the empty splits wrote max -inf (and neither sum nor O)
        def g_max(s):
            return wrote[s][0] if s < busy else NINF

        def g_sum(s):
            return wrote[s][1] if s < busy else NAN

        def g_o(s):
            return wrote[s][2] if s < busy and wrote[s][2] is not None else garbage_o

        # the kernel's staged copy: split s < busy read from global (max and sum), the rest (-inf, 0)
        staged = [(wrote[s][0], wrote[s][1]) if s < busy else (NINF, F(0)) for s in range(n)]
        a = merge_pair(g_max, g_sum, g_o, n, g, sink, d)
        b = merge_pair(lambda s: staged[s][0], lambda s: staged[s][1], g_o, n, g, sink, d)
        assert bits(a[0]) == bits(b[0]) and bits([a[1]]) == bits([b[1]]), (n, busy, g)


# ---------------------------------------------------------------------------------------------------------------
# C. rows: merges (per unit row tile) and the order pass's finishing CTAs
def clamp(cu, b, total, mx):  # clamp_seq
    s, e = cu[b], cu[b + 1]
    s = 0 if s < 0 else (total if s > total else s)
    e = s if e < s else (total if e > total else e)
    return s, min(e - s, mx)


def finish_blocks(tq, B, threads):
    blocks = (tq * 32 + threads - 1) // threads
    by_reads = (1 << 22) // 2 // (B + 1)
    return min(min(blocks, 1024 * 256 // threads), max(1, by_reads))


def check_rows(r, calls=1500):
    for _ in range(calls):
        B = r.choice([1, 2, 3, 17, 64, r.randint(1, 300)])
        H_k = r.choice([1, 2, 8])
        group = r.choice([1, 2, 4, 8])
        H = H_k * group
        block_m = r.choice([16, 32])
        lens = [r.choice([0, 1, 2, 4, 8, 12, r.randint(0, 40)]) for _ in range(B)]
        cu = [0] + list(itertools.accumulate(lens))
        tq = cu[-1] + r.choice([0, 0, 3, r.randint(0, 2000)])
        mq = min(max(lens) if r.random() < 0.8 else r.randint(0, 50), tq)
        if r.random() < 0.3:  # lying
            for i in range(len(cu)):
                if r.random() < 0.2:
                    cu[i] = r.randint(-10, tq + 50)
        broken = cu[0] != 0 or any(not (cu[b] <= cu[b + 1] <= tq and cu[b + 1] - cu[b] <= mq) for b in range(B))
        row_tiles = max(1, (group * mq + block_m - 1) // block_m)
        written = {}
        # the merges: one per (b, hk, row tile) that owns rows, writing nothing when broken
        for b in range(B):
            qs, ql = clamp(cu, b, tq, mq)
            packed = group * ql
            for hk in range(H_k):
                for rt in range(row_tiles):
                    m0 = rt * block_m
                    if m0 >= packed or broken:
                        continue
                    for rr in range(min(block_m, packed - m0)):
                        key = (qs + (m0 + rr) % ql, hk * group + (m0 + rr) // ql)
                        written[key] = written.get(key, 0) + 1
        # the finishing CTAs: blocks of 1024 threads, a warp per row, grid-stride
        owned_end = 0 if broken else (0 if cu[B] < 0 else min(cu[B], tq))
        blocks = finish_blocks(tq, B, 1024) if tq > 0 else 0
        warps = blocks * 1024 // 32
        for blk in range(blocks):
            for w in range(32):
                row = owned_end + (blk * 1024 + w * 32) // 32
                while row < tq:
                    for h in range(H):
                        written[(row, h)] = written.get((row, h), 0) + 1
                    row += warps
        want = {(row, h) for row in range(tq) for h in range(H)}
        assert set(written) == want, (B, lens, cu, tq, mq, broken, sorted(set(written) ^ want)[:5])
        assert all(v == 1 for v in written.values()), "a (row, head) written twice"


if __name__ == "__main__":
    r = random.Random(7)
    hist = check_tickets(r)
    print(f"A. tickets: ok ({hist.get(0, 0)} units with no busy split, {hist.get(1, 0)} with one, "
          f"{hist.get(2, 0)} with several)")
    check_staging(r)
    print("B. staged maxima / sums: merge_pair's bits equal on the combine's view and the staged copy: ok")
    check_rows(r)
    print("C. rows: every (row, head) written exactly once, valid or lying cu_seqlens: ok")
