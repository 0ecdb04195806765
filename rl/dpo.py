"""DPO (Rafailov et al. 2023) as a model wrapper that trainer.train runs like any other.

The batch is tasks/preference_reader.py's (K = 2: chosen, rejected) plus `reference_log_probs` [b, 2],
the frozen reference policy's summed response log-probabilities, added on the fly by
`with_reference_log_probs` (a wrapper of the data iterator), so the trained parameters are the
policy's alone. Loss: -log σ(β[(log π_c - log ref_c) - (log π_r - log ref_r)]) (+ conservative label
smoothing). Metrics: loss, accuracy (implicit reward of chosen above rejected), margin (βΔ),
chosen_reward / rejected_reward (β · log-ratio), num_pairs. No critic and no sampling.
"""

from __future__ import annotations

from typing import Any, Iterator, Mapping

import gin
import jax
import jax.numpy as jnp
import numpy as np

from zhchat.models.base_model import Batch, BaseModel, Params
from zhchat.rl import heads, losses


def response_log_probs(policy: Any, params: Params, batch: Batch) -> jnp.ndarray:
    """Summed log-probabilities of the weighted (response) tokens of rows [b, K, len] -> [b, K]."""
    tgt = jnp.asarray(batch["lm_target_tokens"])
    b, k, length = tgt.shape
    flat = {"decoder_input_tokens": jnp.asarray(batch["lm_input_tokens"]).reshape(b * k, length),
            "decoder_target_tokens": tgt.reshape(b * k, length),
            "decoder_loss_weights": jnp.asarray(batch["lm_loss_weights"]).reshape(b * k, length)}
    if heads.is_encoder_decoder(policy):
        flat["encoder_input_tokens"] = jnp.repeat(jnp.asarray(batch["encoder_input_tokens"]), k, axis=0)
    return policy.score_batch(params, flat).reshape(b, k)


@gin.configurable
class DPOModel(BaseModel):
    """Trains a DecoderOnlyModel / EncoderDecoderModel policy with the DPO loss."""

    def __init__(self, *, policy: Any = gin.REQUIRED, beta: float = 0.1, label_smoothing: float = 0.0):
        heads.is_encoder_decoder(policy)
        if beta <= 0 or not 0 <= label_smoothing < 0.5:
            raise ValueError(f"DPOModel: beta must be > 0 and label_smoothing in [0, 0.5), got "
                             f"{beta}, {label_smoothing}")
        self.policy, self.beta, self.label_smoothing = policy, beta, label_smoothing
        self.module, self.config = policy.module, policy.config

    def init_params(self, rng: jax.Array, batch_shapes: Mapping[str, tuple]) -> Params:
        length = tuple(batch_shapes.get("lm_input_tokens", batch_shapes["decoder_input_tokens"]))[-1]
        shapes = {"decoder_input_tokens": (1, length)}
        if "encoder_input_tokens" in batch_shapes:
            shapes["encoder_input_tokens"] = (1, tuple(batch_shapes["encoder_input_tokens"])[-1])
        return self.policy.init_params(rng, shapes)

    def loss_fn(self, params: Params, batch: Batch, dropout_rng: jax.Array | None
                ) -> tuple[jnp.ndarray, dict[str, jnp.ndarray]]:
        del dropout_rng
        if "reference_log_probs" not in batch:
            raise KeyError("DPOModel.loss_fn: batch lacks reference_log_probs; wrap the data "
                           "iterator with rl.dpo.with_reference_log_probs")
        logp = response_log_probs(self.policy, params, batch)
        ref = jnp.asarray(batch["reference_log_probs"], jnp.float32)
        loss, margin = losses.dpo_loss(logp[:, 0], logp[:, 1], ref[:, 0], ref[:, 1], beta=self.beta,
                                       label_smoothing=self.label_smoothing)
        valid = jnp.asarray(batch.get("response_valid", jnp.ones_like(ref)))
        pair = (valid[:, 0] * valid[:, 1]) > 0
        return losses.masked_mean(loss, pair), {
            "loss": losses.masked_mean(loss, pair),
            "accuracy": losses.masked_mean((margin > 0).astype(jnp.float32), pair),
            "margin": losses.masked_mean(margin, pair),
            "chosen_reward": losses.masked_mean(self.beta * (logp[:, 0] - ref[:, 0]), pair),
            "rejected_reward": losses.masked_mean(self.beta * (logp[:, 1] - ref[:, 1]), pair),
            "num_pairs": jnp.sum(pair).astype(jnp.float32)}

    def score_batch(self, params: Params, batch: Batch) -> jnp.ndarray:
        return self.policy.score_batch(params, batch)

    def predict_batch(self, params: Params, batch: Batch, rng: jax.Array, **decode_kwargs):
        return self.policy.predict_batch(params, batch, rng, **decode_kwargs)

    def flops_per_token(self, seq_len: int) -> float:
        return self.policy.flops_per_token(seq_len)

    def num_params(self) -> int:
        return self.policy.num_params()


class _WithReference:
    """Iterator adding `reference_log_probs` to each batch; forwards get_state / set_state."""

    def __init__(self, it: Iterator, policy: Any, reference_params: Params):
        self.it, self.params = it, reference_params
        self.fn = jax.jit(lambda p, b: response_log_probs(policy, p, b))

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        batch = dict(next(self.it))
        batch["reference_log_probs"] = np.asarray(self.fn(self.params, batch), np.float32)
        return batch

    def __getattr__(self, name):
        if name in ("get_state", "set_state"):
            return getattr(self.it, name)
        raise AttributeError(name)


@gin.configurable
def with_reference_log_probs(*, data: Any = gin.REQUIRED, policy: Any = gin.REQUIRED,
                             reference_params: Params = gin.REQUIRED, batch_size: int, seed: int = 0,
                             shard_index: int = 0, shard_count: int = 1) -> Iterator:
    """Trainer-style factory: `data` (a preference-batch factory) with the frozen reference's
    log-probabilities added (the reference is usually the SFT policy DPO starts from)."""
    it = data(batch_size=batch_size, seed=seed, shard_index=shard_index, shard_count=shard_count) \
        if callable(data) else iter(data)
    return _WithReference(it, policy, reference_params)
