#!/usr/bin/env bash
# Download (or build) the wheels listed in benchmarks/gpu/wheels.txt into .whl/ (git-ignored) for the
# GPU machine's Python 3.12 / x86_64, then list their sizes. Run once here, where pip can reach PyPI.
#   benchmarks/gpu/fetch_wheels.sh [PYTHON]      # PYTHON builds deepspeed's wheel (needs torch): .venv/bin/python
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
cd "$ROOT"
PY="${1:-$ROOT/.venv/bin/python}"
mkdir -p .whl
mapfile -t SPECS < <(sed -e 's/#.*//' -e 's/[[:space:]]//g' benchmarks/gpu/wheels.txt | grep -v '^$')
binary=()
for spec in "${SPECS[@]}"; do
  case "$spec" in deepspeed==*) ds="$spec" ;; *) binary+=("$spec") ;; esac
done
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl "${binary[@]}"
if [ -n "${ds:-}" ] && ! ls .whl/deepspeed-"${ds#deepspeed==}"-*.whl >/dev/null 2>&1; then
  # DeepSpeed publishes an sdist only; with DS_BUILD_OPS=0 its wheel is pure Python (ops JIT-built on first use).
  tmp=$(mktemp -d)
  python3 -m pip download -q --no-deps --no-binary=:all: -d "$tmp" "$ds"
  DS_BUILD_OPS=0 "$PY" -m pip wheel -q --no-deps --no-build-isolation -w .whl "$tmp"/deepspeed-*.tar.gz
  rm -rf "$tmp"
fi
ls -l .whl/*.whl | awk '{printf "%8.2f MiB  %s\n", $5/1048576, $NF}'
du -ch .whl/*.whl | tail -1
