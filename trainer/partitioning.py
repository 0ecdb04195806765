"""Device mesh (`data`, `fsdp`, `tensor`) and logical-axis rules -> shardings, T5X-style.

Models name every parameter and activation axis logically (`embed`, `mlp`, `activation_batch`, ...).
A `Partitioner` owns the mesh and the rules that map those names to mesh axes, and turns abstract
(boxed) parameter trees into `NamedSharding`s. A mesh axis that does not divide a dimension is
dropped for that dimension (replicated) so tiny models run on any device count; the dry-run summary
reports every such fallback.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, Iterator, Sequence

import flax.linen as nn
import gin
import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

# docs/architecture.md: batch -> (data, fsdp), embed -> fsdp, mlp/heads/kv_heads/vocab -> tensor.
DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", BATCH_AXES),
    ("activation_batch", BATCH_AXES),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("vocab", "tensor"),
    ("activation_mlp", "tensor"),
    ("activation_heads", "tensor"),
    ("activation_vocab", "tensor"),
    ("layers", None),
    ("kv", None),
    ("relpos_buckets", None),
    ("activation_length", None),
    ("activation_embed", None),
    ("activation_kv", None),
)


def resolve_mesh_shape(mesh_shape: Sequence[int], num_devices: int) -> tuple[int, ...]:
    """Fills in a single -1 in `mesh_shape` so that the product equals `num_devices`."""
    shape = [int(s) for s in mesh_shape]
    unknown = [i for i, s in enumerate(shape) if s == -1]
    if len(unknown) > 1 or any(s == 0 or s < -1 for s in shape):
        raise ValueError(f"mesh_shape={tuple(mesh_shape)}: use positive sizes and at most one -1")
    known = math.prod(s for s in shape if s != -1)
    if unknown:
        if num_devices % known:
            raise ValueError(f"mesh_shape={tuple(mesh_shape)} does not divide {num_devices} devices")
        shape[unknown[0]] = num_devices // known
    if math.prod(shape) != num_devices:
        raise ValueError(f"mesh_shape={tuple(shape)} needs {math.prod(shape)} devices, "
                         f"{num_devices} available")
    return tuple(shape)


@gin.configurable
def make_mesh(*, mesh_shape: Sequence[int] = (-1, 1, 1), axis_names: Sequence[str] = MESH_AXES,
              devices: Sequence[Any] | None = None, num_devices: int | None = None) -> Mesh:
    """Builds a mesh over `devices` (default: all global devices, or the first `num_devices`)
    with -1 filled in."""
    devices = list(jax.devices() if devices is None else devices)
    if num_devices is not None:
        if not 0 < num_devices <= len(devices):
            raise ValueError(f"num_devices={num_devices}: {len(devices)} devices available")
        devices = devices[:num_devices]
    shape = resolve_mesh_shape(mesh_shape, len(devices))
    try:
        dev_array = mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True)
    except (ValueError, NotImplementedError, AssertionError):
        dev_array = np.asarray(devices, dtype=object).reshape(shape)
    auto = (jax.sharding.AxisType.Auto,) * len(shape)
    return Mesh(dev_array, tuple(axis_names), axis_types=auto)


def _divisible_spec(spec: P, shape: Sequence[int], mesh: Mesh) -> tuple[P, list[str]]:
    """Drops mesh axes that do not divide their dimension; returns the spec and what was dropped."""
    out, dropped = [], []
    for dim, entry in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
        axes = (entry,) if isinstance(entry, str) else tuple(entry or ())
        kept = []
        for ax in axes:
            size = mesh.shape[ax] * math.prod(mesh.shape[a] for a in kept)
            if dim % size == 0:
                kept.append(ax)
            else:
                dropped.append(f"{ax} (dim {dim})")
        out.append(None if not kept else kept[0] if len(kept) == 1 else tuple(kept))
    return P(*out), dropped


@gin.configurable
class Partitioner:
    """Mesh + logical-axis rules; converts logical annotations into shardings for jit."""

    def __init__(self, *, mesh_shape: Sequence[int] = (-1, 1, 1),
                 logical_axis_rules: Sequence[tuple[str, Any]] = DEFAULT_RULES,
                 extra_rules: Sequence[tuple[str, Any]] = (),
                 devices: Sequence[Any] | None = None, num_devices: int | None = None):
        self.mesh = make_mesh(mesh_shape=mesh_shape, devices=devices, num_devices=num_devices)
        extra = {name for name, _ in extra_rules}
        # Overrides come first: flax uses the first rule that names a logical axis.
        self.rules = tuple(tuple(r) for r in extra_rules) + tuple(
            tuple(r) for r in logical_axis_rules if r[0] not in extra)

    @contextlib.contextmanager
    def activate(self) -> Iterator[None]:
        """Context for tracing models: the mesh and the rules used by `nn.with_logical_constraint`."""
        with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
            yield

    @property
    def batch_sharding(self) -> NamedSharding:
        """Leading (batch) dimension split over the data-parallel axes, the rest replicated."""
        return NamedSharding(self.mesh, P(BATCH_AXES))

    @property
    def replicated(self) -> NamedSharding:
        return NamedSharding(self.mesh, P())

    @property
    def data_parallel_size(self) -> int:
        return math.prod(self.mesh.shape[a] for a in BATCH_AXES)

    def logical_specs(self, boxed_tree: Any) -> Any:
        """PartitionSpecs of logical names (None-filled for unboxed leaves)."""
        return nn.get_partition_spec(boxed_tree)

    def mesh_spec(self, logical_spec: P, shape: Sequence[int]) -> tuple[P, list[str]]:
        """Mesh PartitionSpec for one array, with non-dividing axes dropped."""
        mesh_spec = nn.logical_to_mesh_axes(logical_spec, self.rules)
        return _divisible_spec(mesh_spec, shape, self.mesh)

    def shardings(self, boxed_abstract: Any) -> Any:
        """NamedShardings for a tree of (possibly boxed) abstract arrays."""
        specs = self.logical_specs(boxed_abstract)
        shapes = nn.unbox(boxed_abstract)

        def one(spec, leaf):
            return NamedSharding(self.mesh, self.mesh_spec(spec, leaf.shape)[0])
        return jax.tree.map(one, specs, shapes, is_leaf=lambda x: isinstance(x, P))

    def derived_shardings(self, tree: Any, params_abstract: Any, params_shardings: Any) -> Any:
        """Shardings for e.g. optimizer state, matching leaves to parameters by key-path suffix.

        Leaves shaped like their parameter get its sharding; factored leaves (Adafactor row/column
        statistics: the parameter's shape minus one dim) get the spec minus that dim; the rest
        (counts, scalars) are replicated.
        """
        by_path = {}
        for (path, leaf), sh in zip(jax.tree_util.tree_leaves_with_path(params_abstract),
                                    jax.tree.leaves(params_shardings)):
            by_path[tuple(path)] = (tuple(leaf.shape), sh.spec)

        def one(path, leaf):
            shape = tuple(leaf.shape)
            for start in range(len(path)):
                hit = by_path.get(tuple(path[start:]))
                if hit is None:
                    continue
                pshape, spec = hit
                spec = tuple(spec) + (None,) * (len(pshape) - len(spec))
                if shape == pshape:
                    return NamedSharding(self.mesh, P(*spec))
                for i in range(len(pshape)):
                    if len(shape) == len(pshape) - 1 and pshape[:i] + pshape[i + 1:] == shape:
                        return NamedSharding(self.mesh, P(*(spec[:i] + spec[i + 1:])))
                break
            return self.replicated
        return jax.tree_util.tree_map_with_path(one, tree)

    def summary(self, boxed_abstract: Any) -> list[str]:
        """One line per parameter: path, shape, logical axes -> mesh axes (and any fallback)."""
        specs = self.logical_specs(boxed_abstract)
        shapes = nn.unbox(boxed_abstract)
        lines = []
        for (path, spec), leaf in zip(
                jax.tree_util.tree_leaves_with_path(specs, is_leaf=lambda x: isinstance(x, P)),
                jax.tree.leaves(shapes)):
            mesh_spec, dropped = self.mesh_spec(spec, leaf.shape)
            name = "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path)
            note = f"  [replicated: {', '.join(dropped)}]" if dropped else ""
            lines.append(f"{name:60s} {str(tuple(leaf.shape)):24s} {tuple(spec)} -> "
                         f"{tuple(mesh_spec)}{note}")
        return lines
