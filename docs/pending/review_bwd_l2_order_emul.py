"""Review evidence for docs/pending/bwd_l2_order.patch (review_bwd_l2_order.md): host emulations, no device.

Part 1, the order pass (run_varlen_bwd.cu order_ctas_kernel + longest_first.cuh order_runs_longest_first + bwd_params.h
CtaOrder::runs / run_width / run_unit), on random calls (empty sequences, lying cu_seqlens, huge max_seqlen_k,
seqused_k, windows, lying kept-key counts and positions), every band 1..64 and out-of-range values the kernel clamps:
  - every emit position in [0, units), the order a permutation of the units, each band's tiles contiguous and in tile
    order, the bands' classes non-increasing (longest first);
  - each launched CTA's work (key_tile of cta_order[blockIdx.x]) equals the grid launch's set of CTAs with work;
  - band 1 == the old order_longest_first (BASE c650205's text) bit for bit under the same sequence of shared-memory
    atomics, and the same for decode_order.cu's call (order_longest_first, now through order_runs_longest_first with
    width 1) on random kept counts up to kMaxOrderedUnits.
Part 2, the kernel's walk (bwd_kernel.cuh item_tile): tile_major and head_major visit the same (head, query tile)
items for random spans (mid-tile begins, partial last tiles), groups 1..8 and dead-head sets; the producer's, the row
producers', the consumers' and the dQ writer's sequences are the one item_tile sequence; the dbias owner map (lane t ==
0 of each quad, slot_a / slot_a + 8) has one writer per (slot, head) entry and covers all 128 slots; the quad sums
cover the tile's 64 rows once; each (slot, head) table entry gets each computed item's share exactly once.
Part 3, tools/model_bwd_dq_tile.py (the named-barrier protocol model) run with the tile-major item map (its head and
partial-tile tests rewritten to TileMajorWalk's): no deadlock, no mixed phase, each tile reduced once.

    python3 docs/pending/review_bwd_l2_order_emul.py [CALLS]     # exit status 1 on any violation
"""
import itertools
import os
import re
import random
import sys

KMAX = 16384
THREADS, PER = 1024, 16
TR, TK, NB = 64, 128, 64
KMAXBAND = 64
ERRORS = []


def check(cond, msg):
    if not cond:
        ERRORS.append(msg)
        if len(ERRORS) < 10:
            print("VIOLATION:", msg)


# ---------------------------------------------------------------- CtaOrder (bwd_params.h), host ints
def units_of(B, Hk, tk, mk):
    keys = min(mk, tk)
    if B <= 0 or Hk <= 0 or keys <= 0:
        return 0
    pairs = B * Hk
    if pairs > KMAX:
        return 0
    tiles = (keys + TK - 1) // TK
    return pairs * tiles if pairs * tiles <= KMAX else 0


def coords(B, Hk, u):
    pair = u % (B * Hk)
    tile = u // (B * Hk)
    return pair % Hk, pair // Hk, tile  # hk, b, tile


def runs(units, pairs, band):  # C ints: all operands >= 0 here
    tiles = units // pairs
    return (tiles + band - 1) // band * pairs


def run_width(r, units, pairs, band):
    rest = units // pairs - r // pairs * band
    return rest if rest < band else band


def run_unit(r, k, pairs, band):
    return (r // pairs * band + k) * pairs + r % pairs


def cdiv(a, b):  # C truncating division
    q = abs(a) // abs(b)
    return q if (a >= 0) == (b >= 0) else -q


def clamp(cu, b, total, mx):
    s, e = cu[b], cu[b + 1]
    s = 0 if s < 0 else (total if s > total else s)
    e = s if e < s else (total if e > total else e)
    ln = e - s
    return s, (mx if ln > mx else ln)


class Call:
    """A random call as review_longest_first_perm.py draws them (its Seq / KeySlots / key_tile emulation)."""

    def __init__(s, r):
        s.r = r
        s.B = r.choice([1, 2, 3, 5, 8, 12, 17, 64, 128, 300, 1000, r.randint(1, 4000)])
        s.Hk = r.choice([1, 2, 4, 8])
        s.group = r.choice([1, 2, 4, 8])
        s.tq = r.randint(0, 20000)
        s.tk = r.randint(0, 20000)
        lens = [r.choice([0, 0, 1, 63, 64, 65, 127, 128, 129, r.randint(0, 3000), r.randint(0, 9000)])
                for _ in range(s.B)]

        def cu(total):
            c = [0]
            for ln in lens:
                c.append(c[-1] + ln)
            if r.random() < 0.3:  # lying
                for i in range(len(c)):
                    if r.random() < 0.2:
                        c[i] = r.randint(-100, total + 500)
            return c

        s.cuq, s.cuk = cu(s.tq), cu(s.tk)
        s.mq = min(r.choice([max(lens + [0]), r.randint(0, 6000), 10**12]), s.tq)
        s.mk = min(r.choice([max(lens + [0]), r.randint(0, 9000), 10**12, 1]), s.tk)
        s.seqused = [r.randint(-5, 3000) for _ in range(s.B)] if r.random() < 0.2 else None
        s.wl = r.choice([-1, -1, -1, 0, 5, 100, 1000])
        s.wr = r.choice([-1, -1, 0, 0, 3, 100])
        s.lists = r.random() < 0.4
        if s.lists:
            s.hm = r.choice([h for h in (1, s.Hk, s.Hk * s.group) if (s.Hk * s.group) % h == 0])
            s.count = {(b, l): r.randint(-3, 9500) for b in range(s.B) for l in range(s.hm)}
            s.listpos = {}
        s.tile_cache = {}

    def seq(s, b):
        qs, ql = clamp(s.cuq, b, s.tq, s.mq)
        ks, kl = clamp(s.cuk, b, s.tk, s.mk)
        if s.seqused is not None:
            u = s.seqused[b]
            kl = 0 if u < 0 else min(u, kl)
        return qs, ql, ks, kl

    def slots(s, b, h, kl):
        if not s.lists:
            return None, kl
        l = h // ((s.Hk * s.group) // s.hm)
        n = s.count[(b, l)]
        return (b, l), (0 if n < 0 else min(n, kl))

    def pos(s, lst, c, kl):
        if lst is None:
            return c
        key = (lst, c)
        if key not in s.listpos:
            s.listpos[key] = s.r.randint(-10, kl + 10)
        v = s.listpos[key]
        return max(0, min(v, kl - 1)) if kl > 0 else 0

    def key_tile(s, b, hk, tile):
        key = (b, hk, tile)
        if key in s.tile_cache:
            return s.tile_cache[key]
        qs, ql, ks, kl = s.seq(b)
        lst, n = s.slots(b, hk * s.group, kl)
        c0 = tile * TK
        keys = min(TK, n - c0)
        if keys <= 0:
            out = (c0, keys, (0, 0), 0)
        else:
            lo, hi = s.pos(lst, c0, kl), s.pos(lst, c0 + keys - 1, kl)
            shift = kl - ql
            beg = 0 if s.wr < 0 else max(0, lo - shift - s.wr)
            end = ql if s.wl < 0 else min(ql, hi - shift + s.wl + 1)
            out = (c0, keys, (beg, end), cdiv(end - beg + TR - 1, TR) if end > beg else 0)
        s.tile_cache[key] = out
        return out


# ---------------------------------------------------------------- longest_first.cuh, both texts
def atomic_sequence(r, n_slots):
    """The order in which the (thread, i) slots' shared-memory atomics land: any (a shuffle), or thread order."""
    seq = [(t, i) for i in range(PER) for t in range(THREADS) if t + i * THREADS < n_slots]
    if r is not None:
        r.shuffle(seq)
    return seq


def old_order_longest_first(units, count_of, order, seq, per=PER, threads=THREADS):
    """BASE's order_longest_first, statement by statement."""
    count = {}
    for t in range(threads):
        for i in range(per):
            u = t + i * threads
            count[(t, i)] = count_of(u) if u < units else 0
    longest = max(count.values(), default=0)
    width = longest + 1
    bucket = {k: NB - 1 - (c * NB // width) for k, c in count.items()}
    count_in = [0] * NB
    for (t, i) in seq:
        if t + i * threads < units:
            count_in[bucket[(t, i)]] += 1
    count_in = list(itertools.accumulate([0] + count_in[:-1]))
    for (t, i) in seq:
        u = t + i * threads
        if u < units:
            at = count_in[bucket[(t, i)]]
            count_in[bucket[(t, i)]] += 1
            order[at] = u


def order_runs_longest_first(nruns, count_of, width_of, emit, seq, per=PER, threads=THREADS):
    """HEAD's order_runs_longest_first, statement by statement."""
    check(nruns <= threads * per, f"runs {nruns} > {threads * per}")
    count, width = {}, {}
    for t in range(threads):
        for i in range(per):
            r = t + i * threads
            count[(t, i)] = count_of(r) if r < nruns else 0
            width[(t, i)] = width_of(r) if r < nruns else 0
            check(count[(t, i)] >= 0 and width[(t, i)] >= 0, "negative count or width")
    longest = max(count.values(), default=0)
    classes = longest + 1
    bucket = {k: NB - 1 - (c * NB // classes) for k, c in count.items()}
    check(all(0 <= v < NB for v in bucket.values()), "bucket out of range")
    count_in = [0] * NB
    for (t, i) in seq:
        if width[(t, i)] > 0:
            count_in[bucket[(t, i)]] += width[(t, i)]
    count_in = list(itertools.accumulate([0] + count_in[:-1]))
    for (t, i) in seq:
        if width[(t, i)] > 0:
            at = count_in[bucket[(t, i)]]
            count_in[bucket[(t, i)]] += width[(t, i)]
            emit(t + i * threads, at)
    return bucket, count


def new_order_longest_first(units, count_of, order, seq, per=PER, threads=THREADS):
    def emit(u, at):
        order[at] = u
    order_runs_longest_first(units, count_of, lambda _: 1, emit, seq, per, threads)


# ---------------------------------------------------------------- part 1
def order_pass(c, U, order_band, seq_rng):
    """order_ctas_kernel: returns cta_order (None where never written) and the runs' (key, first position)."""
    pairs = c.B * c.Hk
    band = min(max(order_band, 1), KMAXBAND)

    def tiles(u):
        hk, b, t = coords(c.B, c.Hk, u)
        return c.key_tile(b, hk, t)[3]

    width = lambda r: run_width(r, U, pairs, band)

    def longest(r):
        most = 0
        for k in range(width(r)):
            most = max(most, tiles(run_unit(r, k, pairs, band)))
        return most

    order = [None] * U
    placed = []

    def emit(r, at):
        placed.append((r, at))
        for k in range(width(r)):
            check(0 <= at + k < U, f"emit position {at + k} outside [0, {U})")
            if 0 <= at + k < U:
                check(order[at + k] is None, f"position {at + k} written twice")
                order[at + k] = run_unit(r, k, pairs, band)

    nr = runs(U, pairs, band)
    seq = atomic_sequence(seq_rng, nr)
    bucket, count = order_runs_longest_first(nr, longest, width, emit, seq)
    return order, placed, band, {t + i * THREADS: b for (t, i), b in bucket.items()}


def part1(ncalls):
    r = random.Random(7)
    stats = dict(calls=0, ordered=0, orders=0, units=0)
    bands = [1, 2, 3, 4, 5, 6, 7, 8, 12, 16, 31, 64, 0, -3, 65, 1000]
    for it in range(ncalls):
        c = Call(r)
        stats["calls"] += 1
        U = units_of(c.B, c.Hk, c.tk, c.mk)
        # the grid launch's CTAs with work (launcher: key tiles of p.f.max_seqlen_k)
        key_tiles = cdiv(c.mk + TK - 1, TK) if c.mk > 0 else 0
        grid = {}
        if U:
            for b in range(c.B):
                for hk in range(c.Hk):
                    for tile in range(key_tiles):
                        kt = c.key_tile(b, hk, tile)
                        if kt[3] * c.group:
                            grid[(hk, b, tile)] = kt
        if U == 0:
            continue
        stats["ordered"] += 1
        pairs = c.B * c.Hk
        check(U % pairs == 0, "units not a multiple of the pairs")
        for order_band in r.sample(bands, 4) + [1, 8]:
            order, placed, band, bucket = order_pass(c, U, order_band, random.Random(it))
            stats["orders"] += 1
            stats["units"] += U
            check(None not in order, f"call {it} band {band}: a position never written")
            check(sorted(x for x in order if x is not None) == list(range(U)), f"call {it} band {band}: not a perm")
            # bands contiguous, in tile order, one pair; classes non-increasing along the order
            for rr, at in placed:
                w = run_width(rr, U, pairs, band)
                check(1 <= w <= band, "width out of [1, band]")
                members = order[at:at + w]
                want = [((rr // pairs) * band + k) * pairs + rr % pairs for k in range(w)]
                check(members == want, f"run {rr} at {at}: {members} != {want}")
            keyed = sorted(placed, key=lambda x: x[1])
            bs = [bucket[rr] for rr, _ in keyed]
            check(bs == sorted(bs), f"call {it} band {band}: classes not longest first")
            # each CTA's work equals the grid launch's
            ordered = {}
            for x in range(U):  # the kernel: blockIdx.x in [0, U) takes cta_order[x]
                if order[x] is None or not 0 <= order[x] < U:
                    continue  # reported above
                hk, b, tile = coords(c.B, c.Hk, order[x])
                check(0 <= hk < c.Hk and 0 <= b < c.B, "coords out of range")
                kt = c.key_tile(b, hk, tile)
                if kt[3] * c.group == 0:
                    continue
                check((hk, b, tile) not in ordered, "a CTA twice")
                ordered[(hk, b, tile)] = kt
            check(ordered == grid, f"call {it} band {band}: work differs from the grid's")
        # band 1 == the old text, under the same atomic sequence (thread order and a shuffle)
        tiles = lambda u: c.key_tile(coords(c.B, c.Hk, u)[1], coords(c.B, c.Hk, u)[0], coords(c.B, c.Hk, u)[2])[3]
        for srng in (None, random.Random(1000 + it)):
            seq = atomic_sequence(srng, U)
            old, new = [None] * U, [None] * U
            old_order_longest_first(U, tiles, old, seq)
            new_order_longest_first(U, tiles, new, seq)
            check(old == new, f"call {it}: band 1 differs from BASE's order_longest_first")
            o1, _, _, _ = order_pass(c, U, 1, srng and random.Random(1000 + it))
            check(o1 == old, f"call {it}: order_ctas_kernel band 1 differs from BASE's")
    # decode_order.cu: order_longest_first<1024, 4> over p.batch * Hk units, counts = kept keys (>= 0)
    for it in range(300):
        n = r.choice([1, 2, 7, 64, 1000, 4096, r.randint(1, 4096)])
        hi = r.choice([0, 1, 5, 1000, 2**31 - 1])
        counts = [r.randint(0, hi) for _ in range(n)]
        for srng in (None, random.Random(it)):
            seq = atomic_sequence(srng, n)
            seq = [(t, i) for (t, i) in seq if i < 4]
            old, new = [None] * n, [None] * n
            old_order_longest_first(n, counts.__getitem__, old, seq, per=4)
            new_order_longest_first(n, counts.__getitem__, new, seq, per=4)
            check(old == new and sorted(new) == list(range(n)), f"decode order {it} differs")
    print("part 1:", stats)


# ---------------------------------------------------------------- part 2: the walk
def item_tile(item, group, tiles, begin, tile_major):
    if tile_major:
        back = item // group
        hh = item - back * group
        ti = tiles - 1 - back
    else:
        hh = item // tiles
        ti = item - hh * tiles
    return hh, begin + ti * TR


def part2(trials):
    r = random.Random(3)
    for _ in range(trials):
        group = r.randint(1, 8)
        q_len = r.randint(1, 5000)
        begin = r.randint(0, q_len - 1)
        end = r.randint(begin + 1, q_len)
        tiles = cdiv(end - begin + TR - 1, TR)
        items = tiles * group
        dead = {hh for hh in range(group) if r.random() < r.choice([0, 0.3, 1.0])}
        walks = {}
        for tm in (False, True):
            seqs = [item_tile(i, group, tiles, begin, tm) for i in range(items)]
            check(len(set(seqs)) == items, "an item twice")
            check(all(0 <= hh < group and begin <= m0 < end for hh, m0 in seqs), "item out of the span")
            walks[tm] = seqs
            # consumers and the dQ writer: the computed items, in order (both filter with the same live word)
            computed = [x for x in seqs if x[0] not in dead]
            writer = [x for x in seqs if x[0] not in dead]
            check(computed == writer, "writer order")
            # rows per item as consumer and writer compute them: min(64, q_len - m0) >= 1
            check(all(1 <= min(TR, q_len - m0) <= TR for _, m0 in seqs), "rows out of [1, 64]")
            # dbias: each (head, slot) entry gets each computed item's share once (a share = one item's quad sum)
            table = {}
            for hh, m0 in computed:
                table[(hh, m0)] = table.get((hh, m0), 0) + 1
            check(all(v == 1 for v in table.values()), "a share twice")
        check(sorted(walks[False]) == sorted(walks[True]), "the walks visit different items")
        check(walks[True][:group] == [(hh, begin + (tiles - 1) * TR) for hh in range(group)],
              "tile_major does not start at the last tile")
    # owner map: consumer thread (cw, wtid) lane t == 0 owns key_dbias[.][slot_a] and [slot_a + 8]
    owners = {}
    rows = {}
    for cw in range(2):
        for wtid in range(128):
            lane, g, t = wtid % 32, (wtid % 32) // 4, wtid % 4
            slot_a = 64 * cw + 16 * (wtid // 32) + g
            if t == 0:
                for slot in (slot_a, slot_a + 8):
                    owners.setdefault(slot, []).append((cw, wtid))
            # the thread's query rows of a tile: nt * 8 + 2 t + {0, 1}, nt < 8 (its db share), per slot
            for slot in (slot_a, slot_a + 8):
                for nt in range(8):
                    for e in range(2):
                        rows.setdefault(slot, []).append(nt * 8 + 2 * t + e)
    check(sorted(owners) == list(range(128)), "owner map misses a slot")
    check(all(len(v) == 1 for v in owners.values()), "an entry with two owners")
    check(all(sorted(v) == list(range(64)) for v in rows.values()), "quad sums do not cover 64 rows once")
    print(f"part 2: {trials} CTAs' walks, owner map of 128 slots")


# ---------------------------------------------------------------- part 3: the dQ protocol model, tile-major
def part3(trials):
    here = os.path.dirname(os.path.abspath(__file__))
    path = os.path.join(here, "..", "..", "tools", "model_bwd_dq_tile.py")
    src = open(path).read()
    n_head = len(re.findall(r"\b(item|i) // self\.tiles\b", src))
    n_part = src.count("item % self.tiles == self.tiles - 1")
    check(n_head == 3 and n_part == 1, f"model text changed ({n_head}, {n_part})")
    src = re.sub(r"\b(item|i) // self\.tiles\b", r"(\1 % self.group)", src)  # TileMajorWalk: head j % group
    src = src.replace("item % self.tiles == self.tiles - 1", "item < self.group")  # its last tiles come first
    src = src.replace('if __name__ == "__main__":', "if False:")
    ns = {"__name__": "tile_major_model"}
    exec(compile(src, "model_bwd_dq_tile.py (tile_major)", "exec"), ns)
    rc = ns["main"](trials)
    check(rc == 0, "the dQ protocol model fails under the tile-major item map")
    # sanity: a mutation is still caught under the new map
    ns["WRITER_SKIPS_DEAD"] = False
    import io, contextlib
    with contextlib.redirect_stdout(io.StringIO()):
        rc = ns["main"](400)
    check(rc == 1, "the model no longer catches the writer not skipping dead heads")
    print("part 3: tile-major protocol model passed", trials, "CTAs; mutation still caught")


if __name__ == "__main__":
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 400
    part1(n)
    part2(20000)
    part3(3000)
    print(f"{len(ERRORS)} violations")
    sys.exit(1 if ERRORS else 0)
