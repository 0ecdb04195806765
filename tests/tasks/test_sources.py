"""Corpus readers: every format on crafted files, counted skips and clear errors."""

import gzip
import json

import pytest

from zhchat.tasks import sources


def _docs(files, fmt, **kw):
    counter = sources.SkipCounter()
    docs = list(sources.iter_documents(files=files, format=fmt, counter=counter, **kw))
    return docs, counter


def test_jsonl_counts_bad_lines(tmp_path):
    path = tmp_path / "a.jsonl"
    with open(path, "wb") as f:
        f.write(json.dumps({"id": "d1", "text": "第一篇"}, ensure_ascii=False).encode() + b"\n")
        f.write(b'{"id": "bad", "text": "\xff\xfe broken utf8"}\n')
        f.write(b'{"id": "trunc", "text": "no closing\n')
        f.write(json.dumps({"id": "d2", "body": "no text field"}).encode() + b"\n")
        f.write(b"\n")
        f.write(json.dumps({"text": "没有编号"}, ensure_ascii=False).encode() + b"\r\n")
        f.write(b"[1, 2]\n")
    docs, counter = _docs([str(path)], "jsonl")
    assert [d["text"] for d in docs] == ["第一篇", "没有编号"]
    assert [d["id"] for d in docs] == ["d1", "a.jsonl:6"]
    assert all(d["source"] == "a.jsonl" for d in docs)
    assert counter.as_dict() == {"invalid_utf8": 1, "broken_json": 1, "blank_line": 1,
                                 "missing_text_field:text": 2}
    assert "a.jsonl:2" in counter.report() and "broken_json" in counter.report()


def test_jsonl_text_field_gzip_by_extension_and_magic(tmp_path):
    lines = [json.dumps({"content": f"文档{i}"}, ensure_ascii=False) for i in range(5)]
    payload = ("\n".join(lines) + "\n").encode()
    (tmp_path / "b.jsonl.gz").write_bytes(gzip.compress(payload))
    (tmp_path / "c.data").write_bytes(gzip.compress(payload))  # gzip without the extension
    for name in ("b.jsonl.gz", "c.data"):
        docs, counter = _docs(str(tmp_path / name), "jsonl", text_field="content")
        assert [d["text"] for d in docs] == [f"文档{i}" for i in range(5)]
        assert counter.total == 0
    with pytest.raises(ValueError, match="no documents.*'missing_text_field:text': 5"):
        _docs(str(tmp_path / "b.jsonl.gz"), "jsonl")  # the default field "text" is absent


def test_truncated_gzip_keeps_complete_lines_and_counts(tmp_path):
    lines = [json.dumps({"id": str(i), "text": "长文本" * 50 + str(i)}, ensure_ascii=False)
             for i in range(400)]
    blob = gzip.compress(("\n".join(lines) + "\n").encode())
    path = tmp_path / "t.jsonl.gz"
    path.write_bytes(blob[: len(blob) // 2])
    docs, counter = _docs([str(path)], "jsonl")
    assert 0 < len(docs) < 400
    assert [d["id"] for d in docs] == [str(i) for i in range(len(docs))]
    assert counter.counts["truncated_gzip"] == 1


def test_text_formats(tmp_path):
    (tmp_path / "lines.txt").write_text("一行\n\n二行\r\n三行\n", encoding="utf-8")
    docs, counter = _docs(str(tmp_path / "lines.txt"), "txt_lines")
    assert [d["text"] for d in docs] == ["一行", "二行", "三行"]
    assert [d["id"] for d in docs] == ["lines.txt:1", "lines.txt:3", "lines.txt:4"]
    assert counter.as_dict() == {"blank_line": 1}

    (tmp_path / "blocks.txt").write_text("甲\n乙\n\n\n丙\n\n丁\n戊", encoding="utf-8")
    docs, _ = _docs(str(tmp_path / "blocks.txt"), "txt_blocks")
    assert [d["text"] for d in docs] == ["甲\n乙", "丙", "丁\n戊"]

    docs, _ = _docs(str(tmp_path / "blocks.txt"), "txt_file")
    assert len(docs) == 1 and docs[0]["text"] == "甲\n乙\n\n\n丙\n\n丁\n戊"
    assert docs[0]["id"] == "blocks.txt"


def test_txt_invalid_utf8_line_counted(tmp_path):
    (tmp_path / "x.txt").write_bytes("好\n".encode() + b"\xc3\x28 bad\n" + "也好\n".encode())
    docs, counter = _docs(str(tmp_path / "x.txt"), "txt_lines")
    assert [d["text"] for d in docs] == ["好", "也好"]
    assert counter.as_dict() == {"invalid_utf8": 1}


def test_pku_tagged(tmp_path, demo_data_dir):
    (tmp_path / "p.txt").write_text(
        "迈向/v  充满/v  希望/n  的/u  新/a  世纪/n\n[中央/n  人民/n  广播/vn  电台/n]nt  报道/v\n"
        "\n坏词  好/a\n", encoding="utf-8")
    docs, counter = _docs(str(tmp_path / "p.txt"), "pku_tagged")
    assert [d["text"] for d in docs] == ["迈向充满希望的新世纪", "中央人民广播电台报道", "坏词好"]
    assert counter.as_dict() == {"blank_line": 1, "pku_token_without_tag": 1}
    demo = str(demo_data_dir / "peoples_daily_199801_tagged_sample.txt.gz")
    first = next(sources.iter_documents(files=demo, format="pku_tagged"))
    assert first["text"] == "迈向充满希望的新世纪——一九九八年新年讲话（附图片１张）"


def test_globs_multiple_files_and_empty_file(tmp_path):
    for i in range(3):
        (tmp_path / f"part{i}.txt").write_text(f"文{i}\n", encoding="utf-8")
    (tmp_path / "part9.txt").write_bytes(b"")
    docs, counter = _docs([str(tmp_path / "part*.txt"), str(tmp_path / "part1.txt")], "txt_lines")
    assert [d["text"] for d in docs] == ["文0", "文1", "文2"]  # sorted, deduplicated
    assert counter.as_dict() == {"empty_file": 1}


def test_errors_name_the_input(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        _docs(str(tmp_path / "nope.jsonl"), "jsonl")
    with pytest.raises(FileNotFoundError, match=r"glob .*\*\.zzz"):
        _docs(str(tmp_path / "*.zzz"), "jsonl")
    (tmp_path / "empty.jsonl").write_bytes(b"")
    with pytest.raises(ValueError, match="empty.jsonl.*no documents.*empty_file"):
        _docs(str(tmp_path / "empty.jsonl"), "jsonl")
    with pytest.raises(ValueError, match="unknown corpus format 'csv'"):
        _docs(str(tmp_path / "empty.jsonl"), "csv")
