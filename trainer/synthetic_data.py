"""Synthetic decoder batches (random tokens, fixed shapes) for benchmarks and trainer tests.

Same interface as the cache reader's iterator: numpy dict batches with seqio model-feature names and a
JSON-serialisable `get_state()`/`set_state()`, so checkpoint/resume paths are exercised identically.
Batch `i` depends only on (seed, shard_index, i).
"""

from __future__ import annotations

from typing import Any, Iterator

import gin
import numpy as np


class SyntheticIterator(Iterator[dict[str, np.ndarray]]):
    """Endless packed-looking causal-LM batches of uniformly random tokens (one segment per row)."""

    def __init__(self, *, batch_size: int, seq_len: int, vocab_size: int, seed: int,
                 shard_index: int, shard_count: int):
        self.shape = (batch_size, seq_len)
        self.vocab_size = vocab_size
        self.seed, self.shard_index, self.shard_count = seed, shard_index, shard_count
        self.index = 0

    def __next__(self) -> dict[str, np.ndarray]:
        rng = np.random.default_rng([self.seed, self.shard_index, self.index])
        self.index += 1
        tokens = rng.integers(1, self.vocab_size, size=(self.shape[0], self.shape[1] + 1),
                              dtype=np.int32)
        positions = np.broadcast_to(np.arange(self.shape[1], dtype=np.int32), self.shape)
        return {"decoder_input_tokens": tokens[:, :-1], "decoder_target_tokens": tokens[:, 1:],
                "decoder_segment_ids": np.ones(self.shape, np.int32),
                "decoder_positions": np.array(positions),
                "decoder_loss_weights": np.ones(self.shape, np.float32)}

    def get_state(self) -> dict[str, Any]:
        return {"index": self.index, "seed": self.seed, "shard_index": self.shard_index}

    def set_state(self, state: dict[str, Any]) -> None:
        self.index = int(state["index"])


@gin.configurable
def make_synthetic_iterator(*, batch_size: int = 8, seq_len: int = 128, vocab_size: int = 32000,
                            seed: int = 0, shard_index: int = 0, shard_count: int = 1,
                            shuffle: bool = True, num_epochs: int | None = None
                            ) -> SyntheticIterator:
    """Factory taking the cache reader's keyword arguments (`shuffle`/`num_epochs` have no effect:
    the stream is endless and already random)."""
    del shuffle, num_epochs
    return SyntheticIterator(batch_size=batch_size, seq_len=seq_len, vocab_size=vocab_size,
                             seed=seed, shard_index=shard_index, shard_count=shard_count)
