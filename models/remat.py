"""Rematerialisation policies by name, for `DecoderConfig.remat_policy` / `T5Config.remat_policy`.

"none" saves every activation, "full" recomputes the whole layer in the backward pass, the other
names are `jax.checkpoint_policies`, plus one of ours: "dots_and_attention_saveable" also keeps the
outputs of cuDNN's fused attention (its output and softmax statistics), which the stock policies
recompute because the fused kernel is not a dot. Keeping them costs [batch, len, heads, head_dim]
plus [batch, heads, len] per layer and saves one attention forward per layer in the backward pass.
"""

from __future__ import annotations

from typing import Any, Callable

import jax

REMAT_POLICIES = ("none", "full", "dots_saveable", "dots_with_no_batch_dims_saveable",
                  "dots_and_attention_saveable", "nothing_saveable", "everything_saveable")
# the forward primitives of jax's cuDNN attention (jax._src.cudnn.fused_attention_stablehlo): its
# custom_vjp binds the "_wrapper" ones at trace time, which is what a remat policy sees
ATTENTION_PRIMITIVES = frozenset({"dot_product_attention_fwd_wrapper", "dot_product_attention_fwd",
                                  "dot_product_attention_fp8_fwd_wrapper",
                                  "dot_product_attention_fp8_fwd"})


def _dots_and_attention_saveable(prim: Any, *avals: Any, **params: Any) -> bool:
    return (prim.name in ATTENTION_PRIMITIVES
            or jax.checkpoint_policies.dots_with_no_batch_dims_saveable(prim, *avals, **params))


def checkpoint_policy(name: str) -> Callable[..., bool] | None:
    """The `jax.checkpoint` policy for a remat policy name other than "none" (None for "full")."""
    if name not in REMAT_POLICIES or name == "none":
        raise ValueError(f"remat policy must be one of {REMAT_POLICIES[1:]}, got {name!r}")
    if name == "full":
        return None
    if name == "dots_and_attention_saveable":
        return _dots_and_attention_saveable
    return getattr(jax.checkpoint_policies, name)
