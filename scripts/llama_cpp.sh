#!/usr/bin/env bash
# Build llama.cpp's Python binding (llama-cpp-python, a source distribution on PyPI: cmake and gcc, about 3.5 minutes
# on 2 cores) once per machine, cache the wheel in ${XDG_CACHE_HOME:-~/.cache}/astrai_ds/wheels/, and install it into
# the Python given as PYTHON (default: this checkout's .venv). The tests check our GGUF files with it.
# The build targets AVX2 without AVX-512 or AMX (llama.cpp's native build crashed in decode on an AMX machine), and
# leaves out the multimodal library (LLAVA_BUILD), which text models do not use. Two calls at once (the test
# session's background build and a test) take turns on a lock: the second installs what the first built.
set -euo pipefail
VERSION="${LLAMA_CPP_VERSION:-0.3.36}"
PY="${PYTHON:-$(cd "$(dirname "$0")/.." && pwd)/.venv/bin/python}"
CACHE="${XDG_CACHE_HOME:-$HOME/.cache}/astrai_ds/wheels"
installed() { "$PY" -c "import llama_cpp, sys; sys.exit(llama_cpp.__version__ != '$VERSION')" 2>/dev/null; }
installed && exit 0
mkdir -p "$CACHE"
exec 9>"$CACHE/.llama_cpp.lock"
flock 9
installed && exit 0
WHEEL="$(ls "$CACHE"/llama_cpp_python-"$VERSION"-*.whl 2>/dev/null | head -1 || true)"
if [ -z "$WHEEL" ]; then
  for tool in cmake gcc g++; do
    command -v "$tool" >/dev/null || {
      echo "error: building llama-cpp-python needs $tool (apt-get install cmake g++ make)" >&2; exit 1; }
  done
  echo "building llama-cpp-python==$VERSION (about 3.5 minutes on 2 cores, once per machine) into $CACHE" >&2
  CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AVX512=OFF \
-DGGML_AMX_INT8=OFF -DGGML_AMX_TILE=OFF -DGGML_AMX_BF16=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
-DLLAVA_BUILD=OFF" CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-2}" \
    "$PY" -m pip wheel -q --no-deps "llama-cpp-python==$VERSION" -w "$CACHE" >&2
  WHEEL="$(ls "$CACHE"/llama_cpp_python-"$VERSION"-*.whl | head -1)"
fi
"$PY" -m pip install -q "$WHEEL" >&2
