#!/usr/bin/env bash
# The main job on one machine: a collector and an agent with a freshly generated
# node key, built-in defaults, state under ./run/. Prints where to look; Ctrl-C stops both.
# WAYSTATION_DEMO_SECONDS=N stops them after N seconds (used by the tests).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/bootstrap.sh
bin=.venv/bin
run_dir=${WAYSTATION_RUN_DIR:-$PWD/run}
listen=${WAYSTATION_LISTEN:-127.0.0.1:9480}
mkdir -p "$run_dir"

agent_conf="$run_dir/agent.toml"
cat >"$agent_conf" <<TOML
# Written by scripts/quickstart.sh: everything not named here is a built-in default.
site = "local"
state_dir = "$run_dir/agent"
[uplink]
url = "http://$listen"
[summary]
window = "10s"
TOML

if [ ! -f "$run_dir/agent/node.key" ]; then
  "$bin/waystation-agent" keygen --config "$agent_conf"
fi
pubkey=$("$bin/python" -c 'import sys; from agent import keys; k = keys.load(__import__("pathlib").Path(sys.argv[1])); print(keys.public_key_text(bytes(k.verify_key)))' "$run_dir/agent/node.key")
node=$("$bin/python" -c 'import socket; print(socket.gethostname())')
"$bin/waystation-collector" enroll --data-dir "$run_dir/collector" --site local --node "$node" --key "$pubkey" >/dev/null

# Something else on the port (another collector, any server) would answer /healthz in its
# place: say so and stop, rather than print a banner over a collector that never started.
if ! "$bin/python" - "$listen" <<'PY'
import socket, sys
host, _, port = sys.argv[1].rpartition(":")
host = host.strip("[]")
with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
    try:
        s.bind((host, int(port)))
    except OSError as exc:
        sys.exit(f"quickstart: cannot listen on {sys.argv[1]}: {exc.strerror}; "
                 "stop what uses it or pick another address, e.g. WAYSTATION_LISTEN=127.0.0.1:9481")
PY
then
  exit 1
fi

pids=()
cleanup() { kill "${pids[@]}" 2>/dev/null || true; wait 2>/dev/null || true; }
trap cleanup EXIT INT TERM
"$bin/waystation-collector" serve --data-dir "$run_dir/collector" --listen "$listen" &
collector_pid=$!
pids+=("$collector_pid")
if ! "$bin/python" - "$listen" "$collector_pid" <<'PY'
import os, sys, time, urllib.request
listen, pid = sys.argv[1], int(sys.argv[2])
deadline = time.monotonic() + 60  # a large ledger is replayed before serve listens
while time.monotonic() < deadline:
    try:
        urllib.request.urlopen(f"http://{listen}/healthz", timeout=1)
        sys.exit(0)
    except OSError:
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        sys.exit(f"quickstart: the collector exited before it listened on {listen} (its error is above)")
    time.sleep(0.1)
sys.exit(f"quickstart: the collector did not answer on http://{listen}/healthz within 60 s")
PY
then
  exit 1
fi
"$bin/waystation-agent" run --config "$agent_conf" &
pids+=($!)

cat <<TXT

Waystation is running on this machine:
  collector metrics   http://$listen/metrics    (fleet series carry site="local", node="$node")
  nodes and watermark http://$listen/v1/nodes   or: $bin/waystation-collector nodes --data-dir $run_dir/collector
  agent status        $bin/waystation-agent status --config $agent_conf
  state               $run_dir
The first batch arrives after the first 10 s window. Ctrl-C stops both.
TXT

if [ -n "${WAYSTATION_DEMO_SECONDS:-}" ]; then
  sleep "$WAYSTATION_DEMO_SECONDS"
else
  wait -n
fi
