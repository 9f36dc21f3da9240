#!/usr/bin/env bash
# The entry point of a pod and of a serverless worker, run by RunPod as the container's PID 1 (dockerArgs replaces
# the image's start command). The volume is at WORKSPACE: /workspace on a pod, /runpod-volume on a worker.
# - Installs the pinned requirements and the release `deploy up` shipped (SHIZHEN_PACKAGE: a wheel on the volume
#   or git+URL@commit) into a venv on the volume, once per release.
# - Starts sshd when RunPod passes a PUBLIC_KEY, as the image's own /start.sh would have.
# - Runs the server with its output on the container's stdout (RunPod's log view) and in the volume's log.
# - Forwards SIGTERM/SIGINT to the server, which drains; exits 0 once it has. (A PID 1 that traps nothing never
#   sees SIGTERM: the kernel drops signals PID 1 has no handler for.)
# - Restarts a crashed server with backoff; after SHIZHEN_MAX_RESTARTS crashes in a row (or a failed install) it
#   stops this pod through RunPod's API instead of billing for a crash loop (a serverless worker, with
#   SHIZHEN_STOP_POD_ON_FAILURE=0, exits instead: RunPod replaces it and scales to zero).
set -u
WORKSPACE=${WORKSPACE:-/workspace}
APP="$WORKSPACE/shizhen"
VENV="$APP/venv$(echo "$WORKSPACE" | tr / -)"  # per mount point: a venv's scripts hold its absolute path
LOGS="$APP/logs"
mkdir -p "$LOGS" "$WORKSPACE/models"
export HF_HOME="${HF_HOME:-$WORKSPACE/models}"
export TRITON_CACHE_DIR="${TRITON_CACHE_DIR:-$APP/triton-cache}"  # the engine's compiled kernels survive restarts
export PYTHONUNBUFFERED=1
log() { echo "$(date -u +%FT%TZ) [start_pod] $*" | tee -a "$LOGS/supervisor.log"; }

child=""
stopping=""
on_signal() {
  stopping=1
  log "signal received: asking the server to drain"
  [ -n "$child" ] && kill -TERM "$child" 2>/dev/null
}
trap on_signal TERM INT

# Runs "$@" in the background (so the trap can run) and waits for it, through signals; sets $status.
run_and_wait() {
  "$@" &
  child=$!
  [ -n "$stopping" ] && kill -TERM "$child" 2>/dev/null  # the signal came before $child was known
  while true; do
    wait "$child"
    status=$?
    kill -0 "$child" 2>/dev/null || break  # still running: wait was interrupted by a signal
  done
  child=""
}

stop_this_pod() {  # RunPod then sends SIGTERM; needs only python3's standard library (the venv may not exist)
  if [ "${SHIZHEN_STOP_POD_ON_FAILURE:-1}" = 0 ]; then
    log "giving up ($1); exiting"
    exit 1
  fi
  log "stopping this pod ($1)"
  if RUNPOD_POD_ID=${RUNPOD_POD_ID:-} python3 - <<'EOF' > >(tee -a "$LOGS/supervisor.log") 2>&1; then
import json, os, urllib.request
pod = os.environ["RUNPOD_POD_ID"]
if not pod or not os.environ.get("RUNPOD_API_KEY"):
    raise SystemExit("RUNPOD_POD_ID or RUNPOD_API_KEY is not set: not on a RunPod pod, cannot stop it")
query = "mutation { podStop(input: {podId: %s}) { id desiredStatus } }" % json.dumps(pod)
request = urllib.request.Request(
    os.environ.get("RUNPOD_API_BASE_URL", "https://api.runpod.io") + "/graphql",
    data=json.dumps({"query": query}).encode(),
    headers={"Content-Type": "application/json", "Authorization": "Bearer " + os.environ["RUNPOD_API_KEY"]})
print(urllib.request.urlopen(request, timeout=30).read().decode())
EOF
    run_and_wait sleep "${SHIZHEN_STOP_WAIT_SECONDS:-300}"  # RunPod's SIGTERM ends this wait
  fi
  exit 1  # the stop could not be asked for (not on a pod?): nothing to wait for
}

if [ -n "${PUBLIC_KEY:-}" ] && command -v sshd >/dev/null; then
  mkdir -p ~/.ssh && echo "$PUBLIC_KEY" >> ~/.ssh/authorized_keys && chmod -R go-rwx ~/.ssh
  ssh-keygen -A >/dev/null 2>&1
  service ssh start >/dev/null 2>&1 || /usr/sbin/sshd || log "could not start sshd"
fi

if [ -z "${SHIZHEN_PACKAGE:-}" ] && [ -z "${SHIZHEN_SERVE_CMD:-}" ]; then
  log "SHIZHEN_PACKAGE is not set: this script installs only what \`shizhen deploy up\` ships"
  stop_this_pod "nothing to install"
fi
echo "${SHIZHEN_REQUIREMENTS_B64:-}" | base64 -d > "$APP/requirements.txt"
marker="$APP/.installed-$(cat "$APP/requirements.txt" <(echo "${SHIZHEN_PACKAGE:-}") | sha256sum | cut -c1-16)"
if [ -n "${SHIZHEN_PACKAGE:-}" ] && [ ! -f "$marker" ]; then
  log "installing $SHIZHEN_PACKAGE with the pinned requirements into $VENV (log: $LOGS/install.log)"
  [ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
  PIP=${SHIZHEN_PIP:-"$VENV/bin/pip"}
  run_and_wait bash -c "$PIP install -r '$APP/requirements.txt' && $PIP install --no-deps --force-reinstall \
'$SHIZHEN_PACKAGE'" > >(tee -a "$LOGS/install.log") 2>&1
  [ -n "$stopping" ] && exit 0
  [ "$status" -eq 0 ] || stop_this_pod "installation failed with code $status; see $LOGS/install.log"
  touch "$marker"
fi

serve=${SHIZHEN_SERVE_CMD:-$VENV/bin/shizhen serve}  # split into words where it runs
delay=${SHIZHEN_RESTART_DELAY:-5}
crashes=0
while [ -z "$stopping" ]; do
  started=$(date +%s)
  log "starting the server"
  run_and_wait $serve > >(tee -a "$LOGS/server.log") 2>&1
  if [ "$status" -eq 0 ] || [ -n "$stopping" ]; then
    log "the server stopped (code $status)"
    exit 0
  fi
  if [ $(( $(date +%s) - started )) -gt 600 ]; then  # it had been up a while: not a crash loop
    delay=${SHIZHEN_RESTART_DELAY:-5}
    crashes=0
  fi
  crashes=$((crashes + 1))
  if [ "$crashes" -ge "${SHIZHEN_MAX_RESTARTS:-5}" ]; then
    stop_this_pod "the server crashed $crashes times in a row (last code $status); see $LOGS/server.log"
  fi
  log "the server exited with code $status; restarting in ${delay}s"
  run_and_wait sleep "$delay"
  delay=$(awk -v d="$delay" 'BEGIN { d *= 2; print (d > 300 ? 300 : d) }')
done
exit 0
