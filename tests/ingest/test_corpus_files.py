"""Reading a corpus: binary files are skipped with a word, JSONL may start with a byte-order mark, and a
JSONL file that is not UTF-8 is named."""

import json

import pytest

import knnmem


def test_binary_files_are_skipped_and_counted(tmp_path):
    (tmp_path / "a.txt").write_text("some text")
    (tmp_path / "b.txt").write_bytes(b"\x7fELF\x02\x01\x00\x00binary")
    (tmp_path / "c.txt").write_bytes(b"PK\x03\x04\x00\x00zip")
    with pytest.warns(UserWarning, match=r"skipped 2 binary files \(first: .*b.txt\)"):
        documents = knnmem.read_corpus([tmp_path])
    assert [d.text for d in documents] == ["some text"]


def test_a_byte_order_mark_is_not_text(tmp_path):
    jsonl = tmp_path / "bom.jsonl"
    jsonl.write_bytes("\ufeff".encode() + json.dumps({"text": "first"}).encode() + b"\n")
    (tmp_path / "bom.txt").write_bytes("\ufeffplain".encode())
    assert [d.text for d in knnmem.read_corpus([jsonl, tmp_path / "bom.txt"])] == ["first", "plain"]


def test_a_jsonl_file_that_is_not_utf8_is_named(tmp_path):
    jsonl = tmp_path / "latin1.jsonl"
    jsonl.write_bytes(json.dumps({"text": "caf\u00e9"}, ensure_ascii=False).encode("latin-1"))
    with pytest.raises(ValueError, match=r"latin1.jsonl: not UTF-8 text \(byte 13\)"):
        knnmem.read_corpus([jsonl])

