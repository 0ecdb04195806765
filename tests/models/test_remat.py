"""Remat policies by name: the attention-saving policy recognises jax's cuDNN attention primitives."""

import jax
import jax.numpy as jnp
import pytest

from zhchat.models import remat


def test_attention_saving_policy_matches_cudnn_forward_primitives():
    from jax._src.cudnn import fused_attention_stablehlo as cudnn  # what the policy must match

    policy = remat.checkpoint_policy("dots_and_attention_saveable")
    for prim in (cudnn._dot_product_attention_fwd_p_wrapper, cudnn._dot_product_attention_fwd_p):
        assert policy(prim)
    assert not policy(cudnn._dot_product_attention_bwd_p_wrapper)


def test_attention_saving_policy_keeps_the_dot_policy_otherwise():
    x = jnp.ones((4, 8))
    jaxpr = jax.make_jaxpr(lambda a, b: jnp.sin(a @ b))(x, x.T).jaxpr
    dot, sin = (e for e in jaxpr.eqns)
    avals = lambda e: [v.aval for v in e.invars]  # noqa: E731
    policy = remat.checkpoint_policy("dots_and_attention_saveable")
    assert policy(dot.primitive, *avals(dot), **dot.params)
    assert not policy(sin.primitive, *avals(sin), **sin.params)


def test_policy_names():
    assert remat.checkpoint_policy("full") is None
    assert remat.checkpoint_policy("dots_saveable") is jax.checkpoint_policies.dots_saveable
    for bad in ("none", "sometimes"):
        with pytest.raises(ValueError, match="remat policy must be one of"):
            remat.checkpoint_policy(bad)
