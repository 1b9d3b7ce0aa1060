"""Hugging Face models in and out: tiny random-weight Mixtral, OLMoE, Qwen2-MoE and Qwen3-MoE made
with transformers (scripts/make_hf_testdata.py; tests/data/hf/) are converted and must reproduce
transformers' own logits and per-layer MoE outputs (every architecture with the grouped impl, every
dropless impl at two architectures); export then import
gives back the identical tensors; bad folders fail with one line."""

from __future__ import annotations

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file

from conftest import rel_err
from jaxmoe import cli
from jaxmoe.config import DROPLESS_IMPLS
from jaxmoe.hf import ConvertError, export_hf, import_hf, load_hf
from jaxmoe.sample import load_model

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "hf")
ARCHS = ("mixtral", "olmoe", "qwen2_moe", "qwen3_moe")
TOL = 1e-5   # float32, relative


def _reference(arch):
  return load_file(os.path.join(DATA, arch, "reference.safetensors"))


# Every architecture with the grouped impl, and every other dropless impl at two architectures:
# what differs between architectures (QK-norm, biases, shared experts, routing) is outside the
# expert computation, and the impls agree with each other in test_moe_layer.
HF_CASES = ([(arch, "grouped") for arch in ARCHS]
            + [("olmoe", "ragged_dot"), ("qwen3_moe", "ragged_dot"), ("mixtral", "scatter"),
               ("qwen2_moe", "scatter"), ("mixtral", "blocksparse"), ("qwen2_moe", "blocksparse")])
assert {impl for _, impl in HF_CASES} == set(DROPLESS_IMPLS)


@pytest.mark.parametrize("arch, impl", HF_CASES)
def test_converted_model_reproduces_transformers(arch, impl):
  # block_size 8: the block-sparse impl needs it to divide the experts' width (24).
  cfg, _, model = load_hf(os.path.join(DATA, arch), dtype="float32", moe_impl=impl, block_size=8)
  assert cfg.activation == "swiglu"   # hidden_act "silu" on these experts is the SiLU-gated GLU
  ref = _reference(arch)
  logits, _ = jax.jit(lambda m, t: m(t))(model, jnp.asarray(ref["input_ids"]))
  assert rel_err(logits, ref["logits"]) <= TOL
  for i, block in enumerate(model.blocks):
    x = jnp.asarray(ref[f"layer{i}.moe_input"])
    y = block.ffn(x)[0] if block.is_moe else block.ffn(x)
    assert rel_err(y, ref[f"layer{i}.moe_output"]) <= TOL, f"layer {i}"
    if block.is_moe:
      routing = block.ffn.router(x.reshape(-1, cfg.d_model))
      assert rel_err(routing.logits, ref[f"layer{i}.router_logits"]) <= TOL
      np.testing.assert_array_equal(np.sort(routing.indices, -1),
                                    np.sort(ref[f"layer{i}.topk_idx"], -1))


@pytest.mark.parametrize("arch", ARCHS)
def test_import_export_round_trip_is_exact(arch, tmp_path):
  src = os.path.join(DATA, arch)
  run = import_hf(src, str(tmp_path / "run"), dtype="float32", log=lambda *_: None)
  assert os.path.isfile(os.path.join(run, "tokenizer.json"))
  model, meta = load_model(run)            # what `jaxmoe sample` reads
  assert meta["converted_from"]["arch"] == arch
  ref = _reference(arch)
  logits, _ = model(jnp.asarray(ref["input_ids"]))
  assert rel_err(logits, ref["logits"]) <= TOL
  out = export_hf(run, str(tmp_path / "hf"), log=lambda *_: None)
  original = _all_tensors(src)
  exported = load_file(os.path.join(out, "model.safetensors"))
  assert sorted(exported) == sorted(original)
  for name, value in original.items():
    np.testing.assert_array_equal(exported[name], value, err_msg=name)
  # The exported folder converts again to the same model.
  again, _, model2 = load_hf(out, dtype="float32")
  assert again == model.cfg
  np.testing.assert_array_equal(model2(jnp.asarray(ref["input_ids"]))[0], logits)


def _all_tensors(folder):
  out = {}
  for f in sorted(os.listdir(folder)):
    if f.startswith("model") and f.endswith(".safetensors"):
      out.update(load_file(os.path.join(folder, f)))
  return out


def _copy(arch, tmp_path):
  dst = tmp_path / arch
  shutil.copytree(os.path.join(DATA, arch), dst)
  return dst


def test_bad_folders_name_the_problem(tmp_path):
  from safetensors.numpy import save_file
  mix = _copy("mixtral", tmp_path)
  tensors = load_file(mix / "model.safetensors")
  # A missing tensor.
  save_file({k: v for k, v in tensors.items() if "experts.3.w2" not in k},
            str(mix / "model.safetensors"))
  with pytest.raises(ConvertError, match=r"missing tensor 'model\.layers\.0\.block_sparse_moe\.experts\.3\.w2\.weight'"):
    load_hf(str(mix))
  # A tensor the conversion does not read.
  save_file({**tensors, "model.layers.0.extra.weight": np.zeros(3, np.float32)},
            str(mix / "model.safetensors"))
  with pytest.raises(ConvertError, match="does not read.*extra"):
    load_hf(str(mix))
  # An unknown architecture.
  cfg = json.loads((mix / "config.json").read_text())
  (mix / "config.json").write_text(json.dumps({**cfg, "architectures": ["LlamaForCausalLM"],
                                               "model_type": "llama"}))
  with pytest.raises(ConvertError, match="unknown architecture 'LlamaForCausalLM'"):
    load_hf(str(mix))
  # A missing shard.
  olmoe = _copy("olmoe", tmp_path)
  os.remove(olmoe / "model-00003-of-00004.safetensors")
  with pytest.raises(ConvertError, match="missing shard 'model-00003-of-00004.safetensors'"):
    load_hf(str(olmoe))


def test_convert_cli_one_line_and_never_overwrites(tmp_path, capsys):
  out = tmp_path / "run"
  assert cli.main(["convert", os.path.join(DATA, "qwen3_moe"), str(out), "--dtype", "float32"]) == 0
  before = sorted(os.listdir(out))
  code = cli.main(["convert", os.path.join(DATA, "qwen3_moe"), str(out)])
  err = capsys.readouterr().err.strip()
  assert code == 2 and len(err.splitlines()) == 1 and "not an empty folder" in err, err
  assert sorted(os.listdir(out)) == before
  code = cli.main(["convert", str(tmp_path / "nothing"), str(tmp_path / "x")])
  assert code == 2 and "does not exist" in capsys.readouterr().err
  # Export of a run that knows no architecture must be told which.
  code = cli.main(["convert", str(out), str(tmp_path / "hf"), "--arch", "gpt2"])
  assert code == 2 and "--arch 'gpt2' is unknown" in capsys.readouterr().err


def test_sample_decodes_with_the_models_tokenizer(tmp_path, capsys):
  out = tmp_path / "run"
  import_hf(os.path.join(DATA, "mixtral"), str(out), dtype="float32", log=lambda *_: None)
  assert cli.main(["sample", str(out), "--prompt", "the router", "--tokens", "5",
                   "--temperature", "0"]) == 0
  text = capsys.readouterr().out
  assert text.startswith("the router"), text


def test_export_refuses_what_the_architecture_lacks(tmp_path):
  run = import_hf(os.path.join(DATA, "qwen3_moe"), str(tmp_path / "run"), dtype="float32",
                  log=lambda *_: None)
  with pytest.raises(ConvertError, match="cannot be exported as MixtralForCausalLM.*qk_norm"):
    export_hf(run, str(tmp_path / "hf"), arch="mixtral")
