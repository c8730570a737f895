#!/bin/sh
# Plugs envgate into ../shared/bench/compare (its `--ours` contract): writes a topology
# from the harness's variables (LISTEN, UPSTREAMS, BENCH_DIR) and execs envgate.
#
#   cargo build --release
#   ../shared/bench/compare --ours "exec $PWD/benches/compare-envgate.sh" \
#       --only nginx,haproxy,ours --scenarios small-ka,small-close
#
# One port-wide entry, one environment, the three nodes at weight 1 (plain round-robin).
# The environment has a canary at 5% with a cookie (CANARY=0 leaves it out): the canary
# environment runs on the same three nodes, so the harness's 4/4/4 spread check holds
# whichever side a request is on. The load generator sends no cookie, so every request
# draws a bucket and gets a Set-Cookie: the canary's most expensive path.
# Health checks hit `/` (the harness's nodes have no /healthz). WORKERS=1 comes from the
# harness. ENVGATE overrides the binary.
set -eu
here=$(cd "$(dirname "$0")" && pwd)
bin=${ENVGATE:-$here/../target/release/envgate}
dir=${BENCH_DIR:-$(mktemp -d)}
port=${LISTEN##*:}
conf=$dir/envgate-bench.yaml
{
  echo "version: 1"
  echo "listeners:"
  echo "  - { name: http, bind: \"$LISTEN\" }"
  echo "defaults:"
  echo "  health: { path: /, interval: 2s, timeout: 1s }"
  echo "nodes:"
  i=0
  for u in $(echo "$UPSTREAMS" | tr ',' ' '); do
    i=$((i + 1))
    echo "  node-$i: { address: \"$u\" }"
  done
  echo "environments:"
  echo "  bench:"
  echo "    entries: [\":$port\"]"
  echo "    nodes: [$(seq -s, -f 'node-%g' 1 "$i")]"
  if [ "${CANARY:-1}" != 0 ]; then
    echo "    canary: { environment: bench-canary, weight: 5, header: X-Canary, cookie: envgate_canary }"
    echo "  bench-canary:"
    echo "    nodes: [$(seq -s, -f 'node-%g' 1 "$i")]"
  fi
} > "$conf"
RUST_LOG=${RUST_LOG:-warn} exec "$bin" run --config "$conf"
