"""Reading labelled text tables (CSV, JSON Lines, JSON) and writing a client's share back as JSON Lines.

Users point the toolkit at their own files, so every problem (missing file, bad line, missing column,
empty cell) becomes a one-line :class:`~edgemole.errors.DataError` naming the file and the place at
fault, instead of a traceback from deep inside the csv or json modules.
"""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from edgemole.data.dataset import TextDataset
from edgemole.errors import DataError

SUPPORTED_EXTENSIONS: tuple[str, ...] = (".csv", ".jsonl", ".json")
# Auto-detection order; explicit and fixed so the chosen column never depends on column order in a file.
TEXT_COLUMNS: tuple[str, ...] = ("text", "sentence", "content", "instruction")
LABEL_COLUMNS: tuple[str, ...] = ("label", "category", "label_name", "intent", "class")

# Some real posts (20 Newsgroups) are longer than the csv module's default 128 KiB field limit.
_CSV_FIELD_LIMIT = 2**31 - 1


@dataclass
class _Record:
    where: str  # human-readable location for error messages, e.g. "row 3 (line 4)"
    values: dict[str, object]


def _read_file_text(path: Path) -> str:
    shown = str(path)
    if not path.exists():
        raise DataError(f"data file {shown!r} does not exist")
    if path.is_dir():
        raise DataError(f"data file {shown!r} is a directory, not a file")
    try:
        # newline="" keeps line breaks inside quoted CSV fields exactly as written (e.g. "\r\n").
        with open(path, encoding="utf-8-sig", newline="") as fh:
            content = fh.read()
    except UnicodeDecodeError as err:
        raise DataError(f"data file {shown!r} is not valid UTF-8 (byte {err.start})") from None
    except OSError as err:
        raise DataError(f"data file {shown!r} cannot be read: {err.strerror or err}") from None
    if not content.strip():
        raise DataError(f"data file {shown!r} is empty")
    return content


def _read_csv(shown: str, content: str) -> tuple[list[str], list[_Record]]:
    csv.field_size_limit(max(csv.field_size_limit(), _CSV_FIELD_LIMIT))
    reader = csv.reader(io.StringIO(content, newline=""))
    header: list[str] | None = None
    records: list[_Record] = []
    last_line = 0
    try:
        for row in reader:
            start_line, last_line = last_line + 1, reader.line_num
            if not row or (len(row) == 1 and not row[0].strip()):
                continue  # blank line
            if header is None:
                header = row
                seen: set[str] = set()
                for name in header:
                    if name in seen:
                        raise DataError(f"data file {shown!r} has column {name!r} twice in its header row")
                    seen.add(name)
                continue
            where = f"row {len(records) + 1} (line {start_line})"
            if len(row) != len(header):
                raise DataError(
                    f"data file {shown!r} {where} has {len(row)} fields but the header has {len(header)}"
                )
            records.append(_Record(where, dict(zip(header, row, strict=True))))
    except csv.Error as err:
        raise DataError(f"data file {shown!r} is not valid CSV near line {reader.line_num}: {err}") from None
    assert header is not None  # the file is not blank, so some row was read
    return header, records


def _collect_columns(records: Sequence[_Record]) -> list[str]:
    names: dict[str, None] = {}
    for rec in records:
        names.update(dict.fromkeys(rec.values))
    return list(names)


def _read_jsonl(shown: str, content: str) -> tuple[list[str], list[_Record]]:
    records: list[_Record] = []
    # Split on "\n" only: str.splitlines would also break at U+2028 and similar, which JSON allows raw.
    for number, line in enumerate(content.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(
                f"data file {shown!r} line {number} is not valid JSON: {err.msg} (column {err.colno})"
            ) from None
        if not isinstance(obj, dict):
            raise DataError(
                f"data file {shown!r} line {number} is a JSON {type(obj).__name__}, expected an object"
            )
        records.append(_Record(f"line {number}", obj))
    return _collect_columns(records), records


def _read_json(shown: str, content: str) -> tuple[list[str], list[_Record]]:
    try:
        data = json.loads(content)
    except json.JSONDecodeError as err:
        raise DataError(
            f"data file {shown!r} is not valid JSON: {err.msg} (line {err.lineno}, column {err.colno})"
        ) from None
    if not isinstance(data, list):
        raise DataError(f"data file {shown!r} holds a JSON {type(data).__name__}, expected a list of objects")
    records: list[_Record] = []
    for i, obj in enumerate(data):
        if not isinstance(obj, dict):
            raise DataError(
                f"data file {shown!r} element [{i}] is a JSON {type(obj).__name__}, expected an object"
            )
        records.append(_Record(f"element [{i}]", obj))
    return _collect_columns(records), records


def _to_str(value: object) -> str:
    """A cell as a string; JSON numbers and booleans keep their JSON spelling, nested values stay JSON."""
    if isinstance(value, str):
        return value
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return str(value)
    return json.dumps(value, ensure_ascii=False, sort_keys=True)


def _pick_column(
    shown: str, columns: list[str], wanted: str | None, candidates: tuple[str, ...], role: str, is_csv: bool
) -> str:
    available = ", ".join(columns) if columns else "none"
    if wanted is not None:
        if wanted not in columns:
            raise DataError(f"data file {shown!r} has no column {wanted!r} (columns: {available})")
        return wanted
    for name in candidates:
        if name in columns:
            return name
    hint = "; is the header row missing?" if is_csv else ""
    raise DataError(
        f"data file {shown!r} has no {role} column (looked for {', '.join(candidates)}; "
        f"columns: {available}){hint}"
    )


def load_table(path: str | os.PathLike[str], text_column: str | None = None,
               label_column: str | None = None) -> TextDataset:
    """Read one ``.csv`` (header row required), ``.jsonl`` or ``.json`` (list of objects) file.

    The text and label columns are taken from the arguments or else auto-detected (first present of
    :data:`TEXT_COLUMNS` / :data:`LABEL_COLUMNS`). All other columns are kept as strings, with ``""``
    where a JSON record lacks the key. Labels are stripped of surrounding whitespace; texts are kept
    exactly as written.
    """
    p = Path(path)
    shown = str(path)
    ext = p.suffix.lower()
    if ext not in SUPPORTED_EXTENSIONS:
        raise DataError(
            f"data file {shown!r} has unsupported extension {p.suffix or '(none)'!r} "
            f"(supported: {', '.join(SUPPORTED_EXTENSIONS)})"
        )
    content = _read_file_text(p)
    if ext == ".csv":
        columns, records = _read_csv(shown, content)
    elif ext == ".jsonl":
        columns, records = _read_jsonl(shown, content)
    else:
        columns, records = _read_json(shown, content)
    if not records:
        raise DataError(f"data file {shown!r} has no data rows")

    text_col = _pick_column(shown, columns, text_column, TEXT_COLUMNS, "text", ext == ".csv")
    label_col = _pick_column(shown, columns, label_column, LABEL_COLUMNS, "label", ext == ".csv")
    if text_col == label_col:
        raise DataError(f"data file {shown!r}: column {text_col!r} cannot be both the text and the label")
    others = [c for c in columns if c not in (text_col, label_col)]

    texts: list[str] = []
    labels: list[str] = []
    extra: dict[str, list[str]] = {c: [] for c in others}
    for rec in records:
        text = _to_str(rec.values.get(text_col))
        if not text.strip():
            raise DataError(f"data file {shown!r} {rec.where} has an empty text in column {text_col!r}")
        label = _to_str(rec.values.get(label_col)).strip()
        if not label:
            raise DataError(f"data file {shown!r} {rec.where} has an empty label in column {label_col!r}")
        texts.append(text)
        labels.append(label)
        for c in others:
            extra[c].append(_to_str(rec.values.get(c)))
    return TextDataset(texts=texts, labels=labels, columns=extra)


def _split_files(directory: Path, prefix: str) -> list[Path]:
    return sorted(
        f for f in directory.iterdir()
        if f.is_file() and f.name.lower().startswith(prefix) and f.suffix.lower() in SUPPORTED_EXTENSIONS
    )


def _load_concat(files: list[Path], text_column: str | None, label_column: str | None) -> TextDataset:
    parts = [load_table(f, text_column, label_column) for f in files]
    first = sorted(parts[0].columns)
    for f, part in zip(files[1:], parts[1:], strict=True):
        if sorted(part.columns) != first:
            raise DataError(
                f"data file {str(f)!r} has other columns ({', '.join(sorted(part.columns)) or 'none'}) "
                f"than {str(files[0])!r} ({', '.join(first) or 'none'}) besides text and label"
            )
    return TextDataset.concat(parts)


def load_dataset(path: str | os.PathLike[str], text_column: str | None = None,
                 label_column: str | None = None) -> tuple[TextDataset, TextDataset | None]:
    """Load ``(train, test)`` from one file (``test`` is None) or from a directory.

    In a directory, train is every supported file whose name starts with ``train`` and test every one
    starting with ``test``, each concatenated in sorted name order (``train_part00.csv``,
    ``train_part01.csv``, ...), so datasets shipped in shards load like one file.
    """
    p = Path(path)
    shown = str(path)
    if not p.exists():
        raise DataError(f"data path {shown!r} does not exist")
    if not p.is_dir():
        return load_table(p, text_column, label_column), None
    train_files = _split_files(p, "train")
    if not train_files:
        raise DataError(
            f"data directory {shown!r} has no train file (expected names starting with 'train' "
            f"ending in {', '.join(SUPPORTED_EXTENSIONS)})"
        )
    test_files = _split_files(p, "test")
    train = _load_concat(train_files, text_column, label_column)
    test = _load_concat(test_files, text_column, label_column) if test_files else None
    return train, test


#: the keys of a record that :func:`write_jsonl` writes; extra columns of these names cannot be written
JSONL_KEYS = ("text", "label")


def write_jsonl(path: str | os.PathLike[str], dataset: TextDataset) -> None:
    """Write ``dataset`` so that :func:`load_table` reads back exactly the same texts, labels and columns.

    Keys are ``text``, ``label`` and then the extra columns; output is ASCII-escaped JSON, so any
    string (newlines, quotes, any unicode) survives. The file is replaced atomically, so a reader
    never sees half of it.
    """
    p = Path(path)
    shown = str(path)
    if p.suffix.lower() != ".jsonl":
        raise DataError(f"cannot write {shown!r}: write_jsonl needs a path ending in .jsonl")
    clash = [c for c in dataset.columns if c in JSONL_KEYS]
    if clash:
        raise DataError(f"cannot write {shown!r}: extra column {clash[0]!r} clashes with the text/label keys")
    names = list(dataset.columns)
    tmp = p.with_name(p.name + ".tmp")
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "w", encoding="utf-8", newline="\n") as fh:
            for i, (text, label) in enumerate(zip(dataset.texts, dataset.labels, strict=True)):
                row: dict[str, str] = {"text": text, "label": label}
                for name in names:
                    row[name] = dataset.columns[name][i]
                fh.write(json.dumps(row, ensure_ascii=True))
                fh.write("\n")
        os.replace(tmp, p)
    except OSError as err:
        raise DataError(f"cannot write {shown!r}: {err.strerror or err}") from None
