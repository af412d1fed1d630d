# Review aid for docs/pending/review_bwd_dq_tile.md (not a test): the index chain of the dq_tiles path, by hand from
# bwd_params.h (DqTiles), bwd_kernel.cuh (add_dq tile branch, the writer's offset / size) and dq_convert.cuh.
#   python3 docs/pending/review_bwd_dq_tile_layout_sim.py   # prints "layout simulation ok"
# End-to-end index simulation of the dq_tiles path: consumer fragments -> staging (add_dq) -> bulk add (writer)
# -> dq_convert, against the direct dQ. Mirrors bwd_params.h DqTiles and the kernel's index expressions.
import random
def position(c, row):
    chunk = (4 * (c // 16) + (c % 8) // 2) ^ (4 * (row & 1))
    return 4 * chunk + 2 * ((c % 16) // 8) + c % 2
def column(pos, row):
    chunk = (pos // 4) ^ (4 * (row & 1))
    return 16 * (chunk // 4) + 8 * ((pos % 4) // 2) + 2 * (chunk % 4) + pos % 2
def offset(h, cb, row, blocks, total_q):
    return ((h * blocks + cb) * total_q + row) * 64
rng = random.Random(1)
for trial in range(200):
    D = rng.choice((64, 128)); blocks = D // 64; H = rng.randint(1, 3); total_q = rng.randint(1, 300)
    acc = [0.0] * (H * blocks * total_q * 64)
    want = {}
    for _ in range(rng.randint(1, 6)):  # tiles: (h, q_start + m0, rows), any start row
        h = rng.randrange(H); start = rng.randrange(total_q); rows = min(64, total_q - start)
        for w in range(2):
            cb = w if D == 128 else 0
            stage = [None] * (64 * 64)
            for warp in range(4):
                for lane in range(32):
                    g, t = lane // 4, lane % 4
                    row0 = start + g
                    # dq[0][nt][e]: row 16 warp + g + 8 (e >= 2), column 8 nt + 2 t + (e & 1); a value per (w, row, col)
                    val = lambda r, c: float(hash((trial, h, start, w, r, c)) % 1000)
                    for half in range(2):
                        r = 16 * warp + g + 8 * half
                        for j in range(4):
                            p = r * 64 + position(16 * j + 2 * t, row0)
                            assert p % 4 == 0
                            vals = [val(r, 16*j + 2*t), val(r, 16*j + 2*t + 1), val(r, 16*j + 8 + 2*t), val(r, 16*j + 8 + 2*t + 1)]
                            for k in range(4):
                                assert stage[p + k] is None
                                stage[p + k] = vals[k]
                            for col, v in zip((16*j+2*t, 16*j+2*t+1, 16*j+8+2*t, 16*j+8+2*t+1), vals):
                                if r < rows:
                                    key = (start + r, h, cb * 64 + col)
                                    want[key] = want.get(key, 0.0) + v
            dst = offset(h, cb, start, blocks, total_q)
            assert dst + rows * 64 <= offset(h, cb, 0, blocks, total_q) + total_q * 64
            for k in range(rows * 64):
                acc[dst + k] += stage[k]
    # dq_convert
    dq = {}
    for hb in range(H * blocks):
        h, cb = hb // blocks, hb % blocks
        src = offset(h, cb, 0, blocks, total_q)
        for i in range(total_q * 16):
            row, chunk = i // 16, i % 16
            v = acc[src + 4 * i: src + 4 * i + 4]
            c = column(4 * chunk, row)
            for col, x in zip((c, c + 1, c + 8, c + 9), v):
                key = (row, h, cb * 64 + col)
                assert key not in dq
                dq[key] = x
    assert len(dq) == total_q * H * D
    for key, x in dq.items():
        assert x == want.get(key, 0.0), (key, x, want.get(key))
print("layout simulation ok")
