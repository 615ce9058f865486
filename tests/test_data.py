"""Tests of edgemole.data: loaders, partitions, train/test hold-out and the synthetic task."""

from __future__ import annotations

import csv
import json
from collections import Counter, defaultdict
from pathlib import Path

import pytest

from edgemole.data import (
    SYNTHETIC_DOMAINS,
    PartitionSpec,
    TextDataset,
    label_histogram,
    load_dataset,
    load_table,
    make_synthetic,
    parse_partition,
    partition,
    split_train_test,
    write_jsonl,
)
from edgemole.errors import ConfigError, DataError

SHARED = Path("/work/shared/datasets")


def write_csv(path: Path, header: list[str], rows: list[list[str]]) -> Path:
    with open(path, "w", encoding="utf-8", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def data_error(func, *args, **kwargs) -> str:
    """Call ``func`` expecting a DataError; return its message after checking it is one line."""
    with pytest.raises(DataError) as info:
        func(*args, **kwargs)
    message = str(info.value)
    assert "\n" not in message
    return message


# --- TextDataset -------------------------------------------------------------------------------


def test_dataset_subset_and_label_names() -> None:
    ds = TextDataset(["a", "b", "c"], ["y", "x", "y"], {"domain": ["d1", "d2", "d3"]})
    sub = ds.subset([2, 0])
    assert sub.texts == ["c", "a"]
    assert sub.labels == ["y", "y"]
    assert sub.columns == {"domain": ["d3", "d1"]}
    assert len(sub) == 2
    assert ds.label_names() == ["x", "y"]
    with pytest.raises(ValueError):
        TextDataset(["a"], ["x", "y"])
    with pytest.raises(ValueError):
        TextDataset(["a"], ["x"], {"domain": []})


# --- loaders -------------------------------------------------------------------------------------


def test_load_csv_autodetects_and_keeps_other_columns(tmp_path: Path) -> None:
    path = write_csv(
        tmp_path / "d.csv",
        ["id", "text", "category", "domain"],
        [["1", "first, with comma", "alpha", "bank"], ["2", 'multi\nline "quoted"', " beta ", "school"]],
    )
    ds = load_table(path)
    assert ds.texts == ["first, with comma", 'multi\nline "quoted"']
    assert ds.labels == ["alpha", "beta"]  # labels are stripped, texts are not
    assert ds.columns == {"id": ["1", "2"], "domain": ["bank", "school"]}


def test_load_csv_explicit_columns(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "d.csv", ["utterance", "tag", "text"], [["hello", "greet", "ignored"]])
    ds = load_table(path, text_column="utterance", label_column="tag")
    assert ds.texts == ["hello"]
    assert ds.labels == ["greet"]
    assert ds.columns == {"text": ["ignored"]}


def test_label_column_order_is_fixed(tmp_path: Path) -> None:
    both = write_csv(tmp_path / "a.csv", ["text", "label_name", "label"], [["t", "sci.space", "14"]])
    assert load_table(both).labels == ["14"]  # 'label' comes before 'label_name'
    named = write_csv(tmp_path / "b.csv", ["sentence", "label_name", "category"], [["t", "n", "c"]])
    assert load_table(named).labels == ["c"]  # 'category' comes before 'label_name'
    assert load_table(named).texts == ["t"]


def test_load_csv_with_bom_and_crlf(tmp_path: Path) -> None:
    path = tmp_path / "bom.csv"
    path.write_bytes('\ufefftext,label\r\n"a\r\nb",x\r\nc,y\r\n'.encode())
    ds = load_table(path)
    assert ds.texts == ["a\r\nb", "c"]
    assert ds.labels == ["x", "y"]


def test_load_csv_field_longer_than_csv_default_limit(tmp_path: Path) -> None:
    long_text = "word " * 60_000  # 300,000 characters, beyond the csv module's 131,072 default
    path = write_csv(tmp_path / "long.csv", ["text", "label"], [[long_text, "x"]])
    assert load_table(path).texts == [long_text]


def test_load_jsonl_converts_values_to_str(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    lines = [
        json.dumps({"text": "hi", "label": 3, "score": 0.5, "ok": True}),
        "",
        json.dumps({"text": "there", "label": "b", "extra": None}),
    ]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    ds = load_table(path)
    assert ds.texts == ["hi", "there"]
    assert ds.labels == ["3", "b"]
    assert ds.columns == {"score": ["0.5", ""], "ok": ["true", ""], "extra": ["", ""]}


def test_load_json_list(tmp_path: Path) -> None:
    path = tmp_path / "d.json"
    rows = [{"instruction": "do x", "category": "qa"}, {"instruction": "do y", "category": "summ"}]
    path.write_text(json.dumps(rows), encoding="utf-8")
    ds = load_table(path)
    assert ds.texts == ["do x", "do y"]
    assert ds.labels == ["qa", "summ"]
    assert ds.columns == {}


def test_missing_column_names_file_column_and_available(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "x.csv", ["text", "category"], [["a", "b"]])
    msg = data_error(load_table, path, label_column="label")
    assert "x.csv" in msg and "'label'" in msg and "columns: text, category" in msg


def test_no_detectable_column_lists_candidates(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "x.csv", ["3", "Fiji takes gold"], [["1", "Other news"]])
    msg = data_error(load_table, path)
    assert "no text column" in msg and "sentence" in msg and "header" in msg
    path = write_csv(tmp_path / "y.csv", ["text", "stars"], [["good", "5"]])
    msg = data_error(load_table, path)
    assert "no label column" in msg and "intent" in msg and "stars" in msg


def test_malformed_jsonl_reports_line_number(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "a", "label": "x"}\n\n{"text": "b", "label": \n', encoding="utf-8")
    msg = data_error(load_table, path)
    assert "bad.jsonl" in msg and "line 3" in msg
    path.write_text('{"text": "a", "label": "x"}\n["not", "an", "object"]\n', encoding="utf-8")
    assert "line 2" in data_error(load_table, path)


def test_bad_json_documents(tmp_path: Path) -> None:
    path = tmp_path / "d.json"
    path.write_text('{"text": "a", "label": "x"}', encoding="utf-8")
    assert "list" in data_error(load_table, path)
    path.write_text('[{"text": "a", "label": "x"}, 5]', encoding="utf-8")
    assert "element [1]" in data_error(load_table, path)
    path.write_text('[{"text": "a", "label": "x"},\n {"text": }]', encoding="utf-8")
    assert "line 2" in data_error(load_table, path)
    path.write_text("[]", encoding="utf-8")
    assert "no data rows" in data_error(load_table, path)


def test_empty_files(tmp_path: Path) -> None:
    for name, content in [("a.csv", ""), ("b.jsonl", "\n\n  \n"), ("c.json", "")]:
        path = tmp_path / name
        path.write_text(content, encoding="utf-8")
        msg = data_error(load_table, path)
        assert name in msg and "empty" in msg
    header_only = tmp_path / "h.csv"
    header_only.write_text("text,label\n", encoding="utf-8")
    assert "no data rows" in data_error(load_table, header_only)


def test_unknown_extension_missing_file_and_directory(tmp_path: Path) -> None:
    path = tmp_path / "d.tsv"
    path.write_text("text\tlabel\na\tb\n", encoding="utf-8")
    msg = data_error(load_table, path)
    assert "'.tsv'" in msg and ".jsonl" in msg
    assert "does not exist" in data_error(load_table, tmp_path / "nope.csv")
    (tmp_path / "dir.csv").mkdir()
    assert "directory" in data_error(load_table, tmp_path / "dir.csv")


def test_invalid_utf8(tmp_path: Path) -> None:
    path = tmp_path / "latin.csv"
    path.write_bytes("text,label\ncaf\u00e9,x\n".encode("latin-1"))
    assert "UTF-8" in data_error(load_table, path)


def test_empty_text_and_label_give_row_and_line(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "e.csv", ["text", "label"], [["two\nlines", "x"], ["  ", "y"]])
    msg = data_error(load_table, path)
    # The second data row starts on line 4 because the first row's text spans two lines.
    assert "row 2 (line 4)" in msg and "empty text" in msg and "'text'" in msg
    path = write_csv(tmp_path / "f.csv", ["text", "label"], [["ok", "x"], ["fine", ""]])
    assert "row 2" in data_error(load_table, path) and "empty label" in data_error(load_table, path)
    jpath = tmp_path / "g.json"
    jpath.write_text(json.dumps([{"text": "ok", "label": "x"}, {"text": "no label"}]), encoding="utf-8")
    msg = data_error(load_table, jpath)
    assert "element [1]" in msg and "empty label" in msg


def test_csv_row_with_wrong_field_count(tmp_path: Path) -> None:
    path = tmp_path / "w.csv"
    path.write_text("text,label\na,b\nc,d,e\n", encoding="utf-8")
    msg = data_error(load_table, path)
    assert "row 2 (line 3)" in msg and "3 fields" in msg


TRICKY_TEXTS = [
    "plain",
    'quotes " and \' and "" doubled',
    "new\nline and\r\nwindows and \r lone CR",
    "tab\tand backslash \\ and \\n literal",
    "unicode: caf\u00e9 \u65e5\u672c\u8a9e \U0001f600 and line sep \u2028 para sep \u2029",
    "  leading and trailing spaces  ",
    "{\"json\": [1, 2]}",
    "lone surrogate \udc80 kept",
]


def test_write_jsonl_round_trip(tmp_path: Path) -> None:
    ds = TextDataset(
        texts=list(TRICKY_TEXTS),
        labels=[f"label {i} \u00e9" for i in range(len(TRICKY_TEXTS))],
        columns={
            "domain": ["a\nb", "", "\u00fc", "x", "y", "z", "\"q\"", "w"],
            "id": [str(i) for i in range(len(TRICKY_TEXTS))],
        },
    )
    path = tmp_path / "sub" / "client_0.jsonl"
    write_jsonl(path, ds)
    assert len(path.read_bytes().split(b"\n")) == len(ds) + 1  # one record per line, trailing newline
    back = load_table(path)
    assert back == ds
    assert not list(path.parent.glob("*.tmp"))


def test_write_jsonl_rejects_bad_target(tmp_path: Path) -> None:
    ds = TextDataset(["a"], ["b"], {"text": ["c"]})
    assert "clashes" in data_error(write_jsonl, tmp_path / "x.jsonl", ds)
    assert ".jsonl" in data_error(write_jsonl, tmp_path / "x.csv", TextDataset(["a"], ["b"]))


def test_load_dataset_file_and_directory(tmp_path: Path) -> None:
    single = write_csv(tmp_path / "one.csv", ["text", "label"], [["a", "x"]])
    train, test = load_dataset(single)
    assert train.texts == ["a"] and test is None

    d = tmp_path / "shards"
    d.mkdir()
    write_csv(d / "train_part01.csv", ["text", "label", "id"], [["second", "y", "2"]])
    write_csv(d / "train_part00.csv", ["text", "label", "id"], [["first", "x", "1"]])
    (d / "train_part02.jsonl").write_text(json.dumps({"text": "third", "label": "z", "id": 3}) + "\n")
    (d / "train_notes.txt").write_text("not data")
    write_csv(d / "test.csv", ["text", "label", "id"], [["held", "x", "9"]])
    train, test = load_dataset(d)
    assert train.texts == ["first", "second", "third"]
    assert train.columns == {"id": ["1", "2", "3"]}
    assert test is not None and test.texts == ["held"]

    (d / "test.csv").unlink()
    assert load_dataset(d)[1] is None


def test_load_dataset_directory_errors(tmp_path: Path) -> None:
    write_csv(tmp_path / "test.csv", ["text", "label"], [["a", "x"]])
    msg = data_error(load_dataset, tmp_path)
    assert "no train file" in msg
    write_csv(tmp_path / "train_a.csv", ["text", "label"], [["a", "x"]])
    write_csv(tmp_path / "train_b.csv", ["text", "label", "domain"], [["b", "y", "d"]])
    assert "train_b.csv" in data_error(load_dataset, tmp_path)
    assert "does not exist" in data_error(load_dataset, tmp_path / "missing")


def _require_shared(name: str) -> Path:
    path = SHARED / name
    if not path.is_dir():
        pytest.skip(f"{path} is not present")
    return path


def test_real_banking77() -> None:
    path = _require_shared("banking77")
    train, test = load_dataset(path)
    assert test is not None
    assert (len(train), len(test)) == (10_003, 3_080)
    categories = json.loads((path / "categories.json").read_text())
    assert train.label_names() == sorted(categories)
    assert set(test.labels) <= set(train.labels)
    assert train.columns == {}
    assert "card_arrival" in train.labels


def test_real_20newsgroups() -> None:
    path = _require_shared("20newsgroups")
    train, test = load_dataset(path)
    assert test is not None
    assert (len(train), len(test)) == (11_314, 7_532)
    # 'label' (the numeric id) wins over 'label_name' in auto-detection; the name stays a column.
    assert sorted(train.columns) == ["id", "label_name"]
    assert len(train.label_names()) == 20
    pairs = set(zip(train.labels, train.columns["label_name"], strict=True))
    assert len(pairs) == 20  # one name per id
    names = (path / "labels.txt").read_text().split()
    assert sorted({name for _, name in pairs}) == sorted(names)
    assert all("\n" in t for t in train.texts[:50])
    assert max(len(t) for t in test.texts) > 131_072  # needs the raised csv field limit
    named = load_dataset(path, label_column="label_name")[0]
    assert named.label_names() == sorted(names)


# --- parse_partition -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("iid", PartitionSpec("iid")),
        (" IID ", PartitionSpec("iid")),
        ("dirichlet:0.5", PartitionSpec("dirichlet", alpha=0.5)),
        ("Dirichlet: 1e-2", PartitionSpec("dirichlet", alpha=0.01)),
        ("quantity:2", PartitionSpec("quantity", alpha=2.0)),
        ("column:domain", PartitionSpec("column", column="domain")),
        ("column:Speaker", PartitionSpec("column", column="Speaker")),
    ],
)
def test_parse_partition_accepts(text: str, expected: PartitionSpec) -> None:
    spec = parse_partition(text)
    assert spec == expected
    assert parse_partition(str(spec)) == spec


@pytest.mark.parametrize(
    "text",
    ["", "iid:2", "dirichlet", "dirichlet:", "dirichlet:0", "dirichlet:-1", "dirichlet:nan", "dirichlet:inf",
     "quantity:abc", "column:", "column", "shards:2", "label_skew:0.5"],
)
def test_parse_partition_rejects(text: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_partition(text)
    msg = str(info.value)
    assert "\n" not in msg and repr(text) in msg
    assert "accepted" in msg or "positive" in msg


def test_partition_spec_validates_direct_construction() -> None:
    with pytest.raises(ConfigError):
        PartitionSpec("dirichlet")
    with pytest.raises(ConfigError):
        PartitionSpec("column")
    with pytest.raises(ConfigError):
        PartitionSpec("random")


# --- partition -----------------------------------------------------------------------------------


def labelled(n_per_label: int, n_labels: int, domains: int = 1) -> TextDataset:
    texts, labels, domain = [], [], []
    for k in range(n_labels):
        for j in range(n_per_label):
            texts.append(f"text {k} {j}")
            labels.append(f"L{k}")
            domain.append(f"d{(k * n_per_label + j) % domains}")
    return TextDataset(texts, labels, {"domain": domain})


def check_partition(parts: list[list[int]], n: int, n_clients: int, min_size: int) -> None:
    assert len(parts) == n_clients
    flat = [i for p in parts for i in p]
    assert len(flat) == len(set(flat))  # disjoint
    assert sorted(flat) == list(range(n))  # covering
    assert min(len(p) for p in parts) >= min_size
    assert all(isinstance(i, int) for i in flat)


@pytest.mark.parametrize("spec", ["iid", "dirichlet:0.1", "dirichlet:10", "quantity:0.3", "column:domain"])
def test_partition_properties_and_determinism(spec: str) -> None:
    ds = labelled(40, 10, domains=4)
    parts = partition(ds, 8, spec, seed=1, min_size=3)
    check_partition(parts, len(ds), 8, 3)
    assert partition(ds, 8, spec, seed=1, min_size=3) == parts
    assert partition(ds, 8, parse_partition(spec), seed=1, min_size=3) == parts
    assert partition(ds, 8, spec, seed=2, min_size=3) != parts


def test_iid_partition_is_balanced_and_mixed() -> None:
    ds = labelled(50, 4)
    parts = partition(ds, 7, "iid", seed=0)
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1
    assert all(len({ds.labels[i] for i in p}) == 4 for p in parts)


def mean_distinct_labels(ds: TextDataset, parts: list[list[int]]) -> float:
    return sum(len({ds.labels[i] for i in p}) for p in parts) / len(parts)


def test_dirichlet_small_alpha_skews_labels() -> None:
    ds = labelled(100, 10)
    skewed = [mean_distinct_labels(ds, partition(ds, 10, "dirichlet:0.05", seed=s)) for s in range(3)]
    mixed = [mean_distinct_labels(ds, partition(ds, 10, "dirichlet:100", seed=s)) for s in range(3)]
    assert max(skewed) < 5.0
    assert min(mixed) > 9.5
    # Label distributions differ across clients: the dominant label's share is high under small alpha.
    parts = partition(ds, 10, "dirichlet:0.05", seed=0)
    top_share = [Counter(ds.labels[i] for i in p).most_common(1)[0][1] / len(p) for p in parts]
    assert sum(top_share) / len(top_share) > 0.6


def test_dirichlet_impossible_raises_data_error() -> None:
    ds = labelled(10, 2)
    msg = data_error(partition, ds, 10, "dirichlet:0.001", 0)
    assert "10 clients" in msg and "fewer clients" in msg


def test_quantity_skew_varies_sizes_not_labels() -> None:
    ds = labelled(100, 5)
    parts = partition(ds, 10, "quantity:0.2", seed=3, min_size=2)
    sizes = sorted(len(p) for p in parts)
    assert sizes[-1] > 5 * sizes[0]
    largest = max(parts, key=len)
    assert len({ds.labels[i] for i in largest}) == 5
    mild = sorted(len(p) for p in partition(ds, 10, "quantity:1000", seed=3))
    assert mild[-1] - mild[0] < sizes[-1] - sizes[0]


def test_column_fewer_groups_than_clients_keeps_clients_within_one_group() -> None:
    ds = TextDataset(
        texts=[f"t{i}" for i in range(100)],
        labels=["x"] * 100,
        columns={"domain": ["big"] * 50 + ["mid"] * 30 + ["small"] * 20},
    )
    parts = partition(ds, 7, "column:domain", seed=0)
    check_partition(parts, 100, 7, 2)
    groups_per_client = [{ds.columns["domain"][i] for i in p} for p in parts]
    assert all(len(g) == 1 for g in groups_per_client)
    clients_per_group = Counter(next(iter(g)) for g in groups_per_client)
    assert clients_per_group == {"big": 3, "mid": 2, "small": 2}  # as even as possible, extra to largest


def test_column_more_groups_than_clients_keeps_groups_whole_and_balanced() -> None:
    sizes = {"a": 50, "b": 30, "c": 20, "d": 20, "e": 10}
    domain = [name for name, size in sizes.items() for _ in range(size)]
    ds = TextDataset([f"t{i}" for i in range(len(domain))], ["x"] * len(domain), {"domain": domain})
    parts = partition(ds, 2, "column:domain", seed=5)
    check_partition(parts, len(ds), 2, 2)
    owner = {}
    for c, p in enumerate(parts):
        for i in p:
            owner.setdefault(domain[i], set()).add(c)
    assert all(len(clients) == 1 for clients in owner.values())
    assert sorted(len(p) for p in parts) == [60, 70]  # greedy: 50 | 30+20, then 20 and 10


def test_column_partition_by_label_and_errors() -> None:
    ds = labelled(10, 3)
    parts = partition(ds, 3, "column:label", seed=0)
    assert all(len({ds.labels[i] for i in p}) == 1 for p in parts)
    msg = data_error(partition, ds, 3, "column:speaker", 0)
    assert "'speaker'" in msg and "domain" in msg
    tiny = TextDataset(["a", "b", "c", "d", "e"], ["x"] * 5, {"g": ["p", "p", "p", "p", "q"]})
    assert "'q'" in data_error(partition, tiny, 2, "column:g", 0, min_size=2)


def test_partition_rejects_bad_client_counts() -> None:
    ds = labelled(3, 2)
    with pytest.raises(ConfigError):
        partition(ds, 0, "iid", 0)
    assert "too few" in data_error(partition, ds, 7, "iid", 0, min_size=1)
    assert "too few" in data_error(partition, ds, 4, "iid", 0, min_size=2)
    with pytest.raises(ConfigError):
        partition(ds, 2, "bogus", 0)


# --- split_train_test and label_histogram --------------------------------------------------------


def test_split_train_test_is_disjoint_stratified_and_deterministic() -> None:
    labels = ["a"] * 60 + ["b"] * 40 + ["c"] * 200
    indices = list(range(100))  # the client owns only the a and b examples
    train, test = split_train_test(indices, labels, 0.25, seed=4)
    assert set(train).isdisjoint(test)
    assert sorted(train + test) == indices
    assert len(test) == 25
    assert Counter(labels[i] for i in test) == {"a": 15, "b": 10}
    assert split_train_test(indices, labels, 0.25, seed=4) == (train, test)
    assert split_train_test(indices, labels, 0.25, seed=5) != (train, test)


def test_split_train_test_small_clients_and_bounds() -> None:
    labels = ["a", "b", "a"]
    assert split_train_test([0, 1], labels, 0.01, seed=0)[1] != []
    train, test = split_train_test([0, 1], labels, 0.99, seed=0)
    assert len(train) == 1 and len(test) == 1
    assert split_train_test([2], labels, 0.5, seed=0) == ([2], [])
    assert split_train_test([2, 0], labels, 0.0, seed=0) == ([0, 2], [])
    for bad in (1.0, -0.1, float("nan")):
        with pytest.raises(ConfigError):
            split_train_test([0, 1], labels, bad, seed=0)


def test_label_histogram() -> None:
    labels = ["b", "a", "b", "c"]
    assert label_histogram(labels, [0, 2, 3], ["a", "b", "c"]) == [0, 2, 1]
    assert "'c'" in data_error(label_histogram, labels, [3], ["a", "b"])


# --- synthetic -----------------------------------------------------------------------------------


def test_synthetic_is_deterministic_and_seed_dependent() -> None:
    a = make_synthetic(100, seed=7)
    assert make_synthetic(100, seed=7) == a
    b = make_synthetic(100, seed=8)
    assert a.texts != b.texts
    assert len(a) == 100 * len(SYNTHETIC_DOMAINS)


def test_synthetic_labels_domains_and_length() -> None:
    ds = make_synthetic(200, seed=0)
    assert {"hospital", "bank", "school", "airline"} <= set(SYNTHETIC_DOMAINS)
    assert set(ds.columns["domain"]) == set(SYNTHETIC_DOMAINS)
    intents: dict[str, set[str]] = defaultdict(set)
    for label, domain in zip(ds.labels, ds.columns["domain"], strict=True):
        assert label.startswith(domain + ".")
        intents[domain].add(label)
    assert all(3 <= len(v) <= 4 for v in intents.values())
    assert len(ds.label_names()) == sum(len(v) for v in intents.values())
    assert max(len(t.split()) for t in ds.texts) <= 20
    specific = [t for t, p in zip(ds.texts, ds.columns["phrasing"], strict=True) if p == "specific"]
    assert len(set(specific)) > 0.6 * len(specific)  # templates x fillers give varied texts


def test_synthetic_shared_phrases_are_ambiguous_across_domains() -> None:
    ds = make_synthetic(200, seed=0)
    labels_of_text: dict[str, set[str]] = defaultdict(set)
    domains_of_text: dict[str, set[str]] = defaultdict(set)
    for text, label, domain in zip(ds.texts, ds.labels, ds.columns["domain"], strict=True):
        labels_of_text[text].add(label)
        domains_of_text[text].add(domain)
    cancel_labels = {"hospital.cancel_appointment", "bank.block_card", "school.drop_course",
                     "airline.cancel_flight", "hotel.cancel_reservation"}
    assert len(labels_of_text["I need to cancel it"]) >= 2
    assert labels_of_text["I need to cancel it"] <= cancel_labels
    assert max(len(labels) for labels in labels_of_text.values()) == len(SYNTHETIC_DOMAINS)
    for domain in SYNTHETIC_DOMAINS:
        rows = [t for t, d in zip(ds.texts, ds.columns["domain"], strict=True) if d == domain]
        ambiguous = sum(len(labels_of_text[t]) > 1 for t in rows)
        assert 0.25 <= ambiguous / len(rows) <= 0.35, domain
    # Within a domain a text has one label; ambiguity comes only from the domain.
    for text, labels in labels_of_text.items():
        assert len(labels) == len(domains_of_text[text])


def test_synthetic_domain_subset_matches_full_dataset() -> None:
    full = make_synthetic(50, seed=3)
    bank = make_synthetic(50, seed=3, domains=["bank"])
    rows = [i for i, d in enumerate(full.columns["domain"]) if d == "bank"]
    assert bank == full.subset(rows)
    with pytest.raises(ConfigError):
        make_synthetic(10, domains=["casino"])
    with pytest.raises(ConfigError):
        make_synthetic(0)
    with pytest.raises(ConfigError):
        make_synthetic(10, domains=[])


def test_synthetic_column_partition_gives_single_domain_clients() -> None:
    ds = make_synthetic(60, seed=1)
    parts = partition(ds, 2 * len(SYNTHETIC_DOMAINS), "column:domain", seed=0)
    check_partition(parts, len(ds), 2 * len(SYNTHETIC_DOMAINS), 2)
    assert all(len({ds.columns["domain"][i] for i in p}) == 1 for p in parts)


def test_partitions_of_a_source_whose_other_column_is_named_label(tmp_path: Path) -> None:
    """20 Newsgroups has a numeric ``label`` next to ``label_name``; choosing ``label_name`` must still write client
    files that the clients read back with the default text/label keys."""
    from edgemole.config import Settings, from_dict
    from fleet.simulate import prepare_partitions

    src = tmp_path / "news.csv"
    rows = ["id,text,label,label_name"] + [f"{i},post {i},{i % 3},group{i % 3}" for i in range(30)]
    src.write_text("\n".join(rows) + "\n", encoding="utf-8")
    settings = from_dict(Settings, {"data": {"dataset": str(src), "text_column": "text", "label_column": "label_name",
                                             "partition": "iid", "test_fraction": 0.2},
                                    "simulate": {"clients": 2}}, "")
    report = prepare_partitions(settings, tmp_path / "parts")
    assert report["labels"] == ["group0", "group1", "group2"]
    back = load_table(tmp_path / "parts" / "client-0.train.jsonl")
    assert set(back.labels) <= {"group0", "group1", "group2"} and back.texts[0].startswith("post ")
    assert list(back.columns) == ["id"]
