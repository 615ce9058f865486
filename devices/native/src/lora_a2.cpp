#include "lora_a2.h"

#include <algorithm>
#include <cmath>
#include <set>
#include <tuple>

#include "errors.h"

namespace edgemole {

std::string active_factor(const std::string& phase) {
  if (phase == kTrainB) return "lora_B";
  if (phase == kTrainA) return "lora_A";
  throw ProtocolError("not an alternating phase: '" + phase + "'");
}

std::vector<std::string> adapter_prefixes(const TensorMap& state) {
  std::vector<std::string> out;
  const std::string suffix = ".lora_A";
  for (const auto& item : state) {
    const std::string& name = item.first;
    if (name.size() > suffix.size() && name.compare(name.size() - suffix.size(), suffix.size(), suffix) == 0) {
      const std::string prefix = name.substr(0, name.size() - suffix.size());
      if (state.count(prefix + ".lora_B")) out.push_back(prefix);
    }
  }
  return out;  // std::map iterates in byte order, which is Python's sorted() for these ASCII names
}

std::string adapter_module(const std::string& prefix) {
  const auto expert = prefix.rfind(".expert.");
  if (expert != std::string::npos) return prefix.substr(0, expert);
  const std::string shared = ".shared";
  if (prefix.size() > shared.size() && prefix.compare(prefix.size() - shared.size(), shared.size(), shared) == 0) {
    return prefix.substr(0, prefix.size() - shared.size());
  }
  return prefix;
}

namespace {

// Norms of the columns (B) or rows (A) of a row-major matrix, accumulated in double, rounded to float32.
std::vector<float> column_norms(const std::vector<float>& m, std::int64_t rows, std::int64_t cols) {
  std::vector<double> acc(static_cast<std::size_t>(cols), 0.0);
  for (std::int64_t i = 0; i < rows; ++i) {
    for (std::int64_t j = 0; j < cols; ++j) {
      const double v = m[static_cast<std::size_t>(i * cols + j)];
      acc[static_cast<std::size_t>(j)] += v * v;
    }
  }
  std::vector<float> out;
  for (double a : acc) out.push_back(static_cast<float>(std::sqrt(a)));
  return out;
}

std::vector<float> row_norms(const std::vector<float>& m, std::int64_t rows, std::int64_t cols) {
  std::vector<float> out;
  for (std::int64_t i = 0; i < rows; ++i) {
    double acc = 0.0;
    for (std::int64_t j = 0; j < cols; ++j) {
      const double v = m[static_cast<std::size_t>(i * cols + j)];
      acc += v * v;
    }
    out.push_back(static_cast<float>(std::sqrt(acc)));
  }
  return out;
}

std::vector<float> difference(const Tensor& after, const Tensor& before) {
  std::vector<float> a = after.f32();
  const std::vector<float> b = before.f32();
  for (std::size_t i = 0; i < a.size(); ++i) a[i] -= b[i];
  return a;
}

}  // namespace

std::map<std::string, std::vector<float>> rank_scores(const TensorMap& global, const TensorMap& probed,
                                                      const std::vector<std::string>& prefixes,
                                                      const std::string& phase) {
  const std::string factor = active_factor(phase);
  std::map<std::string, std::vector<float>> scores;
  for (const std::string& p : prefixes) {
    const Tensor& a = global.at(p + ".lora_A");  // (r, d_in)
    const Tensor& b = global.at(p + ".lora_B");  // (d_out, r)
    const std::int64_t r = a.shape[0], d_in = a.shape[1], d_out = b.shape[0];
    std::vector<float> left, right;
    if (factor == "lora_B") {
      left = column_norms(difference(probed.at(p + ".lora_B"), b), d_out, r);
      right = row_norms(a.f32(), r, d_in);
    } else {
      left = column_norms(b.f32(), d_out, r);
      right = row_norms(difference(probed.at(p + ".lora_A"), a), r, d_in);
    }
    std::vector<float> s(static_cast<std::size_t>(r));
    for (std::size_t i = 0; i < s.size(); ++i) s[i] = left[i] * right[i];
    scores[p] = s;
  }
  return scores;
}

Selection select_ranks(const std::map<std::string, std::vector<float>>& scores, std::int64_t budget) {
  if (budget < 0) throw std::invalid_argument("budget must be >= 0");
  // (score, adapter position, rank): highest score first, then the earlier adapter, then the lower rank.
  std::vector<std::tuple<double, std::int64_t, std::int64_t>> pairs;
  std::vector<std::string> names;
  Selection selection;
  for (const auto& item : scores) {
    const auto k = static_cast<std::int64_t>(names.size());
    names.push_back(item.first);
    selection[item.first] = {};
    for (std::size_t i = 0; i < item.second.size(); ++i) {
      pairs.emplace_back(static_cast<double>(item.second[i]), k, static_cast<std::int64_t>(i));
    }
  }
  std::sort(pairs.begin(), pairs.end(), [](const auto& x, const auto& y) {
    if (std::get<0>(x) != std::get<0>(y)) return std::get<0>(x) > std::get<0>(y);
    if (std::get<1>(x) != std::get<1>(y)) return std::get<1>(x) < std::get<1>(y);
    return std::get<2>(x) < std::get<2>(y);
  });
  const std::size_t take = std::min(pairs.size(), static_cast<std::size_t>(budget));
  for (std::size_t n = 0; n < take; ++n) {
    selection[names[static_cast<std::size_t>(std::get<1>(pairs[n]))]].push_back(std::get<2>(pairs[n]));
  }
  for (auto& item : selection) std::sort(item.second.begin(), item.second.end());
  return selection;
}

void hold_unselected(TensorMap& current, const TensorMap& global, const Selection& selection,
                     const std::string& phase) {
  const std::string factor = active_factor(phase);
  for (const auto& item : selection) {
    const std::string name = item.first + "." + factor;
    Tensor& now = current.at(name);
    const Tensor& before = global.at(name);
    const std::int64_t rows = now.shape[0], cols = now.shape[1];
    std::vector<std::uint8_t> keep(static_cast<std::size_t>(factor == "lora_B" ? cols : rows), 0);
    for (std::int64_t rank : item.second) keep[static_cast<std::size_t>(rank)] = 1;
    auto* out = reinterpret_cast<float*>(now.bytes.data());
    const auto* ref = reinterpret_cast<const float*>(before.bytes.data());
    for (std::int64_t i = 0; i < rows; ++i) {
      for (std::int64_t j = 0; j < cols; ++j) {
        const bool selected = keep[static_cast<std::size_t>(factor == "lora_B" ? j : i)] != 0;
        const auto at = static_cast<std::size_t>(i * cols + j);
        if (!selected) out[at] = ref[at];
      }
    }
  }
}

TensorMap encode_slices(const TensorMap& state, const Selection& selection, const std::string& phase) {
  const std::string factor = active_factor(phase);
  TensorMap out;
  for (const auto& item : selection) {
    const std::vector<std::int64_t>& ranks = item.second;
    if (ranks.empty()) continue;
    const Tensor& full = state.at(item.first + "." + factor);
    const std::vector<float> values = full.f32();
    const std::int64_t rows = full.shape[0], cols = full.shape[1];
    const auto k = static_cast<std::int64_t>(ranks.size());
    std::vector<float> slice;
    if (factor == "lora_B") {  // selected columns: (d_out, k)
      for (std::int64_t i = 0; i < rows; ++i) {
        for (std::int64_t rank : ranks) slice.push_back(values[static_cast<std::size_t>(i * cols + rank)]);
      }
      out[item.first + "." + factor] = Tensor::from_f32({rows, k}, slice);
    } else {  // selected rows: (k, d_in)
      for (std::int64_t rank : ranks) {
        slice.insert(slice.end(), values.begin() + rank * cols, values.begin() + (rank + 1) * cols);
      }
      out[item.first + "." + factor] = Tensor::from_f32({k, cols}, slice);
    }
    out[item.first + ".ranks"] = Tensor::from_i64({k}, ranks);
  }
  return out;
}

}  // namespace edgemole

namespace edgemole {

namespace {

// Columns [0, k) of B (d_out, r) or rows [0, k) of A (r, d_in); `zero_rest` keeps the shape and zeroes the others.
Tensor leading(const Tensor& t, bool columns, std::int64_t k, bool zero_rest) {
  const std::vector<float> v = t.f32();
  const std::int64_t rows = t.shape[0], cols = t.shape[1];
  std::vector<float> out;
  for (std::int64_t i = 0; i < rows; ++i) {
    for (std::int64_t j = 0; j < cols; ++j) {
      const bool inside = columns ? j < k : i < k;
      const float x = v[static_cast<std::size_t>(i * cols + j)];
      if (zero_rest) {
        out.push_back(inside ? x : 0.0f);
      } else if (inside) {
        out.push_back(x);
      }
    }
  }
  if (zero_rest) return Tensor::from_f32(t.shape, out);
  return Tensor::from_f32(columns ? std::vector<std::int64_t>{rows, k} : std::vector<std::int64_t>{k, cols}, out);
}

}  // namespace

TensorMap truncate_ranks(const TensorMap& state, const std::vector<std::string>& prefixes, std::int64_t k) {
  TensorMap out = state;
  for (const std::string& p : prefixes) {
    out[p + ".lora_B"] = leading(state.at(p + ".lora_B"), true, k, true);
    out[p + ".lora_A"] = leading(state.at(p + ".lora_A"), false, k, true);
  }
  return out;
}

TensorMap leading_ranks(const TensorMap& state, const std::vector<std::string>& prefixes, std::int64_t k) {
  TensorMap out = state;
  for (const std::string& p : prefixes) {
    out[p + ".lora_B"] = leading(state.at(p + ".lora_B"), true, k, false);
    out[p + ".lora_A"] = leading(state.at(p + ".lora_A"), false, k, false);
  }
  return out;
}

}  // namespace edgemole
