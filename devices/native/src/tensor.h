// A named tensor as it crosses the wire or sits in the program: dtype, shape and little-endian bytes.
#pragma once

#include <cstdint>
#include <map>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

namespace edgemole {

// The dtypes the wire protocol allows (docs/protocol.md section 2.2); the model itself only uses F32 and I64.
enum class DType : std::uint8_t { F32, F16, BF16, I64, I32 };

const char* dtype_name(DType dtype);
std::size_t dtype_size(DType dtype);
std::optional<DType> parse_dtype(std::string_view name);

struct Tensor {
  DType dtype = DType::F32;
  std::vector<std::int64_t> shape;
  std::vector<std::uint8_t> bytes;  // row-major, little-endian

  // Product of the shape (1 for a scalar).
  std::int64_t numel() const;

  static Tensor from_f32(std::vector<std::int64_t> shape, const float* values);
  static Tensor from_f32(std::vector<std::int64_t> shape, const std::vector<float>& values);
  static Tensor from_i64(std::vector<std::int64_t> shape, const std::vector<std::int64_t>& values);

  // The values as binary32 (F32, F16 and BF16); throws std::logic_error for integer dtypes.
  std::vector<float> f32() const;
  // The values as int64 (I64 and I32); throws std::logic_error for float dtypes.
  std::vector<std::int64_t> i64() const;
  bool is_floating() const { return dtype == DType::F32 || dtype == DType::F16 || dtype == DType::BF16; }
};

// Tensors by name, in name order.
using TensorMap = std::map<std::string, Tensor>;

}  // namespace edgemole
