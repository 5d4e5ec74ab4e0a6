#!/usr/bin/env bash
# Portable bundle of qat for Linux x86-64 machines without a Swift toolchain (a GPU host, say):
# a release build with the Swift runtime and Foundation linked statically, stripped, plus the
# shared libraries a stock Ubuntu 24.04 / Debian 12 lacks (OpenBLAS, HDF5 and its dependencies,
# json-c, the gfortran runtime), and a launcher that sets the library path.
#
#   bash scripts/bundle.sh            # writes dist/qat-linux-x86_64.tar.xz (and the unpacked folder)
#   tar xf qat-linux-x86_64.tar.xz && qat-linux-x86_64/qat selftest --device cuda
#
# CUDA (driver, cuBLAS, NVRTC) is not bundled: it is opened at run time from the host's driver
# and toolkit, so the bundle runs with whatever CUDA the GPU host has (set QAT_CUDA_LIB_DIR if
# its libraries are in an unusual folder). MPI likewise comes from the host.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/deps.sh
swift build -c release --product qat --static-swift-stdlib -Xlinker -s
name=qat-linux-x86_64
out=dist/$name
rm -rf "$out" "dist/$name.tar.xz"
mkdir -p "$out/bin" "$out/lib"
cp .build/release/qat "$out/bin/qat"
strip "$out/bin/qat"
# Every shared library qat needs except the C runtime every Linux has (glibc, libstdc++, libgcc).
ldd "$out/bin/qat" | awk '/=> \//{print $3}' | while read -r lib; do
  case "$(basename "$lib")" in
    libc.so*|libm.so*|libdl.so*|libpthread.so*|librt.so*|ld-linux*|libstdc++.so*|libgcc_s.so*|libutil.so*|libresolv.so*) ;;
    *) cp -L "$lib" "$out/lib/" ;;
  esac
done
# OpenBLAS is chosen through Debian's alternatives; keep the real library under its soname.
strip --strip-unneeded "$out"/lib/*.so* 2>/dev/null || true
cat > "$out/qat" <<'LAUNCH'
#!/bin/sh
# qat launcher: the bundled shared libraries first, then the host's.
here=$(dirname "$(readlink -f "$0")")
LD_LIBRARY_PATH="$here/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" exec "$here/bin/qat" "$@"
LAUNCH
chmod +x "$out/qat"
tar -C dist -cJf "dist/$name.tar.xz" "$name"
size=$(stat -c %s "dist/$name.tar.xz")
echo "dist/$name.tar.xz: $((size / 1024 / 1024)) MiB ($(ls "$out/lib" | wc -l) libraries: $(ls "$out/lib" | tr '\n' ' '))"
[ "$size" -le $((40 * 1024 * 1024)) ] || { echo "bundle is over 40 MiB" >&2; exit 1; }
