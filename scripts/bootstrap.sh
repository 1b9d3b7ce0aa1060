#!/usr/bin/env bash
# Creates (once) and refreshes the project's virtual environment in .venv with Python 3.12 and the
# pinned JAX from scripts/constraints.txt. Sourced by run.sh and test.sh; safe to run repeatedly:
# it reinstalls only when pyproject.toml or the constraints changed.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$root/.venv"

find_python312() {
  for cand in python3.12 "$HOME/.pyenv/versions/3.12.1/bin/python3.12"; do
    if command -v "$cand" >/dev/null 2>&1 && PYENV_VERSION=3.12.1 "$cand" -c 'import sys; assert sys.version_info[:2] == (3, 12)' 2>/dev/null; then
      echo "$cand"; return 0
    fi
  done
  for cand in "$HOME"/.pyenv/versions/3.12.*/bin/python3.12 /usr/bin/python3.12 /usr/local/bin/python3.12; do
    if [ -x "$cand" ]; then echo "$cand"; return 0; fi
  done
  return 1
}

if [ ! -x "$venv/bin/python" ]; then
  py="$(find_python312)" || { echo "bootstrap: Python 3.12 not found (jax 0.11 needs Python >= 3.12)" >&2; exit 2; }
  echo "bootstrap: creating $venv with $py" >&2
  PYENV_VERSION=3.12.1 "$py" -m venv "$venv"
fi

stamp="$venv/.jaxmoe-installed"
want="$(cat "$root/pyproject.toml" "$root/scripts/constraints.txt" | sha256sum | cut -d' ' -f1)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "bootstrap: installing jaxmoe and its dependencies into .venv (first run takes a minute or two)" >&2
  "$venv/bin/python" -m pip install -q --disable-pip-version-check --upgrade pip >&2
  "$venv/bin/python" -m pip install -q --disable-pip-version-check -c "$root/scripts/constraints.txt" -e "$root[test]" >&2
  echo "$want" > "$stamp"
fi
