"""Text normalization: safe NFKC, full-width ASCII -> half-width, Traditional -> Simplified, control
characters and ANSI escapes, whitespace inside CJK text, configurable regex fixes.

"Safe" NFKC: compatibility forms are folded (①→1, ﬁ→fi, CJK compatibility ideographs, full-width
letters and digits) except Chinese punctuation, which NFKC would turn into ASCII (，→, ！→! ；→;) and
the ellipsis/dashes that NFKC expands; those stay as written.
"""

from __future__ import annotations

import functools
import re
import sys
import unicodedata
from typing import Sequence

import gin

# Full-width punctuation that is ordinary Chinese typography: never folded to ASCII.
_KEEP = set("，。！？：；（）【】《》〈〉「」『』、…—～·“”‘’\u3000")
_ANSI = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]|\x1b[@-Z\\-_]")
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\u200b-\u200f\u202a-\u202e\u2060\ufeff]")
_CJK = (r"\u2e80-\u2fdf\u3001-\u303f\u3040-\u30ff\u3100-\u312f\u3400-\u4dbf\u4e00-\u9fff"
        r"\uf900-\ufaff\ufe30-\ufe4f\uff01-\uff0f\uff1a-\uff20\uff3b-\uff40\uff5b-\uff65"
        r"\U00020000-\U0003134f")
_CJK_GAP = re.compile(rf"(?<=[{_CJK}])[ \t\u3000\u00a0]+(?=[{_CJK}])")
_SPACES = re.compile(r"[ \t\u00a0\u3000]+")
_BLANK_LINES = re.compile(r"\n{3,}")
_LINE_EDGES = re.compile(r" *\n *")


@functools.lru_cache(maxsize=1)
def _fold_table() -> dict[int, str]:
    """str.translate table: NFKC of every code point whose NFKC differs, except kept punctuation."""
    table = {}
    for cp in range(0x80, sys.maxunicode + 1):
        if 0xD800 <= cp <= 0xDFFF or 0xAC00 <= cp <= 0xD7A3:
            continue
        ch = chr(cp)
        if ch in _KEEP:
            continue
        folded = unicodedata.normalize("NFKC", ch)
        if folded != ch:
            table[cp] = folded
    return table


@functools.lru_cache(maxsize=1)
def _fold_list() -> list:
    """The fold table as a list indexed by code point (str.translate is ~5x faster with a list)."""
    table = list(range(0x30000))  # covers every foldable code point (the last are U+2F800..2FA1D)
    for cp, folded in _fold_table().items():
        table[cp] = folded
    return table


def _fold(text: str) -> str:
    return text.translate(_fold_list())  # code points past the list raise LookupError: unchanged


@functools.lru_cache(maxsize=1)
def _t2s():
    import opencc  # imported lazily: only needed when conversion is on
    return opencc.OpenCC("t2s")


@gin.configurable
class Normalizer:
    """Normalizes one document's text; every step can be switched off from gin."""

    def __init__(self, *, nfkc: bool = True, traditional_to_simplified: bool = True,
                 strip_control: bool = True, join_cjk_spaces: bool = True,
                 regex_fixes: Sequence[tuple[str, str]] = ()):
        self.nfkc = nfkc
        self.traditional_to_simplified = traditional_to_simplified
        self.strip_control = strip_control
        self.join_cjk_spaces = join_cjk_spaces
        self.regex_fixes = tuple((p, r) for p, r in regex_fixes)
        for pattern, _ in self.regex_fixes:
            try:
                re.compile(pattern)
            except re.error as e:
                raise ValueError(f"Normalizer.regex_fixes: bad pattern {pattern!r}: {e}") from e

    def __getstate__(self):  # compiled patterns are rebuilt in the worker
        return {k: v for k, v in self.__dict__.items() if not k.startswith("_")}

    @functools.cached_property
    def _fixes(self):
        return [(re.compile(p), r) for p, r in self.regex_fixes]

    def __call__(self, text: str) -> str:
        text = text.replace("\r\n", "\n").replace("\r", "\n")
        if self.strip_control:
            text = _CONTROL.sub("", _ANSI.sub("", text))
        if self.nfkc:
            text = unicodedata.normalize("NFC", _fold(text))
        if self.traditional_to_simplified:
            text = _t2s().convert(text)
        for pattern, repl in self._fixes:
            text = pattern.sub(repl, text)
        if self.join_cjk_spaces:
            text = _CJK_GAP.sub("", text)
        text = _LINE_EDGES.sub("\n", _SPACES.sub(" ", text))
        return _BLANK_LINES.sub("\n\n", text).strip()
