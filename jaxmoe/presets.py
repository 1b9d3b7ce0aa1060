"""Named model + training presets, from a tiny CPU model to the MegaBlocks paper's GPU sizes.

Each preset is {"model": ModelConfig fields, "train": TrainConfig fields}; command-line flags and a
config file override them. The GPU sizes follow MegaBlocks (Gale et al., 2022, Table 1): XS 46M,
Small 125M, Medium 356M dense base models (GELU MLP with d_ff = 4 d_model, the tanh form that
MegaBlocks' layers default to, seq 1024, GPT-2 vocabulary padded to 50304; ours adds
RoPE/RMSNorm/no biases, so counts differ slightly), with 64 experts, top-1, in every layer for
the MoE variants ("-dense" gives the base).

Every MoE preset states its routing: the MegaBlocks sizes route as MegaBlocks and Switch do (softmax
over the experts, top-1, the expert output weighted by its router probability, no
renormalization); tiny and test route as Mixtral does (softmax, top-2, the two weights
renormalized to sum 1).
"""

from __future__ import annotations

import copy
from typing import Any

_TINY_MODEL = dict(vocab_size=256, d_model=128, n_layers=4, n_heads=4, n_kv_heads=2, d_ff=256,
                   max_seq_len=128, ffn="moe", num_experts=8, top_k=2, router="softmax_topk",
                   renormalize=True, moe_impl="grouped", dtype="bfloat16")
_TINY_TRAIN = dict(steps=200, batch_size=16, seq_len=128, lr=3e-3, warmup_steps=20,
                   eval_every=50, eval_batches=4, ckpt_every=50, log_every=10)


def _megablocks(d_model: int, n_layers: int, n_heads: int, train: dict[str, Any] | None = None,
                **memory: Any) -> dict[str, Any]:
  """memory: the ModelConfig fields that trade compute for memory (remat, remat_mlp, loss_chunks,
  recompute_activation); train: TrainConfig fields over the common ones."""
  return {
      "model": dict(vocab_size=50304, d_model=d_model, n_layers=n_layers, n_heads=n_heads,
                    n_kv_heads=n_heads, d_ff=4 * d_model, activation="gelu_tanh", max_seq_len=1024,
                    ffn="moe", num_experts=64, top_k=1, router="softmax_topk", renormalize=False,
                    moe_impl="grouped", dtype="bfloat16", capacity_factor=1.0, **memory),
      # Real text: the Python sources on the machine ("python", up to 128 MB), tokenized by a
      # byte-level BPE of the model's vocabulary trained on them (cached after the first run).
      "train": dict(steps=20000, batch_size=64, seq_len=1024, lr=6e-4, warmup_steps=2000,
                    eval_every=1000, eval_batches=8, ckpt_every=1000, log_every=50,
                    data="python", tokenizer="bpe", corpus_bytes=128 << 20, **(train or {})),
  }


def with_impl(model: dict[str, Any], moe_impl: str) -> dict[str, Any]:
  """A preset's model fields with another MoE impl. A model made to fit without remat by keeping
  less (the fused head + loss, loss_chunks; recompute_activation) leans on the grouped impl's
  fused expert MLP (recompute_activation runs on it alone); another impl recomputes the whole
  expert MLP instead (remat_mlp), as the capacity baseline at Small does (266.1 ms a step on the
  H100, 2026-11-23): its (E, C, d) buffers go through separate products."""
  model = {**model, "moe_impl": moe_impl}
  lean = model.get("recompute_activation") or model.get("loss_chunks")
  if moe_impl != "grouped" and lean and not model.get("remat"):
    model.update(recompute_activation=False, remat_mlp=True)
  return model


PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    # Trains in a few minutes on 2 CPU cores (byte-level, embedded corpus).
    "tiny": {"model": _TINY_MODEL, "train": _TINY_TRAIN},
    "tiny-dense": {"model": {**_TINY_MODEL, "ffn": "dense"}, "train": _TINY_TRAIN},
    # A few seconds per dozen steps on CPU: used by the tests.
    "test": {
        "model": dict(vocab_size=256, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64,
                      max_seq_len=32, ffn="moe", num_experts=4, top_k=2, router="softmax_topk",
                      renormalize=True, moe_impl="grouped", dtype="float32"),
        "train": dict(steps=30, batch_size=8, seq_len=32, lr=1e-2, warmup_steps=3, eval_every=0,
                      eval_batches=2, ckpt_every=10, log_every=5, corpus_bytes=1 << 20),
    },
    # Small's 64 experts make 3.6B parameters: weights, Adam moments and gradients take ~52 GB,
    # and batch 64 does not fit an 80 GB H100 with every activation kept and float32 Adam moments
    # (81.1 GiB planned on an H200). Fastest measured on the H100 (2026-12-07): nothing
    # recomputed, the head and the loss fused (loss_chunks: no (B, T, V) logits kept) and Adam's
    # first moment in bf16 (7 GiB less): 177.9 ms a step, 64.6 GiB planned, against 181.0 ms
    # when the expert MLP also writes its activation again in the backward's epilogue instead of
    # keeping it (recompute_activation, 60.4 GiB) in the same call; with float32 moments that
    # recompute was needed to fit (186.3 ms, 67.2 GiB), remat_mlp 203.3 ms (recomputing the
    # expert MLP's up projection), full remat 245.9 ms (2026-11-23). On an expert-parallel mesh
    # remat_mlp would become the MoE layers' communication-aware remat (train.parallel_config).
    # Medium (12.9B parameters) needs expert parallelism over several GPUs in any case.
    "xs": _megablocks(512, 8, 8),
    "small": _megablocks(768, 12, 12, train={"adam_mu_dtype": "bfloat16"}, loss_chunks=8),
    "medium": _megablocks(1024, 24, 16, remat=True),
}
for _name in ("xs", "small", "medium"):
  # The dense bases (46M-356M parameters) fit without remat.
  PRESETS[f"{_name}-dense"] = {"model": {**PRESETS[_name]["model"], "ffn": "dense",
                                         "remat": False, "remat_mlp": False,
                                         "recompute_activation": False},
                               "train": PRESETS[_name]["train"]}
  PRESETS[f"{_name}-capacity"] = {"model": with_impl(PRESETS[_name]["model"], "capacity"),
                                  "train": PRESETS[_name]["train"]}


def get_preset(name: str) -> dict[str, dict[str, Any]]:
  """A deep copy of preset `name`; ValueError naming the allowed presets otherwise."""
  if name not in PRESETS:
    raise ValueError(f"unknown preset {name!r}; allowed: {', '.join(sorted(PRESETS))}")
  return copy.deepcopy(PRESETS[name])
