"""Per-shape block sizes for the grouped-matmul kernels: a small tuned table and its lookup.

Why: each Pallas kernel takes a config dataclass (block sizes, pipeline depth, grid swizzle,
warps), and one default per kernel is a compromise; the fastest config depends on the GPU and on
the shape. `experiments/autotune_gmm.py` times a few candidates per shape on the GPU (each one
checked against `kernels.gmm.reference` first) and writes the fastest into a JSON table;
`kernels.gmm.api` asks `lookup` for a config at trace time, on GPU only, and uses the
kernel's default where the table has no entry. Tables are read once per file version (path,
mtime, size); a function already traced keeps the config it was traced with.

The table (kernels/gmm/tuned_configs.json, shipped as package data; the environment variable
JAXMOE_TUNED_CONFIGS=path replaces it with another file):

  {"version": 1,
   "comment": "free text",
   "entries": [
     {"device_kind": "NVIDIA H100 80GB HBM3",  # jax.devices()[0].device_kind, matched exactly
      "op": "gmm",               # "gmm" | "gmm_t" (transpose_rhs=True) | "xty" (group_xty)
      "backend": "mosaic",       # "mosaic" | "triton"
      "dtype": "bfloat16",       # operand dtype: "bfloat16" | "float16" | "float32"
      "k": 4096, "n": 14336,     # gmm/gmm_t: contraction and output columns; xty: x and dy columns
      "m_bucket": 32768,         # rows M rounded up to a power of two (`m_bucket`)
      "config_type": "MosaicWsGmmConfig",   # allowed: CONFIG_TYPES[(op, backend)], the config
                                 # classes of the backend's record in kernels.gmm.backends
      "config": {"block_m": 128, "block_n": 128, ...},   # fields; missing ones take defaults
                                 # (sizes: ints >= 1, or null where the default is None;
                                 # flags such as "chain", "largest_first": true / false)
      "meta": {...}}             # optional, free-form: timings, date, jax version, ...
   ]}

Entries for other devices are ignored, but the whole file is validated: a malformed entry raises
ValueError naming the file, the entry and the field. Two entries with the same key are an error.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.resources
import json
import os
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from kernels.common.groups import pow2_at_least
from kernels.common.registry import Registry
from kernels.gmm.backends import GMM_BACKENDS, XTY_BACKENDS
from kernels.gmm.shapes import GroupedShape, dtypes as make_dtypes

ENV_VAR = "JAXMOE_TUNED_CONFIGS"
TABLE_VERSION = 1
DTYPES = ("bfloat16", "float16", "float32")
# The registry of each tuned op: "gmm_t" is grouped_matmul with transpose_rhs=True (the data
# gradient's shape).
REGISTRIES: dict[str, Registry] = {"gmm": GMM_BACKENDS, "gmm_t": GMM_BACKENDS, "xty": XTY_BACKENDS}
OPS = tuple(REGISTRIES)
# The backends with a config to tune: the compiled (GPU) Pallas ones.
TUNED_BACKENDS = tuple(sorted({b.name for r in REGISTRIES.values() for b in r
                               if b.config_classes and b.needs_gpu}))

# Config dataclass names allowed per (op, backend), from the backends' records. The Mosaic gmm and
# group_xty may name either the warp-specialized kernel's config or the simple kernel's: the type
# picks the kernel.
CONFIG_TYPES: dict[tuple[str, str], tuple[str, ...]] = {
    (op, name): tuple(c.__name__ for c in REGISTRIES[op].get(name).config_classes)
    for op in OPS for name in TUNED_BACKENDS
}

# The comment experiments/autotune_gmm.py writes into the tables it fills.
TABLE_COMMENT = (
    "Tuned grouped-matmul configs keyed by (device_kind, op, backend, dtype, k, n, m_bucket); "
    "schema and lookup in kernels/gmm/tuning.py. Filled by experiments/autotune_gmm.py on the GPU; "
    "each entry's meta records its timing, the default's, the date and the jax version."
)

_TOP_FIELDS = ("version", "comment", "entries")
_KEY_FIELDS = ("device_kind", "op", "backend", "dtype", "k", "n", "m_bucket")
_ENTRY_FIELDS = _KEY_FIELDS + ("config_type", "config", "meta")


class TableKey(NamedTuple):
  """What a tuned config is chosen by."""
  device_kind: str
  op: str
  backend: str
  dtype: str
  k: int
  n: int
  m_bucket: int


@dataclasses.dataclass(frozen=True)
class Table:
  """A validated table: the entries as in the file and the configs they give, by key."""
  path: str
  comment: str
  entries: tuple[dict[str, Any], ...]
  configs: dict[TableKey, Any]


def config_classes() -> dict[str, type]:
  """Config dataclasses by name: those of the tuned backends' records."""
  return {c.__name__: c for r in REGISTRIES.values() for name in TUNED_BACKENDS
          for c in r.get(name).config_classes}


def m_bucket(m: int) -> int:
  """M rounded up to a power of two (1 for M <= 1): the row-count part of a table key."""
  if isinstance(m, bool) or not isinstance(m, int) or m < 0:
    raise ValueError(f"m must be an int >= 0, got {m!r}")
  return pow2_at_least(m)


def current_device_kind() -> str:
  """The device kind string jax reports for the default device, e.g. "NVIDIA H100 80GB HBM3"."""
  dev = jax.devices()[0]
  return str(getattr(dev, "device_kind", dev.platform))


def default_table_path() -> str:
  """The table shipped with the package (kernels/gmm/tuned_configs.json)."""
  return str(importlib.resources.files("kernels.gmm").joinpath("tuned_configs.json"))


def table_path() -> str:
  """$JAXMOE_TUNED_CONFIGS when set and non-empty, else the shipped table."""
  path = os.environ.get(ENV_VAR, "")
  if path:
    if not os.path.isfile(path):
      raise ValueError(f"{ENV_VAR} must name an existing JSON table file, got {path!r}")
    return path
  return default_table_path()


# ---------------------------------------------------------------------------------------------
# Validation.


def _describe(entry: Any) -> str:
  """A short identification of an entry for error messages."""
  if not isinstance(entry, dict):
    return ""
  parts = [f"{f}={entry[f]!r}" for f in ("op", "backend", "k", "n", "m_bucket") if f in entry]
  return f" ({', '.join(parts)})" if parts else ""


def _is_int(v: Any) -> bool:
  return isinstance(v, int) and not isinstance(v, bool)


def _validate_entry(entry: Any, where: str, classes: dict[str, type]) -> tuple[TableKey, Any]:
  """(key, config) of one entry; ValueError naming `where` (file + entry) and the field."""
  if not isinstance(entry, dict):
    raise ValueError(f"{where}: must be a JSON object, got {type(entry).__name__}")
  where = where + _describe(entry)

  def bad(field: str, want: str) -> ValueError:
    return ValueError(f"{where}: field {field!r} must be {want}, got {entry.get(field)!r}")

  unknown = sorted(set(entry) - set(_ENTRY_FIELDS))
  if unknown:
    raise ValueError(f"{where}: unknown field {unknown[0]!r}; allowed fields: {list(_ENTRY_FIELDS)}")
  for field in _KEY_FIELDS + ("config_type", "config"):
    if field not in entry:
      raise ValueError(f"{where}: field {field!r} is missing; required fields: "
                       f"{list(_KEY_FIELDS) + ['config_type', 'config']}")
  if not isinstance(entry["device_kind"], str) or not entry["device_kind"]:
    raise bad("device_kind", "a non-empty string (jax.devices()[0].device_kind)")
  if entry["op"] not in OPS:
    raise bad("op", f"one of {list(OPS)}")
  if entry["backend"] not in TUNED_BACKENDS:
    raise bad("backend", f"one of {list(TUNED_BACKENDS)}")
  if entry["dtype"] not in DTYPES:
    raise bad("dtype", f"one of {list(DTYPES)}")
  for field in ("k", "n"):
    if not _is_int(entry[field]) or entry[field] < 1:
      raise bad(field, "an int >= 1")
  mb = entry["m_bucket"]
  if not _is_int(mb) or mb < 1 or mb & (mb - 1):
    raise bad("m_bucket", "a power of two >= 1 (M rounded up)")
  allowed = CONFIG_TYPES[(entry["op"], entry["backend"])]
  if entry["config_type"] not in allowed:
    raise bad("config_type", f"one of {list(allowed)} for op={entry['op']!r}, "
                             f"backend={entry['backend']!r}")
  cls = classes[entry["config_type"]]
  defaults = {f.name: f.default for f in dataclasses.fields(cls)}
  fields = set(defaults)
  cfg = entry["config"]
  if not isinstance(cfg, dict):
    raise bad("config", f"a JSON object with fields of {cls.__name__} {sorted(fields)}")
  for name, value in cfg.items():
    if name not in fields:
      raise ValueError(f"{where}: field 'config.{name}' is not a field of {cls.__name__}; "
                       f"allowed: {sorted(fields)}")
    # The kind of value a field takes, by its default: a flag (bool), an optional size
    # (None), or a size (int).
    if isinstance(defaults[name], bool):
      if not isinstance(value, bool):
        raise ValueError(f"{where}: field 'config.{name}' must be true or false, got {value!r}")
    elif not (_is_int(value) and value >= 1) and not (defaults[name] is None and value is None):
      want = "null or an int >= 1" if defaults[name] is None else "an int >= 1"
      raise ValueError(f"{where}: field 'config.{name}' must be {want}, got {value!r}")
  if "meta" in entry and not isinstance(entry["meta"], dict):
    raise bad("meta", "a JSON object (free-form record)")
  key = TableKey(*(entry[f] for f in _KEY_FIELDS))
  return key, cls(**cfg)


def validate_table(data: Any, path: str) -> Table:
  """Checks a parsed table; ValueError naming `path`, the entry and the field when malformed."""
  if not isinstance(data, dict):
    raise ValueError(f"{path}: the table must be a JSON object with fields {list(_TOP_FIELDS)}, "
                     f"got {type(data).__name__}")
  unknown = sorted(set(data) - set(_TOP_FIELDS))
  if unknown:
    raise ValueError(f"{path}: unknown top-level field {unknown[0]!r}; allowed: {list(_TOP_FIELDS)}")
  if data.get("version") != TABLE_VERSION:
    raise ValueError(f"{path}: field 'version' must be {TABLE_VERSION}, got {data.get('version')!r}")
  comment = data.get("comment", "")
  if not isinstance(comment, str):
    raise ValueError(f"{path}: field 'comment' must be a string, got {comment!r}")
  entries = data.get("entries")
  if not isinstance(entries, list):
    raise ValueError(f"{path}: field 'entries' must be a list, got {entries!r}")
  classes = config_classes()
  configs: dict[TableKey, Any] = {}
  first: dict[TableKey, int] = {}
  for i, entry in enumerate(entries):
    key, cfg = _validate_entry(entry, f"{path}: entries[{i}]", classes)
    if key in first:
      raise ValueError(f"{path}: entries[{i}]{_describe(entry)} has the same key as "
                       f"entries[{first[key]}] ({key}); keep one")
    first[key] = i
    configs[key] = cfg
  return Table(path=path, comment=comment, entries=tuple(entries), configs=configs)


def load_table(path: str) -> Table:
  """Reads and validates a table file (cached per path, mtime and size)."""
  try:
    st = os.stat(path)
  except OSError as e:
    raise ValueError(f"{path}: cannot read the tuned-config table: {e}") from e
  return _load_cached(os.path.abspath(path), st.st_mtime_ns, st.st_size)


@functools.lru_cache(maxsize=16)
def _load_cached(path: str, mtime_ns: int, size: int) -> Table:
  del mtime_ns, size  # cache key only: a rewritten file is read again
  with open(path) as f:
    text = f.read()
  try:
    data = json.loads(text)
  except json.JSONDecodeError as e:
    raise ValueError(f"{path}: not valid JSON: {e}") from e
  return validate_table(data, path)


# ---------------------------------------------------------------------------------------------
# Lookup.


def make_key(op: str, backend: str, dtype: Any, k: int, n: int, m: int,
             device_kind: str | None = None) -> TableKey:
  """The table key of a call; ValueError naming the argument for an unknown op/backend/dtype."""
  if op not in OPS:
    raise ValueError(f"op must be one of {OPS}, got {op!r}")
  if backend not in TUNED_BACKENDS:
    raise ValueError(f"backend must be one of {TUNED_BACKENDS}, got {backend!r}")
  dtype_name = jnp.dtype(dtype).name
  if dtype_name not in DTYPES:
    raise ValueError(f"dtype must be one of {DTYPES}, got {dtype_name!r}")
  kind = current_device_kind() if device_kind is None else device_kind
  return TableKey(kind, op, backend, dtype_name, int(k), int(n), m_bucket(int(m)))


def lookup(op: str, backend: str, dtype: Any, k: int, n: int, m: int, *,
           device_kind: str | None = None, path: str | None = None) -> Any | None:
  """The tuned config for a call, or None (then the kernel's default is used).

  Args:
    op: "gmm", "gmm_t" (grouped_matmul with transpose_rhs=True) or "xty" (group_xty).
    backend: one of TUNED_BACKENDS ("mosaic", "triton").
    dtype: operand dtype.
    k, n: gmm/gmm_t: contraction size and output columns; xty: columns of x and of dy.
    m: rows (lhs / x rows); matched by its power-of-two bucket.
    device_kind: defaults to this process's device (`current_device_kind`).
    path: table file; defaults to `table_path()` ($JAXMOE_TUNED_CONFIGS or the shipped table).

  Returns:
    The config dataclass (for Mosaic gmm a MosaicWsGmmConfig or MosaicGmmConfig, for Mosaic xty a
    MosaicWsXtyConfig or MosaicXtyConfig: its type says which kernel), or None when the table has
    no entry for this device and shape.
  """
  key = make_key(op, backend, dtype, k, n, m, device_kind)
  return load_table(path or table_path()).configs.get(key)


def fits(config: Any, k: int, n: int, in_dtype: Any, out_dtype: Any) -> bool:
  """Whether a (tuned) config can run this call: the check of the tuned backend whose record
  owns the config's class (Mosaic: tiles dividing K and N, stages and output staging within
  shared memory for these dtypes; Triton kernels mask ragged edges: always True)."""
  shape, dtypes = GroupedShape(1, k, n, 1), make_dtypes(in_dtype, out_dtype)
  for r in (GMM_BACKENDS, XTY_BACKENDS):
    for name in TUNED_BACKENDS:
      backend = r.get(name)
      if isinstance(config, backend.config_classes):
        return backend.check(shape, dtypes, config) is None
  raise ValueError(f"config must be an instance of one of {sorted(config_classes())}, got "
                   f"{type(config).__name__}")


# ---------------------------------------------------------------------------------------------
# Writing (used by experiments/autotune_gmm.py).


def make_entry(key: TableKey, config: Any, meta: dict[str, Any] | None = None) -> dict[str, Any]:
  """A table entry for `config` under `key` (every config field written out)."""
  name = type(config).__name__
  if name not in CONFIG_TYPES.get((key.op, key.backend), ()):
    raise ValueError(f"config must be one of {CONFIG_TYPES.get((key.op, key.backend))} for "
                     f"op={key.op!r}, backend={key.backend!r}, got {name}")
  entry: dict[str, Any] = dict(key._asdict())
  entry["config_type"] = name
  entry["config"] = dataclasses.asdict(config)
  if meta:
    entry["meta"] = meta
  return entry


def merge_entries(old: list[dict[str, Any]], new: list[dict[str, Any]]) -> list[dict[str, Any]]:
  """`old` with each entry of `new` replacing the one of the same key (or added), sorted by key."""
  merged = {tuple(e[f] for f in _KEY_FIELDS): e for e in old}
  for e in new:
    merged[tuple(e[f] for f in _KEY_FIELDS)] = e
  return [merged[k] for k in sorted(merged)]


def write_table(path: str, new_entries: list[dict[str, Any]], comment: str | None = None) -> Table:
  """Merges `new_entries` into the table at `path` (created if absent), validates the result
  before replacing the file (atomically), and returns it as read back."""
  old_entries: list[dict[str, Any]] = []
  old_comment = ""
  if os.path.exists(path):
    old = load_table(path)
    old_entries, old_comment = list(old.entries), old.comment
  data = {
      "version": TABLE_VERSION,
      "comment": comment if comment is not None else old_comment,
      "entries": merge_entries(old_entries, new_entries),
  }
  validate_table(data, path)
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = f"{path}.tmp{os.getpid()}"
  with open(tmp, "w") as f:
    json.dump(data, f, indent=1)
    f.write("\n")
  os.replace(tmp, path)
  return load_table(path)
