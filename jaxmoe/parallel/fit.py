"""Does an MoE layer fit a mesh? The one check, for the layer on its mesh and for a training run.

The expert-parallel layer splits the E experts over the "expert" axis and each expert's hidden
width d_ff over "tensor"; the tokens are split over the other axes (the token shards) and, with
duplicate token dropping, each device's tokens over "tensor" once more; only some impls have an
expert-parallel version. A training run asks the same of its MoE layers before any mesh exists
(jaxmoe.train.train_mesh), the layer when it is given a ParallelConfig and again when it is
called with a number of tokens (jaxmoe.parallel.ParallelConfig.check_layer). Each problem is a
ValueError naming the field, the value and the axis.
"""

from __future__ import annotations

import math

# The MoE impls with an expert-parallel version (its local experts run a grouped matmul).
EP_IMPLS = ("grouped", "ragged_dot")


def check_layer_fits(*, num_experts: int, d_ff: int, expert: int, tensor: int,
                     impl: str | None = None, num_tokens: int | None = None,
                     token_shards: dict[str, int] | None = None,
                     duplicate_token_dropping: bool = True, owner: str = "MoEConfig",
                     d_ff_field: str = "d_ff", impl_field: str = "impl",
                     tokens_how: str | None = None,
                     remedy: str = "set duplicate_token_dropping=False") -> None:
  """ValueError unless an MoE layer of `num_experts` experts of width `d_ff` runs expert-parallel
  on a mesh with `expert` x `tensor` ranks.

  impl (None: not checked): must have an expert-parallel version (EP_IMPLS). num_tokens (None: not
  checked): must divide over the token shards ({axis: size} of the axes the tokens are split
  over); with duplicate token dropping and tensor > 1 each device's share must divide over
  "tensor" too. owner, d_ff_field, impl_field, tokens_how and remedy only word the message (a
  training run names its own fields: "model.expert_d_ff", "batch_size/(data x expert) x seq_len").
  """
  if num_experts % expert:
    raise ValueError(f"{owner}.num_experts={num_experts} is not divisible by the mesh's expert "
                     f"axis ({expert})")
  if d_ff % tensor:
    raise ValueError(f"{owner}.{d_ff_field}={d_ff} (the expert width) must be divisible by the "
                     f"mesh's tensor axis ({tensor})")
  if impl is not None and impl not in EP_IMPLS:
    raise ValueError(f"{impl_field}={impl!r} has no expert-parallel version: on a mesh with "
                     f"expert={expert}, tensor={tensor}, impl must be one of {EP_IMPLS}")
  if num_tokens is None:
    return
  shards = math.prod((token_shards or {}).values())
  if num_tokens % shards:
    raise ValueError(f"number of tokens {num_tokens} must be divisible by the token shards "
                     f"{token_shards} = {shards}")
  local = num_tokens // shards
  if duplicate_token_dropping and tensor > 1 and local % tensor:
    how = tokens_how or f"{num_tokens} tokens / {shards} token shards"
    raise ValueError(f"duplicate_token_dropping: tokens per device {how} = {local} must be "
                     f"divisible by the mesh's tensor axis ({tensor}): each tensor rank "
                     f"dispatches 1/{tensor} of them ({remedy})")
