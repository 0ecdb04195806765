"""SeqIO causal-LM tasks over corpus files (`zhchat.tasks.sources` readers).

A task's source streams documents from the files, sends each to "train" or "validation" by a hash of
its id, and the preprocessors tokenize the text, split long documents into chunks of the target length
(so packing loses no text: T5's `split_tokens_to_targets_length` idea, one EOS per chunk) and append
EOS. Packing to a fixed length comes from `seqio.DecoderFeatureConverter(pack=True)` at use time.

Tasks are registered at run time from gin (the vocabulary path is only known once a tokenizer has
been trained): a gin file binds a scoped `register_lm_task` and lists it in `register_tasks.tasks`,
then the CLIs (cache, inspect) call `register_tasks()` after parsing gin.
"""

from __future__ import annotations

import functools
import logging
import pathlib
from typing import Any, Callable, Mapping, Sequence

import gin
import seqio
import tensorflow as tf

from zhchat.tasks import sources
from zhchat.tasks.splits import split_of  # noqa: F401  (re-exported: tasks.lm.split_of)

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]


def resolve_files(files: Sequence[str], data_dir: str | None) -> list[str]:
    """Joins relative files with `data_dir`; a relative `data_dir` is taken from the repository root."""
    if data_dir is None:
        return list(files)
    root = pathlib.Path(data_dir)
    if not root.is_absolute():
        root = REPO_ROOT / root
    return [str(root / f) for f in files]


def make_document_fn(*, corpora: Sequence[tuple[Sequence[str], str, str]], validation_fraction: float,
                     split_salt: str = "", name: str = "") -> Callable[..., tf.data.Dataset]:
    """A seqio `dataset_fn(split, shuffle_files, seed)` yielding {"id", "text"} of one split."""

    def generate(split: str):
        counter = sources.SkipCounter()
        n_docs = 0
        for doc in sources.iter_corpora(corpora, counter):
            if not doc["text"].strip():
                counter.add("empty_text", f"{doc['source']}:{doc['id']}")
                continue
            if split_of(doc["id"], validation_fraction, split_salt) == split:
                n_docs += 1
                yield {"id": doc["id"], "text": doc["text"]}
        if counter.total:
            logging.warning("task %s: skipped while reading:\n%s", name, counter.report())
        if n_docs == 0:
            raise ValueError(f"task {name!r}: split {split!r} is empty (validation_fraction="
                             f"{validation_fraction}, corpora={corpora})")

    def dataset_fn(split: str, shuffle_files: bool, seed: int | None = None) -> tf.data.Dataset:
        del shuffle_files, seed  # streamed in file order; shuffling happens after caching
        if split not in ("train", "validation"):
            raise ValueError(f"task {name!r} has splits train/validation, not {split!r}")
        return tf.data.Dataset.from_generator(
            lambda: generate(split),
            output_signature={"id": tf.TensorSpec((), tf.string),
                              "text": tf.TensorSpec((), tf.string)})

    return dataset_fn


def split_tokens(dataset: tf.data.Dataset, sequence_length: Mapping[str, int] | None,
                 output_features: Mapping[str, seqio.Feature], *, feature_key: str = "targets"
                 ) -> tf.data.Dataset:
    """Splits each tokenized `feature_key` into consecutive chunks that fit its length (EOS included).

    All other features are dropped (they would be ambiguous across chunks). Without a sequence length
    (e.g. caching) documents pass through whole.
    """
    if not sequence_length or sequence_length.get(feature_key) is None:
        return dataset.map(lambda x: {feature_key: x[feature_key]})
    max_tokens = sequence_length[feature_key] - int(output_features[feature_key].add_eos)
    if max_tokens < 1:
        raise ValueError(f"sequence length {sequence_length[feature_key]} of {feature_key!r} "
                         "leaves no room for tokens")

    def chunks(x):
        tokens = x[feature_key]
        n = tf.size(tokens, out_type=tf.int64)
        starts = tf.range(0, n, max_tokens, dtype=tf.int64)
        row_splits = tf.concat([starts, tf.reshape(n, [1])], axis=0)
        ragged = tf.RaggedTensor.from_row_splits(tokens, row_splits)
        return tf.data.Dataset.from_tensor_slices({feature_key: ragged})

    return dataset.flat_map(chunks)


@gin.configurable
def register_lm_task(*, name: str = gin.REQUIRED, files: Sequence[str] = gin.REQUIRED,
                     format: str | Sequence[str] = "jsonl", text_field: str | Sequence[str] = "text",
                     vocabulary: seqio.Vocabulary = gin.REQUIRED, data_dir: str | None = None,
                     validation_fraction: float = 0.01, split_salt: str = "",
                     cache_placeholder: bool = True, replace: bool = True) -> str:
    """Registers a causal-LM seqio.Task `name` over `files`; returns the name.

    `format`/`text_field` are one value for all files or one per file entry (e.g. jsonl books plus a
    PKU-tagged newspaper). The task has splits "train" and "validation" (a hash of the document id).
    """
    files = [files] if isinstance(files, str) else list(files)
    formats = [format] * len(files) if isinstance(format, str) else list(format)
    fields = [text_field] * len(files) if isinstance(text_field, str) else list(text_field)
    if not (len(formats) == len(fields) == len(files)):
        raise ValueError(f"register_lm_task({name}): {len(files)} files but {len(formats)} formats "
                         f"and {len(fields)} text fields")
    paths = resolve_files(files, data_dir)
    for path in paths:  # fail at registration, naming the file, not deep inside tf.data
        sources.expand_files(path)
    corpora = [([p], fmt, field) for p, fmt, field in zip(paths, formats, fields)]
    preprocessors: list[Any] = [
        functools.partial(seqio.preprocessors.rekey, key_map={"targets": "text"}),
        seqio.preprocessors.tokenize,
    ]
    if cache_placeholder:
        preprocessors.append(seqio.CacheDatasetPlaceholder(required=False))
    preprocessors += [split_tokens, seqio.preprocessors.append_eos_after_trim]
    if replace and name in seqio.TaskRegistry.names():
        seqio.TaskRegistry.remove(name)
    seqio.TaskRegistry.add(
        name,
        source=seqio.FunctionDataSource(
            make_document_fn(corpora=corpora, validation_fraction=validation_fraction,
                             split_salt=split_salt, name=name),
            splits=("train", "validation")),
        preprocessors=preprocessors,
        output_features={"targets": seqio.Feature(vocabulary, add_eos=True, dtype=tf.int32)},
        metric_fns=[])
    return name


@gin.configurable
def register_lm_mixture(*, name: str = gin.REQUIRED,
                        tasks: Sequence[tuple[str, float]] = gin.REQUIRED,
                        replace: bool = True) -> str:
    """Registers a seqio.Mixture of (task name, rate) pairs; returns the name."""
    if replace and name in seqio.MixtureRegistry.names():
        seqio.MixtureRegistry.remove(name)
    seqio.MixtureRegistry.add(name, [(t, float(r)) for t, r in tasks])
    return name


@gin.configurable
def register_tasks(*, tasks: Sequence[str] = ()) -> list[str]:
    """Returns the names registered by the gin references in `tasks`.

    Bind e.g. `register_tasks.tasks = [@zh_demo_lm/register_lm_task()]`: gin calls each reference
    when this function runs, which registers the task with the vocabulary bound at that time.
    """
    return list(tasks)


def feature_lengths_arg(text: str) -> dict[str, int]:
    """'targets=512,inputs=256' -> {'targets': 512, 'inputs': 256} (CLI helper)."""
    out = {}
    for item in filter(None, (s.strip() for s in text.split(","))):
        key, sep, value = item.partition("=")
        if not sep or not value.strip().isdigit():
            raise ValueError(f"bad feature length {item!r}; expected e.g. targets=512,inputs=256")
        out[key.strip()] = int(value)
    return out


def parse_gin(gin_files: Sequence[str], bindings: Sequence[str]) -> list[str]:
    """Parses gin files (paths, or relative to gin_configs/) and bindings; registers gin tasks.

    Uses the shared gin command line's (`zhchat.gin_configs.cli`) conventions: files are looked up
    in the cwd, then in gin_configs/.
    """
    from zhchat.gin_configs import cli as gin_cli

    gin_cli.parse_checked(gin_files, bindings)  # a misspelt --gin.MACRO= is an error, not a no-op
    return register_tasks()
