"""TF-free tokenizer with exactly seqio.SentencePieceVocabulary's ids (extra ids included).

The trainer, decoding, chat and GPU benchmarks cannot import seqio or TensorFlow, so this wraps the
`sentencepiece` package alone. Like seqio, `extra_ids` pieces `▁<extra_id_{i}>` are appended to the
model as user-defined pieces in reverse order, so `<extra_id_0>` is the highest id and
`vocab_size` = SentencePiece pieces + extra ids (seqio does not pad it either).

The pieces are appended to the serialized model proto directly (a repeated field may be extended by
concatenation in the protobuf wire format), so neither protobuf nor seqio is needed.
"""

from __future__ import annotations

import struct
from typing import Iterable, Sequence

import gin
import numpy as np
import sentencepiece as spm

_USER_DEFINED = 4  # ModelProto.SentencePiece.Type.USER_DEFINED


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _piece_field(piece: str) -> bytes:
    """ModelProto field 1 (pieces) holding SentencePiece{piece, score=0.0, type=USER_DEFINED}."""
    text = piece.encode("utf-8")
    body = (b"\x0a" + _varint(len(text)) + text      # 1: piece (string)
            + b"\x15" + struct.pack("<f", 0.0)        # 2: score (float)
            + b"\x18" + _varint(_USER_DEFINED))       # 3: type (enum)
    return b"\x0a" + _varint(len(body)) + body


def model_with_extra_ids(model_proto: bytes, extra_ids: int) -> bytes:
    """Serialized model with seqio's `▁<extra_id_{i}>` pieces appended, i = extra_ids-1 .. 0."""
    return model_proto + b"".join(_piece_field(f"▁<extra_id_{i}>")
                                  for i in reversed(range(extra_ids)))


@gin.configurable
class Vocabulary:
    """SentencePiece vocabulary with T5 sentinels; ids identical to seqio.SentencePieceVocabulary."""

    def __init__(self, path: str = gin.REQUIRED, extra_ids: int = 100,
                 chat_tokens: Sequence[str] = ("<|im_start|>", "<|im_end|>")):
        self.path = path
        self.extra_ids = extra_ids
        with open(path, "rb") as f:
            proto = f.read()
        self.tokenizer = spm.SentencePieceProcessor()
        self.tokenizer.LoadFromSerializedProto(model_with_extra_ids(proto, extra_ids))
        if self.tokenizer.pad_id() not in (0, -1) or self.tokenizer.eos_id() != 1:
            raise ValueError(f"{path}: expected T5 ids pad=0, eos=1; got pad="
                             f"{self.tokenizer.pad_id()}, eos={self.tokenizer.eos_id()}")
        self._chat_ids = {}
        for token in chat_tokens:
            i = self.tokenizer.piece_to_id(token)
            if i == self.tokenizer.unk_id():
                raise ValueError(f"{path}: chat token {token!r} is not a piece of the model")
            self._chat_ids[token] = i

    # -- ids -------------------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        """SentencePiece pieces + extra ids (seqio's `vocab_size`, unpadded)."""
        return self.tokenizer.get_piece_size()

    @property
    def base_vocab_size(self) -> int:
        return self.vocab_size - self.extra_ids

    @property
    def pad_id(self) -> int:
        return 0

    @property
    def eos_id(self) -> int:
        return self.tokenizer.eos_id()

    @property
    def unk_id(self) -> int:
        return self.tokenizer.unk_id()

    @property
    def bos_id(self) -> int:
        """-1: the models have no BOS (seqio returns the SentencePiece value too)."""
        return self.tokenizer.bos_id()

    def sentinel_id(self, i: int) -> int:
        """Id of `<extra_id_{i}>`: vocab_size - 1 - i."""
        if not 0 <= i < self.extra_ids:
            raise ValueError(f"sentinel {i} out of range: {self.path} has {self.extra_ids} extra ids")
        return self.vocab_size - 1 - i

    @property
    def im_start_id(self) -> int:
        return self._chat_ids["<|im_start|>"]

    @property
    def im_end_id(self) -> int:
        return self._chat_ids["<|im_end|>"]

    def piece_to_id(self, piece: str) -> int:
        return self.tokenizer.piece_to_id(piece)

    def id_to_piece(self, i: int) -> str:
        return self.tokenizer.id_to_piece(int(i))

    # -- text ------------------------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, without EOS (seqio's `encode`)."""
        return self.tokenizer.encode(text)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return self.tokenizer.encode(list(texts))

    def decode(self, ids: Iterable[int], stop_at_eos: bool = True) -> str:
        """Text of ids; like seqio, out-of-range ids become UNK and decoding stops at the first EOS."""
        ids = [int(i) for i in np.asarray(list(ids)).reshape(-1)]
        ids = [self.unk_id if i >= self.vocab_size or i < 0 else i for i in ids]
        if stop_at_eos and self.eos_id in ids:
            ids = ids[:ids.index(self.eos_id) + 1]
        return self.tokenizer.decode(ids)

    def decode_batch(self, batch: Iterable[Iterable[int]], stop_at_eos: bool = True) -> list[str]:
        return [self.decode(ids, stop_at_eos) for ids in batch]

    def heal(self, ids: Sequence[int], size: int | None = None) -> tuple[list[int], np.ndarray | None]:
        """Token healing for a completion prompt: `ids` less its last token, and a bool mask
        [size or vocab_size] of the ids whose piece begins with that token's piece (None, and `ids`
        unchanged, when the last token is a byte, control or user-defined piece, or the only one).

        A prompt cut mid-text ends on a shorter piece than the text has there (`子曰：` ends on `：`
        where the corpus has `：“`), a context the model has rarely seen; letting the first sampled
        token re-cover the removed piece removes that bias (as HF generate's `token_healing`).
        """
        ids = [int(i) for i in ids]
        sp = self.tokenizer
        if len(ids) < 2 or not self._plain(ids[-1]):
            return ids, None
        if not hasattr(self, "_pieces"):
            self._pieces = [sp.id_to_piece(i) if self._plain(i) else None
                            for i in range(self.vocab_size)]
        last = self._pieces[ids[-1]]
        mask = np.zeros(size or self.vocab_size, bool)
        for i, piece in enumerate(self._pieces):
            if piece is not None and piece.startswith(last):
                mask[i] = True
        return ids[:-1], mask

    def _plain(self, i: int) -> bool:
        sp = self.tokenizer
        return not (sp.is_byte(i) or sp.is_control(i) or sp.is_unknown(i) or sp.is_unused(i)
                    or sp.id_to_piece(i) in self._chat_ids or i >= self.base_vocab_size)

    def __repr__(self) -> str:
        return f"Vocabulary({self.path!r}, extra_ids={self.extra_ids}, vocab_size={self.vocab_size})"


def pad_token_rows(rows: Sequence[Sequence[int]], *, left: bool) -> np.ndarray:
    """Token-id rows as one int32 [len(rows), width] array padded with 0 (the pad id): on the left
    for decoder prompts (every row ends at the same position), on the right for encoder inputs."""
    width = max(1, max((len(r) for r in rows), default=1))
    out = np.zeros((len(rows), width), np.int32)
    for i, r in enumerate(rows):
        if not len(r):
            continue
        if left:
            out[i, width - len(r):] = r
        else:
            out[i, :len(r)] = r
    return out


def healed_prompt_batch(vocab: Vocabulary, texts: Sequence[str], size: int
                        ) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Completion prompts with token healing (`Vocabulary.heal`): left-padded tokens [B, L], the
    first-token mask [B, size] (all True where a prompt is not healed) and, per prompt, the text
    its tokens now decode to (strip it from the decoded prompt + completion to get the new text)."""
    rows, masks, heads = [], [], []
    for text in texts:
        ids, mask = vocab.heal(vocab.encode(text), size)
        rows.append(ids)
        masks.append(np.ones(size, bool) if mask is None else mask)
        heads.append(vocab.decode(ids))
    return pad_token_rows(rows, left=True), np.stack(masks), heads
