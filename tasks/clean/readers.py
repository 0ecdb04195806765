"""Raw-corpus readers for the Beam pipeline, built on `zhchat.tasks.sources` (shared file readers).

Adds what the cleaning pipeline needs beyond `sources.FORMATS`:
  pku_seg  People's Daily as `字/b 字/e 字/s` character tags (the same text as pku_tagged) -> plain text
  json     one JSON array of objects per file (a broken file is one counted skip)
a per-document size guard (a 50 MB single line is a counted `too_long` skip, not a 50 MB document),
and `Source`, the gin-configurable named corpus whose name every document carries.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Callable, Iterator, Sequence

import gin

from zhchat.tasks import sources

FORMATS = sources.FORMATS + ("pku_seg", "json")
Counter = Callable[[str, int], None]  # counter(reason, chars) for each skipped record


@gin.configurable
@dataclasses.dataclass(frozen=True)
class Source:
    """A named corpus: file globs (relative paths resolve against `root`) and a format."""

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
        patterns = [p if os.path.isabs(p) else os.path.join(root, p) for p in self.files]
        try:
            return sources.expand_files(patterns)
        except FileNotFoundError as e:
            raise FileNotFoundError(f"Source {self.name!r}: {e}") from e


class _ForwardingCounter(sources.SkipCounter):
    """A SkipCounter that also reports each skip to the pipeline's counter."""

    def __init__(self, forward: Counter):
        super().__init__()
        self.forward = forward

    def add(self, reason: str, where: str, n: int = 1) -> None:
        super().add(reason, where, n)
        for _ in range(n):
            self.forward(reason, 0)


def seg_line_to_text(line: str) -> str:
    """`迈/b 向/e 的/s` -> `迈向的` (a token that is itself `/` keeps it: `//s` -> `/`)."""
    return "".join(tok.rpartition("/")[0] or tok for tok in line.split())


def _json_array(path: str, text_field: str, id_field: str, count: Counter, max_bytes: int
                ) -> Iterator[tuple[str, str]]:
    name = os.path.basename(path)
    size = os.path.getsize(path)
    if size == 0:
        count("empty_file", 0)
        return
    if size > max_bytes:
        count("too_long", size)
        return
    with open(path, "rb") as f:
        raw = f.read()
    try:
        records = json.loads(raw.decode("utf-8-sig"))
    except UnicodeDecodeError:
        count("invalid_utf8", len(raw))
        return
    except json.JSONDecodeError:
        count("broken_json_file", len(raw))
        return
    for i, rec in enumerate(records if isinstance(records, list) else [records]):
        body = rec.get(text_field) if isinstance(rec, dict) else None
        if not isinstance(body, str) or not body.strip():
            count(f"missing_text_field:{text_field}", 0)
            continue
        rid = rec.get(id_field)
        yield (str(rid) if rid is not None else f"{name}:{i}"), body


def iter_documents(*, files: Sequence[str], format: str, text_field: str = "text",
                   id_field: str = "id", counter: Counter | None = None,
                   max_doc_chars: int = 16 << 20) -> Iterator[tuple[str, str]]:
    """Yields (doc id, text) for every usable document of `files`; skips go to counter(reason, chars)."""
    if format not in FORMATS:
        raise ValueError(f"unknown corpus format {format!r}; expected one of {FORMATS}")
    count = counter or (lambda reason, chars: None)
    skips = _ForwardingCounter(count)
    for path in files:
        if format == "json":
            docs = _json_array(path, text_field, id_field, count, 4 * max_doc_chars)
        else:
            base = "txt_lines" if format == "pku_seg" else format
            docs = ((d["id"], d["text"]) for d in sources.iter_file(
                path, format=base, text_field=text_field, id_field=id_field, counter=skips))
        for doc_id, text in docs:
            if len(text) > max_doc_chars:
                count("too_long", len(text))
                continue
            if format == "pku_seg":
                text = seg_line_to_text(text)
            if not text.strip():
                count("empty_text", len(text))
                continue
            yield doc_id, text
