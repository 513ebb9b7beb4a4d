#!/bin/sh
# Registers, stack, shared and local memory (spills) per kernel, per SM target,
# read from the objects `make cuda-check` compiled (no GPU needed).
#   tools/cuda_resource_usage.sh [build dir, default build-cuda] [file pattern, default padded_conv]
set -eu
build=${1:-build-cuda}
pattern=${2:-padded_conv}
cuda=${CUDA_HOME:-/usr/local/cuda}
# cuobjdump from the CUDA toolkit, else the copy triton ships
cuobjdump=${CUOBJDUMP:-$cuda/bin/cuobjdump}
[ -x "$cuobjdump" ] || cuobjdump=$(ls .venv/lib/python3*/site-packages/triton/backends/nvidia/bin/cuobjdump 2>/dev/null | head -1)
[ -x "$cuobjdump" ] || { echo "no cuobjdump: set CUOBJDUMP" >&2; exit 1; }
objects=$(find "$build" -name "*${pattern}*.cu.o")
[ -n "$objects" ] || { echo "no $pattern CUDA objects under $build: run make cuda-check" >&2; exit 1; }
for obj in $objects; do
  echo "== $obj"
  "$cuobjdump" --dump-resource-usage "$obj" | c++filt |
    sed -n 's/^ *arch = \(.*\)$/-- \1/p; s/^ *Function \([^(<]*\)[^:]*:/\1:/p; s/^ *\(REG:.*\)$/    \1/p'
done
