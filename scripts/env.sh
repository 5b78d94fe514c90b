# Sourced by the other scripts: create or reuse .venv, install the project, and set the environment.
# Usage: source scripts/env.sh [extras]   (extras: a pip extras list such as "test")
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
EXTRAS="${1:-}"
PYTHON="${PYTHON:-python3}"

if [ ! -x .venv/bin/python ]; then
  echo "== creating .venv"
  "$PYTHON" -m venv .venv
fi
VPY="$ROOT/.venv/bin/python"

# torch: keep one that is already installed (a GPU user's CUDA build); otherwise take the pinned CPU
# build. An unpinned `torch` would pull a CUDA build of several GB.
if ! "$VPY" -c "import torch" 2>/dev/null; then
  echo "== installing torch==2.13.0 (CPU build)"
  "$VPY" -m pip install -q --upgrade pip
  "$VPY" -m pip install -q "torch==2.13.0"
fi

# Reinstall the project only when pyproject.toml changed or an extra is asked for that is not installed yet.
STAMP=".venv/.astrai_ds_installed"
HASH="$(sha256sum pyproject.toml | cut -d' ' -f1)"
if [ -f "$STAMP" ]; then read -r OLD_HASH OLD_EXTRAS < "$STAMP" || true; fi
if [ "${OLD_HASH:-}" = "$HASH" ]; then
  WANT_EXTRAS="${OLD_EXTRAS:-}"
  if [ -n "$EXTRAS" ]; then
    case ",${OLD_EXTRAS:-}," in *",${EXTRAS},"*) ;; *) WANT_EXTRAS="${OLD_EXTRAS:+$OLD_EXTRAS,}$EXTRAS" ;; esac
  fi
else
  WANT_EXTRAS="$EXTRAS"
fi
if [ "${OLD_HASH:-}" != "$HASH" ] || [ "$WANT_EXTRAS" != "${OLD_EXTRAS:-}" ]; then
  echo "== installing astrai_ds${WANT_EXTRAS:+[$WANT_EXTRAS]} into .venv"
  "$VPY" -m pip install -q -e ".${WANT_EXTRAS:+[$WANT_EXTRAS]}"
  echo "$HASH $WANT_EXTRAS" > "$STAMP"
fi

export PATH="$ROOT/.venv/bin:$PATH"
# DeepSpeed compiles its ops on first use (CPU communication 20-30 s, CPU Adam, async_io about 7 minutes on 2 cores):
# once per machine and environment, in ~/.cache/astrai_ds/torch_extensions/<python, torch, DeepSpeed, CPU, .venv>
# (train.py and astrai-ds pick the same folder themselves; a TORCH_EXTENSIONS_DIR set by the caller wins).
TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$("$VPY" -m astrai_ds.extensions)}"
export TORCH_EXTENSIONS_DIR
export PYTHONUNBUFFERED=1
