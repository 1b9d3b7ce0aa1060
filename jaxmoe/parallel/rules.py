"""Logical-axis sharding rules: parameters and activations name their axes ("expert", "embed",
"mlp", "batch", ...), and `RULES` maps those names to mesh axes, so the model code never names a
mesh axis and one definition runs on 1 device, 8 devices or many hosts.

  shard_model(model, mesh)                                         # parameters placed by the rules
  x = jax.device_put(x, batch_sharding(mesh))                      # (B, ...) split over the batch axes

Parameters carry logical names through nnx.with_partitioning (jaxmoe/experts.py: "expert",
"embed", "mlp"; the router ("embed", None)).
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

# logical axis name -> mesh axis (str), several mesh axes (tuple), or None (replicated).
RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("batch", ("data", "expert")),   # tokens / sequences outside the experts
    ("expert", "expert"),            # the stacked expert dimension E
    ("mlp", "tensor"),               # expert (and shared-expert) hidden width d_ff
    ("ffn", "tensor"),               # alias of "mlp"
    ("heads", "tensor"),             # attention heads, for models that annotate them
    ("embed", None),                 # d_model: replicated
    ("vocab", None),
    ("seq", None),
)

# Metadata keys under which flax has stored logical names (0.12 uses "out_sharding").
_NAME_KEYS = ("out_sharding", "sharding_names", "sharding")


def logical_to_spec(names: Sequence[str | None] | None, mesh: Mesh | None = None,
                    rules: Sequence[tuple[str, Any]] = RULES) -> P:
  """Logical axis names (one per array dimension) -> PartitionSpec of mesh axes.

  Unknown names and None are replicated; mesh axes the mesh lacks (or of size 1) are dropped, so
  the same rules serve every mesh. ValueError if two dimensions would use the same mesh axis.
  """
  if names is None:
    return P()
  table = dict(rules)
  spec, used = [], set()
  for name in names:
    target = table.get(name) if name is not None else None
    axes = (target,) if isinstance(target, str) else tuple(target or ())
    if mesh is not None:
      axes = tuple(a for a in axes if a in mesh.shape and mesh.shape[a] > 1)
    for a in axes:
      if a in used:
        raise ValueError(f"logical names {tuple(names)} map mesh axis {a!r} to two dimensions "
                         f"(rules: {dict(rules)})")
      used.add(a)
    spec.append(None if not axes else axes[0] if len(axes) == 1 else axes)
  while spec and spec[-1] is None:
    spec.pop()
  return P(*spec)


def logical_names(variable: nnx.Variable) -> tuple[str | None, ...] | None:
  """The logical axis names a parameter was declared with (nnx.with_partitioning), or None."""
  meta = variable.get_metadata() if hasattr(variable, "get_metadata") else {}
  for key in _NAME_KEYS:
    names = meta.get(key)
    if isinstance(names, (tuple, list)) and all(n is None or isinstance(n, str) for n in names):
      return tuple(names)
  return None


def _is_var(x) -> bool:
  return isinstance(x, nnx.Variable)


def tree_shardings(tree: Any, mesh: Mesh, rules: Sequence[tuple[str, Any]] = RULES) -> Any:
  """NamedShardings for every array of `tree` (an nnx.State, a params/optimizer-state pytree,
  or any pytree), same structure as the tree.

  nnx.Variable leaves (Params, and the optimizer moments optax builds from them, which keep the
  metadata) are sharded by their logical names through `rules`; everything else (step counters,
  unannotated layers such as nnx.Linear) is replicated. ValueError naming the variable if a
  dimension is not divisible by its mesh axes.
  """
  def one(path, leaf):
    if _is_var(leaf):
      names = logical_names(leaf)
      spec = logical_to_spec(names, mesh, rules)
      value = leaf.get_value() if hasattr(leaf, "get_value") else leaf[...]
      shape = tuple(getattr(value, "shape", np.shape(value)))   # arrays or ShapeDtypeStructs
      _check_divisible(jax.tree_util.keystr(path), shape, spec, mesh)
      return jax.tree.map(lambda _: NamedSharding(mesh, spec), leaf)
    return NamedSharding(mesh, P())

  return jax.tree_util.tree_map_with_path(one, tree, is_leaf=_is_var)


def tree_specs(tree: Any, mesh: Mesh, rules: Sequence[tuple[str, Any]] = RULES) -> Any:
  """Like tree_shardings, with PartitionSpecs (for shard_map specs or jit out_shardings)."""
  return jax.tree.map(lambda s: s.spec, tree_shardings(tree, mesh, rules))


def _check_divisible(where: str, shape: tuple[int, ...], spec: P, mesh: Mesh) -> None:
  for dim, (size, axes) in enumerate(zip(shape, tuple(spec) + (None,) * len(shape))):
    if axes is None:
      continue
    axes = (axes,) if isinstance(axes, str) else axes
    n = int(np.prod([mesh.shape[a] for a in axes]))
    if size % n:
      raise ValueError(f"{where}: dimension {dim} of shape {shape} is split over mesh axes {axes} "
                       f"({n} ways) and must be divisible by {n}, got {size}")


def shard_tree(tree: Any, mesh: Mesh, rules: Sequence[tuple[str, Any]] = RULES) -> Any:
  """device_put every array of `tree` by tree_shardings (works on several hosts: each process
  passes the same full values and keeps its addressable shards)."""
  return jax.device_put(tree, tree_shardings(tree, mesh, rules))


def shard_model(model: nnx.Module, mesh: Mesh, rules: Sequence[tuple[str, Any]] = RULES) -> None:
  """Places the model's variables on `mesh` by their logical names, in place."""
  state = nnx.state(model)
  nnx.update(model, shard_tree(state, mesh, rules))


def batch_sharding(mesh: Mesh, ndim: int = 2, rules: Sequence[tuple[str, Any]] = RULES) -> NamedSharding:
  """Sharding of a (B, ...) batch of `ndim` dimensions: B split over the "batch" rule's axes."""
  return NamedSharding(mesh, logical_to_spec(("batch",) + (None,) * (ndim - 1), mesh, rules))


def constrain(x: jax.Array, names: Sequence[str | None], mesh: Mesh | None = None,
              rules: Sequence[tuple[str, Any]] = RULES) -> jax.Array:
  """jax.lax.with_sharding_constraint of x by logical names (one per dimension of x).

  mesh None: the ambient mesh (jax.set_mesh); without one, x is returned unchanged, so model
  code can call it unconditionally.
  """
  if len(names) != x.ndim:
    raise ValueError(f"names must have one entry per dimension of x (ndim={x.ndim}), got {names}")
  if mesh is None:
    mesh = jax.sharding.get_abstract_mesh()
    if mesh is None or mesh.empty:
      return x
    return jax.lax.with_sharding_constraint(x, logical_to_spec(names, mesh, rules))
  return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, logical_to_spec(names, mesh, rules)))
