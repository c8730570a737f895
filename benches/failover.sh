#!/bin/sh
# Failover figures: requests lost and time to take a node out when it dies under load.
#
#   cargo build --release && benches/failover.sh
#
# Three nginx nodes (separate processes, so one can die alone), envgate in front with
# health checks every 1 s (fall 3), wrk driving keep-alive GETs for 12 s. At 4 s one node
# is killed with SIGKILL. wrk's error and non-2xx counts are the requests lost; envgate's
# log gives when the node was ejected (passive) and marked down (active), which the
# script prints relative to the kill. Needs nginx and wrk (Debian packages).
set -eu
here=$(cd "$(dirname "$0")" && pwd)
bin=${ENVGATE:-$here/../target/release/envgate}
dir=$(mktemp -d)
eg=
stop() {
  for f in "$dir"/n*.pid; do
    [ -f "$f" ] && kill -TERM "-$(cat "$f")" 2>/dev/null
  done
  [ -n "$eg" ] && kill "$eg" 2>/dev/null
  rm -rf "$dir"
}
trap stop EXIT
base=${BASE_PORT:-19300}
for i in 1 2 3; do
  cat > "$dir/n$i.conf" <<NGINX
worker_processes 1; daemon on; pid $dir/n$i.pid; error_log $dir/n$i.err;
events { worker_connections 1024; }
http { access_log off; keepalive_requests 100000;
  server { listen 127.0.0.1:$((base + i)); location / { return 200 "node$i\n"; } } }
NGINX
  nginx -c "$dir/n$i.conf"
done
port=$((base + 10))
cat > "$dir/envgate.yaml" <<YAML
version: 1
listeners: [ { name: http, bind: "127.0.0.1:$port" } ]
defaults:
  health: { path: /, interval: 1s, timeout: 500ms, rise: 2, fall: 3 }
nodes:
  n1: { address: "127.0.0.1:$((base + 1))" }
  n2: { address: "127.0.0.1:$((base + 2))" }
  n3: { address: "127.0.0.1:$((base + 3))" }
environments:
  bench: { entries: [":$port"], nodes: [n1, n2, n3] }
YAML
RUST_LOG=info "$bin" run --workers 1 --config "$dir/envgate.yaml" 2> "$dir/envgate.log" &
eg=$!
sleep 1
wrk -t1 -c32 -d12s "http://127.0.0.1:$port/" > "$dir/wrk.txt" &
wrkpid=$!
sleep 4
killed=$(date +%s.%N)
# The whole process group (nginx's master leads it after daemonising): the node is gone
# at once, its connections reset, and no master is left to respawn a worker.
kill -9 "-$(cat "$dir/n2.pid")"
rm -f "$dir/n2.pid"
wait "$wrkpid"
cat "$dir/wrk.txt"
echo "--- node n2 killed at $killed"
python3 - "$killed" "$dir/envgate.log" <<'PY'
import sys, re, datetime
killed = float(sys.argv[1])
for line in open(sys.argv[2]):
    line = re.sub(r'\x1b\[[0-9;]*m', '', line)
    if 'n2' in line and ('ejected' in line or 'health changed' in line):
        ts = datetime.datetime.fromisoformat(line.split()[0].replace('Z', '+00:00')).timestamp()
        print(f"+{(ts - killed) * 1000:7.0f} ms  {line.strip()[28:]}")
PY
