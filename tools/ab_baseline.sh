#!/bin/sh
# Builds the C++ ops of an earlier commit under the op namespace pyattn_base,
# next to the working tree's pyattn, so tools/ab_padded_conv.py can time both
# in one process, call by call (on a shared machine, separate processes differ
# by up to 2x between runs; interleaved calls share the same conditions).
#   tools/ab_baseline.sh COMMIT [dir, default /tmp/pyattn-baseline]
# Prints the path of the built library.
set -eu
commit=$1
dir=${2:-/tmp/pyattn-baseline}
python=${PYTHON:-$(pwd)/.venv/bin/python}
rm -rf "$dir"
git worktree add --detach -f "$dir" "$commit" >/dev/null 2>&1
cd "$dir"
grep -rl "TORCH_LIBRARY" csrc | xargs sed -i -E 's/(TORCH_LIBRARY[A-Z_]*)\(pyattn,/\1(pyattn_base,/'
"$python" setup.py build_ext --inplace >build.log 2>&1 || { tail -30 build.log; exit 1; }
ls "$dir"/pyattn/_C*.so
