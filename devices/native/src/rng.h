// SplitMix64, the one random number generator of a device client (docs/protocol.md section 10). The Python client
// (edgemole/rng.py) draws its held-out split, its batch order and its differential-privacy noise from the same
// generator with the same draws, so both clients can be compared step by step for the same seed.
#pragma once

#include <cstddef>
#include <cstdint>
#include <utility>
#include <vector>

namespace edgemole {

class SplitMix64 {
 public:
  // Any seed; Python's seeds are integers reduced modulo 2^64, which is what the conversion to uint64 does.
  explicit SplitMix64(std::uint64_t seed) : state_(seed) {}

  // state += 0x9E3779B97F4A7C15, then the mix of the new state (all mod 2^64).
  std::uint64_t next_u64();
  // An unbiased integer in [0, n) for n >= 1: draws below 2^64 mod n are rejected (and drawn again), the first
  // accepted draw x gives x mod n. Always consumes at least one draw. Throws std::invalid_argument for n == 0.
  std::uint64_t below(std::uint64_t n);
  // A double in [0, 1): the top 53 bits of one draw times 2^-53.
  double uniform();
  // Fisher-Yates in place: for i from size-1 down to 1, swap items[i] with items[below(i + 1)].
  template <typename T>
  void shuffle(std::vector<T>& items) {
    for (std::size_t i = items.size(); i-- > 1;) {
      const auto j = static_cast<std::size_t>(below(static_cast<std::uint64_t>(i) + 1));
      std::swap(items[i], items[j]);
    }
  }
  // shuffle() of 0, 1, ..., n-1.
  std::vector<std::size_t> permutation(std::size_t n);

  std::uint64_t state() const { return state_; }

 private:
  std::uint64_t state_;
};

}  // namespace edgemole
