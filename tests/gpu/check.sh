#!/usr/bin/env bash
# The prepared GPU check (docs/distributed.md, "The GPU check"): one table, exit 1 on any failure.
exec "${PYTHON:-python}" "$(dirname "$0")/check.py" "$@"
