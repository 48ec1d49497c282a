"""Corpus loaders (default, text file, directory, jsonl), their errors, and the train/val split."""

import json

import pytest

from llmarch.data import default_corpus, default_documents, load_documents, train_val_split


def test_default_documents():
    docs = load_documents("default")
    assert len(docs) > 50 and all(isinstance(d, str) and d for d in docs)
    assert docs == default_documents() and default_corpus() == "\n\n".join(docs)


def test_text_file_is_one_document(tmp_path):
    (tmp_path / "a.txt").write_text("line one\nline two\n", encoding="utf-8")
    assert load_documents(tmp_path / "a.txt") == ["line one\nline two\n"]
    assert load_documents(str(tmp_path / "a.txt")) == ["line one\nline two\n"]


def test_directory_sorted_recursive_txt_md_jsonl(tmp_path):
    (tmp_path / "b.md").write_text("B", encoding="utf-8")
    (tmp_path / "a.txt").write_text("A", encoding="utf-8")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "c.txt").write_text("C", encoding="utf-8")
    (tmp_path / "c.jsonl").write_text('{"text": "J1"}\n{"text": "J2"}\n', encoding="utf-8")
    (tmp_path / "ignored.py").write_text("print()", encoding="utf-8")
    assert load_documents(tmp_path) == ["A", "B", "J1", "J2", "C"]


def test_jsonl(tmp_path):
    path = tmp_path / "d.jsonl"
    lines = [json.dumps({"text": "first", "id": 1}), "", json.dumps({"text": "sécond"})]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    assert load_documents(path) == ["first", "sécond"]
    path.write_text(json.dumps({"body": "x"}) + "\n", encoding="utf-8")
    assert load_documents(path, text_field="body") == ["x"]


@pytest.mark.parametrize(
    "line, match",
    [
        ('{"text": "ok"', r"bad\.jsonl:2: not valid JSON"),
        ('{"content": "x"}', r"bad\.jsonl:2: no field text_field='text' \(found \['content'\]\)"),
        ('{"text": 3}', r"bad\.jsonl:2: field 'text' is a int, expected a string"),
        ('["text"]', r"bad\.jsonl:2: no field text_field='text'"),
    ],
)
def test_jsonl_errors_name_file_and_line(tmp_path, line, match):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "fine"}\n' + line + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match=match):
        load_documents(path)


def test_empty_and_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_documents(tmp_path / "nope.txt")
    with pytest.raises(ValueError, match="empty: it has no documents"):
        load_documents(tmp_path)  # an empty directory
    (tmp_path / "e.txt").write_text("", encoding="utf-8")
    with pytest.raises(ValueError, match="empty: it has only 1 empty document"):
        load_documents(tmp_path / "e.txt")
    (tmp_path / "e.jsonl").write_text('{"text": ""}\n\n', encoding="utf-8")
    with pytest.raises(ValueError, match="empty"):
        load_documents(tmp_path / "e.jsonl")
    (tmp_path / "bin.txt").write_bytes(b"\xff\xfe\x00")
    with pytest.raises(ValueError, match="not UTF-8"):
        load_documents(tmp_path / "bin.txt")


def test_split_documents_deterministic():
    docs = [f"doc {i}" for i in range(20)]
    train, val = train_val_split(docs, 0.25, seed=0)
    assert len(val) == 5 and len(train) == 15 and sorted(train + val) == sorted(docs)
    assert train == sorted(train, key=docs.index) and val == sorted(val, key=docs.index)
    assert train_val_split(docs, 0.25, seed=0) == (train, val)
    assert train_val_split(docs, 0.25, seed=1)[1] != val
    # At least one document on each side, however small the fraction.
    assert [len(x) for x in train_val_split(docs[:2], 0.01, seed=0)] == [1, 1]


def test_split_single_document_holds_out_its_tail():
    text = "".join(chr(97 + i % 26) for i in range(1000))
    train, val = train_val_split([text], 0.1, seed=3)
    assert train == [text[:900]] and val == [text[900:]]
    with pytest.raises(ValueError, match="too short"):
        train_val_split(["a"], 0.1)
    for bad in (0.0, 1.0, -0.5):
        with pytest.raises(ValueError, match=r"val_fraction=.*\(0, 1\)"):
            train_val_split([text], bad)


def test_tinyshakespeare(shared_data):
    docs = load_documents(shared_data / "tinyshakespeare.txt")
    assert len(docs) == 1 and docs[0].startswith("First Citizen")
    train, val = train_val_split(docs, 0.1, seed=0)
    assert train[0] + val[0] == docs[0] and abs(len(val[0]) - 0.1 * len(docs[0])) <= 1
