"""`ParallelConfig`: how the MoE layers run on a device mesh, and `set_parallel` to attach it.

ParallelConfig lives here rather than in jaxmoe.config beside the other frozen configs: it holds a
live jax.sharding.Mesh (devices, not plain values that a checkpoint could save), and it implements
the layer's jaxmoe.moe.ExpertParallel protocol (its methods run jaxmoe.parallel.layer). The MoE
layer only calls those methods: no layer module imports jaxmoe.parallel.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from jaxmoe.config import A2A_MODES, MoEConfig
from jaxmoe.experts import RoutedExperts
from jaxmoe.moe import MoE
from jaxmoe.parallel import fit, layer
from jaxmoe.parallel.remat import REMAT_MODES
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
    """The router on tokens (T, d_model), per device over the token axes (layer.run_router)."""
    return layer.run_router(router, tokens, self, deterministic)

  def run_experts(self, experts: RoutedExperts, tokens: jax.Array, routing: RouterOutput,
                  impl: str) -> tuple[jax.Array, jax.Array]:
    """(y (T, d_model), dropped_fraction) of the routed experts, expert- and tensor-parallel
    (layer.routed_experts)."""
    return layer.routed_experts(experts, tokens, routing.indices, routing.weights, self, impl=impl)

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
