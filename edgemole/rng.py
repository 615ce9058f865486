"""The one random number generator that every draw of a device client comes from (docs/protocol.md section 10).

The Python client and the native C++ client must hold out the same local test split, visit the same batches in
the same order and add the same differential-privacy noise for the same seed, so that the two can be compared step
by step. numpy's and torch's generators cannot be reproduced outside their libraries; SplitMix64 is a few lines
in any language, so it is the generator, and the draws made from it (bounded integers, uniform doubles,
permutations) are specified here exactly, not left to a library.
"""

from __future__ import annotations

from collections.abc import MutableSequence
from typing import TypeVar

#: 2**64 - 1: every state and output is reduced modulo 2**64
MASK64 = (1 << 64) - 1
#: the state increment (the golden ratio times 2**64, odd)
GAMMA = 0x9E3779B97F4A7C15
_MIX1 = 0xBF58476D1CE4E5B9
_MIX2 = 0x94D049BB133111EB
#: 2**-53: a 53-bit integer times this is a double in [0, 1), exactly
_UNIT = 1.0 / (1 << 53)

T = TypeVar("T")


def mix64(z: int) -> int:
    """SplitMix64's output function of one state value (a bijection of the 64-bit integers)."""
    z = ((z ^ (z >> 30)) * _MIX1) & MASK64
    z = ((z ^ (z >> 27)) * _MIX2) & MASK64
    return z ^ (z >> 31)


class SplitMix64:
    """SplitMix64 (Steele, Lea and Flood, 2014): ``state += GAMMA`` then :func:`mix64` of the state, mod 2**64.

    Seeds are integers of any size and sign, reduced modulo 2**64 (so ``-1`` is ``2**64 - 1``)."""

    __slots__ = ("state",)

    def __init__(self, seed: int) -> None:
        self.state = int(seed) & MASK64

    def next_u64(self) -> int:
        """The next 64-bit output."""
        self.state = (self.state + GAMMA) & MASK64
        return mix64(self.state)

    def below(self, n: int) -> int:
        """An unbiased integer in ``[0, n)``: draws below ``2**64 mod n`` are rejected (and drawn again), the
        first accepted draw ``x`` gives ``x mod n``. Always consumes at least one draw."""
        if n < 1 or n > MASK64:
            raise ValueError(f"below() needs 1 <= n <= 2**64 - 1, got {n}")
        threshold = (1 << 64) % n
        while True:
            x = self.next_u64()
            if x >= threshold:
                return x % n

    def uniform(self) -> float:
        """A double in ``[0, 1)``: the top 53 bits of one draw times 2**-53."""
        return (self.next_u64() >> 11) * _UNIT

    def uniforms(self, count: int) -> list[float]:
        """``count`` successive :meth:`uniform` draws (the same values, faster)."""
        state, out = self.state, []
        for _ in range(count):
            state = (state + GAMMA) & MASK64
            out.append((mix64(state) >> 11) * _UNIT)
        self.state = state
        return out

    def shuffle(self, items: MutableSequence[T]) -> None:
        """Fisher-Yates in place: for ``i`` from ``len - 1`` down to 1, swap ``items[i]`` with
        ``items[below(i + 1)]``. Uses ``len(items) - 1`` bounded draws (plus any rejected ones)."""
        state = self.state
        for i in range(len(items) - 1, 0, -1):
            n = i + 1
            threshold = (1 << 64) % n
            while True:  # below(n), inlined: permutations of tens of thousands of items are common
                state = (state + GAMMA) & MASK64
                z = ((state ^ (state >> 30)) * _MIX1) & MASK64
                z = ((z ^ (z >> 27)) * _MIX2) & MASK64
                x = z ^ (z >> 31)
                if x >= threshold:
                    break
            j = x % n
            items[i], items[j] = items[j], items[i]
        self.state = state

    def permutation(self, n: int) -> list[int]:
        """A random order of ``0 .. n-1``: :meth:`shuffle` of ``[0, 1, ..., n-1]``."""
        order = list(range(n))
        self.shuffle(order)
        return order


def as_rng(rng: SplitMix64 | int) -> SplitMix64:
    """``rng`` itself, or a new generator seeded with it."""
    return rng if isinstance(rng, SplitMix64) else SplitMix64(rng)
