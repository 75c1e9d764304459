#!/usr/bin/env bash
# Start a local Ray head for moe-ray: job server and dashboard on 127.0.0.1, token auth on.
#
#   cluster/local/start-head.sh [--dashboard-port 8265] [--temp-dir DIR] [any `ray start` flag...]
#
# Ray opens its GCS, raylet and worker ports on every interface whatever it is told, so the head
# always runs with token authentication (RAY_AUTH_MODE=token). The token lives in a file only you
# can read: $RAY_AUTH_TOKEN_PATH, default ~/.ray/auth_token, generated on first use. Clients on
# this machine (moe-ray submit/status/logs, ray.init) use it when started with the same two
# variables exported:
#   export RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH=~/.ray/auth_token
# Stop this head with cluster/local/stop-head.sh (same --temp-dir).
set -euo pipefail

PYTHON="${PYTHON:-$(command -v python3 || true)}"
if [ -z "$PYTHON" ]; then
    echo "start-head.sh: no python3 on PATH; activate the environment moe-ray is installed in, or set PYTHON=/path/to/python" >&2
    exit 1
fi
RAY="${RAY:-$(dirname "$PYTHON")/ray}"
[ -x "$RAY" ] || RAY="$(command -v ray || true)"
if [ -z "$RAY" ]; then
    echo "start-head.sh: no \`ray\` beside $PYTHON nor on PATH; install moe-ray (and with it Ray) into that Python, or set RAY=/path/to/ray" >&2
    exit 1
fi

export RAY_AUTH_MODE=token
export RAY_AUTH_TOKEN_PATH="${RAY_AUTH_TOKEN_PATH:-$HOME/.ray/auth_token}"
if [ ! -s "$RAY_AUTH_TOKEN_PATH" ]; then
    mkdir -p -m 700 "$(dirname "$RAY_AUTH_TOKEN_PATH")"
    (umask 077 && "$PYTHON" -c 'import secrets; print(secrets.token_hex(32), end="")' > "$RAY_AUTH_TOKEN_PATH")
fi
chmod 600 "$RAY_AUTH_TOKEN_PATH"

# A lost node is declared dead after 5 failed health checks 1 s apart, each given 3 s: ~5 s for a
# crashed node, ~20 s for one gone from the network (Ray's defaults, 3 s apart and 10 s each: ~15 s
# and ~65 s). A dynamic job waits on the shard's node that long before its own node_wait_s starts.
export RAY_health_check_period_ms="${RAY_health_check_period_ms:-1000}"
export RAY_health_check_timeout_ms="${RAY_health_check_timeout_ms:-3000}"
export RAY_health_check_failure_threshold="${RAY_health_check_failure_threshold:-5}"

# Job entrypoints run `python ...` on the head: make that the interpreter moe-ray is installed in.
export PATH="$(dirname "$PYTHON"):$PATH"

DASHBOARD_PORT=8265
ARGS=()
while [ $# -gt 0 ]; do
    case "$1" in
        --dashboard-port) DASHBOARD_PORT="$2"; shift 2 ;;
        *) ARGS+=("$1"); shift ;;
    esac
done

TEMP_DIR=""
for ((i = 0; i < ${#ARGS[@]}; i++)); do
    case "${ARGS[$i]}" in
        --temp-dir) TEMP_DIR="${ARGS[$((i + 1))]:-}" ;;
        --temp-dir=*) TEMP_DIR="${ARGS[$i]#--temp-dir=}" ;;
    esac
done

# Ray's banner ends by advising `ray stop`, which stops every Ray of this user on the machine: left out
# here, and this head's own stop command said instead.
set +e
"$RAY" start --head --node-ip-address 127.0.0.1 \
    --dashboard-host 127.0.0.1 --dashboard-port "$DASHBOARD_PORT" --include-dashboard true \
    --disable-usage-stats "${ARGS[@]}" 2>&1 | grep -v -e "To terminate the Ray runtime" -e "ray stop"
STATUS=("${PIPESTATUS[@]}")
set -e
[ "${STATUS[0]}" -eq 0 ] || { echo "start-head.sh: ray start failed (its output is above)" >&2; exit 1; }
ADDRESS="http://127.0.0.1:$DASHBOARD_PORT"
HINT=""
[ "$DASHBOARD_PORT" = 8265 ] || HINT=" --address $ADDRESS"
echo "moe-ray: head up; submit with: moe-ray submit SPEC.toml$HINT (job server $ADDRESS)"
echo "moe-ray: stop this head (and only it) with: $(dirname "$0")/stop-head.sh${TEMP_DIR:+ --temp-dir $TEMP_DIR}"
echo "moe-ray: moe-ray's commands here turn token auth on themselves; with a token file other than ~/.ray/auth_token," \
     "and for other clients, export RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH=$RAY_AUTH_TOKEN_PATH"
