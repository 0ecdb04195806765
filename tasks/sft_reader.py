"""TF-free reader of a `prefix_lm`-converted SFT cache for a fully causal decoder.

seqio's PrefixLMFeatureConverter gives exactly the SFT loss mask (decoder_loss_weights on the reply
tokens only) and also `decoder_causal_attention`, which would make the history bidirectional. Its
docstring notes the mask may simply be ignored by a causal model: this wrapper drops it, so the
decoder trains causally, as it was pretrained and as chat/RL decode and score it.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import gin
import numpy as np

from zhchat.tasks import cache_reader


class DropFeatures:
    """Iterator over batches without `drop` features; passes get_state/set_state through."""

    def __init__(self, it: Any, drop: Sequence[str]):
        self.it, self.drop = it, tuple(drop)
        self.settings = getattr(it, "settings", None)

    def __iter__(self) -> "DropFeatures":
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        return {k: v for k, v in next(self.it).items() if k not in self.drop}

    def get_state(self) -> Mapping[str, Any]:
        return self.it.get_state()

    def set_state(self, state: Mapping[str, Any]) -> None:
        self.it.set_state(state)


@gin.configurable
def make_causal_cache_iterator(*, drop: Sequence[str] = ("decoder_causal_attention",),
                               **kwargs: Any) -> DropFeatures:
    """`cache_reader.make_cache_iterator(**kwargs)` without the `drop` features (gin: bind its
    cache_dir/batch_size/... here, e.g. `train/make_causal_cache_iterator.cache_dir = ...`)."""
    return DropFeatures(cache_reader.make_cache_iterator(**kwargs), drop)
