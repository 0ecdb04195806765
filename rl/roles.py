"""The four models of RLHF as named parts (Tunix's roles): the actor (the policy being trained), the
critic (a value head on a backbone, trained), the reference (the actor's starting parameters,
frozen: the KL anchor) and the reward model (frozen). Each part holds its model wrapper, its
parameters or train state and their shardings on the one mesh the run uses.
"""

from __future__ import annotations

import dataclasses
import enum
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from zhchat.rl import layouts
from zhchat.trainer import partitioning, state_init
from zhchat.trainer import train_state as ts


class Role(str, enum.Enum):
    ACTOR = "actor"
    CRITIC = "critic"
    REFERENCE = "reference"
    REWARD = "reward"


@dataclasses.dataclass
class Trained:
    """A trained role (actor, critic): its model, train state and the state's shardings."""
    role: Role
    model: Any
    state: ts.TrainState
    shardings: Any


@dataclasses.dataclass
class Frozen:
    """A frozen role (reference, reward): its model and parameters (None: a reward function)."""
    role: Role
    model: Any
    params: Any


def response_shapes(model: Any, prompt_len: int, response_len: int) -> dict:
    """Init shapes of a model that reads a prompt and a response."""
    return layouts.layout_for(model).init_shapes(prompt_len, response_len)


def make_state(model: Any, tx: Any, partitioner: partitioning.Partitioner, shapes: dict,
               rng: jax.Array, params: Any = None) -> tuple[ts.TrainState, Any]:
    """A sharded TrainState of `model` and its shardings, from `params` (unboxed tree) or freshly
    initialised from `rng` (trainer/state_init.py, as every training run builds its state)."""
    init = state_init.StateInitializer(model, tx, partitioner, shapes, rng)
    return (init.init() if params is None else init.from_params(params)), init.shardings


def actor(model: Any, tx: Any, partitioner: partitioning.Partitioner, shapes: dict,
          rng: jax.Array, params: Any = None) -> Trained:
    """The policy from `params` (e.g. the SFT checkpoint) or initialised from `rng`."""
    return Trained(Role.ACTOR, model, *make_state(model, tx, partitioner, shapes, rng, params))


def critic(model: Any, tx: Any, partitioner: partitioning.Partitioner, shapes: dict,
           rng: jax.Array, params: Any = None, reward_params: Any = None) -> Trained:
    """The value model from `params`, else from the reward model's parameters when the shapes
    agree (InstructGPT initialises the value function from the RM), else initialised."""
    if params is None and reward_params is not None:
        abstract = nn.unbox(jax.eval_shape(lambda k: model.init_params(k, shapes), rng))
        shapes_of = lambda t: jax.tree.map(lambda x: (x.shape, x.dtype), t)  # noqa: E731
        if shapes_of(abstract) == shapes_of(reward_params):
            params = reward_params
    return Trained(Role.CRITIC, model, *make_state(model, tx, partitioner, shapes, rng, params))


def reference(of: Trained) -> Frozen:
    """A frozen copy of the actor's parameters as they are now (its starting point)."""
    params = jax.jit(lambda p: jax.tree.map(jnp.copy, p),
                     out_shardings=of.shardings.params)(of.state.params)
    return Frozen(Role.REFERENCE, of.model, params)


def reward(model: Any, params: Any, partitioner: partitioning.Partitioner, shapes: dict,
           rng: jax.Array) -> Frozen:
    """The frozen reward model, its parameters placed by their logical axes (None: the run
    scores with a reward function instead)."""
    if params is not None:
        params = jax.device_put(params, partitioner.shardings(jax.eval_shape(
            lambda k: model.init_params(k, shapes), rng)))
    return Frozen(Role.REWARD, model, params)
