#!/usr/bin/env bash
# Sets up a fresh machine: Debian's redis-server and chromium (the shared rate-limit test starts a Redis; the page
# tests drive Chromium), then a virtual environment with the pinned requirements and the package itself.
set -euo pipefail
cd "$(dirname "$0")/.."
missing=()
command -v redis-server >/dev/null || missing+=(redis-server)
command -v chromium >/dev/null || missing+=(chromium)
[ -d /usr/share/fonts/opentype/noto ] || missing+=(fonts-noto-cjk)  # Chinese text in the page screenshots
if [ ${#missing[@]} -gt 0 ]; then
  if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
    apt-get install -y -q "${missing[@]}" || { apt-get update -q && apt-get install -y -q "${missing[@]}"; }
  else
    echo "note: cannot install ${missing[*]} (needs root apt-get): the tests that use them are skipped" >&2
  fi
fi
python3 -m venv .venv
.venv/bin/pip install -r requirements.txt -e ".[test]"
