"""Prefix-LM objective as a seqio preprocessor: split a document at a random point.

The same task feeds both architectures:
- encoder-decoder: seqio.EncDecFeatureConverter (inputs = prefix into the encoder, targets = the rest);
- decoder-only with a bidirectional prefix: seqio.PrefixLMFeatureConverter, which concatenates
  inputs + targets and marks the prefix in `decoder_causal_attention` (loss on the targets only).
Documents are concatenated and cut into chunks; each chunk is split uniformly at random among the
points that truncate neither side. The default chunk length, min(inputs, targets) length - 1 tokens
(EOS excluded), lets the split fall anywhere; longer chunks (`chunk_length`, up to inputs + targets - 2)
use more of each row but narrow the split range (at the maximum the split point is fixed).
"""

from __future__ import annotations

import functools
from typing import Mapping, Sequence

import gin
import seqio
import tensorflow as tf

from zhchat.tasks import span_corruption


@seqio.map_over_dataset(num_seeds=1)
def _random_split(features: Mapping[str, tf.Tensor], seed: tf.Tensor, *, max_inputs: int,
                  max_targets: int) -> dict[str, tf.Tensor]:
    tokens = features["targets"]
    n = tf.size(tokens)
    # Both sides non-empty when the chunk has 2+ tokens; a 1-token chunk becomes an empty prefix.
    low = tf.where(n >= 2, tf.maximum(1, n - max_targets), 0)
    high = tf.where(n >= 2, tf.minimum(n - 1, max_inputs), 0)
    split = tf.random.stateless_uniform([], seed=seed, minval=low, maxval=high + 1, dtype=tf.int32)
    return {"inputs": tokens[:split], "targets": tokens[split:]}


def prefix_lm(dataset: tf.data.Dataset, sequence_length: Mapping[str, int],
              output_features: Mapping[str, seqio.Feature], *, merge_examples: bool = True,
              chunk_length: int | None = None) -> tf.data.Dataset:
    """seqio preprocessor: tokenized "targets" documents -> {"inputs": prefix, "targets": rest}, without
    EOS (follow with seqio.preprocessors.append_eos_after_trim); lengths fit sequence_length with EOS."""
    del output_features
    max_inputs = sequence_length["inputs"] - 1
    max_targets = sequence_length["targets"] - 1
    if max_inputs < 1 or max_targets < 1:
        raise ValueError(f"prefix LM needs inputs and targets lengths >= 2; got {dict(sequence_length)}")
    chunk_length = chunk_length or min(max_inputs, max_targets) + 1
    if not 1 <= chunk_length <= max_inputs + max_targets:
        raise ValueError(f"prefix LM chunk_length={chunk_length} must be in [1, {max_inputs + max_targets}] "
                         f"for sequence lengths {dict(sequence_length)}")
    dataset = dataset.filter(lambda x: tf.size(x["targets"]) > 0)
    if merge_examples:
        dataset = span_corruption.reduce_concat_tokens(dataset, feature_key="targets")
    dataset = span_corruption.split_tokens(dataset, max_tokens_per_segment=chunk_length,
                                           feature_key="targets")
    return _random_split(dataset, max_inputs=max_inputs, max_targets=max_targets)


@gin.configurable
def register_prefix_lm_task(*, name: str = gin.REQUIRED, vocabulary: seqio.Vocabulary = gin.REQUIRED,
                            files: str | Sequence[str] = (), format: str | Sequence[str] = "jsonl",
                            text_field: str | Sequence[str] = "text", data_dir: str | None = None,
                            validation_fraction: float = 0.01, split_salt: str = "",
                            chunk_length: int | None = None, source: seqio.DataSource | None = None,
                            cache_placeholder: bool = True, replace: bool = True) -> str:
    """Registers a prefix-LM task over corpus `files` (or a given `source` of {"text"}); returns its
    name. Cache converter `encdec` for the encoder-decoder, `prefix_lm` for the decoder."""
    if source is None:
        if not files:
            raise ValueError(f"register_prefix_lm_task({name}): give `files` or `source`")
        source = span_corruption.document_source(
            name=name, files=files, format=format, text_field=text_field, data_dir=data_dir,
            validation_fraction=validation_fraction, split_salt=split_salt)
    return span_corruption.register_inputs_targets_task(
        name, source=source, vocabulary=vocabulary,
        objective=functools.partial(prefix_lm, chunk_length=chunk_length),
        cache_placeholder=cache_placeholder, replace=replace)
