"""Readers of every raw format, and each kind of bad input counted per reason (never a crash)."""

import gzip
import json

import pytest

from zhchat.tasks.clean.readers import Source, iter_documents, seg_line_to_text


def _read(path, fmt, **kw):
    skips = []
    docs = list(iter_documents(files=[str(path)], format=fmt,
                               counter=lambda r, n: skips.append(r), **kw))
    return docs, skips


def test_formats(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"id": "d1", "body": "甲文。"}\n{"body": "乙文。"}\n',
                                      encoding="utf-8")
    docs, skips = _read(tmp_path / "a.jsonl", "jsonl", text_field="body")
    assert docs == [("d1", "甲文。"), ("a.jsonl:2", "乙文。")] and skips == []
    with gzip.open(tmp_path / "b.jsonl.gz", "wt", encoding="utf-8") as f:
        f.write(json.dumps({"id": 7, "text": "丙"}, ensure_ascii=False) + "\n")
    assert _read(tmp_path / "b.jsonl.gz", "jsonl")[0] == [("7", "丙")]
    (tmp_path / "c.txt").write_text("一\n二\n\n三\n", encoding="utf-8")
    assert _read(tmp_path / "c.txt", "txt_lines")[0] == [("c.txt:1", "一"), ("c.txt:2", "二"),
                                                         ("c.txt:4", "三")]
    assert _read(tmp_path / "c.txt", "txt_blocks")[0] == [("c.txt:1", "一\n二"), ("c.txt:4", "三")]
    assert _read(tmp_path / "c.txt", "txt_file")[0] == [("c.txt", "一\n二\n\n三")]
    (tmp_path / "d.json").write_text('[{"text": "丁"}, {"text": "戊", "id": "x"}]',
                                     encoding="utf-8")
    assert _read(tmp_path / "d.json", "json")[0] == [("d.json:0", "丁"), ("x", "戊")]


def test_peoples_daily_formats_agree():
    tagged = "迈向/v  充满/v  [中央/n  电台/n]nt  １２月/t  ——/w  //w"
    seg = "迈/b 向/e 充/b 满/e 中/b 央/e 电/b 台/e １/b ２/m 月/e —/b —/e //s"
    from zhchat.tasks.sources import pku_line_to_text
    assert pku_line_to_text(tagged) == seg_line_to_text(seg) == "迈向充满中央电台１２月——/"


def test_shared_peoples_daily_two_formats_identical(shared_data_dir):
    raw = shared_data_dir / "raw"
    a, _ = _read(raw / "peoples_daily_199801_tagged.txt.gz", "pku_tagged")
    b, _ = _read(raw / "peoples_daily_199801_seg.txt.gz", "pku_seg")
    assert len(a) == len(b) == 19484
    assert sum(x[1] == y[1] for x, y in zip(a, b)) == 19484


def test_bad_inputs_are_counted(tmp_path):
    (tmp_path / "utf.txt").write_bytes("好的文字。\n".encode() + b"\xff\xfe broken\n" + "再来。\n".encode())
    docs, skips = _read(tmp_path / "utf.txt", "txt_lines")
    assert [d[1] for d in docs] == ["好的文字。", "再来。"] and skips == ["invalid_utf8"]

    payload = "".join(json.dumps({"text": "句子" * 50 + str(i)}) + "\n" for i in range(3000))
    blob = gzip.compress(payload.encode())
    (tmp_path / "trunc.jsonl.gz").write_bytes(blob[: len(blob) // 2])
    docs, skips = _read(tmp_path / "trunc.jsonl.gz", "jsonl")
    assert 0 < len(docs) < 3000 and "truncated_gzip" in skips

    (tmp_path / "bad.jsonl").write_text('{"text": "一。"}\n{"text": \n[1, 2]\n{"t": 1}\n',
                                        encoding="utf-8")
    docs, skips = _read(tmp_path / "bad.jsonl", "jsonl")
    assert docs == [("bad.jsonl:1", "一。")]
    assert skips.count("broken_json") == 1 and len(skips) == 3  # + two without a text field

    (tmp_path / "bad.json").write_text('[{"text": "一"},]', encoding="utf-8")
    assert _read(tmp_path / "bad.json", "json") == ([], ["broken_json_file"])

    (tmp_path / "empty.jsonl").write_bytes(b"")
    assert _read(tmp_path / "empty.jsonl", "jsonl") == ([], ["empty_file"])
    (tmp_path / "empty.json").write_bytes(b"")
    assert _read(tmp_path / "empty.json", "json") == ([], ["empty_file"])


def test_50mb_single_line_is_skipped(tmp_path):
    path = tmp_path / "huge.txt"
    with open(path, "wb") as f:
        f.write("短句。\n".encode())
        f.write(b"a" * (50 << 20) + b"\n")
        f.write("又一句。\n".encode())
    docs, skips = _read(path, "txt_lines")
    assert [d[1] for d in docs] == ["短句。", "又一句。"] and skips == ["too_long"]


def test_source_errors_name_the_source(tmp_path):
    with pytest.raises(ValueError, match="src1"):
        Source(name="src1", files=["x"], format="xml")
    with pytest.raises(FileNotFoundError, match="src2"):
        Source(name="src2", files=["missing/*.jsonl"], format="jsonl").resolve(str(tmp_path))
