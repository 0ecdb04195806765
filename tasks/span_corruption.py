"""T5 span corruption as seqio preprocessors (tf.data; seqio itself has none).

A document's tokens are concatenated with its neighbours, split into chunks of `tokens_length` tokens
(chosen by `random_spans_helper` so that a full chunk becomes exactly `inputs_length` input tokens and
`targets_length` target tokens, EOS included), and about `noise_density` of each chunk is masked in spans
of mean length `mean_noise_span_length`. Each noise span becomes one sentinel in the inputs
(`<extra_id_0>` = vocab_size - 1, then decreasing) and the targets list the sentinels, each followed by
the span it replaced: inputs + targets reconstruct the chunk exactly. Randomness is stateless, seeded by
seqio (`map_over_dataset(num_seeds=...)`), so a task's output is reproducible under `seqio.map_seed_manager`.
"""

from __future__ import annotations

import functools
from typing import Mapping, Sequence

import gin
import seqio
import tensorflow as tf

from zhchat.tasks import lm, sources

SENTINEL_COUNT = 100  # extra ids reserved by tasks/tokenizer.py


def _noise_counts(length: int, noise_density: float, mean_noise_span_length: float) -> tuple[int, int]:
    """(noise tokens, noise spans) for a chunk of `length` tokens, as the mask below computes them."""
    num_noise = int(round(length * noise_density))
    num_noise = min(max(num_noise, 1), length - 1)
    num_spans = max(int(round(num_noise / mean_noise_span_length)), 1)
    return num_noise, num_spans


@gin.configurable
def random_spans_helper(*, inputs_length: int = 512, noise_density: float = 0.15,
                        mean_noise_span_length: float = 3.0, extra_tokens_per_span_inputs: int = 1,
                        extra_tokens_per_span_targets: int = 1) -> tuple[int, int]:
    """Returns (tokens_length, targets_length): the largest raw chunk whose corrupted inputs (one sentinel
    per span plus EOS) fit `inputs_length`, and the targets length that chunk produces (with EOS).

    T5's recipe: with inputs_length=512, density 0.15 and mean span 3 this gives (568, 114).
    """
    if not 0.0 < noise_density < 1.0 or mean_noise_span_length < 1.0:
        raise ValueError(f"span corruption needs 0 < noise_density < 1 and mean_noise_span_length >= 1; "
                         f"got {noise_density}, {mean_noise_span_length}")

    def lengths(tokens_length: int) -> tuple[int, int]:
        num_noise, num_spans = _noise_counts(tokens_length, noise_density, mean_noise_span_length)
        return (tokens_length - num_noise + num_spans * extra_tokens_per_span_inputs + 1,
                num_noise + num_spans * extra_tokens_per_span_targets + 1)

    tokens_length = inputs_length - 1
    while lengths(tokens_length + 1)[0] <= inputs_length:
        tokens_length += 1
    if tokens_length < 2:
        raise ValueError(f"inputs_length={inputs_length} is too short for span corruption")
    num_spans = _noise_counts(tokens_length, noise_density, mean_noise_span_length)[1]
    if num_spans > SENTINEL_COUNT:
        raise ValueError(f"{num_spans} noise spans per example exceed the {SENTINEL_COUNT} sentinel ids; "
                         f"lower inputs_length or raise mean_noise_span_length")
    return tokens_length, lengths(tokens_length)[1]


def _random_segmentation(num_items: tf.Tensor, num_segments: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
    """Splits `num_items` into `num_segments` non-empty parts at random: returns the [num_segments] lengths."""
    first_in_segment = tf.cast(tf.range(num_items - 1) < num_segments - 1, tf.int32)
    first_in_segment = seqio.utils.stateless_shuffle(first_in_segment, seed)
    first_in_segment = tf.pad(first_in_segment, [[1, 0]])
    segment_id = tf.cumsum(first_in_segment)
    return tf.math.unsorted_segment_sum(tf.ones_like(segment_id), segment_id, num_segments)


def random_spans_noise_mask(length: tf.Tensor, noise_density: float, seeds: tf.Tensor,
                            mean_noise_span_length: float = 3.0) -> tf.Tensor:
    """Bool [length] mask: round(length * density) noise tokens in round(noise / mean) spans, alternating
    with non-noise spans (the first span is non-noise), span lengths random (T5's
    `random_spans_noise_mask`). A 1-token chunk is all noise. `seeds`: int32 [2, 2]."""
    orig_length = length
    length = tf.maximum(length, 2)  # one noise and one non-noise token at least; trimmed below
    num_noise = tf.cast(tf.round(tf.cast(length, tf.float32) * noise_density), tf.int32)
    num_noise = tf.minimum(tf.maximum(num_noise, 1), length - 1)
    num_spans = tf.cast(tf.round(tf.cast(num_noise, tf.float32) / mean_noise_span_length), tf.int32)
    num_spans = tf.maximum(num_spans, 1)
    noise_lengths = _random_segmentation(num_noise, num_spans, seeds[0])
    nonnoise_lengths = _random_segmentation(length - num_noise, num_spans, seeds[1])
    interleaved = tf.reshape(tf.stack([nonnoise_lengths, noise_lengths], axis=1), [num_spans * 2])
    span_starts = tf.cumsum(interleaved)[:-1]
    start_indicator = tf.math.unsorted_segment_sum(tf.ones_like(span_starts), span_starts, length)
    is_noise = tf.equal(tf.math.floormod(tf.cumsum(start_indicator), 2), 1)
    # A 1-token chunk would keep its token and get an empty span: mask it whole instead.
    return tf.logical_or(is_noise[:orig_length], orig_length < 2)


def noise_span_to_unique_sentinel(tokens: tf.Tensor, noise_mask: tf.Tensor, vocab_size: int) -> tf.Tensor:
    """Replaces each run of masked tokens by one sentinel: vocab_size-1 for the first run, then decreasing."""
    prev_is_noise = tf.pad(noise_mask[:-1], [[1, 0]])
    first_noise = tf.logical_and(noise_mask, tf.logical_not(prev_is_noise))
    later_noise = tf.logical_and(noise_mask, prev_is_noise)
    sentinels = vocab_size - tf.cumsum(tf.cast(first_noise, tokens.dtype))
    tokens = tf.where(first_noise, sentinels, tokens)
    return tf.boolean_mask(tokens, tf.logical_not(later_noise))


def nonnoise_span_to_unique_sentinel(tokens: tf.Tensor, noise_mask: tf.Tensor, vocab_size: int
                                     ) -> tf.Tensor:
    """The targets side: every noise span, announced by the sentinel that replaced it in the inputs.

    Equals T5's (which replaces the non-noise runs by sentinels) when the mask starts with a
    non-noise token, and stays right when it does not (a 1-token chunk is all noise).
    """
    prev_is_noise = tf.pad(noise_mask[:-1], [[1, 0]])
    first_noise = tf.logical_and(noise_mask, tf.logical_not(prev_is_noise))
    sentinels = vocab_size - tf.cumsum(tf.cast(first_noise, tokens.dtype))
    pairs = tf.stack([sentinels, tokens], axis=1)  # [n, 2]: (sentinel, token) at every position
    keep = tf.stack([first_noise, noise_mask], axis=1)
    return tf.boolean_mask(pairs, keep)  # row-major: sentinel before the first token of a span


def reduce_concat_tokens(dataset: tf.data.Dataset, *, feature_key: str = "targets",
                         batch_size: int = 128) -> tf.data.Dataset:
    """Concatenates the token lists of `batch_size` consecutive documents (fewer chunk remainders)."""
    dataset = dataset.map(lambda x: {feature_key: x[feature_key]})
    dataset = dataset.padded_batch(batch_size, padded_shapes={feature_key: [-1]})

    def flatten(x):
        tokens = tf.reshape(x[feature_key], [-1])
        return {feature_key: tf.boolean_mask(tokens, tf.not_equal(tokens, 0))}  # 0 is padding only

    return dataset.map(flatten, num_parallel_calls=tf.data.AUTOTUNE)


def split_tokens(dataset: tf.data.Dataset, *, max_tokens_per_segment: int,
                 feature_key: str = "targets") -> tf.data.Dataset:
    """Cuts each token list into consecutive chunks of at most `max_tokens_per_segment` tokens (no loss;
    empty token lists produce no chunk)."""
    size = max_tokens_per_segment

    def split(x):
        tokens = x[feature_key]
        n = tf.size(tokens)
        num_chunks = (n + size - 1) // size
        padding = num_chunks * size - n
        chunks = tf.reshape(tf.pad(tokens, [[0, padding]]), [num_chunks, size])
        lengths = tf.concat([tf.fill([tf.maximum(num_chunks - 1, 0)], size),
                             tf.reshape(size - padding, [1])], axis=0)[:num_chunks]
        return {feature_key: chunks, "chunk_length": lengths}

    dataset = dataset.map(split, num_parallel_calls=tf.data.AUTOTUNE).unbatch()
    return dataset.map(lambda x: {feature_key: x[feature_key][:x["chunk_length"]]},
                       num_parallel_calls=tf.data.AUTOTUNE)


@seqio.map_over_dataset(num_seeds=1)
def _denoise(features: Mapping[str, tf.Tensor], seed: tf.Tensor, *, vocab_size: int, noise_density: float,
             mean_noise_span_length: float) -> dict[str, tf.Tensor]:
    tokens = features["targets"]
    seeds = tf.random.experimental.stateless_split(seed, 2)
    mask = random_spans_noise_mask(tf.size(tokens), noise_density, seeds, mean_noise_span_length)
    return {"inputs": noise_span_to_unique_sentinel(tokens, mask, vocab_size),
            "targets": nonnoise_span_to_unique_sentinel(tokens, mask, vocab_size)}


def span_corruption(dataset: tf.data.Dataset, sequence_length: Mapping[str, int],
                    output_features: Mapping[str, seqio.Feature], *, noise_density: float = 0.15,
                    mean_noise_span_length: float = 3.0, merge_examples: bool = True) -> tf.data.Dataset:
    """seqio preprocessor: tokenized "targets" documents -> {"inputs", "targets"} span-corrupted chunks
    (without EOS; follow with seqio.preprocessors.append_eos_after_trim). Chunk size is derived from
    sequence_length["inputs"]; full chunks then fill the inputs exactly and give `targets_length` targets.
    """
    tokens_length, targets_length = random_spans_helper(
        inputs_length=sequence_length["inputs"], noise_density=noise_density,
        mean_noise_span_length=mean_noise_span_length)
    if sequence_length.get("targets", targets_length) < targets_length:
        raise ValueError(f"span corruption with inputs length {sequence_length['inputs']} produces targets "
                         f"of {targets_length} tokens; sequence_length['targets'] is "
                         f"{sequence_length['targets']} (use random_spans_helper to choose it)")
    vocab = output_features["targets"].vocabulary
    if output_features["inputs"].vocabulary.vocab_size != vocab.vocab_size:
        raise ValueError("span corruption needs the same vocabulary for inputs and targets")
    dataset = dataset.filter(lambda x: tf.size(x["targets"]) > 0)
    if merge_examples:
        dataset = reduce_concat_tokens(dataset, feature_key="targets")
    dataset = split_tokens(dataset, max_tokens_per_segment=tokens_length, feature_key="targets")
    return _denoise(dataset, vocab_size=vocab.vocab_size, noise_density=noise_density,
                    mean_noise_span_length=mean_noise_span_length)


def document_source(*, name: str, files: str | Sequence[str], format: str | Sequence[str],
                    text_field: str | Sequence[str], data_dir: str | None, validation_fraction: float,
                    split_salt: str = "") -> seqio.DataSource:
    """A train/validation seqio source of {"id", "text"} documents over corpus files (as tasks/lm.py)."""
    files = [files] if isinstance(files, str) else list(files)
    formats = [format] * len(files) if isinstance(format, str) else list(format)
    fields = [text_field] * len(files) if isinstance(text_field, str) else list(text_field)
    if not (len(formats) == len(fields) == len(files)):
        raise ValueError(f"task {name}: {len(files)} files but {len(formats)} formats and "
                         f"{len(fields)} text fields")
    paths = lm.resolve_files(files, data_dir)
    for path in paths:  # fail at registration, naming the file
        sources.expand_files(path)
    corpora = [([p], fmt, field) for p, fmt, field in zip(paths, formats, fields)]
    return seqio.FunctionDataSource(
        lm.make_document_fn(corpora=corpora, validation_fraction=validation_fraction,
                            split_salt=split_salt, name=name),
        splits=("train", "validation"))


def register_inputs_targets_task(name: str, *, source: seqio.DataSource, vocabulary: seqio.Vocabulary,
                                 objective, cache_placeholder: bool = True, replace: bool = True) -> str:
    """Registers a task: rekey "text" -> tokenize -> [cache] -> `objective` -> EOS, features inputs and
    targets on `vocabulary`."""
    features = {k: seqio.Feature(vocabulary=vocabulary, add_eos=True, dtype=tf.int32)
                for k in ("inputs", "targets")}
    preprocessors = [functools.partial(seqio.preprocessors.rekey, key_map={"targets": "text"}),
                     seqio.preprocessors.tokenize]
    if cache_placeholder:
        preprocessors.append(seqio.CacheDatasetPlaceholder(required=False))
    preprocessors += [objective, seqio.preprocessors.append_eos_after_trim]
    if name in seqio.TaskRegistry.names():
        if not replace:
            raise ValueError(f"task {name!r} is already registered")
        seqio.TaskRegistry.remove(name)
    seqio.TaskRegistry.add(name, source=source, output_features=features,
                           preprocessors=preprocessors, metric_fns=[])
    return name


@gin.configurable
def register_span_corruption_task(*, name: str = gin.REQUIRED, vocabulary: seqio.Vocabulary = gin.REQUIRED,
                                  files: str | Sequence[str] = (), format: str | Sequence[str] = "jsonl",
                                  text_field: str | Sequence[str] = "text", data_dir: str | None = None,
                                  validation_fraction: float = 0.01, split_salt: str = "",
                                  noise_density: float = 0.15, mean_noise_span_length: float = 3.0,
                                  source: seqio.DataSource | None = None, cache_placeholder: bool = True,
                                  replace: bool = True) -> str:
    """Registers a T5 span-corruption task over corpus `files` (or a given `source` of {"text"});
    returns its name. Use feature lengths from `random_spans_helper`, e.g. {"inputs": 512,
    "targets": 114}, and seqio.EncDecFeatureConverter(pack=True) (cache converter `encdec`).
    """
    extra_ids = getattr(vocabulary, "extra_ids", SENTINEL_COUNT)
    if extra_ids < SENTINEL_COUNT:
        raise ValueError(f"register_span_corruption_task({name}): the vocabulary has {extra_ids} extra "
                         f"ids; span corruption needs {SENTINEL_COUNT} (get_seqio_vocabulary.extra_ids)")
    random_spans_helper(noise_density=noise_density, mean_noise_span_length=mean_noise_span_length)
    if source is None:
        if not files:
            raise ValueError(f"register_span_corruption_task({name}): give `files` or `source`")
        source = document_source(name=name, files=files, format=format, text_field=text_field,
                                 data_dir=data_dir, validation_fraction=validation_fraction,
                                 split_salt=split_salt)
    objective = functools.partial(span_corruption, noise_density=noise_density,
                                  mean_noise_span_length=mean_noise_span_length)
    return register_inputs_targets_task(name, source=source, vocabulary=vocabulary, objective=objective,
                                        cache_placeholder=cache_placeholder, replace=replace)
