#!/usr/bin/env bash
# Stop the Ray head that cluster/local/start-head.sh started, and only that one.
#
#   cluster/local/stop-head.sh [--temp-dir DIR]     (the --temp-dir given to start-head.sh; default /tmp/ray)
#
# Unlike `ray stop`, which ends every Ray of this user on the machine, this ends the processes of the
# head's own session (found through DIR/session_latest) and their children, by process id.
set -euo pipefail

PYTHON="${PYTHON:-$(command -v python3)}"
TEMP_DIR=/tmp/ray
while [ $# -gt 0 ]; do
    case "$1" in
        --temp-dir) TEMP_DIR="$2"; shift 2 ;;
        *) echo "stop-head.sh: unknown argument $1" >&2; exit 2 ;;
    esac
done
SESSION="$(readlink -f "$TEMP_DIR/session_latest" 2>/dev/null || true)"
if [ -z "$SESSION" ] || [ ! -d "$SESSION" ]; then
    echo "stop-head.sh: no Ray session under $TEMP_DIR" >&2
    exit 1
fi

GCS="$(cat "$TEMP_DIR/ray_current_cluster" 2>/dev/null || true)"

# The head's processes name its session directory, or (the Ray client server) its GCS address.
"$PYTHON" - "$SESSION" "$GCS" <<'PY'
import os
import sys
import psutil

session, gcs = sys.argv[1], sys.argv[2]
marks = [session] + ([f"--address={gcs}"] if gcs else [])
roots = []
for proc in psutil.process_iter(["pid", "cmdline"]):
    cmdline = proc.info["cmdline"] or []
    if proc.pid != os.getpid() and any(m in part for part in cmdline for m in marks):
        roots.append(proc)
procs = {p.pid: p for p in roots}
for p in roots:
    try:
        procs.update({c.pid: c for c in p.children(recursive=True)})
    except psutil.NoSuchProcess:
        pass
for p in procs.values():
    try:
        p.terminate()
    except psutil.NoSuchProcess:
        pass
_, alive = psutil.wait_procs(list(procs.values()), timeout=10)
for p in alive:
    try:
        p.kill()
    except psutil.NoSuchProcess:
        pass
print(f"stop-head.sh: ended {len(procs)} processes of {session}")
PY
rm -f "$TEMP_DIR/ray_current_cluster"
