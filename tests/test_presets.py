"""Presets: every one builds a valid config; the GPU sizes' remat defaults."""

import pytest

from jaxmoe.config import ModelConfig, TrainConfig
from jaxmoe.presets import PRESETS, get_preset


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_is_a_valid_config(name):
  p = get_preset(name)
  ModelConfig(**p["model"])
  TrainConfig(**p["train"])


def test_large_moe_presets_recompute_and_their_dense_bases_do_not():
  """Small (3.6B parameters with 64 experts) fits batch 64 on an 80 GB H100 only with less kept:
  the dMoE fuses the head with the loss and keeps Adam's first moment in bf16 (the fastest
  measured), recomputing nothing; the capacity baseline recomputes the MLPs' hidden activations
  (remat_mlp); Medium all of each block's. The dense bases fit without either."""
  small = get_preset("small")
  assert small["model"]["loss_chunks"] > 0 and small["train"]["adam_mu_dtype"] == "bfloat16"
  for field in ("remat", "remat_mlp", "recompute_activation"):
    assert not small["model"].get(field, False), (field, small)
  model = get_preset("small-capacity")["model"]
  assert model["remat_mlp"] is True and not model.get("remat", False)
  assert not model["recompute_activation"]
  for name in ("medium", "medium-capacity"):
    assert get_preset(name)["model"]["remat"] is True, name
  for name in ("xs", "xs-dense", "small-dense", "medium-dense", "tiny"):
    model = get_preset(name)["model"]
    assert not model.get("remat", False) and not model.get("remat_mlp", False), name


def test_unknown_preset_names_the_allowed_ones():
  with pytest.raises(ValueError, match="allowed: .*small"):
    get_preset("huge")
