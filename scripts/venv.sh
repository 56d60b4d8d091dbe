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
    "$root/.venv/bin/python" -m pip install --quiet -e "$root[test,realkernel,fleet]"
    echo "$want" > "$stamp"
fi
export PATH="$root/.venv/bin:$PATH"
# the fleet's Ansible collection (ansible/liveupdate/fleet): built and installed into the
# venv whenever its files change, never by hand; playbooks find it through this path
export ANSIBLE_COLLECTIONS_PATH="$root/.venv/share/ansible/collections"
export ANSIBLE_HOME="$root/.venv/share/ansible" ANSIBLE_LOCAL_TEMP="$root/.venv/share/ansible/tmp"
export ANSIBLE_NOCOLOR=1 ANSIBLE_DEPRECATION_WARNINGS=0
export PYTHONWARNINGS="ignore:DSA is deprecated"  # cryptography, imported by ansible-core
coll="$root/ansible/liveupdate/fleet"
cstamp="$ANSIBLE_COLLECTIONS_PATH/.fleet.sha256"
cwant=$(cd "$coll" && find . -type f ! -name '*.pyc' | sort | xargs sha256sum | sha256sum | cut -d' ' -f1)
if [ "$(cat "$cstamp" 2>/dev/null)" != "$cwant" ]; then
    mkdir -p "$root/build/collection" "$ANSIBLE_COLLECTIONS_PATH"
    ansible-galaxy collection build "$coll" --force --output-path "$root/build/collection" >/dev/null
    ansible-galaxy collection install --force --offline -p "$ANSIBLE_COLLECTIONS_PATH" \
        "$root/build/collection/liveupdate-fleet-$(sed -n 's/^version: *//p' "$coll/galaxy.yml").tar.gz" >/dev/null
    echo "$cwant" > "$cstamp"
fi
