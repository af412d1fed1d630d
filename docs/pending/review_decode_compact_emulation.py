"""Host emulation of csrc/cuda/key_compaction.cu's two key-side parts kernels (review of decode_compact, c42daa4).

compact_key_parts_kernel<false> (the chunk kernel, DMATTN_KEY_COMPACTION=chunks) and
compact_key_parts_by_warps_kernel (the warps' kernel) are emulated CTA by CTA with the kernels' own index arithmetic:
per thread / per lane, per key / per step, per part, the ticket, the decoupled look-back over the 64-bit statuses
(flag + value in one word), the count written by the chain's last part, the list stores. Every mask, slot, status and
list access is bounds-checked against buffers sized exactly as the call's tensors / workspace are. CTAs run as
coroutines under a random scheduler (a random dispatch order of blockIdx, 1..8 resident CTAs, random interleaving at
the ticket, the publishes and every poll of the look-back), so a wait that can never end shows as a deadlock.

Per random case (lengths on both kernels' part and warp edges, Hm in {1, Hk, H} with several row / head strides, a
key pool with lying slots, seqused_k, empty and 1-key sequences, lying cu_seqlens and max_seqlen_k) it checks:
  - both kernels stay in bounds, finish (no deadlock), write each chain's count exactly once;
  - where the clamped sequences do not overlap: both kernels' index and count buffers are identical, word for word
    (sentinel-initialised, so a stray write shows), and equal the host's list (positions j < len with a nonzero byte);
  - where they overlap (lying cu_seqlens): bounds, termination and one count per chain only (the writes race).
Then each deliberately broken variant of the warps' kernel must be caught on some case.

    python3 docs/pending/review_decode_compact_emulation.py [--cases 3000] [--seed 1]
"""

import argparse
import random
import sys

import numpy as np

K_CHUNK = 2048            # kCompactThreads * kKeysPerThread; KeyParts::kPartKeys
K_WARP_PART = 4096        # kCompactWarps * kWarpKeys; KeyParts::kWarpPartKeys
K_MAX_STATUSES = 1 << 22
COUNT_FLAG, PREFIX_FLAG = 1 << 32, 2 << 32
MASK32 = 0xFFFFFFFF
SENTINEL = -777777


class OOB(Exception):
    pass


class Deadlock(Exception):
    pass


def i32(x):
    x &= MASK32
    return x - (1 << 32) if x >= 1 << 31 else x


def clamp_seq(cu, b, total, max_seqlen):
    start, end = cu[b], cu[b + 1]
    start = 0 if start < 0 else (total if start > total else start)
    end = start if end < start else (total if end > total else end)
    n = end - start
    return start, (max_seqlen if n > max_seqlen else n)


def key_seq(c, b):
    start, n = clamp_seq(c["cu_k"], b, c["total_k"], c["max_k"])
    if c["seqused"] is not None:
        used = c["seqused"][b]
        n = 0 if used < 0 else (used if used < n else n)
    return start, n


def row_start(c, row, h):
    return row * c["rs"] + (h // c["head_group"]) * c["hs"]


def clamp_slot(c, slot):
    if c["slots"] is None:
        return slot
    return 0 if slot < 0 else (c["pool_rows"] - 1 if slot >= c["pool_rows"] else slot)


class Memory:
    """The call's buffers, sized exactly; every access checked."""

    def __init__(self, c):
        self.c = c
        self.mask = c["mask"]
        self.slots = c["slots"]
        B, Hm, total_k = c["B"], c["Hm"], c["total_k"]
        self.index = np.full(Hm * total_k, SENTINEL, dtype=np.int64)
        self.count = np.full(B * Hm, SENTINEL, dtype=np.int64)
        self.count_writes = np.zeros(B * Hm, dtype=np.int64)
        self.status = [0] * c["statuses"]  # memset to 0 (KeyParts::bytes, per_chain of 2048-key parts)
        self.ticket = 0

    def read_mask(self, addr):
        addr = np.asarray(addr)
        if addr.size and (addr.min() < 0 or addr.max() >= self.mask.size):
            raise OOB(f"mask read at {addr.min()}..{addr.max()} of {self.mask.size}")
        return self.mask[addr]

    def read_slots(self, idx):
        idx = np.asarray(idx)
        if idx.size and (idx.min() < 0 or idx.max() >= self.slots.size):
            raise OOB(f"kv_slots read at {idx.min()}..{idx.max()} of {self.slots.size}")
        return self.slots[idx]

    def write_index(self, idx, values):
        idx = np.asarray(idx, dtype=np.int64)
        if idx.size and (idx.min() < 0 or idx.max() >= self.index.size):
            raise OOB(f"index write at {idx.min()}..{idx.max()} of {self.index.size}")
        self.index[idx] = values

    def write_count(self, i, v):
        if not 0 <= i < self.count.size:
            raise OOB(f"count write at {i} of {self.count.size}")
        self.count[i] = v
        self.count_writes[i] += 1

    def st(self, i):
        if not 0 <= i < len(self.status):
            raise OOB(f"status access at {i} of {len(self.status)}")
        return i


def popc(x):
    return bin(x & MASK32).count("1")


# ---------------------------------------------------------------------------------------------------------------
# The look-back (both kernels): thread 0's code, as a coroutine that yields at each publish and poll.
def look_back(mem, status_base, part, part_total, broken=()):
    before = 0
    if part > 0:
        mem.status[mem.st(status_base + part)] = COUNT_FLAG | (part_total & MASK32)
        yield ("publish",)
        q = part - 1
        while True:
            while True:
                s = mem.status[mem.st(status_base + q)]
                if (s >> 32) != 0:
                    break
                yield ("wait", status_base + q)
            before += i32(s & MASK32)
            if (s & PREFIX_FLAG) != 0 or "lookback_one" in broken:
                break
            q -= 1
            if q < 0:
                raise OOB("look-back walked past part 0")
    mem.status[mem.st(status_base + part)] = PREFIX_FLAG | ((before + part_total) & MASK32)
    yield ("publish",)
    return before


# ---------------------------------------------------------------------------------------------------------------
# compact_key_parts_kernel<false>: 256 threads x 8 consecutive keys, a warp shuffle scan, parts of 2048.
def chunk_cta(mem, block_idx):
    c = mem.c
    ticket = mem.ticket
    mem.ticket += 1
    yield ("ticket",)
    chains = (c["B"] * c["Hm"]) & MASK32
    chain = ticket % chains
    part = ticket // chains
    b, hm = chain // c["Hm"], chain % c["Hm"]
    start, klen = key_seq(c, b)
    j0 = part * K_CHUNK
    if part > 0 and j0 >= klen:
        return
    h = hm * c["heads_per_list"]
    tid = np.arange(256)
    first = j0 + tid * 8  # int64
    n_ = klen - first
    valid = np.where(n_ <= 0, 0, np.where(n_ >= 8, 8, n_))
    i = np.arange(8)[None, :]
    inb = i < valid[:, None]
    base = row_start(c, 0, h)
    if c["slots"] is None:
        addr = base + (start + first[:, None]) * c["rs"] + i * c["rs"]
    else:
        sidx = start + first[:, None] + i
        slot = np.zeros_like(sidx)
        slot[inb] = mem.read_slots(sidx[inb])
        cl = np.where(slot < 0, 0, np.where(slot >= c["pool_rows"], c["pool_rows"] - 1, slot))
        addr = base + cl * c["rs"]
    byte = np.zeros(inb.shape, dtype=np.uint8)
    byte[inb] = mem.read_mask(addr[inb])
    keptb = byte != 0
    bits = (keptb.astype(np.int64) << np.arange(8)[None, :]).sum(axis=1)
    n = keptb.sum(axis=1)
    # warp scan: shfl_up inclusive
    inc = n.reshape(8, 32).copy()
    lane = np.arange(32)
    off = 1
    while off < 32:
        up = np.concatenate([inc[:, :off], inc[:, :-off]], axis=1)  # shfl_up: lanes < off get their own value
        inc = np.where(lane[None, :] >= off, inc + up, inc)
        off *= 2
    warp_total = inc[:, 31]
    warp = tid // 32
    before_t = inc.reshape(-1) - n + np.array([warp_total[:w].sum() for w in warp])
    total = int(warp_total.sum())
    before = yield from look_back(mem, chain * c["per_chain"], part, total)
    if j0 + K_CHUNK >= klen:
        mem.write_count(b * c["Hm"] + hm, before + total)
    index0 = hm * c["total_k"] + start
    idx, val = [], []
    for t in range(256):
        slot = before + int(before_t[t])
        for k in range(8):
            if (int(bits[t]) >> k) & 1:
                idx.append(index0 + slot)
                val.append(i32(int(first[t]) + k))
                slot += 1
    mem.write_index(idx, val)


# ---------------------------------------------------------------------------------------------------------------
# compact_key_parts_by_warps_kernel: 8 warps x 16 steps x 32 lanes, lane l key 32 s + l, ballots, parts of 4096.
def warps_cta(mem, block_idx, broken=()):
    c = mem.c
    if "static_part" in broken:  # part from blockIdx, not a ticket
        ticket = block_idx
    else:
        ticket = mem.ticket
        mem.ticket += 1
    yield ("ticket",)
    chains = (c["B"] * c["Hm"]) & MASK32
    chain = ticket % chains
    part = ticket // chains
    b, hm = chain // c["Hm"], chain % c["Hm"]
    start, klen = key_seq(c, b)
    at_k_len = klen
    at_row = start + part * K_WARP_PART
    at_column = row_start(c, 0, hm * c["heads_per_list"])
    at_index = hm * c["total_k"] + start
    at_count = b * c["Hm"] + hm
    j0 = part * K_WARP_PART
    if "no_part_gt0" in broken:
        if j0 >= at_k_len:
            return
    elif part > 0 and j0 >= at_k_len:
        return
    warp = np.arange(8)[:, None, None]
    s = np.arange(16)[None, :, None]
    lane = np.arange(32)[None, None, :]
    left = at_k_len - j0 - warp * 512
    clipped = np.where(left <= 0, 0, np.where(left >= 512, 512, left))
    valid = clipped if "valid_no_lane" in broken else clipped - lane
    row = at_row + warp * 512 + lane
    if "pool_double_start" in broken:
        row = row + start
    inb = np.broadcast_to(32 * s < valid, (8, 16, 32))
    stride = c["rs"]
    if c["slots"] is None:
        addr = at_column + row * stride + s * (32 * stride)  # key = column + row*stride, stepped by 32*stride
    else:
        sidx = np.broadcast_to(row + 32 * s, (8, 16, 32))
        slot = np.zeros((8, 16, 32), dtype=np.int64)
        slot[inb] = mem.read_slots(sidx[inb])
        cl = np.where(slot < 0, 0, np.where(slot >= c["pool_rows"], c["pool_rows"] - 1, slot))
        addr = at_column + cl * stride
    addr = np.broadcast_to(addr, (8, 16, 32))
    byte = np.zeros((8, 16, 32), dtype=np.uint8)
    byte[inb] = mem.read_mask(addr[inb])
    pred = byte != 0
    kept = (pred.astype(np.int64) << np.arange(32)[None, None, :]).sum(axis=2)  # __ballot_sync, (warp, step)
    # lane s holds ballot s; handed back by __shfl_sync(held, s): the same word
    total = np.array([sum(popc(int(kept[w, t])) for t in range(16)) for w in range(8)])
    before_warp = np.concatenate([[0], np.cumsum(total)[:-1]])
    part_total = int(total.sum())
    before = yield from look_back(mem, chain * c["per_chain"], part, part_total, broken)
    last_keys = K_CHUNK if "count_2048" in broken else K_WARP_PART
    if part * K_WARP_PART + last_keys >= at_k_len:
        mem.write_count(at_count, before + part_total)
    idx, val = [], []
    for w in range(8):
        first = at_index + (before + int(before_warp[w]))
        slot = 0
        key0 = [((part * K_WARP_PART + (0 if "key0_no_warp" in broken else w * 512) + l) & MASK32) for l in range(32)]
        for t in range(16):
            kw = int(kept[w, t])
            for l in range(32):
                if (kw >> l) & 1:
                    below = ((1 << l) - 1) if "below_inverted" not in broken else (~((1 << (l + 1)) - 1) & MASK32)
                    idx.append(first + slot + popc(kw & below))
                    val.append(i32(key0[l] + 32 * t))
            slot += popc(kw)
    mem.write_index(idx, val)


# ---------------------------------------------------------------------------------------------------------------
def run_kernel(c, kind, rng, broken=()):
    """compact_keys' parts branch: the memset, then the kernel's CTAs under a random schedule."""
    mem = Memory(c)
    chains = c["B"] * c["Hm"]
    if kind == "chunks":
        ctas = chains * c["per_chain"]
        make = lambda i: chunk_cta(mem, i)  # noqa: E731
    else:
        parts_w = (c["max_k"] + K_WARP_PART - 1) // K_WARP_PART
        if "too_few_parts" in broken:
            parts_w = (c["max_k"] + 2 * K_WARP_PART - 1) // (2 * K_WARP_PART)
        ctas = chains * parts_w
        make = lambda i: warps_cta(mem, i, broken)  # noqa: E731
    order = list(range(ctas))
    mode = rng.random()
    if mode < 0.3:
        order.reverse()
    elif mode < 0.6:
        rng.shuffle(order)
    resident_max = rng.choice([1, 2, 3, 8, 64])
    pending = order[::-1]
    resident = []  # [gen, waiting_on or None]
    while pending or resident:
        while pending and len(resident) < resident_max:
            resident.append([make(pending.pop()), None])
        # deadlock: every resident CTA polls a status still 0 and no slot frees
        if all(r[1] is not None and mem.status[r[1]] >> 32 == 0 for r in resident):
            raise Deadlock(f"{len(resident)} resident CTAs all waiting, {len(pending)} not started")
        k = rng.randrange(len(resident))
        r = resident[k]
        try:
            y = next(r[0])
            r[1] = y[1] if y[0] == "wait" else None
        except StopIteration:
            resident.pop(k)
    return mem


def host_lists(c):
    """The lists by definition: positions j < len of sequence b whose byte of list head hm is nonzero."""
    out = {}
    for b in range(c["B"]):
        start, n = key_seq(c, b)
        for hm in range(c["Hm"]):
            col = row_start(c, 0, hm * c["heads_per_list"])
            lst = []
            for j in range(n):
                r = start + j if c["slots"] is None else clamp_slot(c, int(c["slots"][start + j]))
                if c["mask"][col + r * c["rs"]] != 0:
                    lst.append(j)
            out[(b, hm)] = lst
    return out


EDGE_LENS = [0, 1, 2, 31, 32, 33, 511, 512, 513, 1023, 2047, 2048, 2049, 2560, 4095, 4096, 4097, 6143, 6144,
             8191, 8192, 8193, 12288, 12289]


def make_case(rng):
    B = rng.randint(1, 5)
    Hk = rng.choice([1, 2, 4])
    H = Hk * rng.choice([1, 2, 4])
    which = rng.choice(["1", "Hk", "H"])
    Hm = {"1": 1, "Hk": Hk, "H": H}[which]
    head_group = H // Hm
    lens = [rng.choice(EDGE_LENS) if rng.random() < 0.7 else rng.randint(0, 13000) for _ in range(B)]
    if max(lens) <= K_CHUNK:  # the parts path needs max_seqlen_k > 2048
        lens[rng.randrange(B)] = rng.choice([2049, 4095, 4096, 4097, 8193, rng.randint(2049, 13000)])
    extra = rng.choice([0, 0, 3, 700])
    cu = [0]
    for n in lens:
        cu.append(cu[-1] + n)
    total_k = cu[-1] + extra
    max_k = max(lens) + rng.choice([0, 0, 1, 4096, 5000])
    lie = None
    if rng.random() < 0.2:
        lie = rng.choice(["decreasing", "past_total", "negative", "short_max", "random"])
        if lie == "decreasing" and B >= 2:
            i = rng.randrange(1, B)
            cu[i] = cu[i + 1] + rng.randint(1, 3000)
        elif lie == "past_total":
            cu[-1] = total_k + rng.randint(1, 9000)
        elif lie == "negative":
            cu[rng.randrange(B + 1)] = -rng.randint(1, 5000)
        elif lie == "short_max":
            max_k = max(K_CHUNK + 1, max(lens) - rng.randint(1, 6000))
        else:
            cu = [rng.randint(-100, total_k + 100) for _ in range(B + 1)]
    if max_k <= K_CHUNK:
        max_k = K_CHUNK + 1 + rng.randint(0, 3000)
    seqused = None
    if rng.random() < 0.3:
        seqused = [rng.choice([-1, 0, 1, 511, 512, 2048, 4096, 4097, rng.randint(0, 13000), 10 ** 6]) for _ in range(B)]
    pool = rng.random() < 0.3
    rows = total_k
    slots = None
    pool_rows = 0
    if pool:
        pool_rows = rng.randint(1, total_k + 500) if total_k > 0 else rng.randint(1, 50)
        rows = pool_rows
        slots = np.array([rng.randint(0, pool_rows - 1) for _ in range(total_k)], dtype=np.int64)
        if rng.random() < 0.5 and total_k:  # lying slots: clamped into the pool
            for _ in range(rng.randint(1, 10)):
                slots[rng.randrange(total_k)] = rng.choice([-5, -(2 ** 31), pool_rows, pool_rows + 7, 2 ** 31 - 1])
    layout = rng.choice(["contig", "wide", "transposed", "row0", "head0"])
    if layout == "contig":
        rs, hs = Hm, 1
    elif layout == "wide":
        rs, hs = 2 * Hm, 2
    elif layout == "transposed":
        rs, hs = 1, max(rows, 1)
    elif layout == "row0":
        rs, hs = 0, 1  # expanded over keys
    else:
        rs, hs = Hm if Hm > 1 else 1, 0  # expanded over heads
    size = (max(rows, 1) - 1) * rs + (Hm - 1) * hs + 1
    keep = rng.choice([0.0, 0.02, 0.25, 0.5, 1.0])
    nprng = np.random.default_rng(rng.randrange(2 ** 32))
    mask = (nprng.random(size) < keep).astype(np.uint8) * nprng.integers(1, 256, size, dtype=np.uint8)
    per_chain = (max_k + K_CHUNK - 1) // K_CHUNK
    statuses = B * Hm * per_chain
    assert per_chain > 1 and statuses <= K_MAX_STATUSES
    return dict(B=B, H=H, Hm=Hm, head_group=head_group, heads_per_list=H // Hm, cu_k=cu, total_k=total_k,
                max_k=max_k, seqused=seqused, slots=slots, pool_rows=pool_rows, rs=rs, hs=hs, mask=mask,
                per_chain=per_chain, statuses=statuses, lie=lie, layout=layout, lens=lens, keep=keep)


def overlapping(c):
    spans = sorted((s, s + n) for s, n in (key_seq(c, b) for b in range(c["B"])) if n > 0)
    return any(spans[i][1] > spans[i + 1][0] for i in range(len(spans) - 1))


def check_case(c, rng, broken=()):
    """None when the warps' kernel (with `broken`) agrees with the chunk kernel and the host; else why not."""
    try:
        old = run_kernel(c, "chunks", random.Random(rng.random()))
    except (OOB, Deadlock) as e:
        return f"CHUNK KERNEL: {type(e).__name__}: {e}"
    try:
        new = run_kernel(c, "warps", random.Random(rng.random()), broken)
    except (OOB, Deadlock) as e:
        return f"{type(e).__name__}: {e}"
    if not (new.count_writes == 1).all():
        return f"count written {new.count_writes.tolist()} times per chain"
    if not (old.count_writes == 1).all():
        return f"CHUNK KERNEL: count written {old.count_writes.tolist()} times"
    if overlapping(c):
        return None
    if not np.array_equal(old.count, new.count):
        return f"counts differ: {old.count.tolist()} vs {new.count.tolist()}"
    if not np.array_equal(old.index, new.index):
        d = np.nonzero(old.index != new.index)[0]
        return f"index differs at {d[:5].tolist()}: {old.index[d[:5]].tolist()} vs {new.index[d[:5]].tolist()}"
    ref = host_lists(c)
    for (b, hm), lst in ref.items():
        start, n = key_seq(c, b)
        got_n = int(new.count[b * c["Hm"] + hm])
        got = new.index[hm * c["total_k"] + start: hm * c["total_k"] + start + got_n].tolist()
        if got_n != len(lst) or got != lst:
            return f"list (b={b}, hm={hm}) differs from the host's"
    return None


BROKEN = ["valid_no_lane", "key0_no_warp", "below_inverted", "count_2048", "lookback_one", "no_part_gt0",
          "pool_double_start", "static_part", "too_few_parts"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--cases", type=int, default=3000)
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()
    rng = random.Random(args.seed)
    stats = dict(cases=0, overlapping=0, pool=0, seqused=0, lying=0, empty_or_one=0)
    failures = 0
    cases = []
    for n in range(args.cases):
        c = make_case(rng)
        cases.append(c)
        stats["cases"] += 1
        stats["overlapping"] += overlapping(c)
        stats["pool"] += c["slots"] is not None
        stats["seqused"] += c["seqused"] is not None
        stats["lying"] += c["lie"] is not None
        stats["empty_or_one"] += any(key_seq(c, b)[1] <= 1 for b in range(c["B"]))
        why = check_case(c, rng)
        if why:
            failures += 1
            print(f"case {n} FAILED: {why}\n  {dict((k, v) for k, v in c.items() if k not in ('mask', 'slots'))}")
            if failures > 5:
                break
    print("real kernel:", stats, "failures:", failures)
    # Broken variants: each must fail on some case (the first 400 cases, fresh schedules).
    caught_all = True
    for br in BROKEN:
        brng = random.Random(args.seed + 7)
        hit = None
        for n, c in enumerate(cases[:600]):
            if br == "pool_double_start" and c["slots"] is None:
                continue
            why = check_case(c, brng, (br,))
            if why:
                hit = (n, why)
                break
        print(f"broken variant {br:18s}: {'caught at case %d: %s' % (hit[0], hit[1][:90]) if hit else 'NOT CAUGHT'}")
        caught_all &= hit is not None
    sys.exit(0 if failures == 0 and caught_all else 1)


if __name__ == "__main__":
    main()
