"""Corpus file readers: one or many files/globs in a known format -> documents with counted skips.

Every document is a dict `{"id", "source", "text"}`. Anything a reader cannot use (a line that is not
UTF-8, a broken JSON line, a record without the text field, a truncated gzip, an empty file) is counted
per reason in a `SkipCounter` that the caller reports; nothing is dropped silently. A missing file, a
glob matching nothing or a corpus yielding no document at all raise an error naming the input.

Kept free of TensorFlow so the Beam cleaning pipeline, the tokenizer trainer and seqio sources share it.
"""

from __future__ import annotations

import collections
import glob
import gzip
import json
import os
import zlib
from typing import IO, Any, Iterable, Iterator, Sequence

FORMATS = ("jsonl", "txt_lines", "txt_blocks", "txt_file", "pku_tagged")
_GZIP_MAGIC = b"\x1f\x8b"


class SkipCounter:
    """Counts skipped records per reason and keeps a few examples of where they happened."""

    def __init__(self, max_examples: int = 3):
        self.counts: collections.Counter[str] = collections.Counter()
        self.examples: dict[str, list[str]] = collections.defaultdict(list)
        self._max_examples = max_examples

    def add(self, reason: str, where: str, n: int = 1) -> None:
        self.counts[reason] += n
        if len(self.examples[reason]) < self._max_examples:
            self.examples[reason].append(where)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def as_dict(self) -> dict[str, int]:
        return dict(sorted(self.counts.items()))

    def report(self) -> str:
        """Human-readable summary, one reason per line (empty string when nothing was skipped)."""
        lines = [f"{reason}: {n} (e.g. {', '.join(self.examples[reason])})"
                 for reason, n in sorted(self.counts.items())]
        return "\n".join(lines)

    def __repr__(self) -> str:
        return f"SkipCounter({self.as_dict()})"


def expand_files(files: str | Sequence[str]) -> list[str]:
    """Expands paths and globs (sorted, deduplicated); a path or glob that matches nothing raises."""
    if isinstance(files, (str, os.PathLike)):
        files = [files]
    out: list[str] = []
    for pattern in files:
        pattern = os.fspath(pattern)
        if glob.has_magic(pattern):
            matches = sorted(glob.glob(pattern, recursive=True))
            if not matches:
                raise FileNotFoundError(f"glob {pattern!r} matches no file")
            out.extend(m for m in matches if os.path.isfile(m))
        elif os.path.isfile(pattern):
            out.append(pattern)
        else:
            raise FileNotFoundError(f"corpus file {pattern!r} does not exist")
    return list(dict.fromkeys(out))


def _is_gzip(path: str) -> bool:
    if path.endswith(".gz"):
        return True
    with open(path, "rb") as f:
        return f.read(2) == _GZIP_MAGIC


def _open_binary(path: str) -> IO[bytes]:
    return gzip.open(path, "rb") if _is_gzip(path) else open(path, "rb")


def _iter_lines(path: str, counter: SkipCounter) -> Iterator[tuple[int, str]]:
    """Yields (1-based line number, decoded line without its line ending); counts bad lines."""
    name = os.path.basename(path)
    n_lines = 0
    try:
        with _open_binary(path) as f:
            for n_lines, raw in enumerate(f, start=1):
                try:
                    line = raw.decode("utf-8-sig" if n_lines == 1 else "utf-8")
                except UnicodeDecodeError:
                    counter.add("invalid_utf8", f"{name}:{n_lines}")
                    continue
                yield n_lines, line.rstrip("\r\n")
    except (EOFError, zlib.error, gzip.BadGzipFile) as e:
        counter.add("truncated_gzip", f"{name} after line {n_lines} ({type(e).__name__})")
    if n_lines == 0:
        counter.add("empty_file", name)


def iter_json_records(path: str, counter: SkipCounter) -> Iterator[tuple[str, Any]]:
    """(`file:line`, parsed value) of every line of a JSON-lines file; blank lines, broken JSON and
    the decoding problems of `_iter_lines` are counted in `counter` and skipped."""
    name = os.path.basename(path)
    for lineno, line in _iter_lines(path, counter):
        if not line.strip():
            counter.add("blank_line", f"{name}:{lineno}")
            continue
        try:
            yield f"{name}:{lineno}", json.loads(line)
        except json.JSONDecodeError:
            counter.add("broken_json", f"{name}:{lineno}")


def _read_jsonl(path: str, text_field: str, id_field: str, counter: SkipCounter
                ) -> Iterator[dict]:
    for where, record in iter_json_records(path, counter):
        text = record.get(text_field) if isinstance(record, dict) else None
        if not isinstance(text, str):
            counter.add(f"missing_text_field:{text_field}", where)
            continue
        doc_id = record.get(id_field)
        yield {"id": str(doc_id) if doc_id is not None else where, "text": text}


def _read_txt_lines(path: str, counter: SkipCounter) -> Iterator[dict]:
    name = os.path.basename(path)
    for lineno, line in _iter_lines(path, counter):
        if not line.strip():
            counter.add("blank_line", f"{name}:{lineno}")
            continue
        yield {"id": f"{name}:{lineno}", "text": line}


def _read_txt_blocks(path: str, counter: SkipCounter) -> Iterator[dict]:
    name = os.path.basename(path)
    block: list[str] = []
    start = 0
    for lineno, line in _iter_lines(path, counter):
        if line.strip():
            if not block:
                start = lineno
            block.append(line)
        elif block:
            yield {"id": f"{name}:{start}", "text": "\n".join(block)}
            block = []
    if block:
        yield {"id": f"{name}:{start}", "text": "\n".join(block)}


def _read_txt_file(path: str, counter: SkipCounter) -> Iterator[dict]:
    name = os.path.basename(path)
    text = "\n".join(line for _, line in _iter_lines(path, counter))
    if text.strip():
        yield {"id": name, "text": text}
    else:
        counter.add("empty_text", name)


def pku_line_to_text(line: str, counter: SkipCounter | None = None, where: str = "") -> str:
    """`迈向/v  充满/v ...` -> `迈向充满...`; PKU compound brackets `[中央/n  电台/n]nt` are unwrapped."""
    words = []
    for token in line.split():
        word, sep, _tag = token.rpartition("/")
        if not sep or not word:
            if counter is not None:
                counter.add("pku_token_without_tag", where)
            word = token
        if word.startswith("[") and len(word) > 1:
            word = word[1:]
        words.append(word)
    return "".join(words)


def _read_pku_tagged(path: str, counter: SkipCounter) -> Iterator[dict]:
    name = os.path.basename(path)
    for lineno, line in _iter_lines(path, counter):
        text = pku_line_to_text(line, counter, f"{name}:{lineno}")
        if not text:
            counter.add("blank_line", f"{name}:{lineno}")
            continue
        yield {"id": f"{name}:{lineno}", "text": text}


def iter_file(path: str, *, format: str, text_field: str = "text", id_field: str = "id",
              counter: SkipCounter) -> Iterator[dict]:
    """Documents of one file (no empty-corpus check; see `iter_documents`)."""
    if format == "jsonl":
        docs = _read_jsonl(path, text_field, id_field, counter)
    elif format == "txt_lines":
        docs = _read_txt_lines(path, counter)
    elif format == "txt_blocks":
        docs = _read_txt_blocks(path, counter)
    elif format == "txt_file":
        docs = _read_txt_file(path, counter)
    elif format == "pku_tagged":
        docs = _read_pku_tagged(path, counter)
    else:
        raise ValueError(f"unknown corpus format {format!r} for {path}; expected one of {FORMATS}")
    source = os.path.basename(path)
    for doc in docs:
        doc["source"] = source
        yield doc


def iter_documents(*, files: str | Sequence[str], format: str, text_field: str = "text",
                   id_field: str = "id", counter: SkipCounter | None = None) -> Iterator[dict]:
    """Streams `{"id", "source", "text"}` documents from files/globs in one format.

    Skips are counted in `counter` (pass one in to report them). Raises FileNotFoundError for a missing
    file or an empty glob, ValueError for an unknown format or when the whole corpus yields nothing.
    """
    if format not in FORMATS:
        raise ValueError(f"unknown corpus format {format!r}; expected one of {FORMATS}")
    paths = expand_files(files)
    counter = counter if counter is not None else SkipCounter()
    n_docs = 0
    for path in paths:
        for doc in iter_file(path, format=format, text_field=text_field, id_field=id_field,
                             counter=counter):
            n_docs += 1
            yield doc
    if n_docs == 0:
        raise ValueError(f"corpus {list(files) if not isinstance(files, str) else files!r} "
                         f"(format {format}) yielded no documents; skipped: {counter.as_dict()}")


def iter_corpora(corpora: Iterable[tuple[str | Sequence[str], str, str]],
                 counter: SkipCounter | None = None) -> Iterator[dict]:
    """Chains several (files, format, text_field) corpora, e.g. jsonl books plus PKU-tagged news."""
    for files, fmt, text_field in corpora:
        yield from iter_documents(files=files, format=fmt, text_field=text_field, counter=counter)
