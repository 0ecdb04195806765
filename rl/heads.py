"""Scalar heads on backbone hidden states, and the hidden states themselves.

The decoder and T5 modules return logits; their final-norm output (the hidden state the output
layer reads) is taken with flax's `capture_intermediates` on the module named `decoder_norm`, so
the backbone's parameter tree stays exactly that of models/ (an SFT checkpoint loads as is).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from zhchat.models.decoder import model_kwargs
from zhchat.models.decoder_model import DecoderOnlyModel
from zhchat.models.encdec_model import EncoderDecoderModel

Array = jax.Array


class ScalarHead(nn.Module):
    """hidden [..., embed] -> scalar [...]: a vector and a bias (fp32)."""

    init_scale: float = 1.0

    @nn.compact
    def __call__(self, x: Array) -> Array:
        dim = x.shape[-1]
        init = nn.initializers.normal(self.init_scale / dim ** 0.5) if self.init_scale else \
            nn.initializers.zeros
        kernel = self.param("kernel", nn.with_logical_partitioning(init, ("embed",)), (dim,),
                            jnp.float32)
        bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, ()), (),
                          jnp.float32)
        return jnp.einsum("...d,d->...", x.astype(jnp.float32), kernel) + bias


def _capture(module: nn.Module, params: Any, *args, **kwargs) -> tuple[Array, Array]:
    logits, state = module.apply({"params": params}, *args, mutable=["intermediates"],
                                 capture_intermediates=lambda mdl, _: mdl.name == "decoder_norm",
                                 **kwargs)
    return logits.astype(jnp.float32), state["intermediates"]["decoder_norm"]["__call__"][0]


def decoder_forward(model: DecoderOnlyModel, params: Any, tokens: Array, *,
                    positions: Array | None = None, segment_ids: Array | None = None
                    ) -> tuple[Array, Array]:
    """(fp32 logits [b, len, vocab], hidden [b, len, embed]) of the decoder."""
    return _capture(model.module, params, tokens,
                    **model_kwargs({"decoder_positions": positions,
                                    "decoder_segment_ids": segment_ids}))


def t5_forward(model: EncoderDecoderModel, params: Any, encoder_tokens: Array,
               decoder_tokens: Array) -> tuple[Array, Array]:
    """(fp32 logits, hidden [b, dec_len, d_model]) of T5's decoder, teacher-forced, unpacked."""
    return _capture(model.module, params, encoder_tokens, decoder_tokens)


def vocab_size(model: Any) -> int:
    return int(model.config.vocab_size)


def is_encoder_decoder(model: Any) -> bool:
    if isinstance(model, EncoderDecoderModel):
        return True
    if isinstance(model, DecoderOnlyModel):
        return False
    raise TypeError(f"expected a DecoderOnlyModel or EncoderDecoderModel backbone, got {type(model)}")



