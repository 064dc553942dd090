#!/usr/bin/env bash
# The prepared GPU check (docs/distributed.md, "The GPU check"): one table, exit 1 on any failure.
#   bash tests/gpu/check.sh [--wheels DIR] [check.py's options]
# --wheels DIR (first, if given): install DIR/*.whl (what a GPU image lacks; tests/gpu/wheels.sh
# fetches them where pip reaches a registry) offline and without dependencies into
# DIR/site-packages, put that on PYTHONPATH, then run the check, so it runs on a machine that
# reaches no registry. Nothing in the machine's own environment changes.
set -euo pipefail
py="${PYTHON:-$(command -v python || command -v python3 || true)}"
[[ -n "$py" ]] || { echo "check.sh: no python or python3 on PATH; set PYTHON" >&2; exit 2; }
if [[ "${1:-}" == "--wheels" ]]; then
  [[ -n "${2:-}" ]] && compgen -G "$2/*.whl" >/dev/null || { echo "check.sh: no wheels in '${2:-}'" >&2; exit 2; }
  site="$2/site-packages"
  rm -rf "$site"
  "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site" "$2"/*.whl
  export PYTHONPATH="$(cd "$site" && pwd)${PYTHONPATH:+:$PYTHONPATH}"
  shift 2
fi
# exec: a signal sent to this script's process reaches the check itself
exec "$py" "$(dirname "$0")/check.py" "$@"
