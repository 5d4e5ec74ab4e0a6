#!/usr/bin/env bash
# Open MPI's runtime from this (Debian/Ubuntu) machine as one tarball, for a GPU host that has
# no mpirun and nothing to install it from: mpirun, libmpi and the libraries they load (in
# bin/ and lib/, used through PATH and LD_LIBRARY_PATH), and the plugin and help folders
# (under abs/, copied to their own absolute paths by scripts/multigpu-check.sh, and only where
# nothing is there yet). qat opens libmpi.so.40 with dlopen, so no qat file changes.
#   bash scripts/ompi-carry.sh dist/ompi.tar.xz        # about 3 MiB
set -euo pipefail
out=$1
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
lib=/usr/lib/x86_64-linux-gnu
mkdir -p "$tmp/bin" "$tmp/lib" "$tmp/abs$lib/openmpi/lib" "$tmp/abs/usr/share" "$tmp/abs/etc"
cp -L "$(readlink -f "$(command -v mpirun)")" "$tmp/bin/mpirun"
for l in libmpi.so.40 libopen-rte.so.40 libopen-pal.so.40 libhwloc.so.15 libevent_core-2.1.so.7 libevent_pthreads-2.1.so.7 \
  libpmix.so.2 libudev.so.1 libmca_common_sm.so.40 libmca_common_monitoring.so.50 libmca_common_ompio.so.41; do
  [ -e "$lib/$l" ] && cp -L "$lib/$l" "$tmp/lib/"
done
cp -a "$lib/openmpi/lib/openmpi3" "$tmp/abs$lib/openmpi/lib/"
# Plugins for fabrics a single host does not use (UCX, libfabric, PSM, verbs) would only fail to load.
for f in "$tmp/abs$lib/openmpi/lib/openmpi3"/*.so; do
  if ldd "$f" 2>/dev/null | grep -qE "libucp|libucs|libfabric|libpsm|libibverbs|librdmacm"; then rm -f "$f"; fi
done
[ -d "$lib/pmix2" ] && cp -a "$lib/pmix2" "$tmp/abs$lib/" && rm -rf "$tmp/abs$lib/pmix2/include" "$tmp/abs$lib/pmix2/lib/libpmix.a"
for d in /usr/share/openmpi /usr/share/pmix; do [ -d "$d" ] && cp -a "$d" "$tmp/abs/usr/share/"; done
[ -d /etc/openmpi ] && cp -a /etc/openmpi "$tmp/abs/etc/"
mkdir -p "$(dirname "$out")"
tar -cJf "$out" -C "$tmp" .
echo "$out: $(($(stat -c %s "$out") / 1024)) KiB ($("$tmp/bin/mpirun" --version 2>/dev/null | head -1))"
