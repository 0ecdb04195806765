"""Context-free baselines on cached rows: what a model must beat to show it learned anything.

TF-free (reads caches through tasks/cache_reader.py), so the training side can report them.
"""

from __future__ import annotations

import numpy as np

from zhchat.tasks import cache_reader


def target_tokens(cache_dir: str) -> np.ndarray:
    """Every weighted target token of a cache, in order (one pass, no shuffling)."""
    it = cache_reader.make_cache_iterator(cache_dir=cache_dir, batch_size=1, shuffle=False,
                                          num_epochs=1, shard_index=0, shard_count=1,
                                          num_threads=1, prefetch_buffer_size=4)
    rows = [(b["decoder_target_tokens"][0], b["decoder_loss_weights"][0]) for b in it]
    return np.concatenate([t[w > 0] for t, w in rows])


def unigram_baseline(train_cache: str, heldout_cache: str, vocab_size: int) -> tuple[float, int]:
    """(cross-entropy in nats/token, tokens) on the held-out cache's targets of an add-one unigram
    model counted on the train cache: what a model that ignores context can reach."""
    counts = np.bincount(target_tokens(train_cache), minlength=vocab_size) + 1.0
    log_p = np.log(counts / counts.sum())
    heldout = target_tokens(heldout_cache)
    return float(-log_p[heldout].mean()), int(heldout.size)
