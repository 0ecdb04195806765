"""Mixtures of dialogue tasks with rates by examples or characters, temperature-scaled.

rate(task) = min(size, maximum) ** (1 / temperature), size = the task's number of training examples
or characters (history + reply text) as its source yields them; temperature 1 is proportional
mixing, larger temperatures flatten towards uniform (T5's examples-proportional and temperature
mixing). `rate_by="fixed"` takes the given (task, weight) pairs as they are. Sizes are computed
lazily (seqio calls the rate functions when the mixture is first used), so registering is cheap.
`mixture_rates(name)` gives the normalised rates; `python -m zhchat.scripts.inspect --task=<mixture>`
shows the realized proportions.
"""

from __future__ import annotations

import functools
from typing import Sequence

import gin
import seqio

from zhchat.tasks import sft

RATE_BY = ("examples", "characters", "fixed")


@functools.lru_cache(maxsize=64)
def task_size(task: str, split: str, unit: str) -> int:
    """Examples or characters (inputs + targets text) of a registered dialogue task's split."""
    if task not in sft.EXAMPLE_FNS:
        raise ValueError(f"{task!r} is not a registered dialogue task (known: "
                         f"{sorted(sft.EXAMPLE_FNS)})")
    total = 0
    for ex in sft.iter_examples(task, split, log=False):
        total += 1 if unit == "examples" else len(ex["inputs_pretokenized"]) + len(
            ex["targets_pretokenized"])
    return total


def _scaled_rate(task: seqio.Task, *, rate_by: str, temperature: float, maximum: float | None,
                 split: str) -> float:
    size = float(task_size(task.name, split, rate_by))
    return (min(size, maximum) if maximum else size) ** (1.0 / temperature)


def mixture_rates(name: str) -> dict[str, float]:
    """Normalised rates of a registered mixture's tasks (computes lazy sizes)."""
    mixture = seqio.get_mixture_or_task(name)
    rates = {t.name: float(mixture.get_rate(t)) for t in mixture.tasks}
    total = sum(rates.values())
    return {t: r / total for t, r in rates.items()}


@gin.configurable
def register_mixture(*, name: str = gin.REQUIRED, tasks: Sequence = gin.REQUIRED,
                     rate_by: str = "examples", temperature: float = 1.0,
                     maximum: float | None = None, split: str = "train",
                     replace: bool = True) -> str:
    """Registers seqio.Mixture `name`; `tasks` are names (or (name, weight) pairs for 'fixed')."""
    if rate_by not in RATE_BY:
        raise ValueError(f"register_mixture({name}): rate_by must be one of {RATE_BY}, "
                         f"got {rate_by!r}")
    if temperature <= 0:
        raise ValueError(f"register_mixture({name}): temperature must be > 0, got {temperature}")
    if rate_by == "fixed":
        pairs = [(t, float(w)) for t, w in tasks]
    else:
        rate = functools.partial(_scaled_rate, rate_by=rate_by, temperature=temperature,
                                 maximum=maximum, split=split)
        pairs = [(t if isinstance(t, str) else t[0], rate) for t in tasks]
    if replace and name in seqio.MixtureRegistry.names():
        seqio.MixtureRegistry.remove(name)
    seqio.MixtureRegistry.add(name, pairs)
    return name
