#!/usr/bin/env bash
# Build the wheel, install it into a fresh virtual environment (CPU torch), and run the demo
# from an empty folder: the wheel carries everything the demo needs.
#   scripts/check_wheel.sh [demo options, default --quick]
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
work="$(mktemp -d)"
git -C "$root" archive HEAD | tar -x -C "$work"
python -m build --wheel -o "$work/dist" "$work" >/dev/null
python -m venv "$work/venv"
"$work/venv/bin/pip" install -q "torch==2.13.0"
"$work/venv/bin/pip" install -q "$work"/dist/pyroflows-*.whl
mkdir "$work/run"
cd "$work/run"
"$work/venv/bin/pyroflows" demo "${@:---quick}"
echo "check_wheel: $(ls "$work"/dist) installed and ran the demo in $work/run"
