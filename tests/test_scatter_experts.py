"""Scatter expert MLP/GLU equal the grouped-matmul path (sort + gather + kernels.grouped_matmul +
unsort/combine) and a plain per-token loop on the same routing: values and gradients."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import assert_close
from kernels import grouped_matmul
from kernels.scatter import triton as scatter_triton
from kernels.scatter import scatter_glu, scatter_mlp
from kernels.scatter import sort_slots

SMALL = scatter_triton.TritonScatterConfig(block_m=16, block_n=16, block_k=16, group_m=2)
T, K, E, D, F = 19, 2, 5, 24, 32


def _setup(rng, kind: str, glu: bool, dtype=jnp.float32):
  if kind == "one":  # expert 0 takes every first choice, expert 1 every second one
    choices = np.tile(np.arange(K, dtype=np.int32), (T, 1))
  else:  # experts 0 and 3 stay empty
    choices = np.stack([rng.choice([1, 2, 4], K, replace=False) for _ in range(T)])
  choices = jnp.asarray(choices, jnp.int32)
  x = jnp.asarray(rng.standard_normal((T, D)), dtype)
  n_in = 2 if glu else 1
  ws = [jnp.asarray(rng.standard_normal((E, D, F)) / np.sqrt(D), dtype) for _ in range(n_in)]
  ws.append(jnp.asarray(rng.standard_normal((E, F, D)) / np.sqrt(F), dtype))
  gates = jnp.asarray(rng.random((T, K)) + 0.1, jnp.float32)
  return choices, x, ws, gates


def _act(h, up=None):
  a = jax.nn.silu(h.astype(jnp.float32))
  return (a if up is None else a * up.astype(jnp.float32)).astype(h.dtype)


def grouped_path(x, ws, choices, gates):
  """sort + gather + kernels.grouped_matmul + unsort + gate-weighted combine."""
  flat = choices.reshape(-1)
  order = jnp.argsort(flat, stable=True)
  sizes = jnp.bincount(flat, length=E).astype(jnp.int32)
  xs = x[order // K]
  if len(ws) == 3:
    h = _act(grouped_matmul(xs, ws[0], sizes, backend="xla"),
             grouped_matmul(xs, ws[1], sizes, backend="xla"))
  else:
    h = _act(grouped_matmul(xs, ws[0], sizes, backend="xla"))
  ys = grouped_matmul(h, ws[-1], sizes, backend="xla")
  y = jnp.zeros_like(ys).at[order].set(ys).reshape(T, K, D).astype(jnp.float32)
  return jnp.einsum("tk,tkd->td", gates, y).astype(x.dtype)


def loop_reference(x, ws, choices, gates):
  """Per token, per choice, in float32: the definition of a top-k expert layer."""
  x32 = x.astype(jnp.float32)
  ws = [w.astype(jnp.float32) for w in ws]
  rows = []
  for t in range(T):
    acc = jnp.zeros((D,), jnp.float32)
    for j in range(K):
      e = int(choices[t, j])
      if len(ws) == 3:
        h = jax.nn.silu(x32[t] @ ws[0][e]) * (x32[t] @ ws[1][e])
      else:
        h = jax.nn.silu(x32[t] @ ws[0][e])
      acc = acc + gates[t, j] * (h @ ws[-1][e])
    rows.append(acc)
  return jnp.stack(rows)


def _scatter(x, ws, choices, gates, backend):
  routing = sort_slots(choices, E)
  kw = dict(backend=backend, config=SMALL)
  if len(ws) == 3:
    return scatter_glu(x, ws[0], ws[1], ws[2], routing, gates, activation=jax.nn.silu, **kw)
  return scatter_mlp(x, ws[0], ws[1], routing, gates, activation=jax.nn.silu, **kw)


def _grads(fn, x, ws, choices, gates, probe):
  def loss(x, ws, g):
    return jnp.sum(fn(x, ws, choices, g).astype(jnp.float32) * probe)
  return jax.grad(loss, argnums=(0, 1, 2))(x, ws, gates)


def _compare_grads(got, want, dtype, factor=1.0):
  assert_close(got[0], want[0], dtype, factor=factor, name="dx")
  for i, (g, w) in enumerate(zip(got[1], want[1])):
    assert_close(g, w, dtype, factor=factor, name=f"dw{i}")
  assert_close(got[2], want[2], dtype, factor=factor, name="dgates")


@pytest.mark.parametrize("glu", [False, True])
@pytest.mark.parametrize("kind", ["empty", "one"])
def test_xla_equals_grouped_path_and_loop(rng, glu, kind):
  choices, x, ws, gates = _setup(rng, kind, glu)
  fn = lambda x, ws, c, g: _scatter(x, ws, c, g, "xla")
  got = fn(x, ws, choices, gates)
  chex.assert_shape(got, (T, D))
  assert_close(got, grouped_path(x, ws, choices, gates), jnp.float32, name="vs grouped")
  assert_close(got, loop_reference(x, ws, choices, gates), jnp.float32, name="vs loop")
  probe = jnp.asarray(rng.standard_normal((T, D)), jnp.float32)
  got_g = _grads(fn, x, ws, choices, gates, probe)
  _compare_grads(got_g, _grads(grouped_path, x, ws, choices, gates, probe), jnp.float32)
  _compare_grads(got_g, _grads(loop_reference, x, ws, choices, gates, probe), jnp.float32)


def test_triton_interpret_glu_equals_grouped_path(rng):
  choices, x, ws, gates = _setup(rng, "empty", True)
  fn = lambda x, ws, c, g: _scatter(x, ws, c, g, "triton_interpret")
  got = fn(x, ws, choices, gates)
  chex.assert_tree_all_finite(got)
  assert_close(got, loop_reference(x, ws, choices, gates), jnp.float32, name="vs loop")
  probe = jnp.asarray(rng.standard_normal((T, D)), jnp.float32)
  _compare_grads(_grads(fn, x, ws, choices, gates, probe),
                 _grads(grouped_path, x, ws, choices, gates, probe), jnp.float32)


def test_bf16_mlp_triton_interpret(rng):
  choices, x, ws, gates = _setup(rng, "one", False, jnp.bfloat16)
  fn = lambda x, ws, c, g: _scatter(x, ws, c, g, "triton_interpret")
  got = fn(x, ws, choices, gates)
  assert got.dtype == jnp.bfloat16
  assert_close(got, loop_reference(x, ws, choices, gates), jnp.bfloat16, name="vs loop")
  probe = jnp.asarray(rng.standard_normal((T, D)), jnp.float32)
  _compare_grads(_grads(fn, x, ws, choices, gates, probe),
                 _grads(loop_reference, x, ws, choices, gates, probe), jnp.bfloat16)


def test_validation(rng):
  choices, x, ws, gates = _setup(rng, "empty", True)
  routing = sort_slots(choices, E)
  with pytest.raises(ValueError, match="w_down"):
    scatter_glu(x, ws[0], ws[1], ws[0], routing, gates)
  with pytest.raises(ValueError, match="w_up"):
    scatter_glu(x, ws[0], ws[1][:, :, :-1], ws[2], routing, gates)
  with pytest.raises(ValueError, match="gates"):
    scatter_mlp(x, ws[0], ws[2], routing, gates[:-1])
  with pytest.raises(ValueError, match="w_in"):
    scatter_mlp(x, ws[2], ws[2], routing, gates)


def test_glu_gradient_lowers_for_h100():
  """The scatter GLU's products path (fused=False) forward+backward lowers for an H100 with the
  Triton kernels (the fused path: tests/test_scatter_glu_fused.py)."""
  from kernels.common.gpu_lowering import lower_for_gpu

  s = jax.ShapeDtypeStruct
  t, k, e, d, f = 300, 2, 4, 256, 384

  def loss(x, g, wg, wu, wd, choices):
    out = scatter_glu(x, wg, wu, wd, sort_slots(choices, e), g, backend="triton", fused=False)
    return jnp.sum(out.astype(jnp.float32))

  bf = jnp.bfloat16
  text = lower_for_gpu(jax.grad(loss, argnums=(0, 1, 2, 3, 4)), s((t, d), bf),
                       s((t, k), jnp.float32), s((e, d, f), bf), s((e, d, f), bf),
                       s((e, f, d), bf), s((t, k), jnp.int32))
  assert text.count("jaxmoe_scatter2scatter") >= 6   # 3 forward products, 3 data gradients
  assert text.count("jaxmoe_group_xty") >= 3         # 3 weight gradients
