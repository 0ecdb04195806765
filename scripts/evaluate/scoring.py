"""Batched, jitted log-likelihood of continuations given contexts, for a decoder or a T5.

A request is (context ids, continuation ids). The decoder scores context + continuation as one row
(inputs shifted right with 0, loss weights on the continuation); T5 encodes the context (+ EOS) and
scores the continuation as its targets. Rows are sorted by length, padded to a multiple of `bucket`
tokens and to a full batch, so a suite compiles a handful of shapes; results come back in request
order. Contexts longer than the model's window lose tokens from the left (counted). With a
partitioner, each batch is split over the mesh's data axes (the params as the checkpoint restored them).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import numpy as np
import tqdm

Request = tuple[Sequence[int], Sequence[int]]


@dataclasses.dataclass
class Scorer:
    """`score(requests)` -> summed log p(continuation | context) per request (float64 [n])."""
    model: Any
    params: Any
    batch_size: int = 16
    bucket: int = 64
    max_len: int = 1024          # decoder: the whole row; T5: the encoder input
    max_target_len: int = 256    # T5 targets
    progress: bool = True
    partitioner: Any = None      # trainer/partitioning.Partitioner: batches split over its data axes
    truncated: int = 0           # requests whose context was cut from the left

    def __post_init__(self):
        import jax

        from zhchat.models.encdec_model import EncoderDecoderModel

        if self.partitioner is not None:  # every data-parallel shard gets whole rows
            dp = self.partitioner.data_parallel_size
            self.batch_size = -(-self.batch_size // dp) * dp
        self.encdec = isinstance(self.model, EncoderDecoderModel)
        if not self.encdec:
            self.max_len = min(self.max_len, self.model.config.max_len)
        self._fn = jax.jit(self.model.score_batch)

    def _round(self, n: int, cap: int) -> int:
        return min(cap, max(self.bucket, -(-n // self.bucket) * self.bucket))

    def _fit(self, context: Sequence[int], continuation: Sequence[int]) -> tuple[list, list]:
        context, continuation = list(context), list(continuation)
        if self.encdec:
            continuation = continuation[:self.max_target_len]
            room = self.max_len - 1
        else:
            continuation = continuation[-self.max_len:]
            room = self.max_len - len(continuation)
        if len(context) > room:
            self.truncated += 1
            context = context[len(context) - room:] if room > 0 else []
        return context, continuation

    def _batch(self, rows: list[tuple[list, list]]) -> dict[str, np.ndarray]:
        n = self.batch_size
        if self.encdec:
            enc = self._round(max(len(c) + 1 for c, _ in rows), self.max_len)
            dec = self._round(max(len(t) for _, t in rows), self.max_target_len)
            b = {"encoder_input_tokens": np.zeros((n, enc), np.int32),
                 "decoder_input_tokens": np.zeros((n, dec), np.int32),
                 "decoder_target_tokens": np.zeros((n, dec), np.int32),
                 "decoder_loss_weights": np.zeros((n, dec), np.float32)}
            for i, (c, t) in enumerate(rows):
                b["encoder_input_tokens"][i, :len(c) + 1] = c + [self.model.eos_id]
                b["decoder_target_tokens"][i, :len(t)] = t
                b["decoder_input_tokens"][i, 1:len(t)] = t[:-1]
                b["decoder_loss_weights"][i, :len(t)] = 1.0
            for i in range(len(rows), n):  # filler rows: an EOS encoder input, no weights
                b["encoder_input_tokens"][i, 0] = self.model.eos_id
            return b
        width = self._round(max(len(c) + len(t) for c, t in rows), self.max_len)
        b = {"decoder_input_tokens": np.zeros((n, width), np.int32),
             "decoder_target_tokens": np.zeros((n, width), np.int32),
             "decoder_loss_weights": np.zeros((n, width), np.float32)}
        for i, (c, t) in enumerate(rows):
            seq = c + t
            b["decoder_target_tokens"][i, :len(seq)] = seq
            b["decoder_input_tokens"][i, 1:len(seq)] = seq[:-1]
            b["decoder_loss_weights"][i, len(c):len(seq)] = 1.0
        return b

    def score(self, requests: Sequence[Request], desc: str = "scoring") -> np.ndarray:
        import jax

        fitted = [self._fit(c, t) for c, t in requests]
        order = sorted(range(len(fitted)), key=lambda i: len(fitted[i][0]) + len(fitted[i][1]))
        out = np.zeros(len(fitted), np.float64)
        starts = range(0, len(order), self.batch_size)
        for s in tqdm.tqdm(starts, desc=desc, disable=not self.progress, leave=False):
            idx = order[s:s + self.batch_size]
            batch = self._batch([fitted[i] for i in idx])
            if self.partitioner is not None:
                batch = jax.device_put(batch, self.partitioner.batch_sharding)
            scores = np.asarray(self._fn(self.params, batch))
            out[idx] = scores[:len(idx)]
        return out


def split_continuation(vocab: Any, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Ids of `context` and of `continuation` as it tokenizes after it: encode(context +
    continuation) split after encode(context)'s length (lm-evaluation-harness's rule), so a
    continuation is scored in its in-text tokenization, not as a fresh string."""
    whole = vocab.encode(context + continuation)
    head = vocab.encode(context) if context else []
    if whole[:len(head)] != head:  # the boundary merged into one piece: back off to where they agree
        k = 0
        while k < min(len(head), len(whole)) and head[k] == whole[k]:
            k += 1
        head = whole[:k]
    return head, whole[len(head):]
