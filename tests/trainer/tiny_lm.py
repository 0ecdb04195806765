"""A tiny flax causal LM implementing BaseModel, for trainer tests that must not depend on the
decoder's internals (the final tests also run the real DecoderOnlyModel)."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from zhchat.models.base_model import BaseModel


class _Net(nn.Module):
    vocab: int = 64
    embed: int = 16
    mlp: int = 32

    @nn.compact
    def __call__(self, tokens, deterministic=True):
        emb = self.param("embedding", nn.with_logical_partitioning(
            nn.initializers.normal(0.5), ("vocab", "embed")), (self.vocab, self.embed))
        x = emb[tokens]
        x = nn.with_logical_constraint(x, ("activation_batch", "activation_length",
                                           "activation_embed"))
        wi = self.param("wi", nn.with_logical_partitioning(
            nn.initializers.lecun_normal(), ("embed", "mlp")), (self.embed, self.mlp))
        wo = self.param("wo", nn.with_logical_partitioning(
            nn.initializers.lecun_normal(), ("mlp", "embed")), (self.mlp, self.embed))
        scale = self.param("scale", nn.with_logical_partitioning(
            nn.initializers.ones, ("embed",)), (self.embed,))
        # causal mixing: running mean over previous positions
        csum = jnp.cumsum(x, axis=1) / jnp.arange(1, x.shape[1] + 1)[None, :, None]
        h = x + csum + jax.nn.gelu(csum @ wi) @ wo
        h = h * scale
        return h @ emb.T


class TinyLM(BaseModel):
    def __init__(self, vocab=64, embed=16, mlp=32, z_loss=1e-4):
        self.module = _Net(vocab, embed, mlp)
        self.z_loss = z_loss

    def init_params(self, rng, batch_shapes):
        tokens = jnp.zeros(batch_shapes["decoder_input_tokens"], jnp.int32)
        return self.module.init(rng, tokens)["params"]

    def loss_fn(self, params, batch, dropout_rng):
        logits = self.module.apply({"params": params}, batch["decoder_input_tokens"])
        logits = logits.astype(jnp.float32)
        w = batch["decoder_loss_weights"].astype(jnp.float32)
        lse = jax.nn.logsumexp(logits, -1)
        tgt = jnp.take_along_axis(logits, batch["decoder_target_tokens"][..., None], -1)[..., 0]
        n = jnp.maximum(w.sum(), 1.0)
        ce = ((lse - tgt) * w).sum() / n
        z = self.z_loss * ((lse ** 2) * w).sum() / n
        acc = ((logits.argmax(-1) == batch["decoder_target_tokens"]) * w).sum() / n
        return ce + z, {"loss": ce + z, "z_loss": z, "accuracy": acc, "num_tokens": w.sum()}

    def score_batch(self, params, batch):
        raise NotImplementedError

    def predict_batch(self, params, batch, rng, **kw):
        raise NotImplementedError

    def flops_per_token(self, seq_len):
        return 6.0 * self.num_params()

    def num_params(self):
        m = self.module
        return m.vocab * m.embed + 2 * m.embed * m.mlp + m.embed
