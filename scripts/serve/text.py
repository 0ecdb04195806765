"""Incremental detokenization with stop strings, for streamed and whole replies.

Text is released only when it decodes cleanly: a token that ends inside a multi-byte character
(byte-fallback pieces of a Chinese character) decodes to U+FFFD, which is held back until the
character's last byte arrives, so a character is never split across two chunks. Continuations are
decoded after a chat token (`vocab.decode([im_end] + ids)`, as scripts/chat.py does) so that a
leading `▁` stays a space. Text that could be the start of a stop string is held back too; a
stop string ends the reply before it (OpenAI's `stop`).
"""

from __future__ import annotations

from typing import Any, Sequence

from zhchat.tasks import chat_template as ct

_REPLACEMENT = "\ufffd"


class TextStream:
    """`push(token)` -> new text to send; `stopped` once a stop string matched; `flush()` at the
    end gives what was held back."""

    def __init__(self, vocab: Any, stop: Sequence[str] = ()):
        self.vocab = vocab
        self.stop = [s for s in stop if s]
        self.ids: list[int] = []
        self._base = 0          # ids[:_base] decode to _stable
        self._stable = ""
        self.text = ""          # all decodable text so far (stop string and after removed)
        self.sent = 0           # characters of `text` released
        self.stopped = False

    def _decode(self) -> str:
        ids = [self.vocab.im_end_id] + self.ids[self._base:]
        tail = self.vocab.decode(ids, stop_at_eos=False)[len(ct.IM_END):]
        if not tail.endswith(_REPLACEMENT):  # a clean boundary: later decodes start here
            self._base, self._stable = len(self.ids), self._stable + tail
            return self._stable
        return self._stable + tail

    def push(self, token: int) -> str:
        if self.stopped:
            return ""
        self.ids.append(int(token))
        full = self._decode()
        clean = full.rstrip(_REPLACEMENT)
        cut = self._find_stop(clean)
        if cut is not None:
            self.text, self.stopped = clean[:cut], True
            return self._release(len(self.text))
        self.text = clean
        return self._release(len(clean) - self._partial_stop(clean))

    def flush(self) -> str:
        """The rest: held-back stop prefixes and an unfinished character (as U+FFFD)."""
        if not self.stopped:
            self.text = self._decode()
        return self._release(len(self.text))

    def _release(self, upto: int) -> str:
        if upto <= self.sent:
            return ""
        out, self.sent = self.text[self.sent:upto], upto
        return out

    def _find_stop(self, text: str) -> int | None:
        """Where the first stop string starts (searching only text not yet released)."""
        longest = max((len(s) for s in self.stop), default=0)
        start = max(0, self.sent - longest + 1)
        hits = [i for i in (text.find(s, start) for s in self.stop) if i >= 0]
        return min(hits) if hits else None

    def _partial_stop(self, text: str) -> int:
        """Length of the longest end of `text` that begins some stop string."""
        best = 0
        for s in self.stop:
            for n in range(min(len(s) - 1, len(text)), best, -1):
                if text.endswith(s[:n]):
                    best = n
                    break
        return best
