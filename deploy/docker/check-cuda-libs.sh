#!/bin/sh
# check-cuda-libs.sh LIBRARY...: fail when the dynamic loader cannot find a library that
# one of LIBRARY needs, other than the driver's libcuda.so.1 (which the NVIDIA container
# runtime mounts at run time). Run by Dockerfile.gpu on ONNX Runtime's CUDA provider after
# ldconfig, so an image that misses a CUDA library (cufft, nvrtc, nvJitLink, ...) does not
# build. Exit 0 all found, 1 a library missing, 2 usage (no such file, ldd failed).
set -eu
[ "$#" -gt 0 ] || { echo "usage: check-cuda-libs.sh LIBRARY..." >&2; exit 2; }
status=0
for lib in "$@"; do
    [ -f "$lib" ] || { echo "check-cuda-libs: no such file: $lib" >&2; exit 2; }
    out=$(ldd "$lib" 2>&1) || { echo "check-cuda-libs: ldd failed on $lib: $out" >&2; exit 2; }
    missing=$(printf '%s\n' "$out" | awk '$2 == "=>" && $3 == "not" && $4 == "found" {print $1}' \
        | grep -vx 'libcuda\.so\.1' | tr '\n' ' ' | sed 's/ $//') || true
    if [ -n "$missing" ]; then
        echo "check-cuda-libs: $lib needs libraries the loader cannot find: $missing" >&2
        status=1
    else
        echo "check-cuda-libs: $lib: every library found (libcuda.so.1 aside: the driver's)"
    fi
done
exit "$status"
