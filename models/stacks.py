"""Scanned layer stacks split into unrolled layers.

`nn.scan` stores a stack's parameters with a leading "layers" axis under one name (`layers`,
`encoder`, `decoder`); the unrolled module names layer i `<name>_<i>`. Splitting serves decoding
(which runs unrolled, so the KV cache is updated in place) and the initialisation of unrolled
models: initialising the scanned twin and splitting it takes one initialiser per stacked weight
instead of one per layer and weight (T5-large unrolled: ~1 minute of init compile before this).
"""

from __future__ import annotations

from typing import Any, Mapping

import flax.linen as nn
import jax


def _layer(x: Any, i: int) -> Any:
    if isinstance(x, nn.Partitioned):  # boxed: drop the "layers" logical axis too
        if not x.names or x.names[0] != "layers":
            raise ValueError(f"expected a scanned parameter (first axis 'layers'), got {x.names}")
        return x.replace(value=x.value[i], names=x.names[1:])
    return x[i]


def split_stacks(params: Mapping[str, Any], stacks: Mapping[str, int]) -> dict[str, Any]:
    """`params` with each scanned stack `name` (of `stacks[name]` layers) replaced by `name_i`.
    Works on boxed (nn.Partitioned) and plain parameter trees."""
    out = dict(params)
    is_box = lambda x: isinstance(x, nn.Partitioned)  # noqa: E731
    for name, n in stacks.items():
        stacked = out.pop(name)
        for i in range(n):
            out[f"{name}_{i}"] = jax.tree_util.tree_map(lambda x, i=i: _layer(x, i), stacked,
                                                        is_leaf=is_box)
    return out
