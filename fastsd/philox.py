"""The standard normal noise torch.randn draws on an NVIDIA GPU, drawn on any device: CUDA's Philox4x32-10
counter-based generator (Salmon et al. 2011, Random123) and curand's Box-Muller transform. A1111 calls this random
number source "NV"; its default, "GPU", draws the same numbers on an NVIDIA card, so most A1111 infotexts (they
write no "RNG" key for "GPU") name noise that this reproduces on a CPU.

Draw n (0, 1, ...) of a generator seeded with `seed`, element i:

    w = Philox4x32-10(counter = (n, 0, i, 0), key = (seed mod 2^32, seed >> 32))
    u = w0 * 2^-32 + 2^-31,  v = (w1 * 2^-32 + 2^-31) * 2 pi        (curand's constants, as float32)
    x = sqrt(-2 ln u) * sin(v)                                      (in float64, then rounded to float32)

which is CUDA's torch.randn as long as every element has a thread of its own (torch launches a thread an element up
to the card's SMs x threads per SM, by its published specs 28 x 1,536 = 43,008 on an RTX 3060, a 4 x 96 x 96
latent; not measured, no GPU here): each thread runs curand_init(seed, subsequence = its index, offset = 4n)
and takes the first normal of its Box-Muller pair. The arithmetic after the words is A1111's NV generator's,
float64; CUDA's own is float32 with a fast sine on the GPU, a few float32 ulps away (up to 2.4e-7 in seed 0's
first 12 numbers: no visible change to an image).
tests/test_philox.py holds the generator to Random123's known answers and to CUDA's numbers for seed 0.
"""
from __future__ import annotations

import math

import numpy as np
import torch

M0, M1 = np.uint64(0xD2511F53), np.uint64(0xCD9E8D57)  # the round's multipliers
W0, W1 = np.uint64(0x9E3779B9), np.uint64(0xBB67AE85)  # the key's increments between rounds (Weyl sequence)
LOW = np.uint64(0xFFFFFFFF)
SHIFT = np.uint64(32)
ROUNDS = 10
INV_2_32 = float(np.float32(2.3283064e-10))  # curand's 2^-32 and 2^-32 * 2 pi, float32 constants
INV_2_32_2PI = float(np.float32(2.3283064e-10 * 6.2831855))


def philox4x32(counter: np.ndarray, key: np.ndarray, rounds: int = ROUNDS) -> np.ndarray:
    """Random123's Philox4x32 block function: counter (4, n) and key (2, n) 32-bit words (any unsigned ints below
    2^32) -> (4, n) uint32. The 32 x 32-bit products are exact in uint64."""
    c0, c1, c2, c3 = (np.asarray(w, dtype=np.uint64) for w in counter)
    k0, k1 = (np.asarray(w, dtype=np.uint64) for w in key)
    for r in range(rounds):
        if r:
            k0, k1 = (k0 + W0) & LOW, (k1 + W1) & LOW
        p0, p1 = c0 * M0, c2 * M1
        c0, c1, c2, c3 = (p1 >> SHIFT) ^ c1 ^ k0, p1 & LOW, (p0 >> SHIFT) ^ c3 ^ k1, p0 & LOW
    return np.stack([c0, c1, c2, c3]).astype(np.uint32)


def box_muller_first(w0: np.ndarray, w1: np.ndarray) -> np.ndarray:
    """curand's Box-Muller transform of two words, its first normal (the sine's), float32."""
    u = w0.astype(np.float64) * INV_2_32 + INV_2_32 / 2
    v = w1.astype(np.float64) * INV_2_32_2PI + INV_2_32_2PI / 2
    return (np.sqrt(-2.0 * np.log(u)) * np.sin(v)).astype(np.float32)


class PhiloxGenerator:
    """A seeded stream of CUDA's torch.randn numbers (A1111's "NV" generator): each `randn` call is the next draw.
    Seeds are taken modulo 2^64, as torch's."""

    def __init__(self, seed: int):
        self.seed = int(seed) % 2**64
        self.draws = 0

    def initial_seed(self) -> int:
        return self.seed

    def randn(self, shape: tuple[int, ...]) -> torch.Tensor:
        """Standard normal float32 noise of `shape` on the CPU: this generator's next draw."""
        n = math.prod(shape)
        index = np.arange(n, dtype=np.uint64)
        counter = (np.full(n, self.draws % 2**32, np.uint64), np.zeros(n, np.uint64), index & LOW, index >> SHIFT)
        key = (np.full(n, self.seed & 0xFFFFFFFF, np.uint64), np.full(n, self.seed >> 32, np.uint64))
        self.draws += 1
        w = philox4x32(counter, key)
        return torch.from_numpy(box_muller_first(w[0], w[1])).reshape(shape)
