"""Counting for the report through Beam metrics (aggregated by every runner, cheap per element).

Counter names are `stage|source|field`, fields docs_in, chars_in, docs_out, chars_out; skips are
`skip:<reason>|source|docs` and `...|chars`.
"""

from __future__ import annotations

import logging
import time

from apache_beam.metrics import Metrics

NAMESPACE = "zhchat.clean"


class Counters:
    """Lazily created Beam counters, one per name (safe to pickle: the cache is rebuilt)."""

    def __init__(self):
        self._cache = {}

    def __getstate__(self):
        return {}

    def __setstate__(self, state):
        self._cache = {}

    def inc(self, name: str, value: int = 1) -> None:
        if value:
            c = self._cache.get(name)
            if c is None:
                c = self._cache[name] = Metrics.counter(NAMESPACE, name)
            c.inc(value)

    def stage(self, stage: str, source: str, text_in: str | None, text_out: str | None) -> None:
        """Counts one document passing through `stage` (text_out None = dropped)."""
        if text_in is not None:
            self.inc(f"{stage}|{source}|docs_in")
            self.inc(f"{stage}|{source}|chars_in", len(text_in))
        if text_out is not None:
            self.inc(f"{stage}|{source}|docs_out")
            self.inc(f"{stage}|{source}|chars_out", len(text_out))

    def skip(self, source: str, reason: str, chars: int) -> None:
        self.inc(f"skip:{reason}|{source}|docs")
        self.inc(f"skip:{reason}|{source}|chars", chars)


class Progress:
    """Logs `what: N docs` at most every `every_s` seconds per worker (the CLI's progress lines)."""

    def __init__(self, what: str, every_s: float = 10.0):
        self.what, self.every_s, self.n, self.last = what, every_s, 0, time.time()

    def tick(self, n: int = 1, detail: str = "") -> None:
        self.n += n
        now = time.time()
        if now - self.last >= self.every_s:
            self.last = now
            logging.info("%s: %d docs so far %s", self.what, self.n, detail)
