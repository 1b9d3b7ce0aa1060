"""Presets: every one builds a valid config; the GPU sizes' remat defaults."""

import pytest

from jaxmoe.model import ModelConfig
from jaxmoe.presets import PRESETS, get_preset
from jaxmoe.train import TrainConfig


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_is_a_valid_config(name):
  p = get_preset(name)
  ModelConfig(**p["model"])
  TrainConfig(**p["train"])


def test_large_moe_presets_remat_and_their_dense_bases_do_not():
  """Small (3.6B parameters with 64 experts) fits batch 64 on an 80 GB H100 only with remat;
  the dense bases fit without it."""
  for name in ("small", "medium", "small-capacity", "medium-capacity"):
    assert get_preset(name)["model"]["remat"] is True, name
  for name in ("xs", "xs-dense", "small-dense", "medium-dense", "tiny"):
    assert not get_preset(name)["model"].get("remat", False), name


def test_unknown_preset_names_the_allowed_ones():
  with pytest.raises(ValueError, match="allowed: .*small"):
    get_preset("huge")
