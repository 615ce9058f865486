// A device's local data as the Python client reads and serves it (edgemole/data/loaders.py, edge_client/local_data.py
// and docs/protocol.md section 10): the same rows from the same file, the same held-out split, the same batch order
// and the same aux sample for the same seed, so that the native and the Python client can be compared step by step.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "pyfmt.h"  // py_repr, py_float_str, py_round, py_strip: once declared here, kept visible
#include "rng.h"

namespace edgemole {

// The text and label of every row of a table, in file order (the other columns are not needed on the device).
struct TextTable {
  std::vector<std::string> texts, labels;
};

// Reads a .csv (header row; Python's csv module with its default dialect), .jsonl (one object a line) or .json
// (a list of objects) file exactly as edgemole/data/loaders.py `load_table` does: the text and label columns are
// the given ones, or else the first present of text, sentence, content, instruction / label, category, label_name,
// intent, class; JSON values become strings as Python's `_to_str` makes them; labels are stripped of surrounding
// whitespace, texts kept exactly. An empty column name means "detect". Every problem is a one-line DataError worded
// as Python's.
TextTable load_table(const std::string& path, const std::string& text_column = "",
                     const std::string& label_column = "");

// The held-out local test split of a table with these labels (Python's `split_train_test` over every row): sorted
// (train, test) row indices. Throws ConfigError unless 0 <= test_fraction < 1.
std::pair<std::vector<std::size_t>, std::vector<std::size_t>> split_train_test(const std::vector<std::string>& labels,
                                                                               double test_fraction,
                                                                               std::uint64_t seed);

// The validation split of a device's training rows (edge_client/local_data.py, docs/protocol.md 10.3a): with
// val_fraction > 0 and at least kMinValidationRows rows, `split_train_test` over the training rows in their order with
// seed + 1 (`seed`: the client's split seed, crc32(client_id)); else every row trains and none validates. Sorted
// (train, validation) positions into `train_labels`; ConfigError for a fraction of 1 or more when it splits.
inline constexpr std::size_t kMinValidationRows = 10;
std::pair<std::vector<std::size_t>, std::vector<std::size_t>> split_validation(
    const std::vector<std::string>& train_labels, double val_fraction, std::uint64_t seed);

// The rows of a data file with these labels that a device trains, validates and tests on, each ascending: the test
// split of `split_train_test` (none with a separate test file: then every row is a training row), then the validation
// split of `split_validation` over the training rows, both from the client's split seed.
struct RowSplit {
  std::vector<std::size_t> train, val, test;
};
RowSplit split_rows(const std::vector<std::string>& labels, bool separate_test, double test_fraction,
                    double val_fraction, std::uint64_t seed);

// zlib's CRC-32 (Python's zlib.crc32): the split seed of a client is crc32(client_id).
std::uint32_t crc32(std::string_view data);

// The batch seed of one round (edge_client/client.py `batch_seed`):
// (task_seed * 1000003 + round * 7919 + crc32(client_id)) mod 2^63, for any signs. The DP seed is this plus 1.
std::uint64_t batch_seed(std::int64_t task_seed, const std::string& client_id, std::int64_t round);

// The endless sequence of training-row batches of `LocalData.train_batches`: one SplitMix64 seeded with `seed`, each
// epoch its next permutation of the rows cut into batches of `batch_size` (the last one of an epoch may be smaller).
class BatchOrder {
 public:
  // Throws std::invalid_argument for no rows or a zero batch size.
  BatchOrder(std::size_t num_train, std::size_t batch_size, std::uint64_t seed);
  std::vector<std::size_t> next();
  // Epochs started so far (1 after the first call of next()).
  std::size_t epochs() const { return epochs_; }

 private:
  std::size_t batch_size_;
  SplitMix64 rng_;
  std::vector<std::size_t> order_;
  std::size_t pos_;
  std::size_t epochs_ = 0;
};

// The rows of `LocalData.aux_batches`: n = max(1, min(max_examples, round(fraction * num_train), num_train)) with
// Python's round, the first n of the permutation of a SplitMix64 seeded with num_train.
std::vector<std::size_t> aux_indices(std::size_t num_train, double fraction, std::size_t max_examples);

}  // namespace edgemole
