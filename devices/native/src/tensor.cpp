#include "tensor.h"

#include <cmath>
#include <cstring>
#include <stdexcept>

namespace edgemole {
namespace {

static_assert(sizeof(float) == 4, "binary32 floats expected");

// IEEE binary16 to binary32, exactly (subnormals, infinities and NaN included).
float half_to_float(std::uint16_t h) {
  const std::uint32_t sign = static_cast<std::uint32_t>(h & 0x8000u) << 16;
  const std::uint32_t exponent = (h >> 10) & 0x1fu;
  const std::uint32_t mantissa = h & 0x3ffu;
  float magnitude;
  if (exponent == 0) {
    magnitude = std::ldexp(static_cast<float>(mantissa), -24);
  } else if (exponent == 31) {
    magnitude = mantissa ? std::nanf("") : INFINITY;
  } else {
    magnitude = std::ldexp(static_cast<float>(mantissa | 0x400u), static_cast<int>(exponent) - 25);
  }
  float out = magnitude;
  if (sign) out = -out;
  return out;
}

template <typename T>
T load_le(const std::uint8_t* p) {
  T value{};
  std::memcpy(&value, p, sizeof(T));  // the supported targets (x86-64, aarch64, arm64-v8a) are little-endian
  return value;
}

}  // namespace

const char* dtype_name(DType dtype) {
  switch (dtype) {
    case DType::F32:
      return "F32";
    case DType::F16:
      return "F16";
    case DType::BF16:
      return "BF16";
    case DType::I64:
      return "I64";
    case DType::I32:
      return "I32";
  }
  return "?";
}

std::size_t dtype_size(DType dtype) {
  switch (dtype) {
    case DType::F32:
      return 4;
    case DType::F16:
      return 2;
    case DType::BF16:
      return 2;
    case DType::I64:
      return 8;
    case DType::I32:
      return 4;
  }
  return 0;
}

std::optional<DType> parse_dtype(std::string_view name) {
  for (DType d : {DType::F32, DType::F16, DType::BF16, DType::I64, DType::I32}) {
    if (name == dtype_name(d)) return d;
  }
  return std::nullopt;
}

std::int64_t Tensor::numel() const {
  std::int64_t n = 1;
  for (std::int64_t d : shape) n *= d;
  return n;
}

Tensor Tensor::from_f32(std::vector<std::int64_t> shape, const float* values) {
  Tensor t{DType::F32, std::move(shape), {}};
  t.bytes.resize(static_cast<std::size_t>(t.numel()) * 4);
  if (!t.bytes.empty()) std::memcpy(t.bytes.data(), values, t.bytes.size());
  return t;
}

Tensor Tensor::from_f32(std::vector<std::int64_t> shape, const std::vector<float>& values) {
  Tensor t = from_f32(std::move(shape), values.data());
  if (static_cast<std::size_t>(t.numel()) != values.size()) throw std::logic_error("tensor shape and values differ");
  return t;
}

Tensor Tensor::from_i64(std::vector<std::int64_t> shape, const std::vector<std::int64_t>& values) {
  Tensor t{DType::I64, std::move(shape), {}};
  if (static_cast<std::size_t>(t.numel()) != values.size()) throw std::logic_error("tensor shape and values differ");
  t.bytes.resize(values.size() * 8);
  if (!t.bytes.empty()) std::memcpy(t.bytes.data(), values.data(), t.bytes.size());
  return t;
}

std::vector<float> Tensor::f32() const {
  const auto n = static_cast<std::size_t>(numel());
  std::vector<float> out(n);
  const std::uint8_t* p = bytes.data();
  switch (dtype) {
    case DType::F32:
      if (n) std::memcpy(out.data(), p, n * 4);
      break;
    case DType::F16:
      for (std::size_t i = 0; i < n; ++i) out[i] = half_to_float(load_le<std::uint16_t>(p + 2 * i));
      break;
    case DType::BF16:
      for (std::size_t i = 0; i < n; ++i) {
        const std::uint32_t bits = static_cast<std::uint32_t>(load_le<std::uint16_t>(p + 2 * i)) << 16;
        std::memcpy(&out[i], &bits, 4);
      }
      break;
    default:
      throw std::logic_error("f32() of an integer tensor");
  }
  return out;
}

std::vector<std::int64_t> Tensor::i64() const {
  const auto n = static_cast<std::size_t>(numel());
  std::vector<std::int64_t> out(n);
  if (dtype == DType::I64) {
    if (n) std::memcpy(out.data(), bytes.data(), n * 8);
  } else if (dtype == DType::I32) {
    for (std::size_t i = 0; i < n; ++i) out[i] = load_le<std::int32_t>(bytes.data() + 4 * i);
  } else {
    throw std::logic_error("i64() of a float tensor");
  }
  return out;
}

}  // namespace edgemole
