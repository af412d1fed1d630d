"""An emulation of block_map_vectors' bit arithmetic (csrc/cuda/block_map.cu: nonzero_bytes, block_word; landed
after run EB) in Python integers, against the mask bytes themselves: for random rows of bytes (0, 1 and other nonzero
values, as a uint8 tensor viewed as bool may hold) starting at every offset within a 16-byte chunk, each of the 16
block words the warp assembles equals the bits of its 32 keys.
Run: python3 docs/pending/review_block_map_vectors_emul.py"""

import random

MASK32 = 0xFFFFFFFF


def nonzero_bytes(v: int) -> int:
    """Bit i: byte i of the 32-bit v is nonzero (block_map.cu's word form)."""
    tops = (((v & 0x7F7F7F7F) + 0x7F7F7F7F) | v) & 0x80808080
    return (((tops >> 7) * 0x01020408) & MASK32) >> 24


def chunk_bits(data, c: int) -> int:
    """The 16-bit nonzero mask of 16-byte chunk c (block_map.cu's uint4 form)."""
    b = data[16 * c:16 * c + 16]
    words = [b[4 * i] | b[4 * i + 1] << 8 | b[4 * i + 2] << 16 | b[4 * i + 3] << 24 for i in range(4)]
    return sum(nonzero_bytes(w) << (4 * i) for i, w in enumerate(words))


def block_word(bits, tail_bits: int, off: int, lane: int) -> int:
    """What lane `lane` of the warp computes: bits[l] is lane l's chunk, tail_bits lane 0's chunk 32."""
    lo, mid = bits[(2 * lane) % 32], bits[(2 * lane + 1) % 32]
    hi = tail_bits if lane == 15 else bits[(2 * lane + 2) % 32]
    return ((lo | mid << 16 | hi << 32) >> off) & MASK32


def main(trials: int = 3000) -> None:
    rng = random.Random(1)
    for _ in range(trials):
        off = rng.randrange(16)
        data = [rng.choice([0, 0, 1, 1, 2, 7, 128, 255]) for _ in range(16 * 33)]
        bits = [chunk_bits(data, c) for c in range(32)]
        tail = chunk_bits(data, 32)
        for lane in range(16):
            want = sum(1 << i for i in range(32) if data[off + 32 * lane + i] != 0)
            assert block_word(bits, tail, off, lane) == want, (off, lane)
    print(f"block_word: {trials} rows x 16 words, every offset: equal to the bytes' bits")
    # Aligned rows (block_map_aligned_rows.patch): off = 0, and lane 0's tail a chunk of the row instead of chunk 32
    # (which may lie past the row's extent): any tail gives the same words.
    for _ in range(trials):
        data = [rng.choice([0, 0, 1, 1, 2, 7, 128, 255]) for _ in range(16 * 32)]
        bits = [chunk_bits(data, c) for c in range(32)]
        tail = rng.randrange(1 << 16)
        for lane in range(16):
            want = sum(1 << i for i in range(32) if data[32 * lane + i] != 0)
            assert block_word(bits, tail, 0, lane) == want, lane
    print(f"block_word: {trials} aligned rows x 16 words, any tail: equal to the bytes' bits")


if __name__ == "__main__":
    main()
