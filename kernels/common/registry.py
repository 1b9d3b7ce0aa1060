"""Backends of an op: one record per backend, one registry per op, one platform default rule.

Every differentiable op of this package (`kernels.gmm`, `kernels.scatter`, `kernels.blocksparse`)
has a registry, `name -> Backend`. The op, the autotuner, the benchmarks, the GPU checks and the
tests iterate it; nothing else maps a backend name to code. A name the op does not have is a
ValueError listing the names it has.

Kinds of names (each op's registry says which it holds):
  "xla"               plain XLA (jax.lax.ragged_dot or gathers + matmuls): portable; CPU default
  "triton"            Pallas kernels lowered through Triton (GPU)
  "mosaic"            Pallas kernels lowered through Mosaic GPU: TMA + wgmma (Hopper)
  "<name>_interpret"  the same kernels run by the Pallas interpreter (how CPU tests check them)
  "pallas"            the fastest Pallas path for the shape on this GPU; GPU default. Usually an
                      automatic choice (a chooser maps it to one of the op's backends per call)
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Iterator, Sequence

import jax

# The name of the automatic Pallas choice, and the per-platform default.
PALLAS = "pallas"
XLA = "xla"


def on_gpu() -> bool:
  return jax.default_backend() == "gpu"


def is_hopper() -> bool:
  if not on_gpu():
    return False
  kind = getattr(jax.devices()[0], "compute_capability", "")
  return str(kind).startswith("9")


def default_backend() -> str:
  """The backend a `backend=None` call gets: "pallas" on a GPU, "xla" elsewhere."""
  return PALLAS if on_gpu() else XLA


def _no_config(shapes: Any, dtypes: Any) -> None:
  return None


def _always_fits(shapes: Any, dtypes: Any, config: Any) -> None:
  return None


def _no_search_space(shapes: Any, dtypes: Any, smoke: bool = False) -> list[Any]:  # no config
  return []


@dataclasses.dataclass(frozen=True)
class Backend:
  """One way to run an op.

  fn:             the op's implementation: fn(*operands, **op keywords, config=...) (backends
                  without a config class take no `config`).
  config_classes: the config dataclasses fn accepts; the first is the default's kind. Empty: none.
  default_config: (shapes, dtypes) -> the config fn uses when given none (None: no config).
  check:          (shapes, dtypes, config) -> why this config cannot run these shapes and dtypes,
                  or None when it can (the kernel's own limits: tiles, shared memory, dtypes).
  search_space:   (shapes, dtypes, smoke=False) -> autotune candidates, the default first.
  needs_gpu:      runs only on a CUDA GPU (it may still be lowered for one from a CPU host).
  interpret:      the kernels run in the Pallas interpreter.
  epilogue_config: None, or for a backend whose kernels apply an epilogue to the product
                  (kernels.gmm.epilogue; fn then takes `epilogue=` and `residual=`):
                  (shapes, dtypes, tuned config or None, epilogue) -> the config such a call
                  runs with, or None when this shape cannot run one.
  What `shapes` and `dtypes` hold is the op's convention (see its backends module).
  """
  name: str
  fn: Callable[..., Any]
  config_classes: tuple[type, ...] = ()
  default_config: Callable[[Any, Any], Any] = _no_config
  check: Callable[[Any, Any, Any], str | None] = _always_fits
  search_space: Callable[..., list[Any]] = _no_search_space
  needs_gpu: bool = False
  interpret: bool = False
  epilogue_config: Callable[[Any, Any, Any, Any], Any] | None = None

  def interpreted(self) -> "Backend":
    """The same kernels run by the Pallas interpreter, named "<name>_interpret"."""
    return dataclasses.replace(self, name=f"{self.name}_interpret",
                               fn=functools.partial(self.fn, interpret=True), needs_gpu=False,
                               interpret=True)

  def unavailable(self, shapes: Any, dtypes: Any, config: Any = None) -> str | None:
    """Why this backend cannot run these shapes here (no GPU, or `check`'s reason for `config`,
    default: `default_config`'s), or None when it can."""
    if self.needs_gpu and not on_gpu():
      return f"needs a CUDA GPU (jax.default_backend() is {jax.default_backend()!r})"
    if config is None:
      config = self.default_config(shapes, dtypes)
    return self.check(shapes, dtypes, config)


class Registry:
  """The backends of one op, by name, plus automatic choices (such as "pallas") resolved per call.

  choosers: name -> (shapes, dtypes) -> the name of a registered backend.
  """

  def __init__(self, op: str, backends: Sequence[Backend],
               choosers: dict[str, Callable[[Any, Any], str]] | None = None):
    self.op = op
    self._backends = {b.name: b for b in backends}
    if len(self._backends) != len(backends):
      raise ValueError(f"{op}: backend names must be unique, got {[b.name for b in backends]}")
    self._choosers = dict(choosers or {})
    if XLA not in self._backends or PALLAS not in self.names:
      raise ValueError(f"{op}: a registry needs an {XLA!r} backend and a {PALLAS!r} backend or "
                       "chooser (the platform defaults)")

  @property
  def names(self) -> tuple[str, ...]:
    """Every name the op accepts (registered backends, then automatic choices)."""
    return tuple(self._backends) + tuple(self._choosers)

  def __iter__(self) -> Iterator[Backend]:
    """The registered backends (not the automatic choices)."""
    return iter(self._backends.values())

  def __contains__(self, name: object) -> bool:
    return name in self.names

  def validate(self, backend: str | None, argname: str = "backend") -> str:
    """`backend` (None: the platform default) if the op has it; else ValueError naming the
    argument, the op and the names it has."""
    if backend is None:
      return default_backend()
    if backend not in self.names:
      raise ValueError(f"{argname} must be one of {self.names} (the backends of {self.op}) or "
                       f"None, got {backend!r}")
    return backend

  def get(self, name: str) -> Backend:
    """The registered backend `name` (not an automatic choice); ValueError if there is none."""
    if name not in self._backends:
      raise ValueError(f"backend must be one of {tuple(self._backends)} (the registered backends "
                       f"of {self.op}), got {name!r}")
    return self._backends[name]

  def select(self, backend: str | None, shapes: Any, dtypes: Any) -> Backend:
    """The backend a call runs on: None -> the platform default; an automatic choice -> the
    backend its chooser picks for these shapes and dtypes."""
    name = self.validate(backend)
    if name in self._choosers:
      name = self._choosers[name](shapes, dtypes)
    return self.get(name)
