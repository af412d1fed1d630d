"""A model of the sm90a backward's consumer protocol (csrc/cuda/sm90a/bwd_kernel.cuh: each tile's dQ issued a tile
late, the two consumer warpgroups staggered half a tile) at D = 128, run under random interleavings of its two consumer
warpgroups (tests/test_protocol_models.py runs it in CI). Checks: no deadlock; each late dQ product reads
its own tile's dS^T from both warpgroups; no dS^T buffer is written while a dQ product may still read it; no named
barrier's phase mixes two tiles. Named barriers count threads as PTX does (bar.arrive / bar.sync, 128 per warpgroup,
complete at 256); the Q / dO stage of item i is refilled once both warpgroups released item i - 2's.

    python3 tools/model_bwd_dq_late.py [TRIALS]   # exit status 1 on any violation

Mutations it catches (tried): two dS^T buffers instead of three, one barrier id per warpgroup instead of two by
parity, the wait for the other warpgroup's tile n - 1 moved after the write of tile n."""
import random
import sys

BUFFERS, STAGES, COUNT, WG = 3, 2, 256, 128


def ds_ready(cw, n):
    return 7 + 2 * cw + (n & 1)


class Model:
    def __init__(self, rng, items, dead, partial, stagger):
        self.rng, self.items, self.dead, self.partial, self.stagger = rng, items, dead, partial, stagger
        self.arrived = {}    # barrier id -> [(warpgroup, tag)] of its current phase
        self.passed = {}     # barrier id -> warpgroups its last completed phase released (bar.sync)
        self.written = [dict() for _ in range(BUFFERS)]  # buffer -> {warpgroup: tile}
        self.reads = [set() for _ in range(BUFFERS)]     # buffer -> {(warpgroup, tile)} of dQ products in flight
        self.released = [[0] * STAGES for _ in range(2)]
        self.errors = []

    def arrive(self, cw, bid, tag, waits):
        phase = self.arrived.setdefault(bid, [])
        phase.append((cw, tag, waits))
        if len(phase) * WG == COUNT:
            if len({t for _, t, _ in phase}) != 1 or len({w for w, _, _ in phase}) != 2:
                self.errors.append(f"barrier {bid}'s phase mixes {[(w, t) for w, t, _ in phase]}")
            self.passed.setdefault(bid, set()).update(w for w, _, waits in phase if waits)
            self.arrived[bid] = []

    def sync(self, cw, bid, tag):  # bar.sync: arrive, then wait for the phase to complete
        self.arrive(cw, bid, tag, True)
        yield lambda: cw in self.passed.get(bid, set())
        self.passed[bid].discard(cw)

    def steps(self, most):  # time passing: yields that any interleaving may separate
        for _ in range(self.rng.randint(0, most)):
            yield lambda: True

    def consumer(self, cw):
        other, n, late = 1 - cw, 0, None
        for item in range(self.items):
            yield lambda item=item: all(self.released[w][item % STAGES] >= item // STAGES for w in (0, 1))
            if item in self.dead:  # a dead head's item: waited for and handed back
                self.released[cw][item % STAGES] += 1
                continue
            if item in self.partial:  # rows past the sequence zeroed by both warpgroups: consumer_sync
                yield from self.sync(cw, 1, ("partial", item))
            if self.stagger and n == 0 and cw == 1:
                yield from self.sync(cw, 11, "stagger")
            yield from self.steps(3)  # S^T, dP^T, P^T, dV, dS^T
            if self.stagger and n == 0 and cw == 0:
                self.arrive(cw, 11, "stagger", False)
            if n > 0:
                yield from self.sync(cw, ds_ready(other, n - 1), ("ds", other, n - 1))
            if self.reads[n % BUFFERS]:
                self.errors.append(f"warpgroup {cw} writes tile {n} into a buffer dQ reads: {self.reads[n % BUFFERS]}")
            self.written[n % BUFFERS][cw] = n
            self.arrive(cw, ds_ready(cw, n), ("ds", cw, n), False)
            yield from self.late_dq(cw, n - 1 if late is not None else None)
            yield from self.steps(2)  # dK lands
            self.released[cw][item % STAGES] += 1
            late, n = item, n + 1
        if late is not None:
            yield from self.sync(cw, ds_ready(other, n - 1), ("ds", other, n - 1))
            yield from self.late_dq(cw, n - 1)

    def late_dq(self, cw, tile):
        if tile is None:  # the first tile's product: its result is dropped
            return
        buf = tile % BUFFERS
        if self.written[buf] != {0: tile, 1: tile}:
            self.errors.append(f"warpgroup {cw}'s dQ of tile {tile} reads {self.written[buf]}")
        self.reads[buf].add((cw, tile))
        yield from self.steps(3)
        self.reads[buf].discard((cw, tile))

    def run(self):
        live = {cw: self.consumer(cw) for cw in (0, 1)}
        waiting = {cw: next(live[cw], None) for cw in (0, 1)}
        while any(w is not None for w in waiting.values()):
            ready = [cw for cw, w in waiting.items() if w is not None and w()]
            if not ready:
                self.errors.append("deadlock")
                return
            cw = self.rng.choice(ready)
            waiting[cw] = next(live[cw], None)


def main(trials):
    failures = 0
    for seed in range(trials):
        rng = random.Random(seed)
        items = rng.randint(1, 24)
        dead = {i for i in range(items) if rng.random() < 0.25}
        partial = {i for i in range(items) if rng.random() < 0.2}
        for stagger in (False, True):
            model = Model(rng, items, dead, partial, stagger)
            model.run()
            if model.errors:
                failures += 1
                print(f"seed {seed}, stagger {stagger}: {model.errors[:2]}")
    print(f"{2 * trials} interleavings, {failures} with a violation")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(int(sys.argv[1]) if len(sys.argv) > 1 else 2000))
