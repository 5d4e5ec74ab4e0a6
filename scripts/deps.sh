#!/usr/bin/env bash
# Installs the system libraries qat links against (Debian/Ubuntu), only when missing, and
# Open MPI (dlopen'd at run time by data-parallel `mpirun -np N qat apply`; without it its tests
# skip, which scripts/test.sh counts as a failure).
set -euo pipefail
need=()
for pc in openblas hdf5 json-c; do
  pkg-config --exists "$pc" 2>/dev/null || need+=("$pc")
done
command -v pkg-config >/dev/null 2>&1 || need+=(pkg-config)
command -v mpirun >/dev/null 2>&1 || need+=(openmpi)
if [ ${#need[@]} -gt 0 ]; then
  echo "installing system packages (missing: ${need[*]})" >&2
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq libopenblas-dev libhdf5-dev libjson-c-dev pkg-config libopenmpi-dev openmpi-bin >/dev/null
fi
