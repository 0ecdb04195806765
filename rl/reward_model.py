"""RewardModel: a decoder or T5 backbone with a scalar head, behind the BaseModel interface.

The reward of a response is the head applied to the backbone's final hidden state at the last real
token: for the decoder the last non-pad token of prompt + response + EOS; for T5 the decoder's final
position (its input is the response's EOS; position 0 holds BOS = 0). Training goes through
trainer.train (sharded, checkpointed); the batch features are (pad = 0, right-padded):

  decoder:  decoder_input_tokens [batch, K, len]       prompt + response + EOS per response
  T5:       encoder_input_tokens [batch, enc_len]      prompt + EOS (shared by the K responses)
            decoder_input_tokens [batch, K, dec_len]   BOS + response + EOS
  both:     response_valid [batch, K] (optional)       1 on present responses (ranked lists vary)
            score_labels [batch, K] (loss='direct')    target scores

Responses are in rank order, best first (K = 2: chosen, rejected). Losses (gin `loss`):
'pairwise' (K = 2), 'ranking' (all pairs of a K-wise list), 'direct' (regression to score_labels).
Metrics: loss, accuracy (ordered pairs ranked right), margin (mean r_better - r_worse),
reward_mean, num_pairs.
"""

from __future__ import annotations

from typing import Any, Mapping

import gin
import jax
import jax.numpy as jnp

from zhchat.models.base_model import Batch, BaseModel, Params
from zhchat.rl import heads, layouts, losses

LOSSES = ("pairwise", "ranking", "direct")


@gin.configurable
class RewardModel(BaseModel):
    """Scalar reward r(prompt, response) from a DecoderOnlyModel or EncoderDecoderModel backbone."""

    def __init__(self, *, backbone: Any = gin.REQUIRED, loss: str = "pairwise",
                 head_init_scale: float = 1.0):
        self.layout = layouts.layout_for(backbone)
        self.encdec = self.layout.encoder_decoder
        if loss not in LOSSES:
            raise ValueError(f"RewardModel.loss={loss!r}: expected one of {LOSSES}")
        self.backbone, self.loss = backbone, loss
        self.config = backbone.config
        self.pad_id, self.eos_id = backbone.pad_id, backbone.eos_id
        self.head = heads.ScalarHead(init_scale=head_init_scale)
        self.module = backbone.module

    @property
    def vocab_size(self) -> int:
        return heads.vocab_size(self.backbone)

    # ---- parameters -------------------------------------------------------------------------
    def init_params(self, rng: jax.Array, batch_shapes: Mapping[str, tuple]) -> Params:
        """{"backbone": the backbone's params, "head": ScalarHead params}; lengths only matter."""
        dec_len = tuple(batch_shapes["decoder_input_tokens"])[-1]
        shapes = {"decoder_input_tokens": (1, dec_len)}
        if self.encdec:
            shapes["encoder_input_tokens"] = (1, tuple(batch_shapes.get(
                "encoder_input_tokens", (1, dec_len)))[-1])
        b_rng, h_rng = jax.random.split(rng)
        backbone = self.backbone.init_params(b_rng, shapes)
        dim = self.layout.hidden_dim(self.config)
        head = self.head.init(h_rng, jnp.zeros((1, dim), jnp.float32))["params"]
        return {"backbone": backbone, "head": head}

    def num_params(self) -> int:
        return self.backbone.num_params() + self.layout.hidden_dim(self.config) + 1

    def flops_per_token(self, seq_len: int) -> float:
        return self.backbone.flops_per_token(seq_len)

    # ---- rewards ----------------------------------------------------------------------------
    def hidden_and_logits(self, params: Params, tokens: jnp.ndarray,
                          encoder_tokens: jnp.ndarray | None = None, mask: jnp.ndarray | None = None):
        """(fp32 logits, hidden) of the backbone for 2-D token rows; `mask` (default tokens != pad)
        marks real decoder tokens, so left padding is masked out of the decoder's attention."""
        mask = (tokens != self.pad_id) if mask is None else mask.astype(bool)
        return self.layout.forward(self.backbone, params["backbone"], tokens, mask,
                                   encoder_tokens)

    def rewards_masked(self, params: Params, tokens: jnp.ndarray, mask: jnp.ndarray,
                       encoder_tokens: jnp.ndarray | None = None) -> jnp.ndarray:
        """Rewards [rows] read at the last position where `mask` is 1 (T5: mask covers BOS..EOS)."""
        _, hidden = self.hidden_and_logits(params, tokens, encoder_tokens, mask)
        idx = jnp.max(jnp.where(mask.astype(bool), jnp.arange(tokens.shape[-1]), 0), axis=-1)
        last = jnp.take_along_axis(hidden, idx[:, None, None], axis=1)[:, 0]
        return self.head.apply({"params": params["head"]}, last)

    def rewards(self, params: Params, batch: Batch) -> jnp.ndarray:
        """Rewards [batch] for rows [batch, len], or [batch, K] for ranked lists [batch, K, len]."""
        tokens = jnp.asarray(batch["decoder_input_tokens"], jnp.int32)
        lead = tokens.shape[:-1]
        flat = tokens.reshape(-1, tokens.shape[-1])
        enc = None
        if self.encdec:
            if "encoder_input_tokens" not in batch:
                raise KeyError(f"RewardModel (T5): batch lacks encoder_input_tokens; has {sorted(batch)}")
            enc = jnp.asarray(batch["encoder_input_tokens"], jnp.int32)
            if tokens.ndim == 3:
                enc = jnp.repeat(enc, tokens.shape[1], axis=0)
        mask = self.layout.row_mask(flat, self.pad_id)
        return self.rewards_masked(params, flat, mask, enc).reshape(lead)

    def score_batch(self, params: Params, batch: Batch) -> jnp.ndarray:
        """The reward of each row (not a log-probability: this is a reward model)."""
        return self.rewards(params, batch)

    def loss_fn(self, params: Params, batch: Batch, dropout_rng: jax.Array | None
                ) -> tuple[jnp.ndarray, dict[str, jnp.ndarray]]:
        del dropout_rng
        if "decoder_input_tokens" not in batch or jnp.ndim(batch["decoder_input_tokens"]) != 3:
            raise KeyError("RewardModel.loss_fn: needs decoder_input_tokens [batch, K, len] "
                           f"(responses best first); has {sorted(batch)}")
        r = self.rewards(params, batch)
        valid = batch.get("response_valid")
        valid = (jnp.any(batch["decoder_input_tokens"] != self.pad_id, -1) if valid is None
                 else jnp.asarray(valid) > 0)
        pair_loss, pair_mask = losses.ranking_pairs(r, valid)
        diff = r[:, :, None] - r[:, None, :]
        if self.loss == "pairwise":
            if r.shape[1] != 2:
                raise ValueError(f"RewardModel.loss='pairwise' needs K = 2 responses, got {r.shape[1]}; "
                                 "use loss='ranking' for ranked lists")
            loss = losses.masked_mean(losses.pairwise_loss(r[:, 0], r[:, 1]), valid[:, 0] & valid[:, 1])
        elif self.loss == "ranking":
            loss = losses.masked_mean(pair_loss, pair_mask)
        else:
            if "score_labels" not in batch:
                raise KeyError("RewardModel.loss='direct' needs score_labels [batch, K]")
            loss = losses.direct_score_loss(r, jnp.asarray(batch["score_labels"], jnp.float32), valid)
        metrics = {"loss": loss,
                   "accuracy": losses.masked_mean((diff > 0).astype(jnp.float32), pair_mask),
                   "margin": losses.masked_mean(diff, pair_mask),
                   "reward_mean": losses.masked_mean(r, valid),
                   "num_pairs": jnp.sum(pair_mask).astype(jnp.float32)}
        return loss, metrics

    def predict_batch(self, params: Params, batch: Batch, rng: jax.Array, **decode_kwargs):
        raise TypeError("RewardModel scores responses (score_batch / rewards); it does not generate")


def check_same_vocabulary(policy: Any, reward_model: RewardModel) -> None:
    """A reward model must read the policy's token ids: equal vocabulary sizes, pad and EOS."""
    pv, rv = heads.vocab_size(policy), reward_model.vocab_size
    if (pv, policy.pad_id, policy.eos_id) != (rv, reward_model.pad_id, reward_model.eos_id):
        raise ValueError(
            f"reward model vocabulary (size {rv}, pad {reward_model.pad_id}, eos "
            f"{reward_model.eos_id}) differs from the policy's (size {pv}, pad {policy.pad_id}, "
            f"eos {policy.eos_id}): train the reward model on the policy's tokenizer "
            "(bind the same VOCAB_SIZE / vocabulary in both gin configs)")
