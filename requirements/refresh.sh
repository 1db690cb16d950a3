#!/usr/bin/env bash
# Refresh requirements/dev.lock: the test environment's every package at the version pip picks
# today, resolved in a fresh virtual environment exactly as README's test command installs it
# (torch's CPU build first). Then check the refresh: run README's test command in a fresh clone.
#
# Usage (from anywhere): bash requirements/refresh.sh
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
venv="$(mktemp -d)"
trap 'rm -rf "$venv"' EXIT

python3 -m venv "$venv"
"$venv/bin/pip" install -q torch==2.13.0
"$venv/bin/pip" install -q -e "$repo[dev]"
"$venv/bin/pip" install -q --no-deps autoawq accelerate   # the AWQ tests' reference packer (README)
{
  echo "# The test environment (README's test command installs with -c this file), Python 3.11, CPU."
  echo "# Made by requirements/refresh.sh on $(date -u +%Y-%m-%d); do not edit by hand."
  # torch's local label (+cpu) names a wheel, not a release: torch==2.13.0 admits the CPU build
  "$venv/bin/pip" freeze --exclude-editable | sed -E 's/^(torch==[^+]+)\+.*/\1/'
} > "$repo/requirements/dev.lock"
echo "wrote $repo/requirements/dev.lock ($(grep -vc '^#' "$repo/requirements/dev.lock") packages)"
