"""Review model (CPU, no GPU): the sm90a backward's Q / dO rings (bc098b4) as a protocol, searched for deadlocks.

Actors: the producer (thread 0) and the two consumer warpgroups. Each is a straight-line program of blocking steps,
built from bwd_kernel.cuh at a00923a:
  producer, per item n: the two loads in the kernel's order (`(k == 0) == (item < kStages)`: Q then dO for the first
      kStages items, dO then Q after), each `producer_acquire` = wait until both warpgroups released that ring's
      stage for item n - kStages (its previous use); a TMA, once issued, lands (its bytes always match: see review).
  consumer warpgroup cw, per item n (item index; c = computed-tile index, skipped items aside):
      dead (kDeadHeads skip): wait Q(n), wait dO(n), release Q(n), release dO(n)
      else: wait Q(n); partial: wait dO(n), consumer_sync (both warpgroups, by partial-tile count);
            stagger (c == 0 or partial): cw 1 waits for cw 0's arrive of the same stagger index;
            wait dO(n); cw 0 arrives on stagger; c > 0: ds_wait(other, c - 1); ds_arrive(c);
            release dO(n); release Q(n)
      after the loop: c > 0: ds_wait(other, c_last)
Named barriers are modelled as "the other warpgroup has arrived for this index" (their phase reuse is the earlier
review's concern, unchanged here). A state is stuck when some actor is unfinished and none can step. Every call is
run under many random schedules; the kernel's order must never get stuck. To show that the model sees the deadlock
the brief names (a producer waiting on a slot the consumers free only after a load queued behind that wait), a
variant with one stage whose consumers wait for item n + 1's dO before handing back item n's Q must get stuck with Q
issued first, and not with dO first.
Run: python3 docs/pending/review_bwd_rings_model.py
"""

import random
import sys


def programs(items, dead, partial, stages, order, release_q_late=False):
    prod = []
    for n in range(items):
        first = ["q", "do"] if order(n, stages) else ["do", "q"]
        prod += [("acquire", r, n) for r in first]
    cons = {0: [], 1: []}
    for cw in (0, 1):
        c = 0
        p = 0  # partial-tile index (consumer_sync / stagger pairing)
        s = 0  # stagger index
        prog = cons[cw]
        for n in range(items):
            if dead[n]:
                prog += [("wait", "q", n), ("wait", "do", n), ("release", "q", n), ("release", "do", n)]
                continue
            prog.append(("wait", "q", n))
            if partial[n]:
                prog += [("wait", "do", n), ("sync", p)]
                p += 1
            stagger = c == 0 or partial[n]
            if stagger and cw == 1:
                prog.append(("stagger_wait", s))
            prog.append(("wait", "do", n))
            if stagger and cw == 0:
                prog.append(("stagger_arrive", s))
            if stagger:
                s += 1
            if c > 0:
                prog.append(("ds_wait", c - 1))
            prog.append(("ds_arrive", c))
            prog.append(("release", "do", n))
            if release_q_late and n + 1 < items:
                prog.append(("wait", "do", n + 1))
            prog.append(("release", "q", n))
            c += 1
        if c > 0:
            prog.append(("ds_wait", c - 1))
    return prod, cons


def run(items, dead, partial, stages, order, rng, release_q_late=False):
    prod, cons = programs(items, dead, partial, stages, order, release_q_late)
    issued = set()  # (ring, n)
    released = {0: set(), 1: set()}  # (ring, n)
    arrived = {0: set(), 1: set()}  # ("ds", c) / ("stagger", s) / ("sync", p)
    pc = {"p": 0, 0: 0, 1: 0}

    def can(actor):
        prog = prod if actor == "p" else cons[actor]
        if pc[actor] >= len(prog):
            return False
        op, *a = prog[pc[actor]]
        if op == "acquire":
            ring, n = a
            return n < stages or all((ring, n - stages) in released[w] for w in (0, 1))
        if op == "wait":
            return tuple(a) in issued
        if op in ("release", "ds_arrive", "stagger_arrive"):
            return True
        if op == "ds_wait":
            return ("ds", a[0]) in arrived[1 - actor]
        if op == "stagger_wait":
            return ("stagger", a[0]) in arrived[0]
        if op == "sync":  # both arrive, then both pass
            return ("sync", a[0]) in arrived[1 - actor] or _at_sync(1 - actor, a[0])
        raise AssertionError(op)

    def _at_sync(other, p):
        prog = cons[other]
        return pc[other] < len(prog) and prog[pc[other]] == ("sync", p)

    def step(actor):
        prog = prod if actor == "p" else cons[actor]
        op, *a = prog[pc[actor]]
        if op == "acquire":
            issued.add(tuple(a))
        elif op == "release":
            released[actor].add(tuple(a))
        elif op == "ds_arrive":
            arrived[actor].add(("ds", a[0]))
        elif op == "stagger_arrive":
            arrived[actor].add(("stagger", a[0]))
        elif op == "sync":
            arrived[actor].add(("sync", a[0]))
        pc[actor] += 1

    while True:
        ready = [x for x in ("p", 0, 1) if can(x)]
        if not ready:
            done = pc["p"] == len(prod) and all(pc[w] == len(cons[w]) for w in (0, 1))
            return done, {k: (v, (prod if k == "p" else cons[k])[v:v + 1]) for k, v in pc.items()}
        step(rng.choice(ready))


def kernel_order(n, stages):  # bwd_kernel.cuh: Q first for the first kStages items, dO first after
    return n < stages


def q_first(n, stages):  # Q before dO in every item
    return True


def main():
    rng = random.Random(7)
    calls = 0
    for _ in range(4000):
        items = rng.randint(1, 12)
        dead = [rng.random() < 0.25 for _ in range(items)]
        partial = [rng.random() < 0.3 for _ in range(items)]
        for _ in range(5):
            ok, where = run(items, dead, partial, 2, kernel_order, rng)
            calls += 1
            if not ok:
                print("DEADLOCK in the kernel's protocol", items, dead, partial, where)
                return 1
    print(f"kernel protocol: {calls} random schedules of random calls (1-12 items, dead heads, partial tiles): "
          "no deadlock")
    # the model sees a deadlock where one exists: one stage, consumers that wait for item n + 1's dO before handing
    # back item n's Q; with Q issued first, dO(n + 1) is queued behind Q(n + 1)'s acquire, which needs that release
    for order, label in ((q_first, "Q first"), (kernel_order, "dO first (the kernel's)")):
        stuck = sum(not run(6, [False] * 6, [False] * 6, 1, order, rng, release_q_late=True)[0] for _ in range(200))
        print(f"variant 'one stage, Q handed back after the next dO wait', {label}: stuck in {stuck}/200 schedules")
    return 0


if __name__ == "__main__":
    sys.exit(main())
