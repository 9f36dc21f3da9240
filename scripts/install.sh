#!/usr/bin/env bash
# Sets up a fresh machine: Debian's redis-server (the shared rate-limit test starts one), then a virtual
# environment with the pinned requirements and the package itself.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v redis-server >/dev/null; then
  if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
    apt-get install -y -q redis-server || { apt-get update -q && apt-get install -y -q redis-server; }
  else
    echo "note: no redis-server and no root apt-get: the shared rate-limit test will be skipped" >&2
  fi
fi
python3 -m venv .venv
.venv/bin/pip install -r requirements.txt -e ".[test]"
