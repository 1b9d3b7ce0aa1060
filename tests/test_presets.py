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
  """Small (3.6B parameters with 64 experts) fits batch 64 on an 80 GB H100 only when it
  recomputes activations: the MLPs' hidden ones (remat_mlp, the fastest measured); Medium all of
  each block's. The dense bases fit without either."""
  for name in ("small", "small-capacity"):
    model = get_preset(name)["model"]
    assert model["remat_mlp"] is True and not model["remat"], name
  for name in ("medium", "medium-capacity"):
    assert get_preset(name)["model"]["remat"] is True, name
  for name in ("xs", "xs-dense", "small-dense", "medium-dense", "tiny"):
    model = get_preset(name)["model"]
    assert not model.get("remat", False) and not model.get("remat_mlp", False), name


def test_unknown_preset_names_the_allowed_ones():
  with pytest.raises(ValueError, match="allowed: .*small"):
    get_preset("huge")
