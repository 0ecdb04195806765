"""Raw-corpus readers: every document gets a stable id and its source name; bad input is a counted skip.

Formats (gzip is detected from the file's magic bytes, so `.gz` names are not required):
  jsonl      one JSON object per line; text in `text_field`, id in `id_field` (else `file:line`)
  json       one JSON array of objects in the file
  txt_lines  one document per line (short reviews)
  txt_blocks one document per blank-line separated block
  txt_file   one document per file
  pku_tagged People's Daily `词/tag  词/tag` lines (compound brackets `[词/n 词/n]nt` too) -> plain text
  pku_seg    the same text as `字/b 字/e 字/s` character tags -> plain text
Skip reasons: unreadable_file, empty_file, truncated_gzip, invalid_utf8, broken_json, broken_json_file,
not_an_object, missing_text_field, line_too_long, empty_text.
"""

from __future__ import annotations

import dataclasses
import glob
import gzip
import json
import os
import re
import zlib
from typing import Callable, Iterator, Sequence

import gin

FORMATS = ("jsonl", "json", "txt_lines", "txt_blocks", "txt_file", "pku_tagged", "pku_seg")
Counter = Callable[[str, int], None]  # counter(reason, chars) for each skipped record
_TOKEN_SPLIT = re.compile(r"\s+")
_PKU_TAG = re.compile(r"/[A-Za-z]+\]?[A-Za-z]*$")


@gin.configurable
@dataclasses.dataclass(frozen=True)
class Source:
    """A named corpus: file globs (relative paths resolve against `root` at read time) and a format."""

    name: str
    files: Sequence[str]
    format: str
    text_field: str = "text"
    id_field: str = "id"

    def __post_init__(self):
        if self.format not in FORMATS:
            raise ValueError(f"Source {self.name!r}: format {self.format!r} not one of {FORMATS}")

    def resolve(self, root: str = ".") -> list[str]:
        """Sorted file paths; a pattern that matches nothing is an error naming the source."""
        paths = []
        for pattern in self.files:
            full = pattern if os.path.isabs(pattern) else os.path.join(root, pattern)
            hits = sorted(glob.glob(full))
            if not hits:
                raise FileNotFoundError(f"Source {self.name!r}: no file matches {pattern!r}")
            paths.extend(hits)
        return paths


def _open(path: str):
    f = open(path, "rb")
    magic = f.read(2)
    f.seek(0)
    return gzip.GzipFile(fileobj=f, mode="rb") if magic == b"\x1f\x8b" else f


def _lines(path: str, count: Counter, max_line_bytes: int) -> Iterator[tuple[int, bytes]]:
    """(1-based line number, raw line) pairs; over-long lines are skipped without loading them."""
    try:
        f = _open(path)
    except OSError:
        count("unreadable_file", 0)
        return
    with f:
        lineno, total = 0, 0
        try:
            while True:
                line = f.readline(max_line_bytes + 1)
                if not line:
                    break
                lineno += 1
                total += len(line)
                if len(line) > max_line_bytes and not line.endswith(b"\n"):
                    skipped = len(line)
                    while line and not line.endswith(b"\n"):
                        line = f.readline(1 << 20)
                        skipped += len(line)
                    total += skipped - len(line)
                    count("line_too_long", skipped)
                    continue
                yield lineno, line
        except (EOFError, gzip.BadGzipFile, zlib.error):
            count("truncated_gzip", 0)
        except OSError:
            count("unreadable_file", 0)
        if total == 0 and lineno == 0:
            count("empty_file", 0)


def _decode(raw: bytes, count: Counter) -> str | None:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        count("invalid_utf8", len(raw))
        return None


def _untag(line: str, fmt: str) -> str:
    words = []
    for tok in _TOKEN_SPLIT.split(line.strip()):
        if not tok:
            continue
        if fmt == "pku_tagged":
            if tok.startswith("[") and not tok.startswith("[/"):
                tok = tok[1:]  # opening bracket of a compound word `[中央/n 电台/n]nt`
            cut = _PKU_TAG.search(tok)
            words.append(tok[:cut.start()] if cut and cut.start() > 0 else tok)
        else:
            words.append(tok.rsplit("/", 1)[0] if "/" in tok[1:] else tok)
    return "".join(words)


def iter_documents(*, files: Sequence[str], format: str, text_field: str = "text",
                   id_field: str = "id", counter: Counter | None = None,
                   max_line_bytes: int = 32 << 20) -> Iterator[tuple[str, str]]:
    """Yields (doc id, text) for every readable document of `files`; skips go to counter(reason, chars)."""
    count = counter or (lambda reason, chars: None)
    for path in files:
        base = os.path.basename(path)
        if format in ("txt_file", "json"):
            yield from _whole_file(path, base, format, text_field, id_field, count, max_line_bytes)
            continue
        block: list[str] = []
        block_start = 0
        for lineno, raw in _lines(path, count, max_line_bytes):
            text = _decode(raw, count)
            if text is None:
                continue
            if format == "jsonl":
                doc = _json_record(text, f"{base}:{lineno}", text_field, id_field, count)
                if doc is not None:
                    yield doc
            elif format == "txt_blocks":
                if text.strip():
                    block_start = block_start or lineno
                    block.append(text.rstrip("\r\n"))
                elif block:
                    yield f"{base}:{block_start}", "\n".join(block)
                    block, block_start = [], 0
            else:
                body = text.rstrip("\r\n")
                if format in ("pku_tagged", "pku_seg"):
                    body = _untag(body, format)
                if body.strip():
                    yield f"{base}:{lineno}", body
                else:
                    count("empty_text", len(body))
        if block:
            yield f"{base}:{block_start}", "\n".join(block)


def _json_record(text: str, default_id: str, text_field: str, id_field: str,
                 count: Counter) -> tuple[str, str] | None:
    if not text.strip():
        count("empty_text", 0)
        return None
    try:
        rec = json.loads(text)
    except json.JSONDecodeError:
        count("broken_json", len(text))
        return None
    return _from_record(rec, default_id, text_field, id_field, count)


def _from_record(rec, default_id: str, text_field: str, id_field: str,
                 count: Counter) -> tuple[str, str] | None:
    if not isinstance(rec, dict):
        count("not_an_object", 0)
        return None
    body = rec.get(text_field)
    if not isinstance(body, str):
        count("missing_text_field", 0)
        return None
    if not body.strip():
        count("empty_text", len(body))
        return None
    rid = rec.get(id_field)
    return (str(rid) if rid is not None else default_id), body


def _whole_file(path: str, base: str, format: str, text_field: str, id_field: str,
                count: Counter, max_bytes: int) -> Iterator[tuple[str, str]]:
    try:
        with _open(path) as f:
            raw = f.read(max_bytes + 1)
    except (EOFError, gzip.BadGzipFile, zlib.error):
        count("truncated_gzip", 0)
        return
    except OSError:
        count("unreadable_file", 0)
        return
    if not raw:
        count("empty_file", 0)
        return
    if len(raw) > max_bytes:
        count("line_too_long", len(raw))
        return
    text = _decode(raw, count)
    if text is None:
        return
    if format == "txt_file":
        if text.strip():
            yield base, text
        else:
            count("empty_text", len(text))
        return
    try:
        records = json.loads(text)
    except json.JSONDecodeError:
        count("broken_json_file", len(text))
        return
    if not isinstance(records, list):
        records = [records]
    for i, rec in enumerate(records):
        doc = _from_record(rec, f"{base}:{i}", text_field, id_field, count)
        if doc is not None:
            yield doc
