"""SeqIO metric evaluation of a model wrapper on dialogue tasks: generate -> postprocess -> metric_fns.

Examples come from the tasks' Python sources (`sft.iter_examples`, no tf.data), generations from
`model.predict_batch` (greedy by default), and the task's own `postprocess_fn` and `metric_fns` score
them, so the numbers are the ones seqio's Evaluator would compute. `make_eval_hook` packages this for
a training run: a callable `(step, params) -> {"<task>/<metric>": value}` to call every N steps.
"""

from __future__ import annotations

import itertools
from typing import Any, Callable, Sequence

import gin
import jax
import jax.numpy as jnp
import numpy as np
import seqio

from zhchat.tasks import chat_template as ct
from zhchat.tasks import sft
from zhchat.tasks.vocabulary import pad_token_rows


def evaluate_task(task: str, *, model: Any, params: Any, split: str = "validation",
                  max_examples: int | None = 200, batch_size: int = 16,
                  max_decode_length: int = 16, decode_kwargs: dict | None = None,
                  seed: int = 0) -> dict[str, float]:
    """Metrics of `task` for `params` (decoder prompts left-padded; encoder inputs end with EOS)."""
    provider = seqio.get_mixture_or_task(task)
    vocab = sft.tf_free_vocabulary(provider.output_features["targets"].vocabulary)
    postprocess = provider.postprocess_fn or (lambda x, example=None, is_target=False: x)
    examples = list(itertools.islice(sft.iter_examples(task, split, log=False), max_examples))
    is_decoder = hasattr(model.config, "max_len")
    targets, predictions = [], []
    for start in range(0, len(examples), batch_size):
        chunk = examples[start:start + batch_size]
        if is_decoder:
            batch = {"decoder_input_tokens": jnp.asarray(
                pad_token_rows([e["inputs"] for e in chunk], left=True))}
        else:
            batch = {"encoder_input_tokens": jnp.asarray(pad_token_rows(
                [e["inputs"] + [vocab.eos_id] for e in chunk], left=False))}
        out = model.predict_batch(params, batch, jax.random.key(seed + start),
                                  max_decode_length=max_decode_length, **(decode_kwargs or {}))
        for e, row in zip(chunk, np.asarray(out).tolist()):
            text = ct.reply_text(vocab.decode([vocab.im_end_id] + row)[len(ct.IM_END):])
            predictions.append(postprocess(text, example=e, is_target=False))
            targets.append(postprocess(e["targets_pretokenized"], example=e, is_target=True))
    results = {"num_examples": float(len(examples))}
    for fn in provider.metric_fns:
        results.update({k: float(v) for k, v in fn(targets, predictions).items()})
    return results


@gin.configurable
def make_eval_hook(*, tasks: Sequence[str] = gin.REQUIRED, model: Any = gin.REQUIRED,
                   split: str = "validation", max_examples: int | None = 200,
                   batch_size: int = 16, max_decode_length: int = 16) -> Callable[[int, Any], dict]:
    """A `(step, params) -> metrics` callable evaluating `tasks` (for a training run's eval hook);
    a mixture name stands for its tasks."""
    names = []
    for name in tasks:
        provider = seqio.get_mixture_or_task(name)
        members = [t.name for t in provider.tasks] if isinstance(provider, seqio.Mixture) else [name]
        names += [m for m in members if m not in names]

    def hook(step: int, params: Any) -> dict[str, float]:
        del step
        out = {}
        for task in names:
            for k, v in evaluate_task(task, model=model, params=params, split=split,
                                      max_examples=max_examples, batch_size=batch_size,
                                      max_decode_length=max_decode_length).items():
                out[f"{task}/{k}"] = v
        return out
    return hook
