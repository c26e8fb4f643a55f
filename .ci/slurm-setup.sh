#!/usr/bin/env bash
# Install a single-machine SLURM (Debian packages) for the tests in tests/test_slurm_*.py.
#
#   bash .ci/slurm-setup.sh            install slurmctld, slurmd, the client tools and munge (idempotent)
#   bash .ci/slurm-setup.sh --start    also start a 2-node test cluster and print `export SLURM_CONF=...`
#                                      (for trying sbatch by hand; the pytest fixture starts its own)
#
# Nothing is written to /etc/slurm: the cluster's config and state live in a temp dir
# (tests/slurm_cluster.py). Needs root (apt-get, and slurmd runs as root).
set -euo pipefail

need_install=0
for tool in slurmctld slurmd sbatch munged; do
    command -v "$tool" >/dev/null 2>&1 || need_install=1
done

if [ "$need_install" = 1 ]; then
    if [ "$(id -u)" != 0 ]; then
        echo "slurm-setup: root is needed to install slurm packages (apt-get)" >&2
        exit 1
    fi
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends slurmctld slurmd slurm-client munge >/dev/null
    # The packages' own services are not used (we are usually in a container without systemd).
fi
echo "slurm-setup: slurm $(dpkg-query -W -f '${Version}' slurm-client 2>/dev/null || echo "?") installed"

if [ "${1:-}" = "--start" ]; then
    here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
    py="${PYTHON:-$here/.venv/bin/python}"
    [ -x "$py" ] || py=python3
    exec "$py" "$here/tests/slurm_cluster.py" start
fi
