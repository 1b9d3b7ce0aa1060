"""What the expert-parallel layer recomputes in the backward pass: communication-aware activation
checkpointing (DeepSpeed-TED) keeps the named all-to-all / all-gather results (COMM_NAMES) and
recomputes the expert computation around them.
"""

from __future__ import annotations

from typing import Any, Callable

import jax

# ParallelConfig.remat: "none" saves everything, "comm_aware" recomputes the experts but keeps the
# communication results, "full" recomputes everything (communication included).
REMAT_MODES = ("none", "comm_aware", "full")

# checkpoint_name()s of the communication results kept by remat="comm_aware".
COMM_NAMES = ("moe_counts", "moe_dispatch", "moe_dispatch_gathered", "moe_expert_ids",
              "moe_combine")


def comm_aware_policy() -> Callable[..., Any]:
  """The named checkpoint policy of communication-aware activation checkpointing: save the
  all-to-all / all-gather results (COMM_NAMES), recompute everything else."""
  return jax.checkpoint_policies.save_only_these_names(*COMM_NAMES)


def rematerialized(branch: Callable[[], Any]) -> Callable[[], Any]:
  """A lax.cond branch whose backward pass recomputes its computation (communication-aware: the
  named all-to-all results are kept, so no collective runs twice).

  Differentiating a lax.cond keeps the union of both branches' residuals, the untaken branch's
  as zeros that are written every step: the rarely taken dropless-bound branch (EP x the
  balanced rows) would put all its activations there, more memory than the fast branch itself
  (the EP2 Mixtral-like layer planned 42 GiB per device against ~10 on one GPU). Recomputed,
  it costs its forward compute again only in the steps that take it."""
  return jax.checkpoint(branch, policy=comm_aware_policy())
