"""Mixture-of-Attention (ScatterMoE's MoA, after Zhang et al. 2022): attention heads as experts.

Each token picks top_k of E experts. Expert e owns a query projection W_q[e] (d, h*dh) and an output
projection W_o[e] (h*dh, d); keys and values are shared (W_k, W_v: (d, h*dh)). For token t and its
chosen experts e_1..e_k with gate weights g:
  q_{t,j} = x_t W_q[e_j]                      (h heads of size dh)
  o_{t,j} = attention(q_{t,j}, K, V)           (per head, causal by default)
  y_t     = sum_j g_{t,j} o_{t,j} W_o[e_j]
So each token runs k*h query heads against h shared key/value heads (grouped-query style).

impl "scatter" is ScatterMoE's dataflow (kernels.scatter_matmul): the query projection gathers token
rows inside the kernel and writes queries straight in (token, slot) order, and the output projection
reads those rows, scales by the gates and scatters back to tokens inside the kernel: no permuted
copy of x or of the attention output. impls "grouped" (kernels.grouped_matmul) and "ragged_dot"
(jax.lax.ragged_dot) run the same math with explicit sort/gather/unsort (jaxmoe.dispatch).

  MoA(cfg, rngs=...)(x (B, S, d_model)) -> (y (B, S, d_model), MoEStats)
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from jaxmoe import dispatch
from jaxmoe import router as router_lib
from jaxmoe.config import MoEConfig
from jaxmoe.experts import _param, _weight_init
from jaxmoe.moe import MoEStats, _grouped_matmul_fn, _ragged_dot

MOA_IMPLS = ("scatter", "grouped", "ragged_dot")


@dataclasses.dataclass(frozen=True)
class MoAConfig:
  """Mixture-of-Attention configuration (fields as in MoEConfig where shared).

  d_model: model width. num_heads, head_dim: heads per expert and their size (shared K/V have the
  same). num_experts, top_k: experts and experts per token. causal: causal attention mask.
  """

  d_model: int
  num_heads: int
  head_dim: int
  num_experts: int
  top_k: int = 2
  impl: str = "scatter"
  router: str = "softmax_topk"
  renormalize: bool | None = None
  causal: bool = True
  jitter: float = 0.0
  aux_loss_weight: float = 0.01
  z_loss_weight: float = 0.001
  bias_balancing: bool = False
  backend: str | None = None

  def __post_init__(self):
    for name in ("num_heads", "head_dim"):
      value = getattr(self, name)
      if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"MoAConfig.{name} must be a positive int, got {value!r}")
    if self.impl not in MOA_IMPLS:
      raise ValueError(f"MoAConfig.impl must be one of {MOA_IMPLS}, got {self.impl!r}")
    self.router_config()  # validates the shared fields (d_model, num_experts, top_k, router, ...)

  def router_config(self) -> MoEConfig:
    """The MoEConfig the router and the shared validation read (d_ff = the query width)."""
    try:
      return MoEConfig(
          d_model=self.d_model, d_ff=self.num_heads * self.head_dim, num_experts=self.num_experts,
          top_k=self.top_k, router=self.router, renormalize=self.renormalize, jitter=self.jitter,
          aux_loss_weight=self.aux_loss_weight, z_loss_weight=self.z_loss_weight,
          bias_balancing=self.bias_balancing, backend=self.backend)
    except ValueError as e:
      raise ValueError(str(e).replace("MoEConfig.", "MoAConfig.")) from None


def attention(q: jax.Array, k: jax.Array, v: jax.Array, *, causal: bool) -> jax.Array:
  """q (B, S, k, h, dh), k/v (B, S, h, dh) -> (B, S, k, h, dh); softmax in float32."""
  scale = q.shape[-1] ** -0.5
  s = jnp.einsum("bqjhd,bshd->bjhqs", q, k, preferred_element_type=jnp.float32) * scale
  if causal:
    n = q.shape[1]
    s = jnp.where(jnp.tril(jnp.ones((n, n), bool)), s, -jnp.inf)
  p = jax.nn.softmax(s, axis=-1).astype(v.dtype)
  return jnp.einsum("bjhqs,bshd->bqjhd", p, v, preferred_element_type=jnp.float32).astype(v.dtype)


class MoA(nnx.Module):
  """Mixture-of-Attention layer (see the module docstring).

  Parameters: router (d, E) float32; w_q (E, d, h*dh) ("expert", "embed", "heads");
  w_o (E, h*dh, d) ("expert", "heads", "embed"); w_k, w_v (d, h*dh) ("embed", "heads").
  """

  def __init__(self, config: MoAConfig, *, rngs: nnx.Rngs, dtype=jnp.float32,
               param_dtype=jnp.float32):
    if not isinstance(config, MoAConfig):
      raise ValueError(f"config must be a MoAConfig, got {type(config).__name__}")
    self.config = config
    self.dtype = jnp.dtype(dtype)
    e, d, hd = config.num_experts, config.d_model, config.num_heads * config.head_dim
    self.router = router_lib.Router(config.router_config(), rngs=rngs)
    self.w_q = _param(rngs, _weight_init(-2), (e, d, hd), ("expert", "embed", "heads"), param_dtype)
    self.w_o = _param(rngs, _weight_init(-2), (e, hd, d), ("expert", "heads", "embed"), param_dtype)
    dense = nnx.initializers.variance_scaling(1.0, "fan_in", "truncated_normal")
    self.w_k = _param(rngs, dense, (d, hd), ("embed", "heads"), param_dtype)
    self.w_v = _param(rngs, dense, (d, hd), ("embed", "heads"), param_dtype)

  def __call__(self, x: jax.Array, *, deterministic: bool = True,
               impl: str | None = None) -> tuple[jax.Array, MoEStats]:
    """x (B, S, d_model) -> (y (B, S, d_model) in x's dtype, MoEStats)."""
    cfg = self.config
    impl = cfg.impl if impl is None else impl
    if impl not in MOA_IMPLS:
      raise ValueError(f"impl must be one of {MOA_IMPLS}, got {impl!r}")
    if x.ndim != 3 or x.shape[-1] != cfg.d_model:
      raise ValueError(f"x must have shape (B, S, d_model={cfg.d_model}), got {tuple(x.shape)}")
    b, s, _ = x.shape
    h, dh, k, e = cfg.num_heads, cfg.head_dim, cfg.top_k, cfg.num_experts
    tokens = x.reshape(b * s, cfg.d_model)
    routing = self.router(tokens, deterministic=deterministic)
    xc = tokens.astype(self.dtype)
    w = lambda p: p[...].astype(self.dtype)
    keys = jnp.dot(xc, w(self.w_k), preferred_element_type=jnp.float32).astype(self.dtype)
    vals = jnp.dot(xc, w(self.w_v), preferred_element_type=jnp.float32).astype(self.dtype)
    keys, vals = keys.reshape(b, s, h, dh), vals.reshape(b, s, h, dh)

    if impl == "scatter":
      from kernels import scatter as sm  # imported here: only this impl needs it

      route = sm.sort_slots(routing.indices, e)
      kw = dict(backend=cfg.backend)
      # Token rows gathered in the kernel; queries written in flat (t * k + j) order.
      q = sm.scatter_matmul(xc, w(self.w_q), route, **kw)                      # (T*k, h*dh)
      o = attention(q.reshape(b, s, k, h, dh), keys, vals, causal=cfg.causal)
      # Flat rows in, gate-scaled and summed per token on the way out.
      y = sm.scatter_matmul(o.reshape(b * s * k, h * dh), w(self.w_o), route,
                            gates=routing.weights.astype(jnp.float32), **kw)
    else:
      matmul = _ragged_dot if impl == "ragged_dot" else _grouped_matmul_fn(cfg.backend)
      disp = dispatch.sort_by_expert(routing.indices, e)
      # Expert query projections on expert-sorted rows, back to (token, slot) order for attention.
      q_sorted = matmul(dispatch.gather_sorted(xc, disp), w(self.w_q), disp.group_sizes)
      q = dispatch.unsort(q_sorted, disp, k).reshape(b, s, k, h, dh)
      o = attention(q, keys, vals, causal=cfg.causal)
      # Flat (t*k + j) order -> expert-sorted rows for the expert output projections.
      o_sorted = jnp.take(o.reshape(b * s * k, h * dh), disp.order, axis=0)
      y_sorted = matmul(o_sorted, w(self.w_o), disp.group_sizes)
      y = dispatch.combine_sorted(y_sorted, disp, routing.weights)

    aux = router_lib.load_balancing_loss(routing.probs, routing.indices, e)
    z = router_lib.router_z_loss(routing.logits)
    stats = MoEStats(
        aux_loss=aux, z_loss=z, loss=cfg.aux_loss_weight * aux + cfg.z_loss_weight * z,
        tokens_per_expert=jax.lax.stop_gradient(router_lib.tokens_per_expert(routing.indices, e)),
        dropped_fraction=jnp.zeros((), jnp.float32))
    return y.astype(x.dtype).reshape(x.shape), stats

  def update_router_bias(self, tokens_per_expert: jax.Array, rate: float = 1e-3) -> None:
    """Auxiliary-loss-free balancing step; see MoE.update_router_bias."""
    self.router.update_bias(tokens_per_expert, rate)
