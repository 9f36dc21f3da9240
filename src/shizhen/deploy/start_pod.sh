#!/usr/bin/env bash
# The pod's entry point. Idempotent: the pinned requirements are installed into the volume once (again only when
# they change); the model cache is on the volume; the server is restarted with backoff if it crashes, and stops
# for good when it exits cleanly (SIGTERM, idle auto-stop). Everything is logged to the volume.
set -u
WORKSPACE=${WORKSPACE:-/workspace}
APP="$WORKSPACE/shizhen"
VENV="$APP/venv"
LOGS="$APP/logs"
mkdir -p "$LOGS" "$WORKSPACE/models"
export HF_HOME="${HF_HOME:-$WORKSPACE/models}"
export TRITON_CACHE_DIR="${TRITON_CACHE_DIR:-$APP/triton-cache}"  # the engine's compiled kernels survive restarts
log() { echo "$(date -u +%FT%TZ) $*" | tee -a "$LOGS/supervisor.log"; }

echo "${SHIZHEN_REQUIREMENTS_B64:-}" | base64 -d > "$APP/requirements.txt"
marker="$APP/.installed-$(cat "$APP/requirements.txt" <(echo "${SHIZHEN_PACKAGE:-}") | sha256sum | cut -c1-16)"
if [ ! -f "$marker" ]; then
  log "installing ${SHIZHEN_PACKAGE:-} with the pinned requirements into $VENV"
  [ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
  PIP=${SHIZHEN_PIP:-"$VENV/bin/pip"}
  if ! $PIP install -r "$APP/requirements.txt" "${SHIZHEN_PACKAGE:-shizhen-serve}" >> "$LOGS/install.log" 2>&1; then
    log "installation failed; see $LOGS/install.log"
    exit 1
  fi
  touch "$marker"
fi

delay=${SHIZHEN_RESTART_DELAY:-5}
while true; do
  started=$(date +%s)
  log "starting the server"
  ${SHIZHEN_SERVE_CMD:-"$VENV/bin/shizhen serve"} >> "$LOGS/server.log" 2>&1
  code=$?
  if [ "$code" -eq 0 ]; then
    log "the server stopped cleanly"
    exit 0
  fi
  if [ $(( $(date +%s) - started )) -gt 600 ]; then delay=${SHIZHEN_RESTART_DELAY:-5}; fi  # it had been healthy
  log "the server exited with code $code; restarting in ${delay}s"
  sleep "$delay"
  delay=$(awk -v d="$delay" 'BEGIN { d *= 2; print (d > 300 ? 300 : d) }')
done
