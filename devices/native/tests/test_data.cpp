// Tests of the shared RNG, the local data and the UTF-8 helpers (rng.h, data.h, utf8.h): the test vectors of
// docs/protocol.md section 10, the Python behaviours the reader copies (csv module, json values, round(), repr()),
// the known differences of its JSON parser (nlohmann-json) and its one-line errors.
// tests/test_native_data.py compares the same code with the Python client on real datasets.
#include <doctest/doctest.h>
#include <unistd.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <limits>
#include <string>
#include <vector>

#include "data.h"
#include "errors.h"
#include "rng.h"
#include "utf8.h"

namespace fs = std::filesystem;
using edgemole::SplitMix64;
using Rows = std::vector<std::size_t>;

namespace {

// A scratch folder, removed with everything in it at the end of a test.
class TempDir {
 public:
  TempDir() {
    static int counter = 0;
    path_ = fs::temp_directory_path() /
            ("edgemole-test-data-" + std::to_string(::getpid()) + "-" + std::to_string(counter++));
    fs::create_directories(path_);
  }
  ~TempDir() {
    std::error_code ignored;
    fs::remove_all(path_, ignored);
  }
  TempDir(const TempDir&) = delete;
  TempDir& operator=(const TempDir&) = delete;

  // Writes `bytes` to `name` and returns its path.
  std::string write(const std::string& name, const std::string& bytes) const {
    const fs::path file = path_ / name;
    std::ofstream out(file, std::ios::binary);
    out << bytes;
    return file.string();
  }
  std::string path(const std::string& name) const { return (path_ / name).string(); }

 private:
  fs::path path_;
};

// The message of the DataError that loading `path` raises ("" when none is raised).
std::string load_error(const std::string& path, const std::string& text_column = "",
                       const std::string& label_column = "") {
  try {
    edgemole::load_table(path, text_column, label_column);
  } catch (const edgemole::DataError& err) {
    return err.what();
  }
  return "";
}

}  // namespace

// ------------------------------------------------------------------------------------------ the RNG ----------

TEST_CASE("SplitMix64 gives the test vectors of section 10") {
  SplitMix64 zero(0);
  const std::vector<std::uint64_t> expect0 = {16294208416658607535ULL, 7960286522194355700ULL, 487617019471545679ULL,
                                              17909611376780542444ULL, 1961750202426094747ULL};
  for (const auto want : expect0) CHECK(zero.next_u64() == want);
  SplitMix64 answer(42);
  const std::vector<std::uint64_t> expect42 = {13679457532755275413ULL, 2949826092126892291ULL, 5139283748462763858ULL,
                                               6349198060258255764ULL, 701532786141963250ULL};
  for (const auto want : expect42) CHECK(answer.next_u64() == want);
  CHECK(SplitMix64(7).permutation(10) == Rows{8, 1, 5, 9, 0, 4, 3, 2, 6, 7});
  // Python's seed -1 is 2^64 - 1.
  CHECK(SplitMix64(static_cast<std::uint64_t>(-1)).next_u64() == 16490336266968443936ULL);
}

TEST_CASE("uniform() is the top 53 bits of a draw") {
  SplitMix64 rng(1);
  CHECK(rng.uniform() == 0.5665615751722809);
  CHECK(rng.uniform() == 0.7457817572627011);
  CHECK(rng.uniform() == 0.9710027535867962);
  SplitMix64 a(99), b(99);
  for (int i = 0; i < 1000; ++i) {
    const double u = a.uniform();
    CHECK(u == static_cast<double>(b.next_u64() >> 11) / 9007199254740992.0);
    CHECK(u >= 0.0);
    CHECK(u < 1.0);
  }
}

TEST_CASE("below() rejects the draws that would bias it") {
  SplitMix64 small(5);
  for (const std::uint64_t want : {8, 4, 3, 9, 1, 6, 9, 5}) CHECK(small.below(10) == want);
  // For n = 2^63 + 1 almost half of all draws are rejected: the first draw of seed 3 is.
  SplitMix64 big(3);
  CHECK(big.below((1ULL << 63) + 1) == 3694763184872335752ULL);
  CHECK(big.below((1ULL << 63) + 1) == 2084015055746161920ULL);
  SplitMix64 one(3);
  CHECK(one.below(1) == 0);
  CHECK(one.state() == SplitMix64(3).state() + 0x9E3779B97F4A7C15ULL);  // one draw even for n = 1
  CHECK_THROWS_AS(one.below(0), std::invalid_argument);
  // Every value of a small range comes up about equally often.
  SplitMix64 rng(2024);
  std::vector<int> counts(6, 0);
  for (int i = 0; i < 60000; ++i) ++counts[rng.below(6)];
  for (const int c : counts) CHECK(std::abs(c - 10000) < 500);
}

TEST_CASE("permutation() is a permutation and depends on the seed") {
  for (const std::size_t n : {0, 1, 2, 17, 1000}) {
    Rows p = SplitMix64(n).permutation(n);
    Rows sorted = p;
    std::sort(sorted.begin(), sorted.end());
    for (std::size_t i = 0; i < n; ++i) CHECK(sorted[i] == i);
  }
  CHECK(SplitMix64(1).permutation(50) != SplitMix64(2).permutation(50));
  CHECK(SplitMix64(1).permutation(50) == SplitMix64(1).permutation(50));
}

// ----------------------------------------------------------------------------------------- the seeds ----------

TEST_CASE("crc32 and batch_seed equal Python's") {
  CHECK(edgemole::crc32("") == 0);
  CHECK(edgemole::crc32("phone-1") == 1792061904u);
  CHECK(edgemole::crc32("123456789") == 0xCBF43926u);
  CHECK(edgemole::batch_seed(0, "phone-1", 0) == 1792061904u);
  CHECK(edgemole::batch_seed(-5, "phone-1", 3) == 1787085646u);
  CHECK(edgemole::batch_seed(-1, "", 0) == 9223372036853775805ULL);
  CHECK(edgemole::batch_seed(12345678901, "board-7", 99) == 12345719341094935ULL);
  CHECK(edgemole::batch_seed(std::numeric_limits<std::int64_t>::max(), "x", std::numeric_limits<std::int64_t>::min()) ==
        2362233920u);
}

// --------------------------------------------------------------------------------- split and batches ----------

TEST_CASE("the documented split example") {
  const std::vector<std::string> labels = {"b", "a", "b", "c", "a", "b", "a", "c", "b", "b"};
  const auto [train, test] = edgemole::split_train_test(labels, 0.3, 7);
  CHECK(train == Rows{1, 2, 3, 4, 5, 8, 9});
  CHECK(test == Rows{0, 6, 7});
}

TEST_CASE("the validation split: seed + 1 over the training rows, none below 10 rows") {
  const std::vector<std::string> labels = {"b", "a", "b", "c", "a", "b", "a", "c", "b", "b"};
  CHECK(edgemole::split_validation(labels, 0.3, 6) == edgemole::split_train_test(labels, 0.3, 7));
  const std::vector<std::string> nine(labels.begin(), labels.begin() + 9);
  CHECK(edgemole::split_validation(nine, 0.3, 6) == std::pair{Rows{0, 1, 2, 3, 4, 5, 6, 7, 8}, Rows{}});
  CHECK(edgemole::split_validation(labels, 0.0, 6).second.empty());
  // The rows of a file: the test split, then the validation split of the training rows (positions mapped back).
  std::vector<std::string> file(labels);
  file.insert(file.end(), labels.begin(), labels.end());
  const edgemole::RowSplit rows = edgemole::split_rows(file, false, 0.25, 0.3, 41);
  const auto [train, test] = edgemole::split_train_test(file, 0.25, 41);
  CHECK(rows.test == test);
  CHECK(rows.train.size() + rows.val.size() == train.size());
  CHECK(rows.val.size() == 4);  // round(15 * 0.3) of the 15 training rows (4.5, to even)
  for (std::size_t i : rows.val) CHECK(std::binary_search(train.begin(), train.end(), i));
  const edgemole::RowSplit separate = edgemole::split_rows(file, true, 0.25, 0.3, 41);
  CHECK(separate.test.empty());
  CHECK(separate.val.size() == 6);  // round(20 * 0.3)
}

TEST_CASE("split_train_test keeps its bounds") {
  const std::vector<std::string> two = {"a", "b"};
  CHECK(edgemole::split_train_test(two, 0.01, 0).second.size() == 1);
  CHECK(edgemole::split_train_test(two, 0.99, 0).first.size() == 1);
  CHECK(edgemole::split_train_test({"a"}, 0.5, 0) == std::pair{Rows{0}, Rows{}});
  CHECK(edgemole::split_train_test(two, 0.0, 0) == std::pair{Rows{0, 1}, Rows{}});
  CHECK(edgemole::split_train_test({}, 0.5, 0) == std::pair{Rows{}, Rows{}});
  CHECK_THROWS_WITH_AS(edgemole::split_train_test(two, 1.0, 0), "test fraction must be in [0, 1), got 1.0",
                       edgemole::ConfigError);
  CHECK_THROWS_WITH_AS(edgemole::split_train_test(two, -0.1, 0), "test fraction must be in [0, 1), got -0.1",
                       edgemole::ConfigError);
  CHECK_THROWS_AS(edgemole::split_train_test(two, std::numeric_limits<double>::quiet_NaN(), 0), edgemole::ConfigError);
  // Stratified: 60 a and 40 b give 15 and 10 of 25.
  std::vector<std::string> labels(60, "a");
  labels.resize(100, "b");
  const auto [train, test] = edgemole::split_train_test(labels, 0.25, 4);
  CHECK(test.size() == 25);
  CHECK(std::count_if(test.begin(), test.end(), [](std::size_t i) { return i < 60; }) == 15);
  CHECK(train.size() + test.size() == 100);
}

TEST_CASE("BatchOrder runs over shuffled epochs endlessly") {
  edgemole::BatchOrder order(10, 4, 11);
  const std::vector<Rows> expect = {{1, 9, 8, 6}, {7, 2, 0, 5}, {4, 3},      {2, 3, 4, 0},
                                    {9, 1, 8, 5}, {7, 6},       {3, 8, 6, 2}};
  for (const Rows& want : expect) CHECK(order.next() == want);
  CHECK(order.epochs() == 3);
  CHECK_THROWS_AS(edgemole::BatchOrder(0, 4, 1), std::invalid_argument);
  CHECK_THROWS_AS(edgemole::BatchOrder(4, 0, 1), std::invalid_argument);
}

TEST_CASE("aux_indices rounds like Python and takes the first rows of the permutation seeded with num_train") {
  const Rows perm10 = {3, 0, 2, 1, 7, 9, 4, 8, 5, 6};
  CHECK(edgemole::aux_indices(10, 0.25, 100) == Rows(perm10.begin(), perm10.begin() + 2));  // round(2.5) == 2
  CHECK(edgemole::aux_indices(10, 0.35, 100) == Rows(perm10.begin(), perm10.begin() + 4));  // round(3.5) == 4
  CHECK(edgemole::aux_indices(10, 1.0, 3) == Rows(perm10.begin(), perm10.begin() + 3));
  CHECK(edgemole::aux_indices(10, 5.0, 100) == perm10);
  CHECK(edgemole::aux_indices(5, 0.0, 3) == Rows{4});
}

// ------------------------------------------------------------------------------------ Python's helpers ----------

TEST_CASE("py_round, py_float_str and py_repr") {
  CHECK(edgemole::py_round(0.5) == 0);
  CHECK(edgemole::py_round(1.5) == 2);
  CHECK(edgemole::py_round(2.5) == 2);
  CHECK(edgemole::py_round(-0.5) == 0);
  CHECK(edgemole::py_round(-1.5) == -2);
  CHECK(edgemole::py_round(2.5000000000000004) == 3);
  CHECK(edgemole::py_float_str(1.0) == "1.0");
  CHECK(edgemole::py_float_str(-0.0) == "-0.0");
  CHECK(edgemole::py_float_str(0.1) == "0.1");
  CHECK(edgemole::py_float_str(1e16) == "1e+16");
  CHECK(edgemole::py_float_str(9999999999999998.0) == "9999999999999998.0");
  CHECK(edgemole::py_float_str(1.5e-7) == "1.5e-07");
  CHECK(edgemole::py_float_str(0.0001) == "0.0001");
  CHECK(edgemole::py_float_str(1.2345678901234568e+17) == "1.2345678901234568e+17");
  CHECK(edgemole::py_float_str(5e-324) == "5e-324");
  CHECK(edgemole::py_float_str(1e22) == "1e+22");
  CHECK(edgemole::py_repr("a.csv") == "'a.csv'");
  CHECK(edgemole::py_repr("it's") == "\"it's\"");
  CHECK(edgemole::py_repr("a'b\"c") == "'a\\'b\"c'");
  CHECK(edgemole::py_repr("t\tn\nx\x01\x7f\\") == "'t\\tn\\nx\\x01\\x7f\\\\'");
  CHECK(edgemole::py_repr("\xc3\xa9\xc2\xa0\xe2\x80\xa8") == "'\xc3\xa9\\xa0\\u2028'");
  CHECK(edgemole::py_strip(" \t\xe3\x80\x80x y\xc2\x85\n") == "x y");
  CHECK(edgemole::py_strip("\xe2\x80\x8bx") == "\xe2\x80\x8bx");  // U+200B is not whitespace to Python
}

TEST_CASE("UTF-8: strict decoding, one U+FFFD per maximal subpart as Python's errors=\"replace\"") {
  // The example of Unicode's chapter 3 (U+FFFD substitution of maximal subparts).
  CHECK(edgemole::decode_utf8("a\xF1\x80\x80\xE1\x80\xC2\x62\x80\x63\x80\xBF\x64") ==
        std::u32string{U'a', 0xFFFD, 0xFFFD, 0xFFFD, U'b', 0xFFFD, U'c', 0xFFFD, 0xFFFD, U'd'});
  CHECK(edgemole::decode_utf8("\xE2\x82x\xF0\x9F\x98") == std::u32string{0xFFFD, U'x', 0xFFFD});  // cut sequences
  // A surrogate, an overlong form and a code point beyond U+10FFFF: one U+FFFD per byte.
  CHECK(edgemole::decode_utf8("\xED\xA0\x80\xC0\xAF\xF4\x90\x80\x80") == std::u32string(9, 0xFFFD));
  CHECK(edgemole::decode_utf8("\xC3\xA9\xF0\x9F\x98\x80\xEF\xBF\xBF") == std::u32string{0xE9, 0x1F600, 0xFFFF});
  CHECK(edgemole::first_invalid_utf8("ab\xC3\xA9") == std::string::npos);
  CHECK(edgemole::first_invalid_utf8("ab\xE2\x82") == 2);
  CHECK(edgemole::first_invalid_utf8("\xC3\xA9\xED\xBF\xBF") == 2);
  CHECK(edgemole::to_valid_utf8("a\xE2\x82\x62\xFF") == "a\xEF\xBF\xBD\x62\xEF\xBF\xBD");
  std::string out;
  for (const char32_t c : {U'a', char32_t{0xE9}, char32_t{0x20AC}, char32_t{0x1F600}}) edgemole::append_utf8(out, c);
  CHECK(out == "a\xC3\xA9\xE2\x82\xAC\xF0\x9F\x98\x80");
  CHECK(edgemole::count_code_points(out) == 4);
  std::size_t end = out.size();
  CHECK(edgemole::prev_code_point(out, end) == 0x1F600);
  CHECK(end == 6);
  std::string tail = "a\xC3\xA9\x80";  // a stray continuation byte ends it
  end = tail.size();
  CHECK(edgemole::prev_code_point(tail, end) == 0xFFFD);
  CHECK(edgemole::prev_code_point(tail, end) == 0xE9);
  std::size_t i = 0;
  CHECK(edgemole::next_code_point(tail, i) == U'a');
  CHECK(edgemole::next_code_point(tail, i) == 0xE9);
  CHECK(i == 3);
  // Bytes of a path that are not UTF-8 show as Python's surrogateescape shows them.
  CHECK(edgemole::py_repr("a\xE2\x82\xFF\x62.csv") == "'a\\udce2\\udc82\\udcffb.csv'");
}

// ----------------------------------------------------------------------------------------- the reader ----------

TEST_CASE("CSV: BOM, CRLF, quotes, doubled quotes, multi-line fields, blank lines") {
  TempDir dir;
  const std::string path = dir.write("a.csv",
                                     "\xEF\xBB\xBFid,text,label\r\n"
                                     "1,\"hello, world\",  pos \r\n"
                                     "\r\n"
                                     "2,\"she said \"\"hi\"\"\r\nand left\",neg\r\n"
                                     "   \n"
                                     "3, spaced text ,\"\xE3\x80\x80neu\"\r"
                                     "4,a\"b,x\n"
                                     "5,\"ab\"c,y");
  const auto table = edgemole::load_table(path);
  CHECK(table.texts ==
        std::vector<std::string>{"hello, world", "she said \"hi\"\r\nand left", " spaced text ", "a\"b", "abc"});
  CHECK(table.labels == std::vector<std::string>{"pos", "neg", "neu", "x", "y"});
}

TEST_CASE("CSV: an unterminated quote runs to the end of the file; NUL bytes are kept") {
  TempDir dir;
  const auto table = edgemole::load_table(dir.write("a.csv", std::string("text,label\nx\0y,a\nlast,\"b\n", 25)));
  CHECK(table.texts == std::vector<std::string>{std::string("x\0y", 3), "last"});
  CHECK(table.labels == std::vector<std::string>{"a", "b"});  // "b\n", stripped
}

TEST_CASE("CSV: explicit and detected columns") {
  TempDir dir;
  const std::string path = dir.write("a.csv", "sentence,intent,label\ns1,i1,l1\ns2,i2,l2\n");
  CHECK(edgemole::load_table(path).labels == std::vector<std::string>{"l1", "l2"});
  CHECK(edgemole::load_table(path, "", "intent").labels == std::vector<std::string>{"i1", "i2"});
  CHECK(edgemole::load_table(path, "label", "intent").texts == std::vector<std::string>{"l1", "l2"});
}

TEST_CASE("JSON Lines and JSON: values become strings like Python's _to_str") {
  TempDir dir;
  const std::string line =
      R"({"text": "t", "label": 1, "n": null, "f": 1e16, "b": false, "nest": {"z": [1.5, []], "a": "\u00e9\n"}})";
  const auto jsonl = edgemole::load_table(
      dir.write("a.jsonl", line + "\n\n" + R"({"text": 2.50, "label": " x ", "text": "last"})" + "\r\n"));
  CHECK(jsonl.texts == std::vector<std::string>{"t", "last"});  // a repeated key: the last value wins
  CHECK(jsonl.labels == std::vector<std::string>{"1", "x"});
  const auto nested = edgemole::load_table(dir.write("b.jsonl", line), "nest", "f");
  CHECK(nested.texts == std::vector<std::string>{"{\"a\": \"\xC3\xA9\\n\", \"z\": [1.5, []]}"});
  CHECK(nested.labels == std::vector<std::string>{"1e+16"});
  const auto big =
      edgemole::load_table(dir.write("c.json", R"([{"instruction": 18446744073709551615, "category": -0}, )"
                                               R"({"instruction": -9223372036854775808, "category": 0.00001}, )"
                                               R"({"instruction": -0.0, "category": 1E-400}])"));
  CHECK(big.texts == std::vector<std::string>{"18446744073709551615", "-9223372036854775808", "-0.0"});
  CHECK(big.labels == std::vector<std::string>{"0", "1e-05", "0.0"});
  // json.dumps(value, ensure_ascii=False, sort_keys=True), as Python prints it for this value.
  const auto dumped = edgemole::load_table(dir.write(
      "d.jsonl",
      "{\"text\": {\"b\": [1.5, null, true, \"\xE2\x80\xA8\x7f\\u0001\\\"\\\\/\"], \"a\": 18446744073709551615, "
      "\"\xC3\xA9\": -0.0, \"Z\": 1e16, \"c\": {}, \"e\": []}, \"label\": \"x\"}\n"));
  CHECK(dumped.texts == std::vector<std::string>{"{\"Z\": 1e+16, \"a\": 18446744073709551615, \"b\": [1.5, null, true, "
                                                 "\"\xE2\x80\xA8\x7f\\u0001\\\"\\\\/\"], \"c\": {}, \"e\": [], "
                                                 "\"\xC3\xA9\": -0.0}"});
  // Keys keep their order of first appearance, a repeated one its first place, for the column detection.
  const std::string order = dir.write("o.jsonl", R"({"intent": "i", "label": "a", "intent": "j", "text": "t"})");
  CHECK(edgemole::load_table(order).labels == std::vector<std::string>{"a"});
  CHECK(edgemole::load_table(order, "intent").texts == std::vector<std::string>{"j"});
}

TEST_CASE("JSON: the known differences from Python's json module") {
  TempDir dir;
  // Python accepts these; nlohmann-json refuses them with a one-line message that names the place.
  const std::string nan = dir.write("nan.jsonl", R"({"text": "a", "label": NaN})");
  CHECK(load_error(nan).rfind("data file '" + nan + "' line 1 is not valid JSON: ", 0) == 0);
  CHECK(load_error(nan).find("(column 24)") != std::string::npos);
  const std::string inf = dir.write("inf.json", "[{\"text\": \"a\",\n \"label\": -Infinity}]");
  CHECK(load_error(inf).rfind("data file '" + inf + "' is not valid JSON: ", 0) == 0);
  CHECK(load_error(inf).find("(line 2, column 12)") != std::string::npos);
  const std::string surrogate = dir.write("s.jsonl", R"({"text": "\ud800", "label": "a"})");
  CHECK(load_error(surrogate).find("line 1 is not valid JSON: ") != std::string::npos);
  // A number beyond a double's range: nlohmann names no position.
  const std::string huge = dir.write("h.json", R"([{"text": -1E400, "label": "a"}])");
  CHECK(load_error(huge) == "data file '" + huge + "' is not valid JSON: number overflow parsing '-1E400'");
  // Integers beyond 64 bits are read as the nearest double (Python keeps the digits).
  const auto big =
      edgemole::load_table(dir.write("b.jsonl", R"({"text": 123456789012345678901234567890, "label": 1})"));
  CHECK(big.texts == std::vector<std::string>{"1.2345678901234568e+29"});
  // Deeply nested values are refused (Python: RecursionError), not a stack overflow.
  const std::string deep_value = std::string(100000, '[') + std::string(100000, ']');
  const std::string deep = dir.write("deep.jsonl", "{\"text\": \"a\", \"label\": \"b\", \"x\": " + deep_value + "}\n");
  CHECK(load_error(deep) == "data file '" + deep + "' line 1 holds a value nested more than 900 levels deep");
  const std::string shallow =
      dir.write("ok.jsonl", "{\"text\": " + std::string(899, '[') + std::string(899, ']') + ", \"label\": \"b\"}\n");
  CHECK(edgemole::load_table(shallow).texts[0].size() == 899 * 2);
}

TEST_CASE("JSON: syntax errors are one line of valid UTF-8 at Python's line and column") {
  TempDir dir;
  // A BOM inside the text (the file's own is dropped): Python's words, which nlohmann (skipping BOMs) has not.
  const std::string bom = dir.write("bom.jsonl", "{\"text\": \"a\", \"label\": \"b\"}\n\xEF\xBB\xBF{}\n");
  CHECK(load_error(bom) ==
        "data file '" + bom + "' line 2 is not valid JSON: Unexpected UTF-8 BOM (decode using utf-8-sig) (column 1)");
  const std::string bom2 = dir.write("bom.json", "\xEF\xBB\xBF\xEF\xBB\xBF[]");
  CHECK(load_error(bom2) ==
        "data file '" + bom2 + "' is not valid JSON: Unexpected UTF-8 BOM (decode using utf-8-sig) (line 1, column 1)");
  // A character cut by nlohmann's "last read" (é outside a string), line breaks it does not escape, a long tail.
  const std::string cut = dir.write("cut.jsonl", "{\"text\": \xC3\xA9}\n");
  const std::string cut_error = load_error(cut);
  CHECK(cut_error.find("(column 10)") != std::string::npos);
  CHECK(edgemole::first_invalid_utf8(cut_error) == std::string::npos);
  const std::string open =
      dir.write("open.json", "[{\"text\": \"a\xE2\x80\xA8\xC2\x85" + std::string(100000, 'x') + "\n\n");
  const std::string open_error = load_error(open);
  CHECK(open_error.find('\n') == std::string::npos);
  CHECK(open_error.find("\xE2\x80\xA8") == std::string::npos);
  CHECK(open_error.find("<U+2028><U+0085>") != std::string::npos);
  CHECK(open_error.size() < 500);
  CHECK(open_error.find("(line 1, column 100015)") != std::string::npos);  // the raw line break, as Python's
  const std::string end = dir.write("end.json", "[\n{\"text\": \"a\",");
  CHECK(load_error(end).find("(line 2, column 14)") != std::string::npos);
}

TEST_CASE("errors are one line, worded as Python's") {
  TempDir dir;
  const std::string missing = dir.path("missing.csv");
  CHECK(load_error(missing) == "data file '" + missing + "' does not exist");
  CHECK(load_error(dir.path("")) == "data file '" + dir.path("") +
                                        "' has unsupported extension '(none)' "
                                        "(supported: .csv, .jsonl, .json)");
  const std::string txt = dir.write("a.txt", "text,label\n");
  CHECK(load_error(txt) == "data file '" + txt + "' has unsupported extension '.txt' (supported: .csv, .jsonl, .json)");
  fs::create_directories(dir.path("d.csv"));
  CHECK(load_error(dir.path("d.csv")) == "data file '" + dir.path("d.csv") + "' is a directory, not a file");
  const std::string upper = dir.write("U.CSV", "text,label\nx,y\n");
  CHECK(edgemole::load_table(upper).texts == std::vector<std::string>{"x"});

  const std::string empty = dir.write("e.csv", " \r\n\t");
  CHECK(load_error(empty) == "data file '" + empty + "' is empty");
  const std::string bom_only = dir.write("bom.csv", "\xEF\xBB");
  CHECK(load_error(bom_only) == "data file '" + bom_only + "' is empty");
  const std::string bad_utf8 = dir.write("u.csv", "\xEF\xBB\xBFtext,label\nab\xE2\x82,x\n");
  CHECK(load_error(bad_utf8) == "data file '" + bad_utf8 + "' is not valid UTF-8 (byte 13)");
  const std::string header_only = dir.write("h.csv", "text,label\n\n");
  CHECK(load_error(header_only) == "data file '" + header_only + "' has no data rows");
  const std::string twice = dir.write("t.csv", "text,label,text\n");
  CHECK(load_error(twice) == "data file '" + twice + "' has column 'text' twice in its header row");
  const std::string fields = dir.write("f.csv", "text,label\na,b\n\"multi\nline\",b,c\n");
  CHECK(load_error(fields) == "data file '" + fields + "' row 2 (line 3) has 3 fields but the header has 2");

  const std::string cols = dir.write("c.csv", "id,body,label\n1,x,y\n");
  CHECK(load_error(cols) == "data file '" + cols +
                                "' has no text column (looked for text, sentence, content, "
                                "instruction; columns: id, body, label); is the header row missing?");
  CHECK(load_error(cols, "nope") == "data file '" + cols + "' has no column 'nope' (columns: id, body, label)");
  CHECK(load_error(cols, "label", "label") ==
        "data file '" + cols + "': column 'label' cannot be both the text and the label");
  const std::string no_label = dir.write("n.csv", "text,label\nx, \t\n");
  CHECK(load_error(no_label) == "data file '" + no_label + "' row 1 (line 2) has an empty label in column 'label'");
  const std::string no_text = dir.write("n2.jsonl", "{\"text\": \"t\", \"label\": \"a\"}\n{\"label\": \"a\"}\n");
  CHECK(load_error(no_text) == "data file '" + no_text + "' line 2 has an empty text in column 'text'");

  const std::string jsonl =
      dir.write("j.jsonl", "{\"text\": \"a\", \"label\": \"b\"}\n{\"text\": \"\xC3\xA9\", \"label\"}\n");
  CHECK(load_error(jsonl) == "data file '" + jsonl +
                                 "' line 2 is not valid JSON: syntax error while parsing object separator - "
                                 "unexpected '}'; expected ':' (column 22)");
  const std::string list_line = dir.write("l.jsonl", "[1, 2]\n");
  CHECK(load_error(list_line) == "data file '" + list_line + "' line 1 is a JSON list, expected an object");
  const std::string json = dir.write("j.json", "[\n  {\"text\": \"a\", \"label\": \"b\"},\n  {\"text\": \"a\\q\"}\n]");
  CHECK(load_error(json) == "data file '" + json +
                                "' is not valid JSON: syntax error while parsing value - invalid string: forbidden "
                                "character after backslash; last read: '\"a\\q' (line 3, column 15)");
  const std::string dict = dir.write("d.json", "{\"text\": \"a\"}");
  CHECK(load_error(dict) == "data file '" + dict + "' holds a JSON dict, expected a list of objects");
  const std::string element = dir.write("e.json", "[{\"text\": \"a\", \"label\": \"b\"}, null]");
  CHECK(load_error(element) == "data file '" + element + "' element [1] is a JSON NoneType, expected an object");
  const std::string deep = dir.write("deep.jsonl", std::string(5000, '['));
  CHECK(load_error(deep).find("is not valid JSON") != std::string::npos);

  for (const std::string& path : {missing, txt, fields, jsonl, json}) {
    CHECK(load_error(path).find('\n') == std::string::npos);
  }
}
