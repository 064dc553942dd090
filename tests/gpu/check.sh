#!/usr/bin/env bash
# The prepared GPU check (docs/distributed.md, "The GPU check"): one table, exit 1 on any failure.
#   bash tests/gpu/check.sh [--wheels DIR] [check.py's options]
# --wheels DIR: first install DIR/*.whl (what a GPU image lacks; tests/gpu/wheels.sh fetches them
# where pip reaches a registry) into a temporary folder on PYTHONPATH, offline and without
# dependencies, so the check runs on a machine that reaches no registry.
set -euo pipefail
py="${PYTHON:-$(command -v python || command -v python3)}"
if [[ "${1:-}" == "--wheels" ]]; then
  [[ -n "${2:-}" ]] && compgen -G "$2/*.whl" >/dev/null || { echo "check.sh: no wheels in '${2:-}'" >&2; exit 2; }
  site="$(mktemp -d -t scbch-gpu-check-site.XXXXXX)"
  trap 'rm -rf "$site"' EXIT
  "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site" "$2"/*.whl
  export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
  shift 2
fi
"$py" "$(dirname "$0")/check.py" "$@"
