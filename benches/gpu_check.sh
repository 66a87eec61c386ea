#!/usr/bin/env bash
# The GPU check of the PTX backend, in two halves (the GPU machine has NumPy and CuPy
# but not ferrograd's dependencies):
#
#   bash benches/gpu_check.sh [case ...]
#
# renders every case's PTX here, draws fresh inputs and computes the NumPy
# interpreter's results into .gpu_check/ (ignored by git through .git/info/exclude),
# then prints the command to run on the GPU machine, from the repository root, with
# .gpu_check carried along (the device tool's `carry`). With no case named, every
# case: the catalog examples, the op table, logic, stress and the accuracy probe.
set -euo pipefail
cd "$(dirname "$0")/.."
out=.gpu_check
exclude=$(git rev-parse --git-path info/exclude)
mkdir -p "$(dirname "$exclude")"
grep -qsx "/$out/" "$exclude" || echo "/$out/" >> "$exclude"
rm -rf "$out"
python3 benches/gpu_ptx_check.py prepare "$out" "$@"
du -sh "$out"
cat <<MSG

Now on the GPU machine (carry: ["$out"]):

  set -o pipefail; PYTHONUNBUFFERED=1 python3 benches/gpu_ptx_check.py run $out $* 2>&1 | tee \$OUT/gpu_check.log

It exits 1 on any mismatch; the last lines are the failures and the accuracy probe.
MSG
