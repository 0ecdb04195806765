"""Document filters. Each returns the (possibly trimmed) text or None to drop the document, has a
`name` under which the report counts documents and characters in/out, and can exempt sources.
"""

from __future__ import annotations

import math
import os
import re
from typing import Callable, Sequence

import gin
import numpy as np

from zhchat.tasks.clean import minhash

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

_CJK_CHAR = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0003134f]")
_FINAL = "。！？…”’」』）)!?.;；~～"
_SENTENCE_END = re.compile(r"[。！？!?…]+[”’」』）)]*")


class Filter:
    """Base class: `apply(text, source)` honours `exempt_sources`; subclasses implement `__call__`."""

    name = "filter"

    def __init__(self, *, exempt_sources: Sequence[str] = ()):
        self.exempt_sources = tuple(exempt_sources)

    def setup(self) -> None:
        """Called once per worker before the first document (load models here, not in __init__)."""

    def apply(self, text: str, source: str) -> str | None:
        return text if source in self.exempt_sources else self(text)

    def __call__(self, text: str) -> str | None:
        raise NotImplementedError


@gin.configurable
class LengthFilter(Filter):
    """Keeps documents with min_chars <= len(text) <= max_chars (non-whitespace characters)."""

    name = "length"

    def __init__(self, *, min_chars: int = 20, max_chars: int = 10_000_000, **kw):
        super().__init__(**kw)
        self.min_chars, self.max_chars = min_chars, max_chars

    def __call__(self, text):
        n = len(text) - text.count(" ") - text.count("\n")
        return text if self.min_chars <= n <= self.max_chars else None


@gin.configurable
class CjkRatioFilter(Filter):
    """Keeps documents whose share of CJK ideographs among non-space characters is >= min_ratio."""

    name = "cjk_ratio"

    def __init__(self, *, min_ratio: float = 0.3, **kw):
        super().__init__(**kw)
        self.min_ratio = min_ratio

    def __call__(self, text):
        total = len(text) - text.count(" ") - text.count("\n")
        return text if total and len(_CJK_CHAR.findall(text)) / total >= self.min_ratio else None


@gin.configurable
class SentenceEndFilter(Filter):
    """Documents must end with sentence-final punctuation; with trim=True the last incomplete sentence
    is cut instead (ChatYuan's incomplete-text filter), and the document is dropped if nothing is left."""

    name = "sentence_end"

    def __init__(self, *, trim: bool = True, **kw):
        super().__init__(**kw)
        self.trim = trim

    def __call__(self, text):
        text = text.rstrip()
        if text and text[-1] in _FINAL:
            return text
        if not self.trim:
            return None
        ends = [m.end() for m in _SENTENCE_END.finditer(text)]
        cut = text[:ends[-1]].rstrip() if ends else ""
        return cut if cut and cut[-1] in _FINAL else None


@gin.configurable
class RepetitionFilter(Filter):
    """Gopher-style repetition limits: share of duplicated lines, share of characters in duplicated
    lines, and share of characters covered by n-grams that occur more than once."""

    name = "repetition"

    def __init__(self, *, max_dup_line_frac: float = 0.3, max_dup_line_char_frac: float = 0.2,
                 ngram: int = 10, max_dup_ngram_char_frac: float = 0.5, **kw):
        super().__init__(**kw)
        self.max_dup_line_frac = max_dup_line_frac
        self.max_dup_line_char_frac = max_dup_line_char_frac
        self.ngram = ngram
        self.max_dup_ngram_char_frac = max_dup_ngram_char_frac

    def __call__(self, text):
        lines = [ln for ln in text.split("\n") if ln.strip()]
        if len(lines) > 1:
            seen, dup, dup_chars = set(), 0, 0
            for ln in lines:
                if ln in seen:
                    dup, dup_chars = dup + 1, dup_chars + len(ln)
                seen.add(ln)
            if (dup / len(lines) > self.max_dup_line_frac
                    or dup_chars / max(1, len(text)) > self.max_dup_line_char_frac):
                return None
        return None if dup_ngram_char_frac(text, self.ngram) > self.max_dup_ngram_char_frac else text


def dup_ngram_char_frac(text: str, n: int) -> float:
    """Share of characters covered by a character n-gram that occurs more than once (vectorized)."""
    if len(text) <= n:
        return 0.0
    h = minhash.shingle_hashes(text, n)
    _, inverse, counts = np.unique(h, return_inverse=True, return_counts=True)
    dup_start = counts[inverse] > 1
    cover = np.zeros(len(text) + 1, np.int64)  # +1 at each duplicated n-gram start, -1 at its end
    np.add.at(cover, np.nonzero(dup_start)[0], 1)
    np.add.at(cover, np.nonzero(dup_start)[0] + n, -1)
    return float((np.cumsum(cover)[:-1] > 0).mean())


@gin.configurable
class BlocklistFilter(Filter):
    """Drops documents containing more than `max_hits` occurrences of keywords from a file
    (one keyword per line, `#` comments). A relative `path` not found from the working directory
    is taken from the repository root (the shipped list is tasks/clean/blocklist_zh.txt)."""

    name = "blocklist"

    def __init__(self, *, path: str, max_hits: int = 0, **kw):
        super().__init__(**kw)
        if not os.path.isabs(path) and not os.path.exists(path):
            path = os.path.join(REPO_ROOT, path)
        try:
            with open(path, encoding="utf-8") as f:
                words = [w.strip() for w in f if w.strip() and not w.startswith("#")]
        except OSError as e:
            raise FileNotFoundError(f"BlocklistFilter.path: cannot read {path!r}: {e}") from e
        self.words = tuple(sorted(set(words), key=lambda w: (-len(w), w)))
        self.max_hits = max_hits

    @property
    def _pattern(self):
        if not hasattr(self, "_re"):
            self._re = re.compile("|".join(map(re.escape, self.words))) if self.words else None
        return self._re

    def __getstate__(self):
        return {k: v for k, v in self.__dict__.items() if k != "_re"}

    def __call__(self, text):
        if self._pattern is None:
            return text
        hits = 0
        for _ in self._pattern.finditer(text):
            hits += 1
            if hits > self.max_hits:
                return None
        return text


ScoreFn = Callable[[Sequence[str]], Sequence[float]]


@gin.configurable
class PerplexityFilter(Filter):
    """Drops documents whose per-character perplexity under a language model exceeds `max_perplexity`.

    `score_fn(texts) -> summed natural-log probability of each text` is the hook for the quality model:
    `checkpoint_score_fn` below adapts a zhchat model wrapper's `score_batch`; tests pass a small LM.
    The model is built lazily (in `setup`, once per worker), so this module stays import-light.
    """

    name = "perplexity"

    def __init__(self, *, score_fn: ScoreFn | None = None,
                 score_fn_factory: Callable[[], ScoreFn] | None = None,
                 max_perplexity: float = 1000.0, **kw):
        super().__init__(**kw)
        if (score_fn is None) == (score_fn_factory is None):
            raise ValueError("PerplexityFilter: give exactly one of score_fn or score_fn_factory")
        self.score_fn, self.score_fn_factory = score_fn, score_fn_factory
        self.max_perplexity = max_perplexity

    def setup(self):
        if self.score_fn is None:
            self.score_fn = self.score_fn_factory()

    def perplexity(self, text: str) -> float:
        self.setup()
        logprob = float(self.score_fn([text])[0])
        return math.exp(-logprob / max(1, len(text)))

    def __call__(self, text):
        return text if self.perplexity(text) <= self.max_perplexity else None


@gin.configurable
def checkpoint_score_fn(*, model, params, encode: Callable[[str], Sequence[int]], seq_len: int = 512,
                        bos_id: int = 0) -> ScoreFn:
    """Adapts a decoder model wrapper (`models/base_model.BaseModel`) into a score_fn: each text is
    cut into `seq_len` windows, scored with `score_batch` (summed target log-prob), and summed.
    `bos_id` opens each window's inputs: 0, as seqio's decoder feature converter (and so our
    training rows) shift the targets."""

    def score(texts: Sequence[str]) -> list[float]:
        out = []
        for text in texts:
            ids = list(encode(text))
            total = 0.0
            for start in range(0, max(1, len(ids)), seq_len):
                piece = ids[start:start + seq_len]
                inputs = np.zeros((1, seq_len), np.int32)
                targets = np.zeros((1, seq_len), np.int32)
                targets[0, :len(piece)] = piece
                inputs[0, 0] = bos_id
                inputs[0, 1:len(piece)] = piece[:-1]
                weights = (targets != 0).astype(np.float32)
                batch = {"decoder_input_tokens": inputs, "decoder_target_tokens": targets,
                         "decoder_segment_ids": (targets != 0).astype(np.int32),
                         "decoder_positions": np.arange(seq_len, dtype=np.int32)[None],
                         "decoder_loss_weights": weights}
                total += float(np.asarray(model.score_batch(params, batch))[0])
            out.append(total)
        return out

    return score
