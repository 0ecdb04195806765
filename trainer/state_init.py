"""One way to build a sharded train state (T5X's TrainStateInitializer idea).

`StateInitializer` knows the abstract state of a model + optimizer on a partitioner (shapes,
logical-axis shardings, nothing allocated) and builds the real one three ways:
- `init()`: fresh parameters, created directly sharded (never whole on one device);
- `restore(checkpointer)`: the newest usable checkpoint (resuming a run);
- `from_params(params)`: given parameters (another run's checkpoint, an SFT policy, a reward
  model's backbone under `subtree`) with a fresh optimizer state and step 0.
Pretraining, SFT, reward-model and DPO runs (trainer/train.py), warm starts (rl/warm_start.py) and
PPO's actor and critic (rl/roles.py) all build their state here.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Mapping

import flax.linen as nn
import jax
from jax.sharding import NamedSharding, PartitionSpec

from zhchat.trainer import checkpoints as ckpt_lib
from zhchat.trainer import partitioning
from zhchat.trainer import train_state as ts

# Compiled initialisers, shared across StateInitializers of the same model, shapes and shardings:
# repeated runs in one process (tests, SFT/RL stages) do not compile again.
_INIT_CACHE: dict[Any, Callable] = {}


class StateInitializer:
    """The abstract and real train state of `model` + `tx` on `partitioner`.

    `batch_shapes` are the per-microbatch feature shapes the parameters are initialised from;
    `rng` is the initialisation key (the trainer passes its seed's init key)."""

    def __init__(self, model: Any, tx: Any, partitioner: partitioning.Partitioner,
                 batch_shapes: Mapping[str, tuple], rng: jax.Array):
        self.model, self.tx, self.partitioner, self.rng = model, tx, partitioner, rng
        self.batch_shapes = dict(batch_shapes)
        with partitioner.activate():
            self.boxed = jax.eval_shape(self._init_params, rng)
            abstract = jax.eval_shape(self._init_state, rng)
        params_sh = partitioner.shardings(self.boxed)
        opt_sh = partitioner.derived_shardings(abstract.opt_state, nn.unbox(self.boxed), params_sh)
        self.shardings = ts.TrainState(step=partitioner.replicated, params=params_sh,
                                       opt_state=opt_sh, tx=tx)
        self.abstract = ckpt_lib.abstract_with_shardings(abstract, self.shardings)

    def _init_params(self, key: jax.Array) -> Any:
        return self.model.init_params(key, self.batch_shapes)

    def _init_state(self, key: jax.Array) -> ts.TrainState:
        return ts.TrainState.create(nn.unbox(self._init_params(key)), self.tx)

    @property
    def num_params(self) -> int:
        return sum(math.prod(x.shape) for x in jax.tree.leaves(nn.unbox(self.boxed)))

    def init(self) -> ts.TrainState:
        """A fresh state from `rng`, each array created on its own shards."""
        leaves, treedef = jax.tree.flatten(self.shardings)
        key = (self.model, tuple(sorted(self.batch_shapes.items())), treedef, tuple(leaves))
        if key not in _INIT_CACHE:
            if len(_INIT_CACHE) > 8:
                _INIT_CACHE.clear()
            _INIT_CACHE[key] = jax.jit(self._init_state, out_shardings=self.shardings)
        with self.partitioner.activate():
            return _INIT_CACHE[key](self.rng)

    def restore(self, checkpointer: ckpt_lib.Checkpointer) -> tuple[ts.TrainState, Any, int]:
        """(state, data position, step) of the newest usable checkpoint, on this mesh."""
        with self.partitioner.activate():
            return checkpointer.restore(self.abstract)

    def from_params(self, params: Any, *, subtree: str | None = None) -> ts.TrainState:
        """A step-0 state holding `params` (an unboxed tree; placed under `subtree` of freshly
        initialised parameters when given) and a fresh optimizer state. Shapes must match."""
        with self.partitioner.activate():
            target = self.abstract.params[subtree] if subtree else self.abstract.params
            shape = lambda t: jax.tree.map(lambda x: (tuple(x.shape), str(x.dtype)), t)  # noqa: E731
            if shape(target) != shape(params):
                raise ValueError(
                    f"the given parameters do not match {type(self.model).__name__}"
                    f"{'[' + subtree + ']' if subtree else ''} (different sizes or vocabulary)")
            if subtree:
                fresh = jax.jit(lambda k: nn.unbox(self._init_params(k)),
                                out_shardings=self.shardings.params)(self.rng)
                params = dict(fresh, **{subtree: params})
            params = jax.device_put(params, self.shardings.params)
            return jax.jit(lambda p: ts.TrainState.create(p, self.tx),
                           out_shardings=self.shardings)(params)

    def params_from_checkpoint(self, directory: str, *, step: int | None = None
                               ) -> tuple[Any, int]:
        """(params, step) of another run's checkpoint, on this state's parameter shardings."""
        with self.partitioner.activate():
            return ckpt_lib.restore_params_only(directory, self.abstract.params, step)


def abstract_params(model: Any, partitioner: partitioning.Partitioner,
                    batch_shapes: Mapping[str, tuple]) -> Any:
    """`jax.ShapeDtypeStruct`s of `model`'s parameters carrying their shardings, for restoring
    parameters alone (frozen reference and reward models, inference). Safe inside an active
    partitioner: the boxed shapes are read without `nn.unbox`, which would apply constraints."""
    boxed = jax.eval_shape(lambda k: model.init_params(k, dict(batch_shapes)), jax.random.key(0))
    is_box = lambda x: isinstance(x, nn.Partitioned)  # noqa: E731
    specs = nn.get_partition_spec(boxed)
    shapes = jax.tree.map(lambda x: x.value if is_box(x) else x, boxed, is_leaf=is_box)
    return jax.tree.map(
        lambda spec, x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=NamedSharding(
            partitioner.mesh, partitioner.mesh_spec(spec, x.shape)[0])),
        specs, shapes, is_leaf=lambda x: isinstance(x, PartitionSpec))
