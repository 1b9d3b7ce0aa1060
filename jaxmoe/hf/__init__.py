"""Hugging Face MoE models in and out: Mixtral, OLMoE, Qwen2-MoE, Qwen3-MoE (see convert.py)."""

from jaxmoe.hf.architectures import ARCHITECTURES, HF_GLU_ACTIVATIONS, ConvertError
from jaxmoe.hf.convert import export_hf, import_hf, is_hf_folder, load_hf

__all__ = ["ARCHITECTURES", "HF_GLU_ACTIVATIONS", "ConvertError", "export_hf", "import_hf",
           "is_hf_folder", "load_hf"]
