"""Expert parameters (stacked (E, ...) arrays with logical axis names) and their application.

Routed experts, E of them, each an MLP  act(x W_in + b_in) W_out + b_out  or a GLU
act(x W_gate) * (x W_up) W_out. Weights are stored stacked so a grouped matmul runs all experts in
one kernel, and carry logical axis names ("expert", "embed", "mlp") that the sharding rules map to
mesh axes:
  w_gate, w_up:        (E, d_model, d_ff)   ("expert", "embed", "mlp")   (a plain MLP has only
                                            w_gate, its input projection)
  w_out:               (E, d_ff, d_model)   ("expert", "mlp", "embed")
  b_in / b_gate, b_up: (E, d_ff) ("expert", "mlp");  b_out: (E, d_model) ("expert", "embed")
Shared experts are one dense MLP/GLU of width num_shared_experts * shared_d_ff, ("embed", "mlp").
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import nnx

from jaxmoe.config import MoEConfig
from kernels.activations import ACTIVATIONS
from kernels.hidden import hidden, hidden_packed

# (E, M, K) x (E, K, N) on expert-sorted rows: matmul(lhs (M, K), rhs (E, K, N), group_sizes) -> (M, N)
GroupedMatmul = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]

# (M, d) rows, W_in (E, d, f), W_out (E, f, d), group_sizes -> act(x W_in) W_out, one op.
FusedMlp = Callable[[jax.Array, jax.Array, jax.Array, jax.Array], jax.Array]
# (M, d) rows, W_gate, W_up (E, d, f), W_out, group_sizes -> (act(x W_gate) * x W_up) W_out.
FusedGlu = Callable[[jax.Array, jax.Array, jax.Array, jax.Array, jax.Array], jax.Array]

# kernels.activations' functions: the fused GLU kernels recognize them (by identity) and compile
# the same nonlinearity in.
_ACT_FNS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "swiglu": ACTIVATIONS["silu"],
    "geglu": ACTIVATIONS["gelu"],
    "geglu_tanh": ACTIVATIONS["gelu_tanh"],
    "reglu": ACTIVATIONS["relu"],
    "gelu": ACTIVATIONS["gelu"],
    "gelu_tanh": ACTIVATIONS["gelu_tanh"],
    "relu": ACTIVATIONS["relu"],
    "silu": ACTIVATIONS["silu"],
}


def activation_fn(name: str) -> Callable[[jax.Array], jax.Array]:
  """The elementwise nonlinearity of an activation name (the gate's, for GLUs)."""
  if name not in _ACT_FNS:
    raise ValueError(f"activation must be one of {tuple(_ACT_FNS)}, got {name!r}")
  return _ACT_FNS[name]


def _weight_init(fan_in_axis: int):
  # Fan-in scaling per expert: the leading expert axis is a batch axis, not a fan.
  return nnx.initializers.variance_scaling(
      1.0, "fan_in", "truncated_normal", in_axis=fan_in_axis, out_axis=-1, batch_axis=(0,))


def _param(rngs, init, shape, names, dtype) -> nnx.Param:
  init = nnx.with_partitioning(init, names, eager_sharding=False)
  return nnx.Param(init(rngs.params(), shape, dtype))


# project(which, lhs, out_dtype) -> lhs @ W_which (+ b_which), which in ("gate", "up", "out"): one
# projection of the experts in whatever layout the caller holds them (grouped rows, (E, C, d)
# buffers, a dense shared MLP, a tensor-parallel slice).
Projection = Callable[[str, jax.Array, Any], jax.Array]


def expert_mlp(x: jax.Array, project: Projection, config: MoEConfig, dtype,
               out_dtype=None, packed: bool = False) -> jax.Array:
  """The experts' projection -> activation -> projection, in every layout and on every path:
  act(x W_gate + b_gate) [* (x W_up + b_up)] W_out + b_out.

  The gate and up projections come out in the compute dtype `dtype`; the activation runs in
  float32 on them and is cast back to `dtype` for the output projection (its backward pass
  recomputes the float32 math from the 16-bit gate and up: kernels.hidden). The output projection
  is asked for `out_dtype` (default `dtype`; the tensor-parallel slice asks float32 partial sums).
  Every expert path calls this one function, so their numerics cannot drift apart.

  packed: a GLU's gate and up projections as one projection "gate_up" of width 2f (the layouts
  whose matmul takes the weight pair as one product: kernels.common.weight_parts), with
  kernels.hidden.hidden_packed on its output; the same values, fewer passes over the rows.
  """
  act = activation_fn(config.activation)
  if packed and config.is_glu:
    h = hidden_packed(act, project("gate_up", x, dtype)).astype(dtype)
    return project("out", h, dtype if out_dtype is None else out_dtype)
  gate = project("gate", x, dtype)
  up = project("up", x, dtype) if config.is_glu else None
  h = hidden(act, gate, up).astype(dtype)
  return project("out", h, dtype if out_dtype is None else out_dtype)


# Projection name -> (weight, bias) attribute names of the experts' modules.
PROJECTIONS = {"gate": ("w_gate", "b_gate"), "up": ("w_up", "b_up"), "out": ("w_out", "b_out")}


def _weights(module: nnx.Module, which: str):
  """(weight, bias or None) Params of projection `which` of RoutedExperts / SharedExperts."""
  w, b = PROJECTIONS[which]
  return getattr(module, w), getattr(module, b)


class RoutedExperts(nnx.Module):
  """E experts with stacked weights; applied to expert-sorted rows or to (E, C, d) buffers."""

  def __init__(self, config: MoEConfig, *, rngs: nnx.Rngs, dtype=jnp.float32,
               param_dtype=jnp.float32):
    self.config = config
    self.dtype = dtype
    e, d, f = config.num_experts, config.d_model, config.d_ff
    in_names, out_names = ("expert", "embed", "mlp"), ("expert", "mlp", "embed")
    if config.is_glu:
      self.w_gate = _param(rngs, _weight_init(-2), (e, d, f), in_names, param_dtype)
      self.w_up = _param(rngs, _weight_init(-2), (e, d, f), in_names, param_dtype)
    else:
      self.w_gate = _param(rngs, _weight_init(-2), (e, d, f), in_names, param_dtype)
      self.w_up = None
    self.w_out = _param(rngs, _weight_init(-2), (e, f, d), out_names, param_dtype)
    if config.use_bias:
      zeros = nnx.initializers.zeros
      self.b_gate = _param(rngs, zeros, (e, f), ("expert", "mlp"), param_dtype)
      self.b_up = _param(rngs, zeros, (e, f), ("expert", "mlp"), param_dtype) if config.is_glu \
          else None
      self.b_out = _param(rngs, zeros, (e, d), ("expert", "embed"), param_dtype)
    else:
      self.b_gate = self.b_up = self.b_out = None

  def _w(self, p):
    return None if p is None else p[...].astype(self.dtype)

  def apply_sorted(self, x: jax.Array, group_sizes: jax.Array, expert: jax.Array,
                   matmul: GroupedMatmul, packed: bool = False,
                   fused_mlp: FusedMlp | None = None,
                   fused_glu: FusedGlu | None = None) -> jax.Array:
    """x (M, d) rows sorted by expert, group_sizes (E,), expert (M,) -> (M, d) expert outputs.

    packed: matmul takes a tuple of weights as one product (kernels.grouped_matmul does), so a
    GLU's gate and up run as one product of width 2f (expert_mlp's `packed`).
    fused_mlp: runs a plain MLP without biases as one op (kernels.grouped_mlp: the activation in
    the products' epilogues); fused_glu likewise a GLU without biases (kernels.grouped_glu).
    Otherwise (and with biases) the separate products."""
    if self.b_gate is None:
      if fused_mlp is not None and not self.config.is_glu:
        return fused_mlp(x.astype(self.dtype), self._w(self.w_gate), self._w(self.w_out),
                         group_sizes)
      if fused_glu is not None and self.config.is_glu:
        return fused_glu(x.astype(self.dtype), self._w(self.w_gate), self._w(self.w_up),
                         self._w(self.w_out), group_sizes)
    def project(which, lhs, out_dtype):   # (out_dtype is the compute dtype here)
      if which == "gate_up":
        y = matmul(lhs, (self._w(self.w_gate), self._w(self.w_up)), group_sizes)
        if self.b_gate is not None:
          b = jnp.concatenate([self._w(self.b_gate), self._w(self.b_up)], axis=-1)
          y = y + jnp.take(b, expert, axis=0)
        return y
      w, b = _weights(self, which)
      y = matmul(lhs, self._w(w), group_sizes)
      if b is not None:
        y = y + jnp.take(self._w(b), expert, axis=0)
      return y

    return expert_mlp(x.astype(self.dtype), project, self.config, self.dtype, packed=packed)

  def apply_scatter(self, x: jax.Array, indices: jax.Array, weights: jax.Array) -> jax.Array:
    """x (T, d), indices/weights (T, k) -> (T, d) combined outputs via ScatterMoE.

    No biases (MoEConfig.check_impl refuses use_bias with this impl).
    """
    from kernels import scatter  # imported here: only this impl needs it

    cfg = self.config
    routing = scatter.sort_slots(indices, cfg.num_experts)
    x = x.astype(self.dtype)
    gates = weights.astype(jnp.float32)  # combine weights stay float32, as in the other impls
    kw = dict(activation=activation_fn(cfg.activation), backend=cfg.backend)
    if cfg.is_glu:
      # fuse_glu: the fused GLU kernels forward and backward where the backend has them (as
      # the grouped impl's fuse_glu runs its epilogues only where the backend has them); else
      # scatter_glu's default path.
      backend = scatter.GLU_BACKENDS.get(scatter.GLU_BACKENDS.validate(cfg.backend))
      fused = True if cfg.fuse_glu and backend.fn is not None else None
      return scatter.scatter_glu(x, self._w(self.w_gate), self._w(self.w_up),
                                 self._w(self.w_out), routing, gates, fused=fused, **kw)
    return scatter.scatter_mlp(x, self._w(self.w_gate), self._w(self.w_out), routing, gates, **kw)

  def apply_blocksparse(self, x: jax.Array, indices: jax.Array, weights: jax.Array) -> jax.Array:
    """x (T, d), indices/weights (T, k) -> (T, d) combined outputs via MegaBlocks dMoE.

    No biases (MoEConfig.check_impl refuses use_bias with this impl).
    """
    from kernels.blocksparse import dmoe_mlp  # imported here: only this impl needs it

    cfg = self.config
    return dmoe_mlp(x.astype(self.dtype), indices, weights, self._w(self.w_gate),
                    self._w(self.w_out), self._w(self.w_up), activation=activation_fn(cfg.activation),
                    block_size=cfg.block_size, backend=cfg.backend)

  def apply_batched(self, x: jax.Array) -> jax.Array:
    """x (E, C, d) per-expert buffers -> (E, C, d): a dense batched matmul (capacity baseline)."""
    def project(which, lhs, out_dtype):
      w, b = _weights(self, which)
      y = jnp.einsum("ecd,edf->ecf", lhs, self._w(w), preferred_element_type=jnp.float32)
      y = y.astype(out_dtype)
      if b is not None:
        y = y + self._w(b)[:, None, :]
      return y

    return expert_mlp(x.astype(self.dtype), project, self.config, self.dtype)


class SharedExperts(nnx.Module):
  """Always-on experts, fused into one dense MLP/GLU of width config.shared_width."""

  def __init__(self, config: MoEConfig, *, rngs: nnx.Rngs, dtype=jnp.float32,
               param_dtype=jnp.float32):
    self.config = config
    self.dtype = dtype
    d, s = config.d_model, config.shared_width
    init = nnx.initializers.variance_scaling(1.0, "fan_in", "truncated_normal")
    self.w_gate = _param(rngs, init, (d, s), ("embed", "mlp"), param_dtype)
    self.w_up = _param(rngs, init, (d, s), ("embed", "mlp"), param_dtype) if config.is_glu else None
    self.w_out = _param(rngs, init, (s, d), ("mlp", "embed"), param_dtype)
    if config.use_bias:
      zeros = nnx.initializers.zeros
      self.b_gate = _param(rngs, zeros, (s,), ("mlp",), param_dtype)
      self.b_up = _param(rngs, zeros, (s,), ("mlp",), param_dtype) if config.is_glu else None
      self.b_out = _param(rngs, zeros, (d,), ("embed",), param_dtype)
    else:
      self.b_gate = self.b_up = self.b_out = None

  def __call__(self, x: jax.Array) -> jax.Array:
    """x (T, d) -> (T, d)."""
    def project(which, lhs, out_dtype):
      w, b = _weights(self, which)
      y = jnp.dot(lhs, w[...].astype(self.dtype), preferred_element_type=jnp.float32)
      y = y.astype(out_dtype)
      if b is not None:
        y = y + b[...].astype(self.dtype)
      return y

    return expert_mlp(x.astype(self.dtype), project, self.config, self.dtype)
