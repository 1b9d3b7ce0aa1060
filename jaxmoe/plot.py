"""`jaxmoe plot RUN`: training curves from RUN/metrics.jsonl to RUN/curves.png (matplotlib, Agg)."""

from __future__ import annotations

import os

from jaxmoe.metrics import read_jsonl


class PlotError(ValueError):
  """No metrics to plot (a user-facing error)."""


def plot_run(run_dir: str, out: str | None = None) -> str:
  """Draw loss/val loss, tokens/s and expert load vs step; returns the PNG path."""
  path = os.path.join(run_dir, "metrics.jsonl")
  if not os.path.isfile(path):
    raise PlotError(f"no metrics file {path!r} (is {run_dir!r} a training run folder?)")
  records = [r for r in read_jsonl(path) if "step" in r]
  if not records:
    raise PlotError(f"{path} holds no metrics records")
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  def series(key):
    pts = [(r["step"], r[key]) for r in records if isinstance(r.get(key), (int, float))]
    return [p[0] for p in pts], [p[1] for p in pts]

  fig, axes = plt.subplots(1, 3, figsize=(15, 4))
  for key in ("loss", "val_loss"):
    xs, ys = series(key)
    if xs:
      axes[0].plot(xs, ys, label=key, marker="." if key == "val_loss" else None)
  axes[0].set_xlabel("step"); axes[0].set_ylabel("cross-entropy (nats/token)"); axes[0].legend()
  xs, ys = series("tokens_per_s")
  axes[1].plot(xs, ys); axes[1].set_xlabel("step"); axes[1].set_ylabel("tokens/s")
  for key in ("aux_loss", "expert_load_max", "dropped_fraction"):
    xs, ys = series(key)
    if xs:
      axes[2].plot(xs, ys, label=key)
  axes[2].set_xlabel("step"); axes[2].set_title("MoE routing")
  if axes[2].lines:
    axes[2].legend()
  fig.suptitle(os.path.basename(os.path.abspath(run_dir)))
  fig.tight_layout()
  out = out or os.path.join(run_dir, "curves.png")
  suffix = os.path.splitext(out)[1].lower().lstrip(".")
  if not suffix:
    out += ".png"   # what matplotlib would write; said here so the printed path is the file's
  elif suffix not in fig.canvas.get_supported_filetypes():
    plt.close(fig)
    raise PlotError(f"--out {out!r}: unknown image type {suffix!r}; use one of "
                    f"{sorted(fig.canvas.get_supported_filetypes())}")
  try:
    fig.savefig(out, dpi=100)
  except OSError as e:
    raise PlotError(f"cannot write {out!r}: {e.strerror or e}") from None
  finally:
    plt.close(fig)
  return out
