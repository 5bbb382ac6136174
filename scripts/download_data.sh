#!/usr/bin/env bash
# Fetch the real data sets and model (thin wrapper over `cs336 download`).
#   scripts/download_data.sh                 # list what can be fetched
#   scripts/download_data.sh tinystories owt # into data/ (or $CS336_DATA)
#   scripts/download_data.sh all --out /big/disk
set -euo pipefail
cd "$(dirname "$0")/.."
exec uv run cs336 download "$@"
