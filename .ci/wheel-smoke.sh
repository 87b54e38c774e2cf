#!/usr/bin/env bash
# Install streamdet as a user would, from a wheel without -e, into a fresh venv, and run the
# bundled demo from an empty folder: the demo's files must ship inside the package.
# Usage: bash .ci/wheel-smoke.sh   (from anywhere; needs python >= 3.10 and pip's index)
set -euo pipefail
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

python -m pip wheel -q --disable-pip-version-check --no-deps -w "$work/dist" "$REPO_ROOT"
wheel=("$work"/dist/streamdet-*.whl)
size_mb=$(( $(stat -c %s "${wheel[0]}") / 1024 / 1024 ))
echo "wheel-smoke: built $(basename "${wheel[0]}") (${size_mb} MiB)"
(( size_mb < 20 )) || { echo "wheel-smoke: the wheel is ${size_mb} MiB: keep it small"; exit 1; }

python -m venv "$work/venv"
# The CPU build of torch first, as the README says.
"$work/venv/bin/python" -m pip install -q --disable-pip-version-check torch==2.13.0 "${wheel[0]}"

mkdir "$work/empty"
cd "$work/empty"
"$work/venv/bin/streamdet" --version
out="$("$work/venv/bin/streamdet" run 2>&1)" || { echo "$out"; echo "wheel-smoke: streamdet run failed"; exit 1; }
echo "$out" | tail -3
grep -q "F1 0\.[0-9]" <<<"$out" || { echo "wheel-smoke: no F1 line in the demo's summary"; exit 1; }
[[ -s streamdet-out/events.jsonl ]] || { echo "wheel-smoke: no event log written"; exit 1; }
echo "wheel-smoke: ok"
