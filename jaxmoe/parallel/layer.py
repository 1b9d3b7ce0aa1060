"""Expert- and tensor-parallel routed experts (DeepSpeed-TED, arXiv 2303.06318) in a `shard_map`.

Layout (mesh axes of jaxmoe.parallel.mesh): tokens are split over every mesh axis except "tensor"
("data", "expert"); tensor ranks hold the same tokens. Expert weights (E, d, f) are split over
"expert" on E and over "tensor" on d_ff; the router stays replicated and runs per device in its
own shard_map (`run_router`); its outputs are global arrays, so the layer's statistics are computed
exactly as on one device.

Per device (T_l local tokens, k slots, E experts, EP expert ranks of E_l = E / EP experts, TP tensor
ranks), `routed_experts` runs:

  1. [duplicate token dropping, TP > 1] keep only this tensor rank's 1/TP of the tokens;
  2. sort the T_s * k (token, slot) pairs by expert (jaxmoe.dispatch), gather their rows;
  3. exchange the per-expert counts (all-gather over "expert": (EP, E) int32, tiny);
  4. all-to-all the rows to the ranks that own their experts:
       padded: a (EP, C, d) buffer, C rows per (source, destination) pair. The default C is
         T_s * min(k, E_l), the most rows a source can send one destination (top-k experts are
         distinct): nothing is ever dropped. A smaller `capacity_factor` drops overflow rows
         (counted in dropped_fraction), like the capacity baseline.
       ragged: jax.lax.ragged_all_to_all of the exact rows into a buffer of EP * T_s * min(k, E_l)
         rows (the same dropless bound); only real rows travel. Not implemented on XLA:CPU
         (jax 0.11): GPU only. "ragged_emulated" runs the same offsets through
         `ragged_all_to_all_emulated` (padded all_to_all + scatter) so CPU tests check them.
  5. [duplicate token dropping] all-gather the received rows over "tensor";
  6. sort the received rows by local expert and run the local experts with the project's grouped
     matmul (kernels.grouped_matmul: Pallas on GPU) or jax.lax.ragged_dot; the hidden width is the
     tensor rank's d_ff / TP slice (first matmul column-split, second row-split), so the output is a
     partial sum: one psum over "tensor" (a psum_scatter with duplicate token dropping, which also
     hands each tensor rank back its own rows). The receive buffer is sized for the worst case; a
     lax.cond computes on a smaller prefix of the sorted rows when the real ones fit
     (compute_capacity_factor), on all of it otherwise: no drop either way;
  7. all-to-all the outputs back, un-sort and combine with the gate weights;
  8. [duplicate token dropping] all-gather the combined tokens over "tensor".

Communication-aware activation checkpointing (remat="comm_aware") wraps steps 2-8 in
jax.checkpoint with a policy that saves only the named communication results
(`COMM_NAMES`): the backward pass recomputes the expert matmuls but not the all-to-alls.
remat="full" recomputes everything (communication included); remat="none" saves everything.

The MoE layer reaches these through its ParallelConfig, the object that implements the layer's
jaxmoe.moe.ExpertParallel protocol: the layer only calls its methods, so no layer module imports
jaxmoe.parallel. (ParallelConfig lives here rather than in jaxmoe.config beside the other frozen
configs: it holds a live jax.sharding.Mesh, devices rather than plain values a checkpoint could
save, and its methods run this module's program.)

  pcfg = ParallelConfig(mesh, a2a="padded", duplicate_token_dropping=True, remat="comm_aware")
  set_parallel(model, pcfg)           # every MoE layer in `model` now runs expert-parallel
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.ad_checkpoint import checkpoint_name
from jax.sharding import Mesh, PartitionSpec as P

from jaxmoe import dispatch
from jaxmoe.config import A2A_MODES, MoEConfig
from jaxmoe.experts import RoutedExperts
from jaxmoe.moe import MoE
from jaxmoe.parallel import collectives, fit
from jaxmoe.parallel.local_experts import expert_ids, local_experts, matmul_fn
from jaxmoe.parallel.remat import REMAT_MODES, comm_aware_policy, rematerialized
from jaxmoe.router import Router, RouterOutput


@dataclasses.dataclass(frozen=True)
class ParallelConfig:
  """How the MoE layer runs on a mesh (hashable: it is a static attribute of the layer).

  Attributes:
    mesh: a Mesh with axes among ("data", "expert", "tensor") (jaxmoe.parallel.make_mesh); a
      missing axis counts as size 1. Tokens are split over all axes but "tensor".
    a2a: "padded" (jax.lax.all_to_all of a padded buffer; runs everywhere) or "ragged"
      (jax.lax.ragged_all_to_all; GPU/TPU only, XLA:CPU lacks it), or "ragged_emulated": the
      ragged path's bookkeeping with the collective emulated by a padded all_to_all
      (`ragged_all_to_all_emulated`): runs everywhere; how CPU tests check the ragged path.
    capacity_factor: None (default): dropless. A number > 0 ("padded" only): rows per
      (source, destination) C = ceil(T_s * k / EP * capacity_factor), capped at the dropless bound;
      overflow rows are dropped and counted in MoEStats.dropped_fraction.
    duplicate_token_dropping: with tensor > 1, each tensor rank sends only its 1/TP of the tokens
      through the all-to-all; they are all-gathered after (TED). Changes no numbers.
    remat: "none", "comm_aware" (recompute expert compute, keep the communication results) or
      "full" (jax.checkpoint of everything, communication included).
    compute_capacity_factor: the local experts' fast path, never a drop. The received buffer has
      the static worst-case size (every token of every source routed here), EP times the balanced
      load T_s * k; computing on all of it would spend time on padding (the kernels zero-fill rows
      past the real ones, the activation runs on every row). With a factor f, a lax.cond runs the
      experts on the first ceil(f * balanced load) expert-sorted rows when all received rows fit
      there, and on the whole buffer otherwise: exact either way. None: always the whole buffer.
    a2a_capacity_factor: the dropless padded all-to-all's fast path, never a drop (a2a="padded",
      capacity_factor None). The dropless bound pads every (source, destination) pair to T_s *
      min(k, E_l) rows, EP times the balanced load, and every row-proportional step (the
      exchange, the gathers, the activation) pays for the padding. With a factor f, a lax.cond
      exchanges C_f = ceil(f * T_s * k / EP) rows per pair when no pair sends more (the counts are
      exchanged first), the dropless bound otherwise: exact either way. None: always the bound.
    skip_expert_compute: benchmark hook: replace the expert matmuls by the identity, so a timing
      measures the communication and bookkeeping alone. Wrong numbers by design.
  """

  mesh: Mesh
  a2a: str = "padded"
  capacity_factor: float | None = None
  duplicate_token_dropping: bool = True
  remat: str = "none"
  compute_capacity_factor: float | None = 2.0
  a2a_capacity_factor: float | None = 1.25
  skip_expert_compute: bool = False

  def __post_init__(self):
    if not isinstance(self.mesh, Mesh):
      raise ValueError(f"ParallelConfig.mesh must be a jax.sharding.Mesh, got "
                       f"{type(self.mesh).__name__}")
    unknown = [a for a in self.mesh.axis_names if a not in ("data", "expert", "tensor")]
    if unknown:
      raise ValueError(f"ParallelConfig.mesh axes must be among ('data', 'expert', 'tensor'), got "
                       f"{tuple(self.mesh.axis_names)}")
    if self.a2a not in A2A_MODES:
      raise ValueError(f"ParallelConfig.a2a must be one of {A2A_MODES}, got {self.a2a!r}")
    if self.remat not in REMAT_MODES:
      raise ValueError(f"ParallelConfig.remat must be one of {REMAT_MODES}, got {self.remat!r}")
    if self.capacity_factor is not None:
      cf = self.capacity_factor
      if not isinstance(cf, (int, float)) or isinstance(cf, bool) or not math.isfinite(cf) or cf <= 0:
        raise ValueError(f"ParallelConfig.capacity_factor must be None (dropless) or a finite "
                         f"number > 0, got {cf!r}")
      if self.a2a != "padded":
        raise ValueError(f"ParallelConfig.capacity_factor needs a2a='padded' (the ragged path is "
                         f"dropless only), got a2a={self.a2a!r}")
    ccf = self.compute_capacity_factor
    if ccf is not None and (not isinstance(ccf, (int, float)) or isinstance(ccf, bool)
                            or not math.isfinite(ccf) or ccf <= 0):
      raise ValueError(f"ParallelConfig.compute_capacity_factor must be None or a finite number "
                       f"> 0, got {ccf!r}")
    acf = self.a2a_capacity_factor
    if acf is not None and (not isinstance(acf, (int, float)) or isinstance(acf, bool)
                            or not math.isfinite(acf) or acf < 1):
      raise ValueError(f"ParallelConfig.a2a_capacity_factor must be None or a finite number "
                       f">= 1, got {acf!r}")
    for name in ("duplicate_token_dropping", "skip_expert_compute"):
      if not isinstance(getattr(self, name), bool):
        raise ValueError(f"ParallelConfig.{name} must be a bool, got {getattr(self, name)!r}")

  def axis_size(self, name: str) -> int:
    return int(self.mesh.shape.get(name, 1))

  @property
  def ep(self) -> int:
    return self.axis_size("expert")

  @property
  def tp(self) -> int:
    return self.axis_size("tensor")

  @property
  def token_axes(self) -> tuple[str, ...]:
    """Mesh axes the tokens are split over (all but "tensor", in mesh order)."""
    return tuple(a for a in self.mesh.axis_names if a != "tensor")

  @property
  def token_shards(self) -> int:
    return int(np.prod([self.mesh.shape[a] for a in self.token_axes]))

  def check_layer(self, config: MoEConfig, num_tokens: int | None = None,
                  impl: str | None = None) -> None:
    """ValueError unless an MoE layer of `config` runs on this mesh (jaxmoe.parallel.fit: E
    divisible by expert, d_ff by tensor, num_tokens by the token shards, and by tensor too with
    duplicate token dropping; impl with an expert-parallel version). num_tokens / impl None: not
    checked. A call (num_tokens given) also checks the settings: MoEConfig.remat_experts needs a
    recomputing `remat`."""
    if not isinstance(config, MoEConfig):
      raise ValueError(f"config must be a MoEConfig, got {type(config).__name__}")
    fit.check_layer_fits(
        num_experts=config.num_experts, d_ff=config.d_ff, expert=self.ep, tensor=self.tp,
        impl=impl, num_tokens=num_tokens,
        token_shards={a: int(self.mesh.shape[a]) for a in self.token_axes},
        duplicate_token_dropping=self.duplicate_token_dropping)
    if num_tokens is not None and config.remat_experts and self.remat == "none":
      # The expert-parallel layer recomputes what its ParallelConfig.remat says.
      raise ValueError("MoEConfig.remat_experts=True on the expert-parallel layer needs "
                       "ParallelConfig.remat 'comm_aware' (recompute the experts, keep the "
                       "all-to-all results) or 'full', got 'none'")

  # The jaxmoe.moe.ExpertParallel protocol: how the MoE layer runs its router and experts here.

  def run_router(self, router: Router, tokens: jax.Array, deterministic: bool) -> RouterOutput:
    """The router on tokens (T, d_model), per device over the token axes (run_router)."""
    return run_router(router, tokens, self, deterministic)

  def run_experts(self, experts: RoutedExperts, tokens: jax.Array, routing: RouterOutput,
                  impl: str) -> tuple[jax.Array, jax.Array]:
    """(y (T, d_model), dropped_fraction) of the routed experts, expert- and tensor-parallel
    (routed_experts)."""
    return routed_experts(experts, tokens, routing.indices, routing.weights, self, impl=impl)

  def capacity(self, tokens_sent: int, top_k: int, experts_per_rank: int) -> int:
    """Rows per (source, destination) of the padded all-to-all for T_s = tokens_sent tokens."""
    bound = tokens_sent * min(top_k, experts_per_rank)   # dropless: no source can send more
    if self.capacity_factor is None:
      return max(bound, 1)
    c = math.ceil(tokens_sent * top_k / self.ep * self.capacity_factor)
    return max(1, min(c, bound))

  def fast_capacity(self, tokens_sent: int, top_k: int, experts_per_rank: int) -> int | None:
    """Rows per pair of the dropless padded all-to-all's fast path (a2a_capacity_factor), or
    None where there is none (token-dropping capacity, no factor, or not smaller than the bound)."""
    if self.capacity_factor is not None or self.a2a_capacity_factor is None:
      return None
    c = math.ceil(tokens_sent * top_k / self.ep * self.a2a_capacity_factor)
    return c if c < self.capacity(tokens_sent, top_k, experts_per_rank) else None


def set_parallel(module: nnx.Module, pcfg: ParallelConfig | None) -> int:
  """Sets `parallel` on every jaxmoe.MoE inside `module` (itself included): those layers run
  expert-parallel on pcfg.mesh (None: back to the single-device path). Returns how many."""
  if pcfg is not None and not isinstance(pcfg, ParallelConfig):
    raise ValueError(f"pcfg must be a ParallelConfig or None, got {type(pcfg).__name__}")
  n = 0
  for _, m in nnx.iter_graph(module):
    if isinstance(m, MoE):
      if pcfg is not None:
        pcfg.check_layer(m.config)
      m.parallel = pcfg
      n += 1
  return n


# ------------------------------------------------------------------------------------------------
# The per-device program.


def _device_fn(pcfg: ParallelConfig, cfg, dtype, impl: str, num_tokens_local: int):
  """The shard_map body: (x (T_l, d), indices (T_l, k), weights (T_l, k), params) ->
  (y (T_l, d) in dtype, dropped assignments (), float32)."""
  e_total, k = cfg.num_experts, cfg.top_k
  ep, tp = pcfg.ep, pcfg.tp
  e_local = e_total // ep
  dtd = pcfg.duplicate_token_dropping and tp > 1
  t_send = num_tokens_local // tp if dtd else num_tokens_local
  a_send = t_send * k
  has_expert, has_tensor = "expert" in pcfg.mesh.axis_names, "tensor" in pcfg.mesh.axis_names
  mm = matmul_fn(impl, cfg.backend)
  # Balanced load of the local experts: the rows all (gathered) sources send here on average.
  fast_rows = None if pcfg.compute_capacity_factor is None else \
      math.ceil(pcfg.compute_capacity_factor * a_send * (tp if dtd else 1))

  def a2a(x):
    return jax.lax.all_to_all(x, "expert", 0, 0, tiled=False) if has_expert else x

  if not has_expert:
    ragged = functools.partial(collectives.ragged_all_to_all_emulated, axis_name=None)
  elif pcfg.a2a == "ragged_emulated":
    ragged = functools.partial(collectives.ragged_all_to_all_emulated, axis_name="expert")
  else:
    def ragged(operand, output, *offsets_and_sizes):
      # The primitive types its result like `output`: make the zeros vary like the rows they get.
      output = collectives.vary(output, tuple(sorted(collectives.vma(operand))))
      return jax.lax.ragged_all_to_all(operand, output, *offsets_and_sizes, axis_name="expert")

  def body(x, indices, weights, params):
    params = {n: collectives.vary(p, pcfg.token_axes) for n, p in params.items()}
    me = jax.lax.axis_index("expert") if has_expert else 0
    if dtd:
      r = jax.lax.axis_index("tensor")
      x = jax.lax.dynamic_slice_in_dim(x, r * t_send, t_send, 0)
      indices = jax.lax.dynamic_slice_in_dim(indices, r * t_send, t_send, 0)
      weights = jax.lax.dynamic_slice_in_dim(weights, r * t_send, t_send, 0)
    disp = dispatch.sort_by_expert(indices, e_total)
    rows = dispatch.gather_sorted(x.astype(dtype), disp)                        # (A, d)
    counts = disp.group_sizes                                                    # (E,)
    if has_expert:
      counts_all = jax.lax.all_gather(counts, "expert")                          # (EP, E) [src, e]
    else:
      counts_all = counts[None]
    counts_all = checkpoint_name(counts_all, "moe_counts")
    per_pair = counts_all.reshape(ep, ep, e_local).sum(-1)                      # [src, dest]
    send = per_pair[me]                                                          # (EP,) to dest
    send_start = jnp.cumsum(send) - send
    mine = jax.lax.dynamic_slice_in_dim(counts_all, me * e_local, e_local, 1)  # (EP, E_l)
    dropped = jnp.zeros((), jnp.float32)

    def compute(recv, eid):
      """Steps 5-6: the local experts on the received rows (M, d) -> (M, d) in dtype."""
      if dtd:
        recv_all = checkpoint_name(jax.lax.all_gather(recv, "tensor", tiled=True),
                                   "moe_dispatch_gathered")
        eid_all = checkpoint_name(jax.lax.all_gather(eid, "tensor", tiled=True), "moe_expert_ids")
      else:
        recv_all, eid_all = recv, eid
      y = local_experts(recv_all, eid_all, params, cfg=cfg, dtype=dtype, mm=mm,
                         num_local=e_local, skip=pcfg.skip_expert_compute, fast_rows=fast_rows,
                         partial_dtype=jnp.float32 if tp > 1 else dtype)    # (M, d) f32 partial
      if dtd:
        y = jax.lax.psum_scatter(y, "tensor", scatter_dimension=0, tiled=True)   # my rows, summed
      elif has_tensor:
        y = jax.lax.psum(y, "tensor")  # (with tensor size 1 it only makes y invariant over it)
      if "b_out" in params:
        y = y + jnp.take(params["b_out"].astype(jnp.float32), eid, axis=0, mode="fill",
                         fill_value=0)
      return y.astype(dtype)

    def padded(cap):
      """Steps 4-7 through a padded all-to-all of `cap` rows per (source, destination) ->
      (y_sorted (A, d), dropped assignments)."""
      c = jnp.arange(cap, dtype=jnp.int32)
      src = jnp.clip(send_start[:, None] + c[None, :], 0, a_send - 1)           # (EP, C)
      valid = c[None, :] < send[:, None]
      buf = jnp.where(valid[..., None], jnp.take(rows, src, axis=0), 0).astype(dtype)
      recv = checkpoint_name(a2a(buf), "moe_dispatch")                           # (EP, C, d)
      got = jnp.minimum(jnp.sum(mine, axis=1), cap)                              # (EP,)
      eid = expert_ids(jnp.cumsum(mine, axis=1), c[None, :].repeat(ep, 0), got[:, None], e_local)
      y = compute(recv.reshape(ep * cap, -1), eid.reshape(-1))
      back = checkpoint_name(a2a(y.reshape(ep, cap, -1)), "moe_combine")         # (EP, C, d)
      dest = disp.expert // e_local                                              # (A,)
      slot = jnp.arange(a_send, dtype=jnp.int32) - send_start[dest]
      y_sorted = back[dest, jnp.minimum(slot, cap - 1)]
      y_sorted = jnp.where((slot < cap)[:, None], y_sorted, 0)
      return y_sorted, jnp.sum(jnp.maximum(send - cap, 0)).astype(jnp.float32)

    if pcfg.a2a == "padded":
      cap = pcfg.capacity(t_send, k, e_local)
      cap_fast = pcfg.fast_capacity(t_send, k, e_local)
      if cap_fast is None:          # (fast_capacity is None unless it is below the bound)
        y_sorted, dropped = padded(cap)
      else:
        # Dropless with less padding: when no (source, destination) pair sends more than
        # cap_fast rows, exchange cap_fast rows per pair; else the dropless bound. Every rank
        # of the collectives inside must take the same branch: per_pair is the same on the
        # expert group (all-gathered counts), and tensor ranks agree through the pmin.
        fits = (jnp.max(per_pair) <= cap_fast).astype(jnp.int32)
        sync = tuple(a for a in ("expert", "tensor") if a in pcfg.mesh.axis_names)
        fits = jax.lax.pmin(fits, sync) if sync else fits
        y_sorted, dropped = jax.lax.cond(fits > 0, lambda: padded(cap_fast),
                                         rematerialized(lambda: padded(cap)))
    else:
      rbuf = ep * t_send * min(k, e_local)
      recv_sizes = per_pair[:, me]                                               # (EP,) from src
      out_offsets = (jnp.cumsum(per_pair, axis=0) - per_pair)[me]                # at each dest
      recv = ragged(
          rows, jnp.zeros((rbuf, rows.shape[1]), dtype), send_start.astype(jnp.int32),
          send.astype(jnp.int32), out_offsets.astype(jnp.int32), recv_sizes.astype(jnp.int32))
      recv = checkpoint_name(recv, "moe_dispatch")                               # (R, d)
      pos = jnp.arange(rbuf, dtype=jnp.int32)
      eid = expert_ids(jnp.cumsum(mine.reshape(-1)), pos, jnp.sum(recv_sizes), e_local)
      y = compute(recv, eid)
      recv_start = jnp.cumsum(recv_sizes) - recv_sizes
      back_offsets = (jnp.cumsum(per_pair, axis=1) - per_pair)[:, me]           # on each source
      y_sorted = ragged(
          y, jnp.zeros((a_send, y.shape[1]), dtype), recv_start.astype(jnp.int32),
          recv_sizes.astype(jnp.int32), back_offsets.astype(jnp.int32), send.astype(jnp.int32))
      y_sorted = checkpoint_name(y_sorted, "moe_combine")                        # (A, d)

    out = dispatch.combine_sorted(y_sorted, disp, weights)                       # (T_s, d)
    if dtd:
      out = collectives.gather_invariant(out, "tensor", tp)                                 # (T_l, d)
      dropped = jax.lax.psum(dropped, "tensor")
    dropped = jax.lax.psum(dropped, pcfg.token_axes) if pcfg.token_axes else dropped
    return out, dropped

  if pcfg.remat == "comm_aware":
    body = jax.checkpoint(body, policy=comm_aware_policy())
  elif pcfg.remat == "full":
    body = jax.checkpoint(body, policy=jax.checkpoint_policies.nothing_saveable)
  return body


def expert_params(experts: RoutedExperts) -> dict[str, jax.Array]:
  """The routed experts' arrays by name (w_gate, w_up, w_out, b_gate, b_up, b_out; absent ones
  left out): w_* (E, d, f) / (E, f, d), b_* (E, f) / (E, d)."""
  out = {}
  for name in ("w_gate", "w_up", "w_out", "b_gate", "b_up", "b_out"):
    p = getattr(experts, name, None)
    if p is not None:
      out[name] = p[...]
  return out


def param_specs(names) -> dict[str, P]:
  """shard_map in_specs of the expert arrays: E over "expert", d_ff over "tensor"."""
  specs = {"w_gate": P("expert", None, "tensor"), "w_up": P("expert", None, "tensor"),
           "w_out": P("expert", "tensor", None), "b_gate": P("expert", "tensor"),
           "b_up": P("expert", "tensor"), "b_out": P("expert", None)}
  return {n: specs[n] for n in names}


def _filter_spec(spec: P, mesh: Mesh) -> P:
  out = []
  for a in spec:
    if a is None:
      out.append(None)
      continue
    axes = tuple(x for x in ((a,) if isinstance(a, str) else a) if x in mesh.axis_names)
    out.append(None if not axes else axes[0] if len(axes) == 1 else axes)
  return P(*out)


def run_router(router: Router, tokens: jax.Array, pcfg: ParallelConfig,
               deterministic: bool = True) -> RouterOutput:
  """The router (jaxmoe.router.Router) on tokens (T, d_model) -> RouterOutput of (T, ...) arrays,
  run per device in a shard_map over the token axes (router replicated).

  Routing is per token, but XLA's SPMD partitioner does not split the TopK custom call: under plain
  jit the (T, E) scores of all T tokens would be all-gathered to every device. With router jitter
  active (jitter > 0 and not deterministic) the router mutates its RNG state, which a shard_map body
  cannot: it then runs in the ordinary jit program (same noise as on one device).
  """
  if not deterministic and getattr(router, "jitter_rngs", None) is not None:
    return router(tokens, deterministic=deterministic)
  mesh = pcfg.mesh
  tok = _filter_spec(P(pcfg.token_axes if pcfg.token_axes else None, None), mesh)
  graphdef, state = nnx.split(router)

  def body(state, x):
    return nnx.merge(graphdef, state)(x, deterministic=True)

  fn = jax.shard_map(body, mesh=mesh, in_specs=(P(), tok),
                     out_specs=RouterOutput(tok, tok, tok, tok), check_vma=collectives.CHECK_VMA)
  return fn(state, tokens)


def routed_experts(experts: RoutedExperts, tokens: jax.Array, indices: jax.Array,
                   weights: jax.Array, pcfg: ParallelConfig, impl: str = "grouped"
                   ) -> tuple[jax.Array, jax.Array]:
  """Expert-parallel (and tensor-parallel) dropless routed experts.

  Args:
    experts: the layer's RoutedExperts (stacked (E, ...) parameters, any sharding: jit moves them
      to E over "expert", d_ff over "tensor"; shard them that way, jaxmoe.parallel.shard_model,
      to avoid any weight movement).
    tokens: (T, d_model) float; T divisible by the token shards (mesh size / tensor).
    indices: (T, k) int32 router choices; weights: (T, k) float combine weights.
    pcfg: the ParallelConfig.
    impl: local expert compute, "grouped" (kernels.grouped_matmul, backend from the MoEConfig)
      or "ragged_dot".

  Returns:
    (y (T, d_model) in the experts' compute dtype, dropped_fraction float32 scalar: 0 unless a
    capacity_factor made the padded all-to-all drop rows).
  """
  cfg = experts.config
  if tokens.ndim != 2 or indices.shape != (tokens.shape[0], cfg.top_k) \
      or weights.shape != indices.shape:
    raise ValueError(f"tokens (T, d), indices and weights (T, k={cfg.top_k}) expected, got "
                     f"{tokens.shape}, {indices.shape}, {weights.shape}")
  t = tokens.shape[0]
  pcfg.check_layer(cfg, t, impl)
  params = expert_params(experts)
  mesh = pcfg.mesh
  tok = _filter_spec(P(pcfg.token_axes if pcfg.token_axes else None, None), mesh)
  specs = {n: _filter_spec(s, mesh) for n, s in param_specs(params).items()}
  body = _device_fn(pcfg, cfg, jnp.dtype(experts.dtype), impl, t // pcfg.token_shards)
  fn = jax.shard_map(body, mesh=mesh, in_specs=(tok, tok, tok, specs), out_specs=(tok, P()),
                     check_vma=collectives.CHECK_VMA)
  y, dropped = fn(tokens, indices.astype(jnp.int32), weights.astype(jnp.float32), params)
  return y, dropped / (t * cfg.top_k)
