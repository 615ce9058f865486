#include "rng.h"

#include <numeric>
#include <stdexcept>

namespace edgemole {

std::uint64_t SplitMix64::next_u64() {
  state_ += 0x9E3779B97F4A7C15ULL;
  std::uint64_t z = state_;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
  return z ^ (z >> 31);
}

std::uint64_t SplitMix64::below(std::uint64_t n) {
  if (n == 0) throw std::invalid_argument("SplitMix64::below needs n >= 1");
  const std::uint64_t threshold = (0 - n) % n;  // (2^64 - n) mod n == 2^64 mod n
  for (;;) {
    const std::uint64_t x = next_u64();
    if (x >= threshold) return x % n;
  }
}

double SplitMix64::uniform() { return static_cast<double>(next_u64() >> 11) * 0x1.0p-53; }

std::vector<std::size_t> SplitMix64::permutation(std::size_t n) {
  std::vector<std::size_t> order(n);
  std::iota(order.begin(), order.end(), std::size_t{0});
  shuffle(order);
  return order;
}

}  // namespace edgemole
