"""The native client's local data (devices/native/src/data.cpp, rng.cpp) against the Python client's.

``edgemole-data-tool`` prints what the native code makes of a file and a seed; these tests check that it is what
the Python client does (``LocalData`` built as ``edge_client/client.py`` builds it, ``load_table``, ``SplitMix64``)
on real datasets and on files written here: the same rows, the same held-out split, the same batches over several
epochs, the same aux sample and the same one-line errors. ``EDGEMOLE_DATA_TOOL`` may name an already built tool.

The native reader parses JSON with nlohmann-json: a JSON syntax error names the same file and line (JSON Lines) as
Python's, but its reason is nlohmann's wording, and NaN/Infinity, lone surrogate escapes, numbers beyond a double's
range and integers beyond 64 bits are the known differences from Python's json module (devices/native/src/data.cpp).
"""

from __future__ import annotations

import json
import os
import random
import re
import subprocess
import zlib
from pathlib import Path

import pytest
from native import native_build

from edge_client.client import batch_seed
from edge_client.local_data import LocalData
from edgemole.data import load_table
from edgemole.errors import DataError
from edgemole.rng import SplitMix64

SHARED = Path("/work/shared/datasets")
BANKING = SHARED / "banking77" / "test.csv"
NEWSGROUPS = SHARED / "20newsgroups" / "test_part04.csv"  # full posts: long quoted multi-line fields
DOLLY = SHARED / "dolly15k_fedit_10clients" / "global_test.json"


@pytest.fixture(scope="module")
def tool() -> Path:
    override = os.environ.get("EDGEMOLE_DATA_TOOL")
    return Path(override) if override else native_build() / "tests" / "edgemole-data-tool"


def run_tool(tool: Path, *args: object) -> dict:
    proc = subprocess.run([str(tool), *map(str, args)], capture_output=True, text=True, check=False, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def tool_error(tool: Path, *args: object) -> str:
    """The one-line error of a run that must fail with a DataError."""
    proc = subprocess.run([str(tool), *map(str, args)], capture_output=True, text=True, check=False, timeout=120)
    assert proc.returncode == 1, (proc.returncode, proc.stdout[:500], proc.stderr)
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    return lines[0].removeprefix("error: ")


def column_args(text_column: str | None, label_column: str | None) -> list[str]:
    args = []
    if text_column is not None:
        args += ["--text-column", text_column]
    if label_column is not None:
        args += ["--label-column", label_column]
    return args


def python_table(path: Path, text_column: str | None = None, label_column: str | None = None) -> tuple:
    """("ok", texts, labels) or ("error", message) from the Python loader."""
    try:
        data = load_table(path, text_column, label_column)
    except DataError as err:
        return ("error", str(err))
    return ("ok", data.texts, data.labels)


def native_table(tool: Path, path: Path, text_column: str | None = None, label_column: str | None = None) -> tuple:
    proc = subprocess.run([str(tool), "table", str(path), *column_args(text_column, label_column)],
                          capture_output=True, text=True, check=False, timeout=120)
    if proc.returncode == 0:
        out = json.loads(proc.stdout)
        return ("ok", out["texts"], out["labels"])
    assert proc.returncode == 1 and proc.stderr.count("\n") == 1, proc.stderr
    return ("error", proc.stderr.strip().removeprefix("error: "))


JSON_SYNTAX = " is not valid JSON: "
# Where the native reader names a JSON syntax error: Python's column (JSON Lines) or line and column (JSON).
NATIVE_POSITION = re.compile(r" \((line \d+, )?column \d+\)$")


def same_outcome(expected: tuple, got: tuple) -> bool:
    """The same rows, or the same error; a JSON syntax error only needs the same file and place in the file (the
    native reason is nlohmann-json's wording) and a position, which nlohmann gives for all but a number overflow."""
    if expected == got:
        return True
    if expected[0] != "error" or got[0] != "error" or JSON_SYNTAX not in expected[1] or JSON_SYNTAX not in got[1]:
        return False
    where = expected[1].split(JSON_SYNTAX)[0]
    positioned = NATIVE_POSITION.search(got[1]) is not None or "number overflow" in got[1]
    return got[1].split(JSON_SYNTAX)[0] == where and positioned


# Python's json accepts these and the native reader (nlohmann-json) refuses them: NaN and infinities, a lone
# surrogate escape and a number beyond a double's range.
JSON_ONLY_PYTHON = ("NaN", "Infinity", '"\\ud800"', "1E+400")


# --- the generator and the seeds ------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 42, 7, 2**64 - 1, 12345678901234567890, -1, -(2**63)])
def test_generator_streams_match(tool: Path, seed: int) -> None:
    rng = SplitMix64(seed)
    assert run_tool(tool, "rng", seed, 40)["u64"] == [rng.next_u64() for _ in range(40)]
    assert run_tool(tool, "uniform", seed, 40)["uniform"] == SplitMix64(seed).uniforms(40)
    for n in (1, 2, 3, 10, 10**9 + 7, 2**63 + 1, 2**64 - 1):  # 2**63 + 1 rejects about half of all draws
        rng = SplitMix64(seed)
        assert run_tool(tool, "below", seed, n, 30)["below"] == [rng.below(n) for _ in range(30)]
    for n in (0, 1, 2, 10, 1000):
        assert run_tool(tool, "permutation", seed, n)["permutation"] == SplitMix64(seed).permutation(n)


@pytest.mark.parametrize("client_id", ["phone-1", "board-7", "x", "日本-1"])
@pytest.mark.parametrize(("task_seed", "round_"), [(0, 0), (0, 1), (-5, 3), (2**63 - 1, 10**6), (-(2**63), -(2**63))])
def test_seeds_match(tool: Path, client_id: str, task_seed: int, round_: int) -> None:
    out = run_tool(tool, "seeds", client_id, "--task-seed", task_seed, "--round", round_)
    assert out["crc32"] == zlib.crc32(client_id.encode())
    assert out["batch_seed"] == batch_seed(task_seed, client_id, round_)
    assert out["dp_seed"] == batch_seed(task_seed, client_id, round_) + 1


# --- split, batches and aux on real and written files -----------------------------------------------------


@pytest.fixture(scope="module")
def jsonl_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A JSON Lines file with every kind of value, odd labels and unicode, 60 rows over 4 labels."""
    rnd = random.Random(3)
    labels = ["billing", " refund ", "ca\u0301fe\u3000", 7]
    lines = []
    for i in range(60):
        text = rnd.choice(["plain", "multi\nline", "quote \" and \\ ", "unicode é 😀 \u2028", "  padded  "]) + f" {i}"
        row = {"id": i, "text": text, "label": labels[rnd.randrange(len(labels))], "extra": {"b": [1.5, None]}}
        lines.append(json.dumps(row, ensure_ascii=rnd.random() < 0.5))
    path = tmp_path_factory.mktemp("jsonl") / "client.jsonl"
    path.write_text("\n".join(lines) + "\n\n", encoding="utf-8")
    return path


DATASETS = [
    pytest.param(BANKING, None, None, id="banking77"),
    pytest.param(NEWSGROUPS, None, "label_name", id="20newsgroups"),
    pytest.param(DOLLY, None, None, id="dolly-json"),
]


def _need(path: Path) -> None:
    if not path.exists():
        pytest.skip(f"{path} is not here (see /work/shared/datasets/README.md)")


@pytest.mark.parametrize(("path", "text_column", "label_column"), DATASETS)
@pytest.mark.parametrize(("client_id", "fraction"), [("phone-1", 0.2), ("board-7", 0.05), ("tablet-3", 0.5)])
def test_split_matches_local_data(tool: Path, path: Path, text_column: str | None, label_column: str | None,
                                  client_id: str, fraction: float) -> None:
    _need(path)
    seed = zlib.crc32(client_id.encode())  # as EdgeClient builds its LocalData
    data = LocalData(path, test_fraction=fraction, text_column=text_column, label_column=label_column, seed=seed)
    out = run_tool(tool, "split", path, "--seed", seed, "--test-fraction", fraction,
                   *column_args(text_column, label_column))
    assert out["train"] == data.train_text.texts and out["train_labels"] == data.train_text.labels
    assert out["test"] == data.test_text.texts and out["test_labels"] == data.test_text.labels
    assert len(out["test"]) > 0 and len(out["train"]) > 0


def test_split_of_a_written_jsonl_file(tool: Path, jsonl_file: Path) -> None:
    for client_id in ("phone-1", "phone-2"):
        seed = zlib.crc32(client_id.encode())
        data = LocalData(jsonl_file, test_fraction=0.25, seed=seed)
        out = run_tool(tool, "split", jsonl_file, "--seed", seed, "--test-fraction", 0.25)
        assert (out["train"], out["test"]) == (data.train_text.texts, data.test_text.texts)
        assert (out["train_labels"], out["test_labels"]) == (data.train_text.labels, data.test_text.labels)
        assert "7" in out["train_labels"] + out["test_labels"]  # a JSON number as a label
    assert run_tool(tool, "table", jsonl_file)["texts"] == load_table(jsonl_file).texts


def _assert_same_rows(out: dict, data: LocalData) -> None:
    """The tool's rows (train, validation, test) are LocalData's, texts and labels, in order."""
    for split in ("train", "val", "test"):
        text = getattr(data, f"{split}_text")
        assert (out[split], out[f"{split}_labels"]) == (text.texts, text.labels), split


@pytest.mark.parametrize(("path", "text_column", "label_column"), DATASETS)
@pytest.mark.parametrize(("client_id", "test_fraction", "val_fraction"),
                         [("phone-1", 0.2, 0.1), ("board-7", 0.05, 0.1), ("tablet-3", 0.5, 0.3)])
def test_validation_split_matches_local_data(tool: Path, path: Path, text_column: str | None,
                                             label_column: str | None, client_id: str, test_fraction: float,
                                             val_fraction: float) -> None:
    """The validation rows (docs/protocol.md 10.3a): the stratified split of the training rows with seed + 1."""
    _need(path)
    seed = zlib.crc32(client_id.encode())
    data = LocalData(path, test_fraction=test_fraction, text_column=text_column, label_column=label_column,
                     seed=seed, val_fraction=val_fraction)
    out = run_tool(tool, "split", path, "--seed", seed, "--test-fraction", test_fraction, "--val-fraction",
                   val_fraction, *column_args(text_column, label_column))
    _assert_same_rows(out, data)
    assert data.num_val > 0 and set(out["val_indices"]).isdisjoint(out["train_indices"] + out["test_indices"])
    assert sorted(out["train_indices"] + out["val_indices"] + out["test_indices"]) == list(range(len(
        load_table(path, text_column, label_column))))


def test_validation_split_of_written_files(tool: Path, tmp_path: Path, jsonl_file: Path) -> None:
    """With a separate test file every row of the data file is a training row before the validation split; a device
    with fewer than 10 training rows, or val_fraction 0, holds none out."""
    rows = jsonl_file.read_text(encoding="utf-8").split("\n")  # not splitlines(): texts hold U+2028
    small = tmp_path / "small.jsonl"
    for n in (9, 10, 11, 13):  # 9 training rows: none held out; 10 or more: at least one
        small.write_text("\n".join(rows[:n]) + "\n", encoding="utf-8")
        for client_id in ("phone-1", "phone-2", "日本-1"):
            seed = zlib.crc32(client_id.encode())
            for val_fraction in (0.0, 0.1, 0.25):
                data = LocalData(small, test_path=jsonl_file, seed=seed, val_fraction=val_fraction)
                out = run_tool(tool, "split", small, "--seed", seed, "--test-fraction", 0.2, "--val-fraction",
                               val_fraction, "--separate-test", 1)
                assert out["test"] == [] and out["val"] == data.val_text.texts
                assert (out["train"], out["train_labels"]) == (data.train_text.texts, data.train_text.labels)
                assert (len(out["val"]) > 0) == (val_fraction > 0 and n >= 10)
    for client_id in ("phone-1", "board-7"):  # test split first, then the validation split of the 45 training rows
        seed = zlib.crc32(client_id.encode())
        data = LocalData(jsonl_file, test_fraction=0.25, seed=seed, val_fraction=0.1)
        _assert_same_rows(run_tool(tool, "split", jsonl_file, "--seed", seed, "--test-fraction", 0.25,
                                   "--val-fraction", 0.1), data)
        assert data.num_val == 4


@pytest.mark.parametrize(("path", "batch_size", "task_seed", "round_"), [
    (BANKING, 32, 0, 1), (BANKING, 7, -3, 12), (NEWSGROUPS, 16, 2**40, 2), (DOLLY, 5, 1, 1)])
def test_batch_order_over_several_epochs(tool: Path, path: Path, batch_size: int, task_seed: int,
                                         round_: int) -> None:
    _need(path)
    client_id = "phone-1"
    data = LocalData(path, test_fraction=0.2, label_column="label_name" if path == NEWSGROUPS else None,
                     seed=zlib.crc32(client_id.encode()))
    seed = batch_seed(task_seed, client_id, round_)
    per_epoch = -(-data.num_train // batch_size)
    count = 3 * per_epoch + 2  # into a fourth epoch
    batches = data.batch_indices(batch_size, seed)
    expected = [next(batches) for _ in range(count)]
    out = run_tool(tool, "batches", data.num_train, "--batch-size", batch_size, "--seed", seed, "--count", count)
    assert out["batches"] == expected
    assert sorted(sum(expected[per_epoch:2 * per_epoch], [])) == list(range(data.num_train))


@pytest.mark.parametrize(("fraction", "max_examples"), [(0.1, 64), (0.25, 10_000), (0.0, 5), (1.0, 3), (0.5, 10**9)])
def test_aux_rows(tool: Path, fraction: float, max_examples: int) -> None:
    _need(BANKING)
    data = LocalData(BANKING, test_fraction=0.2, seed=zlib.crc32(b"phone-1"))
    out = run_tool(tool, "aux", data.num_train, "--fraction", fraction, "--max", max_examples)
    assert out["aux"] == data.aux_indices(fraction, max_examples)
    for n, frac in ((10, 0.25), (10, 0.35), (3, 0.5), (1, 0.9)):  # ties of Python's round: 2.5 -> 2, 3.5 -> 4
        rows = run_tool(tool, "aux", n, "--fraction", frac, "--max", 100)["aux"]
        assert rows == SplitMix64(n).permutation(n)[: max(1, min(100, round(frac * n), n))]


# --- the reader: edge cases and errors --------------------------------------------------------------------


def _write(directory: Path, name: str, data: bytes) -> Path:
    path = directory / name
    path.write_bytes(data)
    return path


READER_CASES = [
    # CSV: the csv module's default dialect, fed by io.StringIO(newline="")
    ("crlf.csv", b"\xef\xbb\xbftext,label\r\n\"a, \"\"quoted\"\"\r\nmulti-line\",  x \r\n\r\n   \nplain,y\r\n"),
    ("lone-cr.csv", b"text,label\rone,a\r\"two\rlines\",b\r"),
    ("tricky.csv", b"text,label\na\"b,x\n\"ab\"c,y\n\"open,z"),
    ("nul.csv", b"text,label\nx\x00y,a\n"),
    ("unicode-space.csv", "text,label\n\u3000kept\u3000,\u3000lab\u2028\n".encode()),
    ("fields.csv", b"text,label\na,b\n\"x\ny\",b,c\n"),
    ("dup.csv", b"text,label,text\na,b,c\n"),
    ("no-header.csv", b"how do I pay,payment\nwhere is my card,card\n"),
    ("empty-label.csv", b"text,label\nfine,a\nbad,\"  \"\n"),
    ("empty-text.csv", b"text,label\n \t,a\n"),
    ("header-only.csv", b"text,label\n"),
    ("blank.csv", b" \r\n\t\n"),
    ("bom-prefix.csv", b"\xef\xbb"),
    ("bad-utf8.csv", b"\xef\xbb\xbftext,label\nab\xed\xa0\x80,x\n"),
    ("same.csv", b"label,x\na,b\n"),
    # JSON Lines and JSON: the json module's values, messages and character columns
    ("types.jsonl", b'{"text": 1e16, "label": true}\n{"text": [1, {"b": null, "a": "\\u00e9"}], "label": -0}\n'
                    b'{"text": 18446744073709551615, "label": 0.00001}\n{"text": "n", "label": "x", "other": null}\n'
                    b'{"text": {"z": [false, -0.0, 1e-400, "\\ud83d\\ude00 \\"/"], "\xc3\xa9": {}}, "label": 2.50}\n'),
    ("null-text.jsonl", b'{"text": "a", "label": "b"}\n{"text": null, "label": "x"}\n'),
    ("dupkey.jsonl", b'{"label": "a", "text": "first", "text": "second"}\n'),
    ("missing-key.jsonl", b'{"text": "a", "label": "b"}\n{"label": "c"}\n'),
    ("bad-line.jsonl", '{"text": "a", "label": "b"}\n{"text": "é", "label"}\n'.encode()),
    ("bad-escape.jsonl", b'{"text": "a\\q", "label": "b"}\n'),
    ("trailing.jsonl", b'{"text": "a", "label": "b"},\n'),
    ("list-line.jsonl", b'[1, 2]\n'),
    ("bom-line.jsonl", b'{"text": "a", "label": "b"}\n\xef\xbb\xbf{"text": "a", "label": "b"}\n'),
    ("control.jsonl", b'{"text": "tab\there", "label": "b"}\n'),
    ("list.json", b'[\n {"sentence": "s", "intent": "i"},\n {"sentence": "t", "intent": "j", "x": 1}\n]'),
    ("bad.json", b'[\n  {"text": "a", "label": "b"},\n  {"text": "a", "label": "b",}\n]'),
    ("dict.json", b'{"text": "a", "label": "b"}'),
    ("element.json", b'[{"text": "a", "label": "b"}, "x"]'),
    ("extra.json", b'[{"text": "a", "label": "b"}] x'),
]


@pytest.mark.parametrize(("name", "data"), READER_CASES, ids=[c[0] for c in READER_CASES])
def test_reader_matches_python(tool: Path, tmp_path: Path, name: str, data: bytes) -> None:
    path = _write(tmp_path, name, data)
    expected, got = python_table(path), native_table(tool, path)
    assert same_outcome(expected, got), (expected, got)
    if JSON_SYNTAX not in str(expected[-1]):
        assert got == expected


@pytest.mark.parametrize("value", ["NaN", "-Infinity", '"\\ud800"', "1E+400"])
def test_json_python_accepts_and_native_refuses(tool: Path, tmp_path: Path, value: str) -> None:
    """The known differences: a one-line error that names the line, where Python reads a value."""
    path = _write(tmp_path, "odd.jsonl", f'{{"text": "a", "label": "b"}}\n{{"text": "t", "label": {value}}}\n'.encode())
    assert python_table(path)[0] == "ok"
    assert tool_error(tool, "table", path).startswith(f"data file {str(path)!r} line 2 is not valid JSON: ")


def test_json_integers_beyond_64_bits_are_doubles(tool: Path, tmp_path: Path) -> None:
    """The known difference for big integers: the nearest double's str(), where Python keeps every digit."""
    path = _write(tmp_path, "big.jsonl", b'{"text": 123456789012345678901234567890, "label": 1}\n')
    assert python_table(path) == ("ok", ["123456789012345678901234567890"], ["1"])
    assert native_table(tool, path) == ("ok", ["1.2345678901234568e+29"], ["1"])


def test_errors_match_python(tool: Path, tmp_path: Path) -> None:
    _need(BANKING)
    missing = tmp_path / "missing.csv"
    bad_ext = _write(tmp_path, "data.txt", b"text,label\na,b\n")
    no_ext = _write(tmp_path, "data", b"text,label\na,b\n")
    (tmp_path / "folder.csv").mkdir()
    cases = [
        (missing, None, None),
        (bad_ext, None, None),
        (no_ext, None, None),
        (tmp_path / "folder.csv", None, None),
        (BANKING, "nope", None),
        (BANKING, None, "label"),  # banking77's label column is "category"
        (BANKING, "category", "category"),
        (_write(tmp_path, "empty-label.csv", b"text,label\nfine,a\nbad, \n"), None, None),
        (_write(tmp_path, "quote's.jsonl", b'{"text": "a"}\n'), None, None),
    ]
    for path, text_column, label_column in cases:
        expected = python_table(path, text_column, label_column)
        assert expected[0] == "error", path
        message = tool_error(tool, "table", path, *column_args(text_column, label_column))
        assert message == expected[1]
        # The split (the client's start) fails the same way.
        assert tool_error(tool, "split", path, "--seed", 1, "--test-fraction", 0.2,
                          *column_args(text_column, label_column)) == expected[1]
    assert "does not exist" in tool_error(tool, "table", missing)


def test_fuzzed_files_match_python(tool: Path, tmp_path: Path) -> None:
    """Random CSV rows and JSON fragments (a fixed seed): the same rows or the same error, every time."""
    rnd = random.Random(20240611)
    chars = ["a", " ", "\u3000", "é", "\x00", "\t", "\x0b", "\ufeff", "\u2028", "\x85", "\xa0", "😀", ",", '"']
    quoted = [*chars, '""', "\n", "\r\n", "\r"]
    pieces = ["{", "}", "[", "]", ",", ":", '"text"', '"label"', '"x"', '"\\u00e9"', '"\\ud83d\\ude00"', '"\\ud800"',
              '"\\uZZ12"', '"\\u12"', '"\\q"', '"open', '"tab\there"', "1", "-", "-0", "01", "1.5", "1.", "1e5",
              "1E+400", "2e", "1e+", "true", "null", "nul", "NaN", "-Infinity", "-Inf", " ", "\r", "é", "0.1"]
    mismatches = []
    for k in range(120):
        if k % 2:
            rows = ["text,label"]
            for _ in range(rnd.randrange(1, 5)):
                fields = []
                for _ in range(2):
                    if rnd.random() < 0.5:
                        fields.append("".join(rnd.choice(chars[:-2]) for _ in range(rnd.randrange(0, 5))))
                    else:
                        fields.append('"' + "".join(rnd.choice(quoted) for _ in range(rnd.randrange(0, 6))) + '"')
                rows.append(",".join(fields))
            data = "".join(r + rnd.choice(["\n", "\r\n", "\r", "\n\n"]) for r in rows)
            path = _write(tmp_path, f"f{k}.csv", data.encode())
        else:
            body = "".join(rnd.choice(pieces) for _ in range(rnd.randrange(1, 8)))
            if rnd.random() < 0.5:
                body = '{"text": ' + body + ', "label": "a"}'
            data = '{"text": "first", "label": "a"}\n' + body
            path = _write(tmp_path, f"f{k}.jsonl", data.encode())
        expected, got = python_table(path), native_table(tool, path)
        known = expected[0] == "ok" and got[0] == "error" and JSON_SYNTAX in got[1] and any(
            value in data for value in JSON_ONLY_PYTHON)
        if not same_outcome(expected, got) and not known:
            mismatches.append((data, expected, got))
    assert not mismatches
