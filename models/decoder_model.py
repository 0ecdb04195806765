"""DecoderOnlyModel: the BaseModel wrapper for models/decoder.py (T5X's DecoderOnlyModel, ours).

Turns seqio decoder features (docs/architecture.md) into a loss with z-loss and label smoothing,
per-example scores, and KV-cache samples (models/decoding.py). Logits are cast to fp32 before the
softmax. The decoder has no dropout, so `dropout_rng` is accepted and unused.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import flax.linen as nn
import gin
import jax
import jax.numpy as jnp
import numpy as np

from zhchat.models import decoding, flops, stacks
from zhchat.models.losses import cross_entropy_with_logits, weighted_token_loss
from zhchat.models.base_model import Batch, BaseModel, Params
from zhchat.models.decoder import Decoder, DecoderConfig, model_kwargs

_REQUIRED = ("decoder_input_tokens", "decoder_target_tokens", "decoder_loss_weights")


@gin.configurable
class DecoderOnlyModel(BaseModel):
    """Causal / prefix LM wrapper: loss_fn, score_batch, predict_batch, FLOPs and parameter counts."""

    def __init__(self, *, config: DecoderConfig, z_loss: float = 1e-4, label_smoothing: float = 0.0,
                 eos_id: int = 1, pad_id: int = 0):
        if not isinstance(config, DecoderConfig):
            raise TypeError(f"DecoderOnlyModel.config must be a DecoderConfig, got {type(config)}")
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"DecoderOnlyModel.label_smoothing must be in [0, 1), got {label_smoothing}")
        self.config = config
        self.module = Decoder(config)
        # Decoding runs unrolled layers: with nn.scan every step would copy the whole stacked KV
        # cache (scan reads layer slices from one buffer and stacks them into another).
        self.decode_module = Decoder(dataclasses.replace(config, scan_layers=False))
        self.z_loss = z_loss
        self.label_smoothing = label_smoothing
        self.eos_id, self.pad_id = eos_id, pad_id
        self._decode_fns: dict[tuple, Any] = {}

    # ---- parameters -------------------------------------------------------------------------
    def init_params(self, rng: jax.Array, batch_shapes: Mapping[str, tuple]) -> Params:
        """Boxed (nn.LogicallyPartitioned) parameters; only decoder_input_tokens' shape matters.
        Unrolled layers are initialised as a scanned stack and split (models/stacks.py)."""
        shape = tuple(batch_shapes["decoder_input_tokens"])
        if self.config.scan_layers:
            return self.module.init(rng, jnp.ones(shape, jnp.int32))["params"]
        twin = Decoder(dataclasses.replace(self.config, scan_layers=True))
        return self._split_stacks(twin.init(rng, jnp.ones(shape, jnp.int32))["params"])

    def abstract_params(self, batch_shapes: Mapping[str, tuple] | None = None) -> Params:
        """Parameter ShapeDtypeStructs (boxed) via jax.eval_shape: nothing is allocated."""
        shapes = batch_shapes or {"decoder_input_tokens": (1, 1)}
        return jax.eval_shape(lambda rng: self.init_params(rng, shapes), jax.random.PRNGKey(0))

    def num_params(self) -> int:
        return flops.count_params(self.config)

    def num_params_from_shapes(self) -> int:
        """Parameter count from `abstract_params` (checks count_params against the real module)."""
        leaves = jax.tree_util.tree_leaves(nn.unbox(self.abstract_params()))
        return int(sum(np.prod(x.shape) for x in leaves))

    def flops_per_token(self, seq_len: int) -> float:
        return flops.training_flops_per_token(self.config, seq_len, causal=True)

    # ---- training / scoring -----------------------------------------------------------------
    def _logits(self, params: Params, batch: Batch) -> jnp.ndarray:
        if "decoder_input_tokens" not in batch:
            raise KeyError(f"DecoderOnlyModel: batch lacks decoder_input_tokens; has {sorted(batch)}")
        logits = self.module.apply({"params": params}, batch["decoder_input_tokens"],
                                   **model_kwargs(batch))
        return logits.astype(jnp.float32)

    def loss_fn(self, params: Params, batch: Batch, dropout_rng: jax.Array | None
                ) -> tuple[jnp.ndarray, dict[str, jnp.ndarray]]:
        """Mean cross-entropy over decoder_loss_weights + z-loss.

        Metrics: `loss` (the returned total), `cross_entropy`, `z_loss`, `accuracy` are means over
        the weighted tokens; `num_tokens` is the weight sum. Microbatches combine by averaging the
        means weighted by `num_tokens`.
        """
        del dropout_rng
        missing = [k for k in _REQUIRED if k not in batch]
        if missing:
            raise KeyError(f"DecoderOnlyModel.loss_fn: batch lacks {missing}; has {sorted(batch)}")
        logits = self._logits(params, batch)
        return weighted_token_loss(logits, batch["decoder_target_tokens"],
                                   batch["decoder_loss_weights"], z_loss=self.z_loss,
                                   label_smoothing=self.label_smoothing)

    def score_batch(self, params: Params, batch: Batch) -> jnp.ndarray:
        """Summed log p(target) over weighted tokens of each row: [batch] (no smoothing, no z-loss)."""
        logits = self._logits(params, batch)
        ce, _ = cross_entropy_with_logits(logits, batch["decoder_target_tokens"])
        weights = jnp.asarray(batch.get("decoder_loss_weights", jnp.ones_like(ce)), jnp.float32)
        return -jnp.sum(ce * weights, axis=-1)

    # ---- decoding ---------------------------------------------------------------------------
    def decode_params(self, params: Params) -> Params:
        """`params` in the unrolled layout of `decode_module` (scanned layers split per layer)."""
        return params if not self.config.scan_layers else self._split_stacks(params)

    def _split_stacks(self, params: Params) -> Params:
        return stacks.split_stacks(params, {"layers": self.config.num_layers})

    def init_cache(self, batch_size: int, cache_len: int) -> Any:
        """Zeroed KV cache for `cache_len` slots (shapes from jax.eval_shape, no parameters made)."""
        ones = jnp.ones((batch_size, cache_len), jnp.int32)
        shapes = jax.eval_shape(lambda: self.decode_module.init(
            jax.random.PRNGKey(0), ones, positions=ones, kv_mask=ones.astype(bool), decode=True))
        return jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), shapes["cache"])

    def step_fn(self, params: Params) -> decoding.StepFn:
        """The decoding callback: runs tokens through the cached decoder, returns fp32 logits."""
        params = self.decode_params(params)

        def step(cache, tokens, positions, kv_mask, prefix):
            logits, mutated = self.decode_module.apply(
                {"params": params, "cache": cache}, tokens, positions=positions, prefix=prefix,
                kv_mask=kv_mask, decode=True, mutable=["cache"])
            return logits.astype(jnp.float32), mutated["cache"]
        return step

    def predict_batch(self, params: Params, batch: Batch, rng: jax.Array, *,
                      max_decode_length: int = 64, temperature: float = 0.0, top_k: int = 0,
                      top_p: float = 1.0, return_log_probs: bool = False,
                      first_token_mask: Any = None, **unused
                      ) -> jnp.ndarray | tuple[jnp.ndarray, jnp.ndarray]:
        """Samples continuations of the prompts in `decoder_input_tokens` (pad = `pad_id`, left or
        right padded); `decoder_causal_attention`, if present, marks a bidirectional prompt prefix.
        `first_token_mask` [batch, vocab] bool: token healing (`decoding.decode`).
        Returns tokens [batch, max_decode_length] (and log-probs with `return_log_probs`)."""
        if unused:
            raise TypeError(f"DecoderOnlyModel.predict_batch: unknown decode options {sorted(unused)}")
        prompts = jnp.asarray(batch["decoder_input_tokens"], jnp.int32)
        if prompts.shape[1] + max_decode_length > self.config.max_len:
            raise ValueError(f"prompt length {prompts.shape[1]} + max_decode_length {max_decode_length} "
                             f"exceeds DecoderConfig.max_len={self.config.max_len}")
        key = (max_decode_length, float(temperature), int(top_k), float(top_p), bool(return_log_probs))
        if key not in self._decode_fns:
            def run(params, prompts, prefix, rng, first_token_mask):
                cache = self.init_cache(prompts.shape[0], prompts.shape[1] + max_decode_length)
                return decoding.decode(
                    self.step_fn(params), cache, prompts, rng, max_decode_length=max_decode_length,
                    prefix=prefix, temperature=temperature, top_k=top_k, top_p=top_p,
                    eos_id=self.eos_id, pad_id=self.pad_id, return_log_probs=return_log_probs,
                    first_token_mask=first_token_mask)
            self._decode_fns[key] = jax.jit(run)
        prefix = batch.get("decoder_causal_attention")
        if first_token_mask is not None:
            first_token_mask = jnp.asarray(first_token_mask, bool)
            if first_token_mask.shape != (prompts.shape[0], self.config.vocab_size):
                raise ValueError(f"first_token_mask shape {first_token_mask.shape}; expected "
                                 f"{(prompts.shape[0], self.config.vocab_size)} (batch, vocab)")
        return self._decode_fns[key](params, prompts, prefix, rng, first_token_mask)
