"""Review emulation (CPU, no GPU): the sm90a backward's kRowTma visibility against the threads' RowStats path.

Threads' path (bwd_common.cuh row_info + bwd_kernel.cuh's P^T loop): tile row r (query i = m0 + r) sees key j when
    i < q_len  and  lse(i) != -inf  and  kept(j)  and  low(i) <= j < limit(i)
with [low, limit) = visible_keys(i, lq, lk, window_left, window_right) (varlen_fwd_params.h, no key ranges).
TMA path: bit (e, nt) of `sees` (fragment_rows(rows_seeing(...)) for key_a | ... for key_b << 16), extracted exactly as
the P^T loop does, and lse2 = +inf where lse = -inf (so exp2(x - lse2) == 0 for every x that is finite or -inf).

The script re-implements the C++ integer and bit arithmetic literally (int64 for rows_seeing's d, 64-bit masks for
fragment_rows) and checks, for every thread t of a quad, every one of its 16 accumulator rows and both of its keys:
  (a) rows with lse finite: the TMA bit == the threads' visibility;
  (b) rows with lse = -inf: the TMA bit may be 1 (rows_seeing ignores lse), and then P = exp2(x - inf), which is 0
      for x finite or -inf and NaN for x = +inf or NaN; the threads' path gives 0. Counted, reported.
Run: python3 docs/pending/review_bwd_rows_seeing.py [cases]   (default 300,000 random + an exhaustive small grid)
"""

import random
import sys

M64 = (1 << 64) - 1


def visible_keys(i, lq, lk, wl, wr):
    aligned = i + lk - lq
    begin = 0 if wl < 0 else aligned - wl
    end = lk if wr < 0 else aligned + wr + 1
    return max(begin, 0), min(end, lk)


def rows_seeing(lq, lk, wl, wr, m0, rows, j, kept):
    d = j - (lk - lq) - m0
    lo = 0 if wr < 0 else d - wr
    hi = rows - 1 if wl < 0 else d + wl
    lo = max(lo, 0)
    hi = min(hi, rows - 1)
    if not kept or lo > hi:
        return 1, 0
    return lo, hi


def fragment_rows(lo, hi, t):
    if lo > hi:
        return 0
    tile = ((M64 << lo) & M64) & (M64 >> (63 - hi))
    x = (tile >> (2 * t)) & 0x0303030303030303
    x = (x | x >> 6) & 0x000F000F000F000F
    x = (x | x >> 12) & 0x000000FF000000FF
    return (x | x >> 24) & 0xFFFF


def check_case(lq, lk, wl, wr, m0, ja, jb, kept_a, kept_b, neg_inf_rows, stats):
    rows = min(64, lq - m0)
    assert 1 <= rows <= 64
    for t in range(4):
        sees = fragment_rows(*rows_seeing(lq, lk, wl, wr, m0, rows, ja, kept_a), t) | (
            fragment_rows(*rows_seeing(lq, lk, wl, wr, m0, rows, jb, kept_b), t) << 16)
        assert sees < (1 << 32)
        for nt in range(8):
            for e in range(4):
                tma = (sees >> ((0 if e < 2 else 16) + 2 * nt + (e & 1))) & 1
                r = nt * 8 + 2 * t + (e & 1)
                i = m0 + r
                j, kept = (ja, kept_a) if e < 2 else (jb, kept_b)
                lse_neg_inf = r in neg_inf_rows
                if i < lq:
                    low, limit = visible_keys(i, lq, lk, wl, wr)
                    window = kept and low <= j < limit
                else:
                    window = False
                thr = window and not lse_neg_inf
                stats["pairs"] += 1
                if lse_neg_inf:
                    # (b): TMA's bit is the window's; P is 0 by lse2 = +inf unless the score is +inf / NaN
                    if tma != int(window):
                        stats["bad"] += 1
                        if stats["bad"] <= 10:
                            print("MISMATCH (lse -inf row)", dict(lq=lq, lk=lk, wl=wl, wr=wr, m0=m0, j=j, t=t, r=r))
                    if tma:
                        stats["neg_inf_visible"] += 1
                elif tma != int(thr):
                    stats["bad"] += 1
                    if stats["bad"] <= 10:
                        print("MISMATCH", dict(lq=lq, lk=lk, wl=wl, wr=wr, m0=m0, j=j, kept=kept, t=t, r=r,
                                               tma=tma, thr=thr))


def random_case(rng):
    lq = rng.choice([1, 2, 3, 63, 64, 65, 127, 128, 129, rng.randint(1, 4000)])
    lk = rng.choice([1, 2, 3, 64, 127, 128, 129, rng.randint(1, 4000)])
    def window():
        return rng.choice([-1, -1, 0, 1, 2, 63, 64, 65, rng.randint(0, 5000)])
    wl, wr = window(), window()
    if rng.random() < 0.3:
        wr = 0  # causal (make_params folds is_causal into window_right = 0)
    # m0: the kernel's span.begin + 64 k (span.begin any row), any row < lq
    m0 = rng.randint(0, lq - 1) if rng.random() < 0.7 else (rng.randint(0, (lq - 1) // 64) * 64)
    # the thread's two key positions: slot keys (any position < lk, kept) or INT_MAX / past the end (not kept)
    def key():
        if rng.random() < 0.1:
            return 2**31 - 1, False
        return rng.randint(0, lk - 1), rng.random() < 0.8
    (ja, ka), (jb, kb) = key(), key()
    if rng.random() < 0.5:  # keys near the tile's diagonal, where the span's ends matter
        c = m0 + (lk - lq) + rng.randint(-70, 70)
        ja = min(max(c, 0), lk - 1)
        jb = min(max(c + 8, 0), lk - 1)
    neg = set(r for r in range(64) if rng.random() < 0.1)
    return lq, lk, wl, wr, m0, ja, jb, ka, kb, neg


def main():
    cases = int(sys.argv[1]) if len(sys.argv) > 1 else 300_000
    rng = random.Random(2024)
    stats = {"pairs": 0, "bad": 0, "neg_inf_visible": 0}
    # exhaustive small grid
    n_small = 0
    for lq in range(1, 12):
        for lk in range(1, 12):
            for wl in (-1, 0, 1, 3):
                for wr in (-1, 0, 1, 3):
                    for m0 in range(0, lq):
                        for j in range(lk):
                            check_case(lq, lk, wl, wr, m0, j, j, True, False, set(), stats)
                            n_small += 1
    for _ in range(cases):
        check_case(*random_case(rng), stats)
    print(f"small grid {n_small} cases, random {cases} cases, {stats['pairs']:,} (thread, row, key) pairs checked")
    print(f"mismatches: {stats['bad']}")
    print(f"pairs on lse = -inf rows whose TMA bit is 1 (P = exp2(x - inf): 0 unless x is +inf / NaN): "
          f"{stats['neg_inf_visible']:,}")
    return 1 if stats["bad"] else 0


if __name__ == "__main__":
    sys.exit(main())
