#!/usr/bin/env bash
# Fetches, where pip reaches a registry, the wheels of the package's dependencies that the GPU
# machines' image lacks (docs/distributed.md, "The GPU check"), at the versions installed in this
# environment (the ones CI tests), for that image's Python 3.12 on x86-64 Linux:
#   bash tests/gpu/wheels.sh [DIR]       # DIR: .whl at the repository root unless given
# then, on the GPU machine: bash tests/gpu/check.sh --wheels DIR ...
set -euo pipefail
repo="$(cd "$(dirname "$0")/../.." && pwd)"
dir="$(realpath -m "${1:-$repo/.whl}")"  # the caller's folder, before anything changes directory
py="${PYTHON:-$( [[ -x "$repo/.venv/bin/python" ]] && echo "$repo/.venv/bin/python" || command -v python3)}"
# pyproject's dependencies that the image does not hold, and what they need in turn
packages=(omegaconf webdataset braceexpand)
if [[ -d "$dir" ]] && find "$dir" -mindepth 1 -maxdepth 1 ! -name '*.whl' ! -name site-packages | grep -q .; then
  echo "wheels.sh: $dir holds more than wheels; give an empty or new folder" >&2
  exit 2
fi
pins=()
for name in "${packages[@]}"; do
  pins+=("$name==$("$py" -c 'import sys; from importlib.metadata import version; print(version(sys.argv[1]))' "$name")")
done
rm -rf "$dir" && mkdir -p "$dir"
"$py" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  --platform any -d "$dir" "${pins[@]}"
ls -l "$dir"
