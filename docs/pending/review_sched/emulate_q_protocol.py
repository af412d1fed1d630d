#!/usr/bin/env python3
"""Model check of the dynamic scheduler's Q-buffer publish protocol (fwd_kernel.cuh, kDynamic), at warpgroup
granularity, over random interleavings:
  producer (thread 0): per use k (every unit, empty or not, and the end): qb = k % NB; k >= NB: q_empty[qb].wait of
    use k - NB; write words[qb]; q_full[qb] arrive (+ TMA bytes landing later for a unit with KV tiles).
  each consumer warpgroup (128 threads arriving together; its store thread's late arrival separately, kStagedOut):
    q_full[qb].wait; read words; end -> stop; empty -> release_last_q, q_empty[qb] += 128, ++q_uses;
    else -> first S (release_last_q, the previous use's +1 per warpgroup), last S (q_empty[qb] += 128), ++q_uses.
mbarriers with parity waits (try_wait.parity: returns once the phase of that parity completed), counts as inited:
q_full 1 (+ tx), q_empty 256 + 2 (staged, two buffers) or 256.
Checks: no deadlock; the words a consumer reads are its use's; the producer never rewrites a buffer's words before
every consumer read them; no barrier completes a phase more than one ahead of a waiter (parity aliasing).
"""
import random


class MBar:
    def __init__(self, count):
        self.count, self.pending, self.phase, self.tx = count, count, 0, 0

    def arrive(self, n=1, tx=0):
        self.pending -= n
        self.tx += tx
        assert self.pending >= 0, "too many arrivals in a phase"
        self._maybe()

    def complete_tx(self, tx):
        self.tx -= tx
        self._maybe()

    def _maybe(self):
        if self.pending == 0 and self.tx == 0:
            self.phase += 1
            self.pending = self.count

    def done(self, parity, use):
        # parity wait for use `use` (phase use of this barrier); phase counter must not alias two ahead
        assert self.phase <= use + 1, f"phase aliasing: barrier at {self.phase}, waiter for use {use}"
        return self.phase % 2 != parity


def run(rng, units_empty, NB, staged):
    n = len(units_empty)
    q_full = [MBar(1) for _ in range(NB)]
    q_empty = [MBar(256 + (2 if staged else 0)) for _ in range(NB)]
    words = [None] * NB
    reads_left = [0] * NB  # consumer warpgroups that still must read words[qb]
    tma_inflight = []
    # producer state
    prod = {"k": 0, "stage": "wait", "done": False}
    cons = [{"q": 0, "stage": "wait_full", "done": False, "unit": None} for _ in range(2)]

    def prod_step():
        k = prod["k"]
        qb = k % NB
        if k >= NB and not q_empty[qb].done(((k // NB) - 1) % 2, k // NB - 1):
            return False
        assert reads_left[qb] == 0, "producer rewrites words before every consumer read them"
        end = k >= n
        words[qb] = ("end", k) if end else ("unit", k, units_empty[k])
        reads_left[qb] = 2
        if end or units_empty[k]:
            q_full[qb].arrive()
        else:
            q_full[qb].arrive(tx=1)
            tma_inflight.append(qb)
        prod["k"] += 1
        if end:
            prod["done"] = True
        return True

    def cons_step(c):
        s = cons[c]
        qb = s["q"] % NB
        if s["stage"] == "wait_full":
            if not q_full[qb].done((s["q"] // NB) % 2, s["q"] // NB):
                return False
            w = words[qb]
            assert w[1] == s["q"], f"consumer {c} read words of use {w[1]}, expected {s['q']}"
            reads_left[qb] -= 1
            if w[0] == "end":
                s["done"] = True
                return True
            s["unit"] = w
            s["stage"] = "first_s" if not w[2] else "empty"
            return True
        if s["stage"] == "empty":
            if staged and s["q"] > 0:
                q_empty[(s["q"] + NB - 1) % NB].arrive(1)
            q_empty[qb].arrive(128)
            s["q"] += 1
            s["stage"] = "wait_full"
            return True
        if s["stage"] == "first_s":
            if staged and s["q"] > 0:
                q_empty[(s["q"] + NB - 1) % NB].arrive(1)
            s["stage"] = "last_s"
            return True
        if s["stage"] == "last_s":
            q_empty[qb].arrive(128)
            s["q"] += 1
            s["stage"] = "wait_full"
            return True

    steps = 0
    while True:
        actors = []
        if not prod["done"]:
            actors.append("p")
        actors += [c for c in range(2) if not cons[c]["done"]]
        if tma_inflight:
            actors.append("t")
        if not actors:
            break
        rng.shuffle(actors)
        progressed = False
        for a in actors:
            if a == "p":
                progressed = prod_step()
            elif a == "t":
                q_full[tma_inflight.pop(0)].complete_tx(1)
                progressed = True
            else:
                progressed = cons_step(a)
            if progressed:
                break
        assert progressed, f"deadlock: producer use {prod['k']}, consumers {[(s['q'], s['stage']) for s in cons]}"
        steps += 1
    return steps


def main():
    rng = random.Random(7)
    cases = 0
    for trial in range(3000):
        n = rng.choice([0, 1, 2, 3, 4, 5, rng.randint(6, 40)])
        p_empty = rng.choice([0.0, 0.3, 0.7, 1.0])
        units = [rng.random() < p_empty for _ in range(n)]
        for NB, staged in ((2, True), (2, False), (1, False)):
            run(rng, units, NB, staged)
            cases += 1
    print(f"ok: {cases} interleavings (0-40 units per CTA, empty units, 1 / 2 Q buffers, staged or not): "
          "no deadlock, words read are the use's, never rewritten early, no parity aliasing")


if __name__ == "__main__":
    main()
