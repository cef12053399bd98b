#!/usr/bin/env bash
# Refreshes requirements/constraints.txt on purpose: builds a fresh .venv with the newest versions that
# pyproject.toml admits (torch stays the local CPU build 2.13.0), writes them as the new pins, shows
# what moved, and runs the whole test suite on them. Commit the new pins only if the suite passes.
set -euo pipefail
cd "$(dirname "$0")/.."
CONSTRAINTS=requirements/constraints.txt
old=$(mktemp)
cp "$CONSTRAINTS" "$old"
rm -rf .venv
FUSEDRL_UNPINNED=1 bash scripts/bootstrap.sh
{
    sed -n '/^#/p' "$old"
    .venv/bin/python -m pip freeze --exclude-editable --disable-pip-version-check | grep -iv '^torch=='
} > "$CONSTRAINTS"
rm -f .venv/.fusedrl-installed  # the next bootstrap re-checks against the new pins
python3 - "$old" "$CONSTRAINTS" <<'PY'
import sys

def pins(path):
    lines = (line.strip() for line in open(path))
    return dict(line.split("==", 1) for line in lines if line and not line.startswith("#"))

old, new = pins(sys.argv[1]), pins(sys.argv[2])
print("refresh_pins: versions that moved (old -> new):")
for name in sorted(old.keys() | new.keys(), key=str.lower):
    if old.get(name) != new.get(name):
        print(f"  {name}: {old.get(name, '-')} -> {new.get(name, '-')}")
PY
rm -f "$old"
exec bash scripts/test.sh "$@"
