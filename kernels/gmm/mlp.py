"""A plain expert MLP over expert-sorted rows, with its activation inside the grouped products.

  grouped_mlp(x (M, d), w_in (G, d, f), w_out (G, f, d), group_sizes (G,), activation) -> (M, d)
      y[m] = act(x[m] W_in[g(m)]) W_out[g(m)]        (act in float32 on the 16-bit product)

The activation meets a product twice, and each time it runs in that product's epilogue
(kernels.gmm.epilogue) where the backend has epilogues (the Mosaic GPU one):
  forward   (h, a) = x W_in  with Epilogue("activation"): h kept for the backward, a = act(h)
            y = a W_out
  backward  dh = (dy W_out^T) with Epilogue("activation_grad") on h: act's derivative applied
            to the data gradient before it leaves the kernel
            dW_out = a^T dy,  dW_in = x^T dh,  dx = dh W_in^T
That saves the separate elementwise passes over the (M, f) arrays: in the forward, a read of h;
in the backward, the write and read of d(a). The residuals (x, h, a and the weights) are what
grouped_matmul + kernels.hidden + grouped_matmul keep, and so are the values, to float32
rounding of the activation (kernels.gmm.epilogue): the epilogue rounds the product to 16 bits
before the activation, as the separate passes do. On backends without epilogues the same
epilogues run as separate passes. With keep_activation=False the forward keeps x and h only, and
the backward's data-gradient epilogue writes a = act(h) again next to dh.

  grouped_glu(x (M, d), w_gate, w_up (G, d, f), w_out (G, f, d), group_sizes, activation)
      y[m] = (act(x[m] W_gate[g]) * (x[m] W_up[g])) W_out[g]

The GLU takes gate and up as one product of width 2f whose weights are interleaved in units of
64 columns (kernels.gmm.epilogue.interleave: a copy of the two weights per call), so that each
warpgroup's tile holds a gate unit and its up unit: the forward's epilogue writes that product
gu (the backward's residual) and a = act(g) * u, and the down projection's data-gradient epilogue
turns d(a) into d(gu), from which one transposed product gives dx and one weight gradient both
weights' (split back out of the interleaving). On the Mosaic kernel it needs f % 256 == 0 (the
data gradient's 256-column tiles of f); elsewhere the same epilogues run as separate passes.
"""

from __future__ import annotations

import functools
from typing import Callable

import jax

from kernels.activations import ACTIVATIONS, activation_name
from kernels.common import validation
from kernels.gmm.api import run_gmm, run_xty
from kernels.gmm.backends import GMM_BACKENDS
from kernels.gmm.epilogue import GLU_UNIT, Epilogue, deinterleave, interleave


def _activation(activation) -> str:
  name = activation_name(activation)
  if name is None:
    raise ValueError(f"activation must be one of {tuple(ACTIVATIONS)} or one of their functions, "
                     f"got {activation!r}")
  return name


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _grouped_mlp(x, w_in, w_out, group_sizes, activation, backend, keep_activation):
  return _grouped_mlp_fwd(x, w_in, w_out, group_sizes, activation, backend, keep_activation)[0]


def _grouped_mlp_fwd(x, w_in, w_out, group_sizes, activation, backend, keep_activation):
  h, a = run_gmm(x, w_in, group_sizes, False, backend, x.dtype,
                 epilogue=Epilogue("activation", activation))
  y = run_gmm(a, w_out, group_sizes, False, backend, x.dtype)
  return y, (x, w_in, w_out, group_sizes, h, a if keep_activation else None)


def _grouped_mlp_bwd(activation, backend, keep_activation, residuals, dy):
  x, w_in, w_out, group_sizes, h, a = residuals
  dy = dy.astype(x.dtype)
  if keep_activation:
    dh = run_gmm(dy, w_out, group_sizes, True, backend, x.dtype,
                 epilogue=Epilogue("activation_grad", activation), residual=h)
  else:   # a = act(h) again, in the same epilogue that reads h for the derivative
    dh, a = run_gmm(dy, w_out, group_sizes, True, backend, x.dtype,
                    epilogue=Epilogue("activation_grad_value", activation), residual=h)
  dw_out = run_xty(a, dy, group_sizes, backend, w_out.dtype)
  dw_in = run_xty(x, dh, group_sizes, backend, w_in.dtype)
  dx = run_gmm(dh, w_in, group_sizes, True, backend, x.dtype)
  return dx, dw_in, dw_out, None


_grouped_mlp.defvjp(_grouped_mlp_fwd, _grouped_mlp_bwd)


def grouped_mlp(
    x: jax.Array,
    w_in: jax.Array,
    w_out: jax.Array,
    group_sizes: jax.Array,
    *,
    activation: str | Callable[[jax.Array], jax.Array],
    backend: str | None = None,
    keep_activation: bool = True,
) -> jax.Array:
  """Differentiable act(x W_in) W_out per group; see the module docstring.

  Args:
    x: (M, d) rows sorted by group, float32/bfloat16/float16.
    w_in: (G, d, f) and w_out: (G, f, d), x's dtype.
    group_sizes: (G,) int32 rows per group; rows at or past their sum come out zero.
    activation: a kernels.activations.ACTIVATIONS name, or one of its functions.
    backend: a name of GMM_BACKENDS (kernels.gmm.backends), as for grouped_matmul: every product
      runs there (None: "pallas" on a GPU, "xla" elsewhere).
    keep_activation: True: the forward pass keeps a = act(h) for the backward one (with x and h).
      False: it keeps x and h only, and the backward's data-gradient product writes a again from
      h in its epilogue (Epilogue("activation_grad_value")): an (M, f) array less memory between
      the passes for one more (M, f) write in the backward. The same values either way.

  Returns:
    (M, d) in x's dtype.
  """
  backend = GMM_BACKENDS.validate(backend)
  if not isinstance(keep_activation, bool):
    raise ValueError(f"keep_activation: must be True or False, got {keep_activation!r}")
  name = _activation(activation)
  validation.check_float_operand("x", x, 2)
  validation.check_float_operand("w_in", w_in, 3)
  validation.check_float_operand("w_out", w_out, 3)
  validation.check_same_dtype(x=x, w_in=w_in, w_out=w_out)
  g, d, f = w_in.shape
  if x.shape[1] != d:
    raise ValueError(f"w_in: must have shape (G, d={x.shape[1]}, f), got {tuple(w_in.shape)}")
  if w_out.shape != (g, f, d):
    raise ValueError(f"w_out: must have shape (G, f, d) = {(g, f, d)} to match w_in, got "
                     f"{tuple(w_out.shape)}")
  validation.check_group_sizes(group_sizes, g)
  return _grouped_mlp(x, w_in, w_out, group_sizes, name, backend, keep_activation)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def _grouped_glu(x, w_gate, w_up, w_out, group_sizes, activation, backend):
  return _grouped_glu_fwd(x, w_gate, w_up, w_out, group_sizes, activation, backend)[0]


def _grouped_glu_fwd(x, w_gate, w_up, w_out, group_sizes, activation, backend):
  gu, a = run_gmm(x, interleave(w_gate, w_up), group_sizes, False, backend, x.dtype,
                  epilogue=Epilogue("glu", activation))
  y = run_gmm(a, w_out, group_sizes, False, backend, x.dtype)
  # The weights' parts, not their interleaved copy, are kept (it is made again in the backward).
  return y, (x, w_gate, w_up, w_out, group_sizes, gu, a)


def _grouped_glu_bwd(activation, backend, residuals, dy):
  x, w_gate, w_up, w_out, group_sizes, gu, a = residuals
  dy = dy.astype(x.dtype)
  dgu = run_gmm(dy, w_out, group_sizes, True, backend, x.dtype,
                epilogue=Epilogue("glu_grad", activation), residual=gu)
  dw_out = run_xty(a, dy, group_sizes, backend, w_out.dtype)
  dw_gate, dw_up = deinterleave(run_xty(x, dgu, group_sizes, backend, w_gate.dtype))
  # dx = d(gu) W_gu^T: W_gu (G, d, 2f) read as the transposed (G, N, K) layout.
  dx = run_gmm(dgu, interleave(w_gate, w_up), group_sizes, True, backend, x.dtype)
  return dx, dw_gate, dw_up, dw_out, None


_grouped_glu.defvjp(_grouped_glu_fwd, _grouped_glu_bwd)


def grouped_glu(
    x: jax.Array,
    w_gate: jax.Array,
    w_up: jax.Array,
    w_out: jax.Array,
    group_sizes: jax.Array,
    *,
    activation: str | Callable[[jax.Array], jax.Array],
    backend: str | None = None,
) -> jax.Array:
  """Differentiable (act(x W_gate) * (x W_up)) W_out per group; see the module docstring.

  Args:
    x: (M, d) rows sorted by group, float32/bfloat16/float16.
    w_gate, w_up: (G, d, f) with f a multiple of 64; w_out: (G, f, d); all x's dtype.
    group_sizes: (G,) int32 rows per group; rows at or past their sum come out zero.
    activation: the gate's nonlinearity, a kernels.activations.ACTIVATIONS name or function
      ("silu" for SwiGLU).
    backend: a name of GMM_BACKENDS, as for grouped_matmul.

  Returns:
    (M, d) in x's dtype.
  """
  backend = GMM_BACKENDS.validate(backend)
  name = _activation(activation)
  validation.check_float_operand("x", x, 2)
  for arg, w in (("w_gate", w_gate), ("w_up", w_up), ("w_out", w_out)):
    validation.check_float_operand(arg, w, 3)
  validation.check_same_dtype(x=x, w_gate=w_gate, w_up=w_up, w_out=w_out)
  g, d, f = w_gate.shape
  if x.shape[1] != d or f % GLU_UNIT:
    raise ValueError(f"w_gate: must have shape (G, d={x.shape[1]}, f) with f a multiple of "
                     f"{GLU_UNIT}, got {tuple(w_gate.shape)}")
  if w_up.shape != w_gate.shape:
    raise ValueError(f"w_up: must have w_gate's shape {tuple(w_gate.shape)}, got "
                     f"{tuple(w_up.shape)}")
  if w_out.shape != (g, f, d):
    raise ValueError(f"w_out: must have shape (G, f, d) = {(g, f, d)} to match w_gate, got "
                     f"{tuple(w_out.shape)}")
  validation.check_group_sizes(group_sizes, g)
  return _grouped_glu(x, w_gate, w_up, w_out, group_sizes, name, backend)
