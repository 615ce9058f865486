"""Tests of edgemole.rng (SplitMix64) and of the draws the client makes from it (docs/protocol.md section 10):
the test vectors the native client is checked against too, and the properties the draws must have."""

from __future__ import annotations

import math
import zlib
from collections import Counter
from pathlib import Path

import pytest
import torch

from edge_client.client import batch_seed
from edge_client.local_data import LocalData
from edgemole.adapters.amole.rsea import privatize
from edgemole.data import split_train_test
from edgemole.rng import GAMMA, MASK64, SplitMix64, as_rng

# --- the generator ---------------------------------------------------------------------------------------


def test_known_outputs() -> None:
    rng = SplitMix64(0)
    assert [rng.next_u64() for _ in range(5)] == [
        0xE220A8397B1DCDAF, 0x6E789E6AA1B965F4, 0x06C45D188009454F, 0xF88BB8A8724C81EC, 0x1B39896A51A8749B]
    rng = SplitMix64(42)
    assert [rng.next_u64() for _ in range(5)] == [
        13679457532755275413, 2949826092126892291, 5139283748462763858, 6349198060258255764, 701532786141963250]
    assert SplitMix64(7).permutation(10) == [8, 1, 5, 9, 0, 4, 3, 2, 6, 7]
    assert SplitMix64(1).uniforms(3) == [0.5665615751722809, 0.7457817572627011, 0.9710027535867962]


def test_seeds_are_reduced_mod_2_64_and_runs_are_deterministic() -> None:
    assert SplitMix64(-1).state == MASK64
    assert SplitMix64(2**64 + 5).next_u64() == SplitMix64(5).next_u64()
    a, b = SplitMix64(123), SplitMix64(123)
    assert [a.next_u64() for _ in range(100)] == [b.next_u64() for _ in range(100)]
    assert SplitMix64(1).permutation(100) != SplitMix64(2).permutation(100)
    rng = SplitMix64(9)
    assert as_rng(rng) is rng and as_rng(9).state == rng.state


def test_uniform_is_the_top_53_bits() -> None:
    a, b = SplitMix64(99), SplitMix64(99)
    us = a.uniforms(500)
    assert us == [b.uniform() for _ in range(500)]
    c = SplitMix64(99)
    assert us == [(c.next_u64() >> 11) / 2**53 for _ in range(500)]
    assert all(0.0 <= u < 1.0 for u in us)


def test_below_rejects_biased_draws() -> None:
    rng = SplitMix64(5)
    assert [rng.below(10) for _ in range(8)] == [8, 4, 3, 9, 1, 6, 9, 5]
    # For n = 2**63 + 1 nearly half the draws fall below 2**64 mod n and are drawn again: seed 3's first one does.
    n = 2**63 + 1
    raw = SplitMix64(3)
    first, second = raw.next_u64(), raw.next_u64()
    assert first < (1 << 64) % n <= second
    rng = SplitMix64(3)
    assert rng.below(n) == second % n == 3694763184872335752
    assert rng.state == (3 + 2 * GAMMA) & MASK64  # two draws consumed
    one = SplitMix64(3)
    assert one.below(1) == 0 and one.state == 3 + GAMMA  # even n = 1 consumes a draw
    for bad in (0, -3, 2**64):
        with pytest.raises(ValueError):
            SplitMix64(0).below(bad)


def test_below_and_permutation_are_unbiased() -> None:
    rng = SplitMix64(2024)
    counts = Counter(rng.below(6) for _ in range(60_000))
    assert sorted(counts) == list(range(6))
    assert all(abs(c - 10_000) < 500 for c in counts.values())  # ~5 sigma
    # Every one of the 6 orders of 3 items comes up about equally often.
    orders = Counter(tuple(rng.permutation(3)) for _ in range(30_000))
    assert len(orders) == 6 and all(abs(c - 5_000) < 400 for c in orders.values())
    # Each position of a longer permutation is uniform too.
    first = Counter(rng.permutation(10)[0] for _ in range(20_000))
    assert all(abs(first[i] - 2_000) < 250 for i in range(10))


def test_permutation_is_a_permutation_and_shuffle_matches_it() -> None:
    for n in (0, 1, 2, 17, 30_000):
        p = SplitMix64(n).permutation(n)
        assert sorted(p) == list(range(n))
    items = [f"x{i}" for i in range(50)]
    SplitMix64(4).shuffle(items)
    assert items == [f"x{i}" for i in SplitMix64(4).permutation(50)]


# --- the seeds, the split, the batches and the noise of a client -------------------------------------------


def test_batch_seed_for_any_sign_and_size() -> None:
    crc = zlib.crc32(b"phone-1")
    assert crc == 1792061904
    assert batch_seed(0, "phone-1", 0) == crc
    assert batch_seed(-5, "phone-1", 3) == 1787085646
    assert batch_seed(-1, "", 0) == 2**63 - 1_000_003
    assert batch_seed(2**63 - 1, "x", -(2**63)) == 2362233920


def test_documented_split_example() -> None:
    labels = ["b", "a", "b", "c", "a", "b", "a", "c", "b", "b"]
    # label order [b, c, a] from permutation(3); quotas 1.5, 0.6, 0.9 of 3 give 1, 1, 1; then one shuffle each
    assert SplitMix64(7).permutation(3) == [1, 2, 0]
    assert split_train_test(range(10), labels, 0.3, seed=7) == ([1, 2, 3, 4, 5, 8, 9], [0, 6, 7])
    # members are shuffled in the order of ``indices``
    assert split_train_test([9, 8, 7, 6, 5, 4, 3, 2, 1, 0], labels, 0.3, seed=7) != ([1, 2, 3, 4, 5, 8, 9],
                                                                                      [0, 6, 7])


def _local(tmp_path: Path, rows: int, seed: int = 0) -> LocalData:
    path = tmp_path / "d.csv"
    path.write_text("text,label\n" + "".join(f"t{i},{'ab'[i % 2]}\n" for i in range(rows)))
    return LocalData(path, test_fraction=0.0, seed=seed)


def test_batches_are_seeded_epochs(tmp_path: Path) -> None:
    data = _local(tmp_path, 10)
    batches = data.batch_indices(4, 11)
    got = [next(batches) for _ in range(7)]
    assert got == [[1, 9, 8, 6], [7, 2, 0, 5], [4, 3], [2, 3, 4, 0], [9, 1, 8, 5], [7, 6], [3, 8, 6, 2]]
    rng = SplitMix64(11)
    epochs = [rng.permutation(10) for _ in range(3)]
    assert got[:3] == [epochs[0][:4], epochs[0][4:8], epochs[0][8:]] and sum(got[3:6], []) == epochs[1]
    with pytest.raises(ValueError):
        next(data.batch_indices(0, 1))


def test_aux_rows_use_python_rounding(tmp_path: Path) -> None:
    data = _local(tmp_path, 10)
    perm = SplitMix64(10).permutation(10)
    assert perm == [3, 0, 2, 1, 7, 9, 4, 8, 5, 6]
    assert data.aux_indices(0.25, 100) == perm[:2]  # round(2.5) == 2
    assert data.aux_indices(0.35, 100) == perm[:4]  # round(3.5) == 4
    assert data.aux_indices(1.0, 3) == perm[:3]
    assert data.aux_indices(0.0, 3) == perm[:1]


def test_privatize_draws_r_gamma_uniforms_then_one_sign_uniform_per_coordinate() -> None:
    v = torch.tensor([[3.0, -4.0], [0.5, 1.0]])  # r = 2: three uniforms per coordinate
    eta = 0.7
    u = SplitMix64(17).uniforms(4 * 3)
    noise = []
    for c in range(4):
        gamma = -math.log1p(-u[3 * c]) / eta + -math.log1p(-u[3 * c + 1]) / eta
        noise.append(gamma * (2 * u[3 * c + 2] - 1))
    clean = v.double().reshape(-1)
    noisy = clean + torch.tensor(noise, dtype=torch.float64)
    if noisy.norm() > clean.norm():
        noisy = noisy * (clean.norm() / noisy.norm())
    got = privatize(v, eta, 17)
    assert got.dtype == v.dtype and got.shape == v.shape
    assert torch.equal(got, noisy.reshape(2, 2).float())
    # an rng object continues where it is: two calls draw 12 + 12 uniforms
    rng = SplitMix64(17)
    assert torch.equal(privatize(v, eta, rng), got)
    assert rng.state == SplitMix64(17 + 12 * GAMMA).state
    assert not torch.equal(privatize(v, eta, rng), got)


def test_protocol_section_10_states_these_vectors() -> None:
    """docs/protocol.md section 10 is what other implementations are written from: its vectors must be the code's."""
    text = (Path(__file__).resolve().parent.parent / "docs" / "protocol.md").read_text()
    section = " ".join(text[text.index("## 10. Shared randomness"):].split())
    rng0, rng42 = SplitMix64(0), SplitMix64(42)
    expected = [
        ", ".join(str(rng0.next_u64()) for _ in range(5)),
        ", ".join(str(rng42.next_u64()) for _ in range(5)),
        str(SplitMix64(7).permutation(10)),
        ", ".join(repr(u) for u in SplitMix64(1).uniforms(3)),
        str(SplitMix64(-1).next_u64()),
        f"gives {SplitMix64(3).below(2**63 + 1)}",
        f"= {batch_seed(-5, 'phone-1', 3)}",
        f"test rows are {split_train_test(range(10), list('babcabacbb'), 0.3, 7)[1]}",
        str(SplitMix64(10).permutation(10)),
        str(privatize(torch.tensor([[3.0, -4.0], [0.5, 1.0]]), 0.7, 17).tolist()),
    ]
    for vector in expected:
        assert vector in section
