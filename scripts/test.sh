#!/usr/bin/env bash
# The whole test suite, as CI runs it: creates or reuses .venv, installs the project with its test
# extras, then runs pytest. Extra arguments go to pytest (e.g. scripts/test.sh -m "not multiproc").
source "$(dirname "$0")/env.sh" test
# Slurm, sshd and pdsh for tests/cluster, Chromium for the chat-page test (as root with apt-get; a no-op once
# installed). Where they can be installed, those tests must run: a failed install makes them fail, not skip.
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  export ASTRAI_REQUIRE_CLUSTER_TESTS="${ASTRAI_REQUIRE_CLUSTER_TESTS:-1}"
  scripts/install_cluster_deps.sh || echo "warning: installing the cluster test packages failed (see above)" >&2
fi
# Every run ends with its 25 slowest tests, and leaves the time of each test in test-results/junit.xml (ignored by git).
exec python -m pytest tests --durations=25 --junitxml=test-results/junit.xml "$@"
