"""jaxmoe: dropless Mixture-of-Experts layers in Flax NNX on top of the kernels/ package."""

from jaxmoe.config import MoEConfig
from jaxmoe.moa import MoA, MoAConfig
from jaxmoe.moe import MoE, MoEStats
from jaxmoe.router import Router, RouterBias, RouterOutput

__all__ = ["MoA", "MoAConfig", "MoE", "MoEConfig", "MoEStats", "Router", "RouterBias", "RouterOutput"]
