#!/usr/bin/env bash
# Deploy ShizhenGPT to RunPod: a thin wrapper over `shizhen deploy` (up | status | stop | start | down | logs).
# Needs RUNPOD_API_KEY (or `runpod config`); see README.md, "Deploying to RunPod".
set -euo pipefail
cd "$(dirname "$0")"
if [ $# -eq 0 ]; then
  echo "usage: $0 up | status | stop | start [--recreate] | down [--delete-volume] | logs [--follow]" >&2
  echo "  (nothing is created without an explicit 'up'; README.md, \"Deploying to RunPod\", says what each does)" >&2
  exit 2
fi
exec .venv/bin/shizhen deploy "$@"
