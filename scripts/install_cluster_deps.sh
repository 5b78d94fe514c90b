#!/usr/bin/env bash
# Debian packages for the cluster-launcher tests (tests/cluster/): a one-node Slurm (munge, slurmctld,
# slurmd, slurm-client), sshd and pdsh for the two-host deepspeed run, iproute2 for the network namespaces;
# the headless browser for the chat-page test (tests/serve/test_chat_page.py): chromium, chromium-driver; and
# libaio-dev, which DeepSpeed's async_io op (NVMe offload, ds_configs/zero3_nvme.json) is compiled against; cmake and
# a C++ compiler, which build llama.cpp's Python binding (scripts/llama_cpp.sh, for the GGUF tests).
# Does nothing when they are installed already, or when this is not root on a machine with apt-get
# (the tests then skip and say why). Run by scripts/test.sh; safe to run again.
set -euo pipefail

PACKAGES=(munge slurmctld slurmd slurm-client openssh-server openssh-client pdsh iproute2 procps chromium
          chromium-driver libaio-dev cmake g++ make)
COMMANDS=(munged mungekey slurmctld slurmd sbatch srun scontrol squeue sinfo scancel sshd ssh ssh-keygen pdsh ip
          pkill chromium chromedriver cmake g++ make)

missing=0
for c in "${COMMANDS[@]}"; do
  command -v "$c" >/dev/null 2>&1 || [ -x "/usr/sbin/$c" ] || missing=1
done
[ -e /usr/include/libaio.h ] || missing=1
[ "$missing" = 0 ] && exit 0

if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
  echo "== cluster test packages missing; not root or no apt-get, so the cluster and chat-page tests will skip" >&2
  exit 0
fi

echo "== installing ${PACKAGES[*]}"
# The packages' init scripts would start munged, slurmd and sshd right away, before any configuration
# exists (and outside the tests' control); a policy-rc.d that exits 101 tells invoke-rc.d not to.
POLICY=/usr/sbin/policy-rc.d
OWN_POLICY=0
if [ ! -e "$POLICY" ]; then
  printf '#!/bin/sh\nexit 101\n' > "$POLICY"
  chmod 755 "$POLICY"
  OWN_POLICY=1
fi
trap 'if [ "$OWN_POLICY" = 1 ]; then rm -f "$POLICY"; fi' EXIT

export DEBIAN_FRONTEND=noninteractive
apt_install() { apt-get install -y -q --no-install-recommends "${PACKAGES[@]}" >/dev/null; }
# Refresh the package lists only when the ones on the machine cannot serve the install (missing or stale).
if ! apt_install; then
  echo "== refreshing the package lists"
  apt-get update -q >/dev/null
  apt_install
fi
