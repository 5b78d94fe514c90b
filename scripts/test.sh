#!/usr/bin/env bash
# The whole test suite, as CI runs it: creates or reuses .venv, installs the project with its test
# extras, then runs pytest. Extra arguments go to pytest (e.g. scripts/test.sh -m "not multiproc").
source "$(dirname "$0")/env.sh" test
exec python -m pytest tests "$@"
