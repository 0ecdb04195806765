"""SeqIO instruction-SFT tasks: Alpaca-zh and ShareGPT-zh dialogues in the shared chat template.

Every assistant turn of a dialogue becomes one example with its history (ChatYuan): "inputs" = the
rendered history + `<|im_start|>assistant\\n` (left-truncated at turn boundaries), "targets" = the reply
+ `<|im_end|>` + EOS, tokenized in Python with the TF-free vocabulary (same ids as the task's seqio
vocabulary), so the task is built for fixed `max_inputs_length` / `max_targets_length`.
Feature converters at cache time:
- encoder-decoder: `encdec` (history into the encoder, reply as the decoder target);
- decoder: `prefix_lm` gives decoder_loss_weights on the reply only; read it back with
  `zhchat.tasks.sft_reader.make_causal_cache_iterator`, which drops `decoder_causal_attention` so the
  decoder stays fully causal (as pretrained, and as the chat CLI and RL score it).
Text features `inputs_pretokenized` / `targets_pretokenized` / `id` (and `choices` for prompt tasks)
are kept for seqio metric evaluation.

Skipped records (broken files, missing/non-string fields, empty outputs, prompts too long) are
counted and logged per split pass. Data licences: Alpaca-zh and ShareGPT-zh are for non-commercial
research use only (see the data README).
"""

from __future__ import annotations

import functools
import logging
from typing import Callable, Iterator, Mapping, Sequence

import gin
import seqio
import tensorflow as tf

from zhchat.tasks import lm, sft_sources, sources
from zhchat.tasks.vocabulary import Vocabulary

STRING_FEATURES = ("id", "inputs_pretokenized", "targets_pretokenized", "choices")
ExampleFn = Callable[[str, Vocabulary, int, int, sources.SkipCounter], Iterator[dict]]

# name -> (example_fn, max_inputs, max_targets, vocabulary): lets mixtures size tasks without TF.
EXAMPLE_FNS: dict[str, tuple[ExampleFn, int, int, seqio.Vocabulary]] = {}


@functools.lru_cache(maxsize=8)
def _cached_vocabulary(path: str, extra_ids: int) -> Vocabulary:
    return Vocabulary(path, extra_ids=extra_ids)


def tf_free_vocabulary(vocabulary: seqio.Vocabulary) -> Vocabulary:
    """The TF-free twin of a seqio.SentencePieceVocabulary (identical ids)."""
    path = getattr(vocabulary, "sentencepiece_model_file", None)
    if not path:
        raise TypeError(f"dialogue tasks need a SentencePiece vocabulary, got {vocabulary!r}")
    return _cached_vocabulary(path, vocabulary.extra_ids)


def iter_examples(name: str, split: str, *, log: bool = True) -> Iterator[dict]:
    """Python examples of a registered dialogue task's split (what its seqio source yields)."""
    example_fn, max_inputs, max_targets, vocabulary = EXAMPLE_FNS[name]
    counter = sources.SkipCounter()
    n = 0
    for n, ex in enumerate(example_fn(split, tf_free_vocabulary(vocabulary), max_inputs,
                                      max_targets, counter), 1):
        yield {**{k: "" for k in STRING_FEATURES}, **ex}
    if counter.total and log:
        logging.warning("task %s/%s: %d examples; skipped or truncated:\n%s", name, split, n,
                        counter.report())
    if n == 0:
        raise ValueError(f"task {name!r}: split {split!r} yielded no examples; "
                         f"skipped: {counter.as_dict()}")


def register_dialogue_task(name: str, *, example_fn: ExampleFn, vocabulary: seqio.Vocabulary,
                           max_inputs_length: int, max_targets_length: int,
                           splits: Sequence[str] = ("train", "validation"),
                           postprocess_fn: Callable | None = None,
                           metric_fns: Sequence[Callable] = (), replace: bool = True) -> str:
    """Registers a seqio.Task whose source yields `example_fn`'s pre-tokenized examples."""
    if max_inputs_length < 8 or max_targets_length < 2:
        raise ValueError(f"task {name}: max_inputs_length={max_inputs_length} / max_targets_length="
                         f"{max_targets_length} leave no room for a chat turn")
    EXAMPLE_FNS[name] = (example_fn, max_inputs_length, max_targets_length, vocabulary)

    def dataset_fn(split: str, shuffle_files: bool, seed: int | None = None) -> tf.data.Dataset:
        del shuffle_files, seed  # streamed in file order; the cache/mixture shuffles
        if split not in splits:
            raise ValueError(f"task {name!r} has splits {tuple(splits)}, not {split!r}")
        signature = {"inputs": tf.TensorSpec([None], tf.int32),
                     "targets": tf.TensorSpec([None], tf.int32),
                     **{k: tf.TensorSpec((), tf.string) for k in STRING_FEATURES}}
        return tf.data.Dataset.from_generator(lambda: iter_examples(name, split),
                                              output_signature=signature)

    if replace and name in seqio.TaskRegistry.names():
        seqio.TaskRegistry.remove(name)
    seqio.TaskRegistry.add(
        name, source=seqio.FunctionDataSource(dataset_fn, splits=tuple(splits)),
        preprocessors=[], postprocess_fn=postprocess_fn, metric_fns=list(metric_fns),
        output_features={
            "inputs": seqio.Feature(vocabulary, add_eos=False, dtype=tf.int32),
            "targets": seqio.Feature(vocabulary, add_eos=False, dtype=tf.int32)})
    return name


def _sft_example_fn(paths: Sequence[str], format: str, validation_fraction: float, split_salt: str,
                    system: str | None) -> ExampleFn:
    reader = sft_sources.READERS[format]

    def example_fn(split, vocab, max_inputs, max_targets, counter):
        dialogues = ((i, m) for i, m in reader(paths, counter, system=system)
                     if lm.split_of(i, validation_fraction, split_salt) == split)
        yield from sft_sources.iter_turn_examples(dialogues, vocab, max_inputs=max_inputs,
                                                  max_targets=max_targets, counter=counter)
    return example_fn


@gin.configurable
def register_sft_task(*, name: str = gin.REQUIRED, files: str | Sequence[str] = gin.REQUIRED,
                      format: str = gin.REQUIRED, vocabulary: seqio.Vocabulary = gin.REQUIRED,
                      data_dir: str | None = None, max_inputs_length: int = 512,
                      max_targets_length: int = 512, validation_fraction: float = 0.02,
                      split_salt: str = "", system: str | None = None, replace: bool = True) -> str:
    """Registers an SFT task over Alpaca-style JSON (`format='alpaca'`) or ShareGPT JSON lines
    (`'sharegpt'`) files/globs (relative to `data_dir`, itself relative to the repository root)."""
    if format not in sft_sources.READERS:
        raise ValueError(f"register_sft_task({name}): format must be one of "
                         f"{sorted(sft_sources.READERS)}, got {format!r}")
    paths = lm.resolve_files([files] if isinstance(files, str) else list(files), data_dir)
    for path in paths:  # fail at registration, naming the file
        sources.expand_files(path)
    return register_dialogue_task(
        name, example_fn=_sft_example_fn(paths, format, validation_fraction, split_salt, system),
        vocabulary=vocabulary, max_inputs_length=max_inputs_length,
        max_targets_length=max_targets_length, replace=replace)


def task_feature_lengths(name: str) -> Mapping[str, int]:
    """{"inputs", "targets"} lengths a dialogue task (or mixture of them) was registered for."""
    if name in EXAMPLE_FNS:
        return {"inputs": EXAMPLE_FNS[name][1], "targets": EXAMPLE_FNS[name][2]}
    tasks = [t.name for t in seqio.get_mixture_or_task(name).tasks]
    return {k: max(EXAMPLE_FNS[t][1 if k == "inputs" else 2] for t in tasks)
            for k in ("inputs", "targets")}
