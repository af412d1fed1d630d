"""A model of the sm90a backward's dQ in tiles (BwdParams::dq_tiles, csrc/cuda/sm90a/bwd_kernel.cuh): each consumer
warpgroup stages its dQ part of a tile in shared memory behind the named barriers dq_empty(cw) = 12 + cw and
dq_full(cw) = 14 + cw (160 threads: 128 consumers and producer warp 3), and warp 3 issues one bulk reduce-add per
warpgroup and tile, waiting for the bulk engine to have read a staging (cp.async.bulk.wait_group.read) before it hands
it back. Run over random CTAs (query heads per KV head, tiles per head, dead heads, a partial last tile, D = 64 or
128, lse by TMA or by warps 1-2, zero-item and all-dead CTAs) and random interleavings of every warp of the CTA and
of the bulk engine (tests/test_protocol_models.py runs it in CI).

What it models, at warp granularity (a named barrier counts the arrivals of whole warps, 32 threads each, as PTX
does; bar.arrive does not wait; bar.sync waits for its phase to complete; every participant must give one count):
  producer thread 0  Q and dO of every item into two 2-stage rings (dO first past the first two items), a stage
                     refilled once all 8 consumer warps released the item two before
  warps 1-3          the K / V gather (barrier 6 of 96 threads, the live heads ORed in, kv_full), then without
                     kRowTma warps 1-2 the row statistics ring; warp 3 the dQ writer (below)
  consumer warps     the kernel's per-item sequence: the dead-heads skip (wait and hand back), consumer_sync
                     (barrier 1) on a partial tile, the stagger (11), ds_ready (7-10, D = 128) or the warpgroup's
                     barrier (4 + cw, D = 64) before the dS^T write, and the late tile's staging (add_dq) between dO's
                     release and Q's; after the walk the last computed tile's
  dQ writer (warp 3) the same walk (with kDeadHeads: after kv_full, dead heads skipped); per computed tile
                     wait_group.read 1, arrive dq_empty(0), wait_group.read 0, arrive dq_empty(1) (the first tile at
                     once), then per warpgroup bar.sync dq_full(w) and one bulk reduce-add; at the end wait_group 0
  bulk engine        each reduce-add is read (in any order, at any later time), then completes
Checks: no deadlock; no barrier phase mixes two roles or two tiles; no barrier left with a pending arrival; no
staging written while a bulk operation from it is not yet read; no bulk operation reading a staging some warp has not
finished writing for its tile; every computed (warpgroup, tile) reduced exactly once and nothing else; the writer's
tile count equal to each consumer warp's.

    python3 tools/model_bwd_dq_tile.py [TRIALS]   # exit status 1 on any violation

Mutations it catches (the module-level switches below; tests/test_protocol_models.py tries them): the writer not
skipping dead heads' items, the writer reading live_heads without waiting for kv_full, the writer handing a staging
back without waiting for its read, warpgroup 1's staging handed back after wait_group.read 1 instead of 0, the first
tile's dq_empty arrivals left out, a count of 128 (the writer warp forgotten) or 192 on the dQ barriers, only the
leader lane's arrival counted."""
import random
import sys

WARP = 32
STAGES = 2
DQ_EMPTY, DQ_FULL = 12, 14
CONSUMER_BARRIER, WARPGROUP_BARRIER, GATHER_BARRIER, STAGGER_BARRIER = 1, 4, 6, 11

# The protocol as bwd_kernel.cuh writes it; a test flips one at a time (a mutation the model must catch).
DQ_THREADS = 128 + 32        # kDqBarrierThreads
WRITER_ARRIVAL = WARP        # threads one arrival of the writer counts for (1: only the leader lane's, hypothetically)
WRITER_SKIPS_DEAD = True     # the writer skips dead heads' items, as the consumers do
WRITER_WAITS_KV = True       # with kDeadHeads the writer reads live_heads after kv_full
WRITER_WAITS_READ = True     # wait_group.read before each dq_empty arrival (past the first tile)
WG1_READ_WAIT = 0            # wait_group.read N before dq_empty(1): N = 0 (warpgroup 0's op is read by N = 1)
FIRST_EMPTY_ARRIVE = True    # the first computed tile's dq_empty arrivals (the stagings start free)


def ds_ready(cw, n):
    return 7 + 2 * cw + (n & 1)


class Cta:
    def __init__(self, rng, group, tiles, dead, partial_last, d128, row_tma, dead_heads_kernel):
        self.rng, self.group, self.tiles = rng, group, tiles
        self.items = group * tiles
        self.dead = dead if dead_heads_kernel else set()
        self.partial_last, self.d128, self.row_tma, self.kdead = partial_last, d128, row_tma, dead_heads_kernel
        # which gather warps (1-3) see a key of each live head: each live head at least one
        self.sees = {w: set() for w in (1, 2, 3)}
        for hh in range(group):
            if hh not in self.dead:
                for w in rng.sample((1, 2, 3), rng.randint(1, 3)):
                    self.sees[w].add(hh)
        self.errors = []
        self.phase = {}     # barrier id -> {"count", "threads", "tags": [(who, tag)]} of its open phase
        self.done = {}      # barrier id -> phases completed
        self.q_full, self.do_full, self.rows_full = set(), set(), {}
        self.q_rel, self.do_rel, self.rows_rel = [0] * STAGES, [0] * STAGES, [0] * STAGES
        self.kv_arrived, self.live_heads = 0, set()
        self.staging = [[None] * 4 for _ in range(2)]  # warpgroup -> warp -> (item, "writing" | "written")
        self.ops = []       # bulk reduce-adds in issue order: {"w", "item", "state": issued | reading | read | done}
        self.reduced = {}   # (warpgroup, item) -> completed reduce-adds
        self.staged = {}    # consumer warp -> items it staged, in order
        self.written_by_writer = []
        self.at = {}        # process -> what it waits for (for the deadlock report)

    # ---- named barriers (bar.arrive / bar.sync with a thread count) ----
    def arrive(self, who, bid, count, tag, threads=WARP):
        ph = self.phase.get(bid)
        if ph is None:
            ph = self.phase[bid] = {"count": count, "threads": 0, "tags": []}
        elif ph["count"] != count:
            self.errors.append(f"barrier {bid}: {who} gives count {count}, the phase has {ph['count']}")
        ph["threads"] += threads
        ph["tags"].append((who, tag))
        gen = self.done.get(bid, 0)
        if ph["threads"] >= ph["count"]:
            if len({t for _, t in ph["tags"]}) != 1:
                self.errors.append(f"barrier {bid}'s phase mixes {ph['tags']}")
            self.done[bid] = gen + 1
            del self.phase[bid]
        return gen

    def sync(self, who, bid, count, tag, threads=WARP):
        gen = self.arrive(who, bid, count, tag, threads)
        self.at[who] = f"bar.sync {bid} {tag}"
        yield lambda: self.done.get(bid, 0) > gen

    def steps(self, most):  # time passing: yields any interleaving may separate
        for _ in range(self.rng.randint(0, most)):
            yield lambda: True

    def wait(self, who, what, pred):
        self.at[who] = what
        yield pred

    def live(self, hh):
        return hh not in self.dead

    def partial(self, item):
        return self.partial_last and item % self.tiles == self.tiles - 1

    # ---- producer thread 0: Q and dO by TMA ----
    def producer(self):
        who = "tma"
        for item in range(self.items):
            for k in range(2):
                ring_q = (k == 0) == (item < STAGES)
                rel = self.q_rel if ring_q else self.do_rel
                yield from self.wait(who, f"acquire {'Q' if ring_q else 'dO'} {item}",
                                     lambda rel=rel, item=item: rel[item % STAGES] >= 8 * (item // STAGES))
                (self.q_full if ring_q else self.do_full).add(item)
                yield from self.steps(1)

    # ---- warps 1-3: gather, then row statistics (warps 1-2, without kRowTma) or the dQ writer (warp 3) ----
    def gather(self, warp):
        who = f"warp{warp}"
        yield from self.steps(2)
        yield from self.sync(who, GATHER_BARRIER, 96, "gather")
        yield from self.steps(2)
        if self.kdead:
            self.live_heads |= self.sees[warp]  # atomicOr
        yield from self.steps(2)
        self.kv_arrived += 1  # kv_full.arrive
        if warp == 3:
            yield from self.writer()
        elif not self.row_tma:
            for item in range(self.items):
                yield from self.wait(who, f"acquire rows {item}",
                                     lambda item=item: self.rows_rel[item % STAGES] >= 8 * (item // STAGES))
                yield from self.steps(1)
                self.rows_full[item] = self.rows_full.get(item, 0) + 1

    def unread_but(self, last):  # cp.async.bulk.wait_group.read `last`: all but the `last` most recent groups read
        older = self.ops[:len(self.ops) - last] if last else self.ops
        return all(op["state"] in ("read", "done") for op in older)

    def writer(self):
        who = "writer"
        live = set(range(self.group))
        if self.kdead:
            if WRITER_WAITS_KV:
                yield from self.wait(who, "kv_full", lambda: self.kv_arrived == 3)
            live = set(self.live_heads)
        first = True
        for item in range(self.items):
            if self.kdead and WRITER_SKIPS_DEAD and item // self.tiles not in live:
                continue
            if not first and WRITER_WAITS_READ:
                yield from self.wait(who, "wait_group.read 1", lambda: self.unread_but(1))
            if not first or FIRST_EMPTY_ARRIVE:
                self.arrive(who, DQ_EMPTY + 0, DQ_THREADS, ("dq_empty", 0, item), WRITER_ARRIVAL)
            if not first and WRITER_WAITS_READ:
                yield from self.wait(who, f"wait_group.read {WG1_READ_WAIT}", lambda: self.unread_but(WG1_READ_WAIT))
            if not first or FIRST_EMPTY_ARRIVE:
                self.arrive(who, DQ_EMPTY + 1, DQ_THREADS, ("dq_empty", 1, item), WRITER_ARRIVAL)
            first = False
            self.written_by_writer.append(item)
            for w in range(2):
                yield from self.sync(who, DQ_FULL + w, DQ_THREADS, ("dq_full", w, item), WRITER_ARRIVAL)
                self.ops.append({"w": w, "item": item, "state": "issued"})
                yield from self.steps(1)
        yield from self.wait(who, "wait_group 0", lambda: all(op["state"] == "done" for op in self.ops))

    # ---- the bulk engine: one step of a reduce-add ----
    def advance(self, op):
        w, item = op["w"], op["item"]
        if op["state"] == "issued":
            got = self.staging[w]
            if any(part != (item, "written") for part in got):
                self.errors.append(f"reduce-add of warpgroup {w}, item {item} reads a staging holding {got}")
            op["state"] = "reading"
        elif op["state"] == "reading":
            op["state"] = "read"
        else:
            op["state"] = "done"
            self.reduced[(w, item)] = self.reduced.get((w, item), 0) + 1

    # ---- consumer warps (warpgroup cw = warp // 4) ----
    def add_dq(self, warp, cw, item):
        who = f"c{warp}"
        yield from self.sync(who, DQ_EMPTY + cw, DQ_THREADS, ("dq_empty", cw, item))
        pending = [op["item"] for op in self.ops if op["w"] == cw and op["state"] in ("issued", "reading")]
        if pending:
            self.errors.append(f"warp {warp} writes item {item} into warpgroup {cw}'s staging before the "
                               f"reduce-add of item {pending} read it")
        self.staging[cw][warp % 4] = (item, "writing")
        yield from self.steps(2)
        pending = [op["item"] for op in self.ops if op["w"] == cw and op["state"] in ("issued", "reading")]
        if pending:
            self.errors.append(f"warp {warp} wrote item {item} while the reduce-add of item {pending} read it")
        self.staging[cw][warp % 4] = (item, "written")
        self.staged.setdefault(warp, []).append(item)
        self.arrive(who, DQ_FULL + cw, DQ_THREADS, ("dq_full", cw, item))  # after fence.proxy.async

    def consumer(self, warp):
        who, cw = f"c{warp}", warp // 4
        self.staged[warp] = []
        yield from self.wait(who, "kv_full", lambda: self.kv_arrived == 3)
        live = set(self.live_heads) if self.kdead else set(range(self.group))
        computed, late = 0, None
        for item in range(self.items):
            in_q = lambda item=item: item in self.q_full
            in_do = lambda item=item: item in self.do_full
            in_rows = lambda item=item: self.rows_full.get(item, 0) == 2
            if item // self.tiles not in live:  # the dead-heads skip: the stage waited for and handed back
                yield from self.wait(who, f"Q {item}", in_q)
                yield from self.wait(who, f"dO {item}", in_do)
                if not self.row_tma:
                    yield from self.wait(who, f"rows {item}", in_rows)
                self.q_rel[item % STAGES] += 1
                self.do_rel[item % STAGES] += 1
                if not self.row_tma:
                    self.rows_rel[item % STAGES] += 1
                continue
            n, computed = computed, computed + 1
            partial = self.partial(item)
            yield from self.wait(who, f"Q {item}", in_q)
            if not self.row_tma:
                yield from self.wait(who, f"rows {item}", in_rows)
            if partial:
                yield from self.wait(who, f"dO {item}", in_do)
                yield from self.steps(1)
                yield from self.sync(who, CONSUMER_BARRIER, 256, ("partial", item))
            stagger = n == 0 or partial
            if stagger and cw == 1:
                yield from self.sync(who, STAGGER_BARRIER, 256, ("stagger", n))
            yield from self.steps(1)
            yield from self.wait(who, f"dO {item}", in_do)
            yield from self.steps(1)
            if stagger and cw == 0:
                self.arrive(who, STAGGER_BARRIER, 256, ("stagger", n))
            yield from self.steps(2)  # P^T, dV, dS^T
            if n > 0:
                if self.d128:
                    yield from self.sync(who, ds_ready(1 - cw, n - 1), 256, ("ds", 1 - cw, n - 1))
                else:
                    yield from self.sync(who, WARPGROUP_BARRIER + cw, 128, ("wg", cw, n))
            yield from self.steps(1)  # dS^T written
            if self.d128:
                self.arrive(who, ds_ready(cw, n), 256, ("ds", cw, n))
            yield from self.steps(1)  # the late dQ and dK issued, dV and dQ landed
            self.do_rel[item % STAGES] += 1
            if late is not None:
                yield from self.add_dq(warp, cw, late)
            yield from self.steps(1)  # dK landed
            self.q_rel[item % STAGES] += 1
            if not self.row_tma:
                self.rows_rel[item % STAGES] += 1
            late = item
        if late is not None:
            if self.d128:
                yield from self.sync(who, ds_ready(1 - cw, computed - 1), 256, ("ds", 1 - cw, computed - 1))
            else:
                yield from self.sync(who, WARPGROUP_BARRIER + cw, 128, ("wg", cw, computed))
            yield from self.steps(1)
            yield from self.add_dq(warp, cw, late)

    def run(self):
        if self.items == 0:  # every thread returns before the first barrier
            return
        procs = {"tma": self.producer(), "writer": self.gather(3)}
        procs.update({f"warp{w}": self.gather(w) for w in (1, 2)})
        procs.update({f"c{w}": self.consumer(w) for w in range(8)})
        waiting = {name: next(gen, None) for name, gen in procs.items()}
        while True:
            choices = [("p", name) for name, pred in waiting.items() if pred is not None and pred()]
            choices += [("op", op) for op in self.ops if op["state"] != "done"]
            if not choices:
                stuck = {name: self.at.get(name) for name, pred in waiting.items() if pred is not None}
                if stuck:
                    self.errors.append(f"deadlock: {stuck}")
                break
            kind, x = self.rng.choice(choices)
            if kind == "op":
                self.advance(x)
            else:
                waiting[x] = next(procs[x], None)
            if len(self.errors) > 4:
                return

    def check(self):
        if self.items == 0 or any(e.startswith("deadlock") for e in self.errors):
            return
        for bid, ph in self.phase.items():
            self.errors.append(f"barrier {bid} left with pending arrivals {ph['tags']}")
        live = set(self.live_heads) if self.kdead else set(range(self.group))
        computed = [i for i in range(self.items) if i // self.tiles in live]
        want = {(w, i): 1 for i in computed for w in (0, 1)}
        if self.reduced != want:
            self.errors.append(f"reduced {sorted(self.reduced.items())}, want each of {sorted(want)} once")
        for warp, items in self.staged.items():
            if items != computed or self.written_by_writer != computed:
                self.errors.append(f"warp {warp} staged {items}, the writer walked {self.written_by_writer}, "
                                   f"computed tiles {computed}")


def random_cta(rng):
    group = rng.choice((1, 1, 2, 4, 8, 32))
    tiles = rng.choice((0, 1, 1, 2, 3, 5))
    kdead = rng.random() < 0.6
    p_dead = rng.choice((0.0, 0.3, 0.6, 1.0))
    dead = {hh for hh in range(group) if rng.random() < p_dead}
    return Cta(rng, group, tiles, dead, rng.random() < 0.5, rng.random() < 0.6, rng.random() < 0.5, kdead)


def main(trials):
    failures = 0
    for seed in range(trials):
        rng = random.Random(seed)
        cta = random_cta(rng)
        cta.run()
        cta.check()
        if cta.errors:
            failures += 1
            if failures <= 3:
                print(f"seed {seed} (group {cta.group}, tiles {cta.tiles}, dead {sorted(cta.dead)}, "
                      f"partial {cta.partial_last}, D {128 if cta.d128 else 64}, row_tma {cta.row_tma}, "
                      f"kDeadHeads {cta.kdead}): {cta.errors[:2]}")
    print(f"{trials} CTAs, {failures} with a violation")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(int(sys.argv[1]) if len(sys.argv) > 1 else 2000))
