#!/usr/bin/env bash
# Deploy ShizhenGPT to RunPod: a thin wrapper over `shizhen deploy` (up | status | stop | start | down | logs).
# Needs RUNPOD_API_KEY (or `runpod config`); see README.md, "Deploying to RunPod".
set -euo pipefail
cd "$(dirname "$0")"
exec .venv/bin/shizhen deploy "${@:-up}"
