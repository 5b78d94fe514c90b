# Sourced by the other scripts: create or reuse .venv, install the project, and set the environment.
# Usage: source scripts/env.sh [extras]   (extras: a pip extras list such as "test")
#
# The dependencies (torch, DeepSpeed and the rest: about 1.6 GB) are installed once per machine, Python and
# dependency list, in ${XDG_CACHE_HOME:-~/.cache}/astrai_ds/deps/<python>-<hash>, and every clone's .venv is a small
# environment on top of it that holds the project alone (installed editable). A second clone therefore sets up in
# seconds, and loads the ops DeepSpeed compiled for the first instead of compiling them again (torch's build compiles
# again whenever the compile command changes, and DeepSpeed's and torch's include paths, inside the environment
# they are installed in, are part of it).
#   ASTRAI_SHARED_DEPS=0   a self-contained .venv instead (everything installed into it)
#   ASTRAI_DEPS_DIR=DIR    the shared environment's folder (default: the one above)
#   PYTHON=python3.12      the Python to build the environments with
# A .venv that has its own torch (a self-contained one, or a GPU user's CUDA build) is kept as it is.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
EXTRAS="${1:-}"
PYTHON="${PYTHON:-python3}"
TORCH_PIN="torch==2.13.0"  # the CPU build; an unpinned `torch` would pull a CUDA build of several GB
MARK=".venv/.astrai_ds_deps"  # in a .venv on top of the shared environment: that environment's folder

# `wanted FILE EXTRAS`: the extras to install given those installed (FILE's second field) and those asked; empty
# when nothing new is asked for. FILE's first field is a hash that must match ($HASH), else all are reinstalled.
wanted() {
  local old_hash="" old_extras="" want
  if [ -f "$1" ]; then read -r old_hash old_extras < "$1" || true; fi
  if [ "$old_hash" != "$HASH" ]; then echo "${2:-,}"; return; fi
  want="$old_extras"
  if [ -n "$2" ]; then
    case ",$old_extras," in *",$2,"*) ;; *) want="${old_extras:+$old_extras,}$2" ;; esac
  fi
  [ "$want" != "$old_extras" ] && echo "${want:-,}" || true
}

install_torch() {  # keep a torch that is already installed (a GPU user's CUDA build)
  if ! "$1" -c "import torch" 2>/dev/null; then
    echo "== installing $TORCH_PIN (CPU build)"
    "$1" -m pip install -q --upgrade pip
    "$1" -m pip install -q "$TORCH_PIN"
  fi
}

if [ -x .venv/bin/python ] && [ ! -f "$MARK" ] || [ "${ASTRAI_SHARED_DEPS:-1}" = 0 ]; then
  # A self-contained .venv: everything installed into it.
  if [ -f "$MARK" ]; then
    echo "== ASTRAI_SHARED_DEPS=0: replacing the .venv on top of $(cat "$MARK") by a self-contained one"
    rm -rf .venv
  fi
  if [ ! -x .venv/bin/python ]; then
    echo "== creating .venv"
    "$PYTHON" -m venv .venv
  fi
  VPY="$ROOT/.venv/bin/python"
  install_torch "$VPY"
  # Reinstall the project only when pyproject.toml changed or an extra is asked for that is not installed yet.
  HASH="$(sha256sum pyproject.toml | cut -d' ' -f1)"
  WANT="$(wanted .venv/.astrai_ds_installed "$EXTRAS")"
  if [ -n "$WANT" ]; then
    WANT="${WANT#,}"
    echo "== installing astrai_ds${WANT:+[$WANT]} into .venv"
    PYTHONWARNINGS=ignore "$VPY" -m pip install -q -e ".${WANT:+[$WANT]}"
    echo "$HASH $WANT" > .venv/.astrai_ds_installed
  fi
else
  # The shared environment, named after the Python, the machine and pyproject.toml's dependency lists.
  PYVER="$("$PYTHON" -c 'import sys; print("py%d.%d" % sys.version_info[:2])')"
  KEY="$({ "$PYTHON" -c 'import sys; print(sys.version, sys.base_prefix)'; uname -m; echo "$TORCH_PIN"
           sed -n '/^dependencies = \[/,/^\[project\.scripts\]/p' pyproject.toml; } | sha256sum | cut -c1-12)"
  DEPS="${ASTRAI_DEPS_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/astrai_ds/deps/$PYVER-$KEY}"
  DPY="$DEPS/bin/python"
  mkdir -p "$(dirname "$DEPS")"
  (
    flock 9  # two clones setting up at once: the second waits for the first's installs
    if [ ! -x "$DPY" ]; then
      echo "== creating the shared environment $DEPS"
      "$PYTHON" -m venv "$DEPS"
    fi
    install_torch "$DPY"
    # The dependencies of the extras asked for (and of those installed before): the project is installed to bring
    # them, then removed: each clone's .venv holds its own copy.
    HASH="$KEY"
    WANT="$(wanted "$DEPS/.astrai_ds_extras" "$EXTRAS")"
    if [ -n "$WANT" ]; then
      WANT="${WANT#,}"
      echo "== installing the dependencies of astrai_ds${WANT:+[$WANT]} into $DEPS"
      "$DPY" -m pip install -q "setuptools>=77" wheel ".${WANT:+[$WANT]}"
      "$DPY" -m pip uninstall -q -y astrai_ds
      echo "$HASH $WANT" > "$DEPS/.astrai_ds_extras"
    fi
  ) 9>"$DEPS.lock"

  if [ "$(cat "$MARK" 2>/dev/null)" != "$DEPS" ]; then
    rm -rf .venv
    echo "== creating .venv on top of $DEPS"
    "$PYTHON" -m venv --without-pip .venv
    SITE="$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
    DSITE="$("$DPY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
    # addsitedir, not a bare path: the shared environment's own .pth files are read too
    echo "import site; site.addsitedir('$DSITE')" > "$SITE/_astrai_ds_deps.pth"
    echo "$DEPS" > "$MARK"
  fi
  # The shared environment's programs (deepspeed, ninja, pytest, mpiexec...), libraries and headers, in .venv too:
  # Python scripts copied with .venv's Python in their first line (so that they see the project), the rest linked.
  for dir in bin lib include share; do
    [ -d "$DEPS/$dir" ] || continue
    mkdir -p ".venv/$dir"
    for f in "$DEPS/$dir"/*; do
      name="$(basename "$f")"
      case "$name" in python*|pip*|activate*|Activate.ps1|"*") continue ;; esac
      [ -e ".venv/$dir/$name" ] || [ -L ".venv/$dir/$name" ] && continue
      if [ "$dir" = bin ] && [ -f "$f" ] && [ "$(head -c 2 "$f")" = "#!" ] && head -1 "$f" | grep -qF "$DPY"; then
        { echo "#!$ROOT/.venv/bin/python"; tail -n +2 "$f"; } > ".venv/bin/$name"
        chmod +x ".venv/bin/$name"
      else
        ln -s "$f" ".venv/$dir/$name"
      fi
    done
  done
  VPY="$ROOT/.venv/bin/python"
  HASH="$(sha256sum pyproject.toml | cut -d' ' -f1)"
  if [ "$(cut -d' ' -f1 .venv/.astrai_ds_installed 2>/dev/null)" != "$HASH" ]; then
    echo "== installing astrai_ds into .venv (editable)"
    # (setuptools warns that an editable install can be shadowed by a folder of the same name: not here)
    PYTHONWARNINGS=ignore "$VPY" -m pip install -q --no-deps --no-build-isolation -e .
    echo "$HASH" > .venv/.astrai_ds_installed
  fi
fi

export PATH="$ROOT/.venv/bin:$PATH"
# DeepSpeed compiles its ops on first use (CPU communication 20-30 s, CPU Adam, async_io about 7 minutes on 2 cores):
# once per machine and environment, in ~/.cache/astrai_ds/torch_extensions/<python, torch, DeepSpeed, CPU, where
# DeepSpeed is installed> (train.py and astrai-ds pick the same folder themselves; a TORCH_EXTENSIONS_DIR set by the
# caller wins).
TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$("$VPY" -m astrai_ds.extensions)}"
export TORCH_EXTENSIONS_DIR
export PYTHONUNBUFFERED=1

# A free TCP port for a launch's rendezvous (the launcher's default, 29500, may be another run's on this machine).
free_port() { python -c 'import socket; s = socket.socket(); s.bind(("", 0)); print(s.getsockname()[1])'; }
