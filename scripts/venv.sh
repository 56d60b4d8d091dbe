#!/usr/bin/env bash
# Creates or refreshes the project venv in .venv; sourced by the other scripts.
# The venv is rebuilt only when pyproject.toml changes (a stamp holds its hash).
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
py=${PYTHON:-python3.11}
command -v "$py" >/dev/null || py=python3
stamp="$root/.venv/.pyproject.sha256"
want=$(sha256sum "$root/pyproject.toml" | cut -d' ' -f1)
if [ ! -x "$root/.venv/bin/python" ] || [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    echo "setting up .venv (first run builds pylibfdt; about a minute)" >&2
    "$py" -m venv "$root/.venv"
    "$root/.venv/bin/python" -m pip install --quiet --upgrade pip
    "$root/.venv/bin/python" -m pip install --quiet -e "$root[test,realkernel]"
    echo "$want" > "$stamp"
fi
export PATH="$root/.venv/bin:$PATH"
