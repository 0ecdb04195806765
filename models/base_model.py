"""The model-wrapper interface shared by pretraining, SFT, reward modelling, PPO and evaluation.

Like T5X's BaseModel: a wrapper owns a flax module and knows how to turn a feature-converted batch
(seqio model-feature names, see docs/architecture.md) into a loss, per-example scores or predictions,
so the trainer and the RL code never look inside the architecture.
"""

from __future__ import annotations

import abc
from typing import Any, Mapping

import jax
import jax.numpy as jnp

Params = Any
Batch = Mapping[str, jnp.ndarray]


class BaseModel(abc.ABC):
    """Architecture-independent interface used by the trainer, decoding, RL and eval."""

    module: Any

    @abc.abstractmethod
    def init_params(self, rng: jax.Array, batch_shapes: Mapping[str, tuple]) -> Params:
        """Initialises parameters (boxed with logical axis names) for batches of the given shapes."""

    @abc.abstractmethod
    def loss_fn(self, params: Params, batch: Batch, dropout_rng: jax.Array | None
                ) -> tuple[jnp.ndarray, dict[str, jnp.ndarray]]:
        """Returns (scalar loss, metrics) for a batch; metrics include loss, z_loss, accuracy, num_tokens."""

    @abc.abstractmethod
    def score_batch(self, params: Params, batch: Batch) -> jnp.ndarray:
        """Returns the summed log-probability of the weighted target tokens of each example: [batch]."""

    @abc.abstractmethod
    def predict_batch(self, params: Params, batch: Batch, rng: jax.Array, **decode_kwargs
                      ) -> jnp.ndarray:
        """Generates continuations for the prompts in `batch`: [batch, max_decode_length]."""

    @abc.abstractmethod
    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs (forward + backward) per token, PaLM appendix B with attention counted."""

    @abc.abstractmethod
    def num_params(self) -> int:
        """Number of trainable parameters."""
