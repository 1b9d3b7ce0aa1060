"""kernels.gmm.tuning: the tuned-config table (lookup hits/misses, env override, validation errors),
its use by grouped_matmul/group_xty dispatch on a (faked) GPU, and the autotune's smoke mode
writing a table that lookup reads back. CPU only; no Mosaic kernel runs outside interpret mode."""

import copy
import json
import os

import jax
import jax.numpy as jnp
import pytest

import kernels
from kernels.common import registry
from kernels.gmm import mosaic_kernel, mosaic_ws_kernel, mosaic_xty_ws_kernel, tuning
from kernels.gmm import triton as gmm_triton

H100 = "NVIDIA H100 80GB HBM3"
H200 = "NVIDIA H200"
WS = mosaic_ws_kernel.MosaicWsGmmConfig(block_n=64, max_concurrent_steps=4, grid_tile_width=16)
XTY = mosaic_kernel.MosaicXtyConfig(max_concurrent_steps=6, block_rows=32)
TRI = gmm_triton.TritonGmmConfig(block_m=64, num_warps=4)


def _entry(config, op="gmm", backend="mosaic", k=4096, n=14336, m_bucket=32768,
           device_kind=H100, dtype="bfloat16"):
  key = tuning.TableKey(device_kind, op, backend, dtype, k, n, m_bucket)
  return tuning.make_entry(key, config, {"ms": 1.0})


def _write(path, entries, **top):
  data = {"version": 1, "comment": "test table", "entries": entries, **top}
  path.write_text(json.dumps(data))
  return str(path)


@pytest.fixture
def table(tmp_path, monkeypatch):
  """A table with H100 entries for each op, pointed to by $JAXMOE_TUNED_CONFIGS."""
  path = _write(tmp_path / "tuned.json", [
      _entry(WS),
      _entry(WS, op="gmm_t", k=14336, n=4096),
      _entry(XTY, op="xty"),
      _entry(TRI, backend="triton"),
      _entry(mosaic_kernel.MosaicGmmConfig(max_concurrent_steps=6), device_kind=H200),
  ])
  monkeypatch.setenv(tuning.ENV_VAR, path)
  return path


# ---------------------------------------------------------------------------------------------
# Lookup.


def test_m_bucket():
  assert [tuning.m_bucket(m) for m in (0, 1, 2, 3, 4, 5, 32768, 32769)] == [
      1, 1, 2, 4, 4, 8, 32768, 65536]
  with pytest.raises(ValueError, match="m must be"):
    tuning.m_bucket(-1)


def test_lookup_hits(table):
  assert tuning.lookup("gmm", "mosaic", jnp.bfloat16, 4096, 14336, 32768, device_kind=H100) == WS
  # Any M in the same power-of-two bucket (16385..32768) hits.
  assert tuning.lookup("gmm", "mosaic", jnp.bfloat16, 4096, 14336, 20000, device_kind=H100) == WS
  assert tuning.lookup("gmm_t", "mosaic", "bfloat16", 14336, 4096, 32768, device_kind=H100) == WS
  assert tuning.lookup("xty", "mosaic", jnp.bfloat16, 4096, 14336, 32768, device_kind=H100) == XTY
  assert tuning.lookup("gmm", "triton", jnp.bfloat16, 4096, 14336, 32768, device_kind=H100) == TRI
  # The same key on another device gives that device's entry (here: the simple kernel's config).
  h200 = tuning.lookup("gmm", "mosaic", jnp.bfloat16, 4096, 14336, 32768, device_kind=H200)
  assert h200 == mosaic_kernel.MosaicGmmConfig(max_concurrent_steps=6)


@pytest.mark.parametrize("change", [
    dict(device_kind="NVIDIA A100-SXM4-80GB"),   # entries of other devices are ignored
    dict(m=16384),                               # bucket 16384 != 32768
    dict(m=32769),                               # bucket 65536
    dict(k=2048),
    dict(n=1024),
    dict(dtype=jnp.float16),
    dict(op="xty", backend="triton"),
])
def test_lookup_misses(table, change):
  call = dict(op="gmm", backend="mosaic", dtype=jnp.bfloat16, k=4096, n=14336, m=32768,
              device_kind=H100)
  call.update(change)
  assert tuning.lookup(call.pop("op"), call.pop("backend"), call.pop("dtype"), call.pop("k"),
                       call.pop("n"), call.pop("m"), **call) is None


def test_lookup_uses_current_device_kind(table, monkeypatch):
  monkeypatch.setattr(tuning, "current_device_kind", lambda: H100)
  assert tuning.lookup("gmm", "mosaic", jnp.bfloat16, 4096, 14336, 32768) == WS
  monkeypatch.setattr(tuning, "current_device_kind", lambda: "cpu")
  assert tuning.lookup("gmm", "mosaic", jnp.bfloat16, 4096, 14336, 32768) is None


def test_lookup_argument_errors(table):
  with pytest.raises(ValueError, match="op must be one of"):
    tuning.lookup("sdd", "mosaic", jnp.bfloat16, 1, 1, 1)
  with pytest.raises(ValueError, match="backend must be one of .*'pallas'"):
    tuning.lookup("gmm", "pallas", jnp.bfloat16, 1, 1, 1)
  with pytest.raises(ValueError, match="dtype must be one of .*'int32'"):
    tuning.lookup("gmm", "mosaic", jnp.int32, 1, 1, 1)


def test_shipped_table_is_valid_and_found(monkeypatch):
  """The shipped table (filled on an H100 by experiments/autotune_gmm.py) loads, and every entry
  is found again by lookup at its own key, with a config the kernels accept."""
  monkeypatch.delenv(tuning.ENV_VAR, raising=False)
  path = tuning.table_path()
  assert path == tuning.default_table_path()
  assert os.path.isfile(path) and path.endswith(os.path.join("kernels", "gmm", "tuned_configs.json"))
  t = tuning.load_table(path)
  assert "autotune_gmm.py" in t.comment
  assert t.entries, "the shipped table has entries from the H100 autotune run"
  for key, cfg in t.configs.items():
    got = tuning.lookup(key.op, key.backend, jnp.dtype(key.dtype), key.k, key.n, key.m_bucket,
                        device_kind=key.device_kind)
    assert got == cfg, key
    assert tuning.fits(cfg, key.k, key.n, jnp.dtype(key.dtype), jnp.dtype(key.dtype)), key
  # Another device kind finds nothing: the table never leaks configs across GPUs.
  assert tuning.lookup("gmm", "mosaic", jnp.bfloat16, 4096, 14336, 32768,
                       device_kind="NVIDIA A100-SXM4-80GB") is None


def test_pyproject_ships_the_table():
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  with open(os.path.join(root, "pyproject.toml")) as f:
    text = f.read()
  assert '[tool.setuptools.package-data]\n"kernels.gmm" = ["tuned_configs.json"]' in text


def test_env_var_override(tmp_path, monkeypatch):
  other = _write(tmp_path / "other.json", [_entry(TRI, backend="triton", k=8, n=16, m_bucket=64)])
  monkeypatch.setenv(tuning.ENV_VAR, other)
  assert tuning.table_path() == other
  assert tuning.lookup("gmm", "triton", jnp.bfloat16, 8, 16, 50, device_kind=H100) == TRI
  monkeypatch.delenv(tuning.ENV_VAR)
  assert tuning.lookup("gmm", "triton", jnp.bfloat16, 8, 16, 50, device_kind=H100) is None
  monkeypatch.setenv(tuning.ENV_VAR, str(tmp_path / "missing.json"))
  with pytest.raises(ValueError, match=f"{tuning.ENV_VAR} must name an existing.*missing.json"):
    tuning.table_path()


def test_rewritten_table_is_reread(tmp_path, monkeypatch):
  path = tmp_path / "t.json"
  _write(path, [])
  monkeypatch.setenv(tuning.ENV_VAR, str(path))
  assert tuning.lookup("gmm", "triton", jnp.bfloat16, 8, 16, 64, device_kind=H100) is None
  _write(path, [_entry(TRI, backend="triton", k=8, n=16, m_bucket=64)], comment="longer comment")
  assert tuning.lookup("gmm", "triton", jnp.bfloat16, 8, 16, 64, device_kind=H100) == TRI


# ---------------------------------------------------------------------------------------------
# Validation: a malformed file raises ValueError naming the file, the entry and the field.


def _bad(field_path, value):
  def change(e):
    *parents, last = field_path.split(".")
    target = e
    for p in parents:
      target = target[p]
    if value is _DELETE:
      del target[last]
    else:
      target[last] = value
  return change


_DELETE = object()


@pytest.mark.parametrize("change, match", [
    (_bad("op", "fwd"), r"field 'op' must be one of \['gmm', 'gmm_t', 'xty'\], got 'fwd'"),
    (_bad("backend", "pallas"), r"field 'backend' must be one of \['mosaic', 'triton'\]"),
    (_bad("dtype", "int8"), r"field 'dtype' must be one of .*got 'int8'"),
    (_bad("k", "4096"), r"field 'k' must be an int >= 1, got '4096'"),
    (_bad("n", 0), r"field 'n' must be an int >= 1, got 0"),
    (_bad("m_bucket", 3000), r"field 'm_bucket' must be a power of two"),
    (_bad("m_bucket", True), r"field 'm_bucket' must be a power of two"),
    (_bad("device_kind", ""), r"field 'device_kind' must be a non-empty string"),
    (_bad("config_type", "TritonGmmConfig"), r"field 'config_type' must be one of "
                                             r"\['MosaicWsGmmConfig', 'MosaicGmmConfig'\]"),
    (_bad("config.block_q", 64), r"field 'config.block_q' is not a field of MosaicWsGmmConfig"),
    (_bad("config.block_n", -64), r"field 'config.block_n' must be an int >= 1, got -64"),
    (_bad("config.block_n", 64.0), r"field 'config.block_n' must be an int >= 1, got 64.0"),
    (_bad("config.chain", 1), r"field 'config.chain' must be true or false, got 1"),
    (_bad("config.epi_cols", 0), r"field 'config.epi_cols' must be null or an int >= 1, got 0"),
    (_bad("config.block_m", None), r"field 'config.block_m' must be an int >= 1, got None"),
    (_bad("config", [1, 2]), r"field 'config' must be a JSON object"),
    (_bad("meta", "fast"), r"field 'meta' must be a JSON object"),
    (_bad("tflops", 700), r"unknown field 'tflops'"),
    (_bad("m_bucket", _DELETE), r"field 'm_bucket' is missing"),
    (_bad("config", _DELETE), r"field 'config' is missing"),
])
def test_malformed_entry_names_file_entry_and_field(tmp_path, change, match):
  good = _entry(TRI, backend="triton")
  bad = copy.deepcopy(_entry(WS))
  change(bad)
  path = _write(tmp_path / "bad.json", [good, bad])
  with pytest.raises(ValueError, match=match) as info:
    tuning.load_table(path)
  assert str(info.value).startswith(f"{os.path.abspath(path)}: entries[1]")


def test_malformed_file_level_errors(tmp_path):
  p = tmp_path / "x.json"
  p.write_text("{not json")
  with pytest.raises(ValueError, match=r"x.json: not valid JSON"):
    tuning.load_table(str(p))
  for data, match in [
      ([], r"x.json: the table must be a JSON object"),
      ({"version": 2, "entries": []}, r"x.json: field 'version' must be 1, got 2"),
      ({"version": 1}, r"x.json: field 'entries' must be a list, got None"),
      ({"version": 1, "entries": [], "extra": 1}, r"x.json: unknown top-level field 'extra'"),
      ({"version": 1, "entries": [3]}, r"x.json: entries\[0\]: must be a JSON object, got int"),
      ({"version": 1, "entries": [_entry(WS), _entry(TRI, backend="triton"), _entry(WS)]},
       r"x.json: entries\[2\] .* has the same key as entries\[0\]"),
  ]:
    p.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=match):
      tuning.load_table(str(p))


def test_malformed_entry_of_another_device_still_raises(tmp_path, monkeypatch):
  bad = _entry(WS, device_kind=H200)
  bad["config"]["block_m"] = "big"
  monkeypatch.setenv(tuning.ENV_VAR, _write(tmp_path / "t.json", [bad]))
  with pytest.raises(ValueError, match=r"t.json: entries\[0\].*'config.block_m'"):
    tuning.lookup("gmm", "mosaic", jnp.bfloat16, 4096, 14336, 32768, device_kind=H100)


def test_write_table_merges(tmp_path):
  path = str(tmp_path / "t.json")
  tuning.write_table(path, [_entry(WS), _entry(TRI, backend="triton")], comment="c")
  replaced = _entry(mosaic_kernel.MosaicGmmConfig())
  t = tuning.write_table(path, [replaced, _entry(XTY, op="xty")])
  assert t.comment == "c" and len(t.entries) == 3
  assert tuning.lookup("gmm", "mosaic", jnp.bfloat16, 4096, 14336, 32768, device_kind=H100,
                       path=path) == mosaic_kernel.MosaicGmmConfig()
  with pytest.raises(ValueError, match="config must be one of"):
    tuning.make_entry(tuning.TableKey(H100, "xty", "mosaic", "bfloat16", 1, 1, 1), WS)


def test_flag_and_optional_fields_round_trip(tmp_path):
  """Config fields that are flags (chain, largest_first) or optional sizes (epi_cols) are
  written and read back; an entry written before a field existed takes its default."""
  wsx = mosaic_xty_ws_kernel.MosaicWsXtyConfig(largest_first=False)
  ws = mosaic_ws_kernel.MosaicWsGmmConfig(chain=True, epi_cols=64)
  old = _entry(mosaic_xty_ws_kernel.MosaicWsXtyConfig(max_concurrent_steps=3), op="xty", k=2048,
               n=1024)
  del old["config"]["largest_first"]
  path = str(tmp_path / "t.json")
  tuning.write_table(path, [_entry(wsx, op="xty"), _entry(ws), _entry(WS, k=2048, n=1024), old])
  get = lambda op, k, n: tuning.lookup(op, "mosaic", jnp.bfloat16, k, n, 32768, device_kind=H100,
                                       path=path)
  assert get("xty", 4096, 14336) == wsx
  assert get("gmm", 4096, 14336) == ws
  assert get("gmm", 2048, 1024) == WS and WS.epi_cols is None
  assert get("xty", 2048, 1024).largest_first is True


# ---------------------------------------------------------------------------------------------
# Dispatch: grouped_matmul / group_xty pass the tuned config to the backend on a GPU.


class _Called(Exception):
  pass


@pytest.fixture
def fake_h100(monkeypatch, table):
  """Pretend to be on an H100 and capture (kernel, kwargs) instead of running Mosaic/Triton."""
  monkeypatch.setattr(registry, "on_gpu", lambda: True)
  monkeypatch.setattr(registry, "is_hopper", lambda: True)
  monkeypatch.setattr(tuning, "current_device_kind", lambda: H100)
  calls = []

  def capture(name):
    def fn(*args, **kwargs):
      calls.append((name, kwargs))
      raise _Called(name)
    return fn

  monkeypatch.setattr(mosaic_kernel, "gmm", capture("mosaic"))
  monkeypatch.setattr(mosaic_ws_kernel, "gmm", capture("mosaic_ws"))
  monkeypatch.setattr(mosaic_kernel, "group_xty", capture("mosaic_xty"))
  monkeypatch.setattr(mosaic_xty_ws_kernel, "group_xty", capture("mosaic_ws_xty"))
  monkeypatch.setattr(gmm_triton, "gmm", capture("triton"))
  monkeypatch.setattr(gmm_triton, "group_xty", capture("triton_xty"))
  return calls


def _sds(*shape, dtype=jnp.bfloat16):
  return jax.ShapeDtypeStruct(shape, dtype)


def _trace_gmm(m, k, n, g=8, *, transpose_rhs=False, backend=None, out_dtype=None):
  rhs = _sds(g, n, k) if transpose_rhs else _sds(g, k, n)
  f = lambda a, w, s: kernels.grouped_matmul(a, w, s, transpose_rhs=transpose_rhs,
                                             backend=backend, out_dtype=out_dtype)
  with pytest.raises(_Called):
    jax.eval_shape(f, _sds(m, k), rhs, _sds(g, dtype=jnp.int32))


def _trace_xty(m, k, n, g=8, *, backend=None, out_dtype=None):
  f = lambda x, dy, s: kernels.group_xty(x, dy, s, backend=backend, out_dtype=out_dtype)
  with pytest.raises(_Called):
    jax.eval_shape(f, _sds(m, k), _sds(m, n), _sds(g, dtype=jnp.int32))


def test_dispatch_uses_tuned_config(fake_h100):
  calls = fake_h100
  _trace_gmm(32768, 4096, 14336)                      # default backend: pallas -> Mosaic ws
  _trace_gmm(30000, 14336, 4096, transpose_rhs=True)  # the data gradient's shape, same bucket
  _trace_xty(32768, 4096, 14336)
  _trace_gmm(32768, 4096, 14336, backend="triton")
  _trace_gmm(32768, 4096, 14336, backend="mosaic")
  assert [(name, kw.get("config")) for name, kw in calls] == [
      ("mosaic_ws", WS), ("mosaic_ws", WS), ("mosaic_xty", XTY), ("triton", TRI),
      ("mosaic_ws", WS)]
  assert calls[1][1]["transpose_rhs"] is True


def test_dispatch_without_entry_keeps_defaults(fake_h100):
  calls = fake_h100
  _trace_gmm(8192, 4096, 14336)                      # M bucket 8192: no entry
  _trace_gmm(32768, 2048, 1024)                      # another shape
  _trace_xty(32768, 4096, 14336, backend="triton")   # no triton xty entry
  assert [(name, "config" in kw) for name, kw in calls] == [
      ("mosaic_ws", False), ("mosaic_ws", False), ("triton_xty", False)]


def test_dispatch_ws_config_respects_shared_memory(fake_h100, monkeypatch, tmp_path):
  """A tuned ws config whose stages + float32 output staging exceed shared memory is not used:
  the op falls back to its default choice (the simple kernel for float32 outputs)."""
  calls = fake_h100
  big = mosaic_ws_kernel.MosaicWsGmmConfig(max_concurrent_steps=3)   # fits bf16 out, not f32 out
  assert mosaic_ws_kernel.supports(4096, 14336, big, jnp.bfloat16, jnp.bfloat16)
  assert not mosaic_ws_kernel.supports(4096, 14336, big, jnp.bfloat16, jnp.float32)
  monkeypatch.setenv(tuning.ENV_VAR, _write(tmp_path / "t.json", [_entry(big)]))
  _trace_gmm(32768, 4096, 14336, out_dtype=jnp.float32)
  _trace_gmm(32768, 4096, 14336)
  assert [(name, kw.get("config")) for name, kw in calls] == [("mosaic", None), ("mosaic_ws", big)]


def test_dispatch_not_on_cpu_or_interpret(table, monkeypatch):
  """On CPU (and for interpret backends) the table is never read: a broken table is harmless."""
  calls = []
  real = gmm_triton.gmm
  monkeypatch.setattr(gmm_triton, "gmm", lambda *a, **kw: calls.append(kw) or real(*a, **kw))
  monkeypatch.setattr(tuning, "lookup", lambda *a, **kw: pytest.fail("lookup called on CPU"))
  lhs = jnp.ones((8, 16), jnp.bfloat16)
  rhs = jnp.ones((2, 16, 16), jnp.bfloat16)
  gs = jnp.array([3, 5], jnp.int32)
  kernels.grouped_matmul(lhs, rhs, gs, backend="triton_interpret")
  # backend="triton" off the GPU: traced only (no kernel runs on CPU), still no lookup.
  jax.eval_shape(lambda a, w, s: kernels.grouped_matmul(a, w, s, backend="triton"), lhs, rhs, gs)
  assert len(calls) == 2 and all("config" not in kw for kw in calls)


def test_pallas_xty_mosaic_choice_uses_x_columns(fake_h100):
  """backend="pallas" picks Mosaic group_xty only when its tiles divide K = x.shape[1] (an
  x of 96 columns goes to Triton, whatever the row count)."""
  calls = fake_h100
  _trace_xty(4096, 96, 256)
  _trace_xty(1000, 256, 256)
  assert [name for name, _ in calls] == ["triton_xty", "mosaic_ws_xty"]


def test_dispatch_xty_kernel_choice(fake_h100, monkeypatch, tmp_path):
  """Mosaic group_xty: a tuned config's type picks the kernel (the single-warpgroup one stays
  selectable, see test_dispatch_uses_tuned_config); without a fitting entry the ws kernel runs
  where its 256-wide CTA tile divides N and its stages fit shared memory, else the simple one."""
  calls = fake_h100
  wsx = mosaic_xty_ws_kernel.MosaicWsXtyConfig(block_rows=128, max_concurrent_steps=2)
  assert not tuning.fits(wsx, 4096, 14336, jnp.bfloat16, jnp.float32)   # f32 staging: too big
  monkeypatch.setenv(tuning.ENV_VAR, _write(tmp_path / "t.json", [_entry(wsx, op="xty")]))
  _trace_xty(32768, 4096, 14336)                          # the tuned ws entry
  _trace_xty(32768, 4096, 14336, out_dtype=jnp.float32)   # entry does not fit: ws default
  _trace_xty(32768, 4096, 384)                            # N % 256 != 0: simple kernel
  assert [(name, kw.get("config")) for name, kw in calls] == [
      ("mosaic_ws_xty", wsx), ("mosaic_ws_xty", None), ("mosaic_xty", None)]


# ---------------------------------------------------------------------------------------------
# The autotune's smoke mode writes a table that lookup reads back.


def test_autotune_smoke_writes_a_table_lookup_reads(tmp_path, monkeypatch):
  """experiments/autotune_gmm.py --smoke (Triton interpret, tiny shape, ~20 s on CPU)."""
  autotune_gmm = _autotune(monkeypatch)

  path = tmp_path / "tuned.json"
  out = autotune_gmm.main(["--smoke", "--backends", "triton", "--write", str(path)])
  assert out["table"] == str(path) and os.path.isfile(out["record"])
  t = tuning.load_table(str(path))
  assert len(t.entries) == 3 and "autotune_gmm.py" in t.comment
  m, k, n, _ = autotune_gmm.SMOKE_SHAPES["smoke"]
  kind = tuning.current_device_kind()
  for op, (kk, nn) in {"gmm": (k, n), "gmm_t": (n, k), "xty": (k, n)}.items():
    cfg = tuning.lookup(op, "triton", jnp.bfloat16, kk, nn, m, device_kind=kind, path=str(path))
    want = gmm_triton.TritonXtyConfig if op == "xty" else gmm_triton.TritonGmmConfig
    assert isinstance(cfg, want)
    rec = next(r for r in out["records"] if r["op"] == op)
    chosen = next(c for c in rec["candidates"] if c.get("chosen"))
    assert chosen["status"] == "ok" and chosen["rel_err"] < 1e-2
    assert chosen["config"] == {f: getattr(cfg, f) for f in chosen["config"]}
  with open(out["record"]) as f:
    assert len(json.load(f)["results"]) == 3


def test_autotune_smoke_interleaved_rounds(tmp_path, monkeypatch, capsys):
  """--interleave 2: every passing candidate is timed in 2 more rounds, and its ms (which picks
  the winner) is the median of those rounds; the sequential time is kept."""
  import statistics

  autotune_gmm = _autotune(monkeypatch)
  out = autotune_gmm.main(["--smoke", "--backends", "triton", "--ops", "gmm,xty", "--interleave",
                           "2", "--write", str(tmp_path / "tuned.json")])
  assert len(out["records"]) == 2
  for rec in out["records"]:
    assert rec["interleave"] == 2
    ok = [c for c in rec["candidates"] if c["status"] == "ok"]
    assert len(ok) == 2
    for c in ok:
      assert len(c["round_ms"]) == 2 and all(t > 0 for t in c["round_ms"])
      assert c["ms"] == statistics.median(c["round_ms"]) and c["sequential_ms"] > 0
    chosen = next(c for c in ok if c.get("chosen"))
    assert rec["default_ms"] == ok[0]["ms"]
    faster = min(ok, key=lambda c: c["ms"])
    assert chosen is faster or faster["ms"] > ok[0]["ms"] * (1 - 0.02)   # --min-gain
  for e in out["entries"]:
    assert e["meta"]["interleave"] == 2
  printed = capsys.readouterr().out
  assert printed.count("round 1/2 smoke") == 2 and printed.count("round 2/2 smoke") == 2
  with pytest.raises(SystemExit, match="--interleave must be >= 0"):
    autotune_gmm.main(["--smoke", "--interleave", "-1"])


def _autotune(monkeypatch):
  monkeypatch.syspath_prepend(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  from experiments import autotune_gmm

  return autotune_gmm


def test_autotune_candidate_grids(monkeypatch):
  """At most 8 candidates per op/backend (GPU time is scarce), the op's default first, every one
  fitting the benchmark shapes."""
  at = _autotune(monkeypatch)
  for m, k, n, g in at.SHAPES.values():
    for op in at.OPS:
      kk, nn = (n, k) if op == "gmm_t" else (k, n)
      for backend in at.BACKENDS:
        grid = at.candidates(op, backend, kk, nn, jnp.bfloat16)
        assert 2 <= len(grid) <= at.MAX_CANDIDATES and len(set(grid)) == len(grid)
        assert grid[0] == at.default_config(op, backend, kk, nn, jnp.bfloat16)
        assert all(tuning.fits(c, kk, nn, jnp.bfloat16, jnp.bfloat16) for c in grid), (op, backend)
        tuning.make_entry(tuning.make_key(op, backend, jnp.bfloat16, kk, nn, m, "x"), grid[-1])


def test_autotune_mosaic_xty_candidates_lower_for_h100(monkeypatch):
  """Every Mosaic group_xty candidate lowers for an H100 (block_rows=32 did not: found on CPU)."""
  at = _autotune(monkeypatch)
  rows = at.lower_only({"olmoe": at.SHAPES["olmoe"]}, ["xty"], ["mosaic"], jnp.dtype(jnp.bfloat16))
  assert len(rows) == 8 and all(r["status"] == "lowers" for r in rows), rows
