#!/bin/sh
# Plugs envgate into benches/compare/compare (or ../shared/bench/compare: the same
# harness without the tls-close and h2-upstream scenarios), following its `--ours`
# contract: writes a topology from the harness's variables (LISTEN, UPSTREAMS,
# UPSTREAM_PROTOCOL, BENCH_DIR) and execs envgate.
#
#   cargo build --release
#   benches/compare/compare --ours "exec $PWD/benches/compare-envgate.sh" \
#       --only nginx,haproxy,ours --scenarios small-ka,small-close
#
# One port-wide entry, one environment, the three nodes at weight 1 (plain round-robin).
# The environment has a canary at 5% with a cookie (CANARY=0 leaves it out): the canary
# environment runs on the same three nodes, so the harness's 4/4/4 spread check holds
# whichever side a request is on. The load generator sends no cookie, so every request
# draws a bucket and gets a Set-Cookie: the canary's most expensive path.
# Health checks hit `/` (the harness's nodes have no /healthz). WORKERS=1 comes from the
# harness. ENVGATE overrides the binary. With TLS_LISTEN (the `h2` and `tls-close`
# scenarios), a TLS listener on the same environment; session resumption is off there, as
# on the harness's nginx and HAProxy, so that `tls-close` measures full handshakes
# (TLS_RESUMPTION=true turns it on).
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
  if [ -n "${TLS_LISTEN:-}" ] && [ -n "${TLS_CERT:-}" ]; then
    echo "  - { name: https, bind: \"$TLS_LISTEN\", tls: { certificates: [ { cert: \"$TLS_CERT\", key: \"$TLS_KEY\" } ], session_resumption: ${TLS_RESUMPTION:-false} } }"
  fi
  echo "defaults:"
  echo "  health: { path: /, interval: 2s, timeout: 1s }"
  echo "nodes:"
  i=0
  for u in $(echo "$UPSTREAMS" | tr ',' ' '); do
    i=$((i + 1))
    echo "  node-$i: { address: \"$u\", protocol: ${UPSTREAM_PROTOCOL:-http1} }"
  done
  echo "environments:"
  echo "  bench:"
  if [ -n "${TLS_LISTEN:-}" ] && [ -n "${TLS_CERT:-}" ]; then
    echo "    entries: [\":$port\", \":${TLS_LISTEN##*:}\"]"
  else
    echo "    entries: [\":$port\"]"
  fi
  echo "    nodes: [$(seq -s, -f 'node-%g' 1 "$i")]"
  if [ "${CANARY:-1}" != 0 ]; then
    echo "    canary: { environment: bench-canary, weight: 5, header: X-Canary, cookie: envgate_canary }"
    echo "  bench-canary:"
    echo "    nodes: [$(seq -s, -f 'node-%g' 1 "$i")]"
  fi
} > "$conf"
RUST_LOG=${RUST_LOG:-warn} exec "$bin" run --config "$conf" --access-log "${ACCESS_LOG:--}"
