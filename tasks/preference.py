"""SeqIO preference tasks: (prompt, chosen, rejected) or K-wise ranked lists from jsonl.

The records are read and chat-formatted by the TF-free tasks/preference_reader.py (same skips, same
tokens), so `seqio.get_mixture_or_task(name).get_dataset(...)` and the reward-model / DPO training
batches agree. Features: `inputs` (history + generation prompt), `chosen` and `rejected` (reply +
<|im_end|> + EOS; K-wise lists give `chosen` = the best and `rejected` = the next ranked reply,
`responses` [K, len] ragged-free padded and `num_responses` for the whole list). Splits: every 10th
record is `validation`. The shared pairs (../shared/data/preference/dpo_zh_500.jsonl) are for
non-commercial research use only (Apache-2.0 with the origin's research-only disclaimer).
"""

from __future__ import annotations

from typing import Sequence

import gin
import numpy as np
import seqio
import tensorflow as tf

from zhchat.tasks import preference_reader
from zhchat.tasks.sft import tf_free_vocabulary

SPLITS = ("train", "validation")


@gin.configurable
def register_preference_task(*, name: str = gin.REQUIRED, files: str | Sequence[str] = gin.REQUIRED,
                             vocabulary: seqio.Vocabulary = gin.REQUIRED, max_prompt_len: int = 256,
                             max_response_len: int = 256, max_responses: int = 2,
                             replace: bool = True) -> str:
    """Registers seqio task `name` over preference jsonl `files`; returns the name."""
    def dataset_fn(split: str, shuffle_files: bool, seed: int | None = None) -> tf.data.Dataset:
        del shuffle_files, seed
        if split not in SPLITS:
            raise ValueError(f"task {name!r} has splits {SPLITS}, not {split!r}")
        examples = preference_reader.PreferenceExamples(
            files=files, vocab=tf_free_vocabulary(vocabulary), max_prompt_len=max_prompt_len,
            max_response_len=max_response_len, max_responses=max_responses, split=split)

        def gen():
            for ex in examples.examples:
                rs = ex["responses"]
                padded = np.zeros((max_responses, max(len(r) for r in rs)), np.int32)
                for i, r in enumerate(rs):
                    padded[i, :len(r)] = r
                yield {"inputs": np.asarray(ex["prompt"], np.int32),
                       "chosen": np.asarray(rs[0], np.int32),
                       "rejected": np.asarray(rs[1] if len(rs) > 1 else [], np.int32),
                       "responses": padded, "num_responses": np.int32(len(rs))}
        sig = {"inputs": tf.TensorSpec([None], tf.int32), "chosen": tf.TensorSpec([None], tf.int32),
               "rejected": tf.TensorSpec([None], tf.int32),
               "responses": tf.TensorSpec([max_responses, None], tf.int32),
               "num_responses": tf.TensorSpec((), tf.int32)}
        return tf.data.Dataset.from_generator(gen, output_signature=sig)

    if replace and name in seqio.TaskRegistry.names():
        seqio.TaskRegistry.remove(name)
    feature = lambda rank=1: seqio.Feature(vocabulary, add_eos=False, dtype=tf.int32, rank=rank)  # noqa: E731
    seqio.TaskRegistry.add(
        name, source=seqio.FunctionDataSource(dataset_fn, splits=SPLITS), preprocessors=[],
        output_features={"inputs": feature(), "chosen": feature(), "rejected": feature(),
                         "responses": feature(2)})
    return name
