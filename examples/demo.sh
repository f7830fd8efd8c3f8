#!/usr/bin/env bash
# Keel demo: the rate limiter in a real Envoy.
#
# Starts a test upstream on 127.0.0.1:18080 and Envoy with envoy/rate-limit.yaml (listener
# 127.0.0.1:10000, admin 127.0.0.1:9901), sends traffic through it, prints what happened, and
# stops everything it started. Run it with `make demo` (which builds what is missing first).
set -euo pipefail
cd "$(dirname "$0")/.."

ENVOY=${KEEL_ENVOY:-.venv/envoy}
LISTENER=http://127.0.0.1:10000
ADMIN=http://127.0.0.1:9901
WORK=$(mktemp -d)
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT INT TERM

say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
for port in 10000 9901 18080; do
  if (exec 3<>/dev/tcp/127.0.0.1/$port) 2>/dev/null; then
    echo "demo: port $port on 127.0.0.1 is in use; stop what listens there and run again" >&2
    exit 1
  fi
done

say "Starting the upstream (127.0.0.1:18080) and Envoy with envoy/rate-limit.yaml"
cargo build -q --release -p keel-upstream
"${TARGET_DIR:-target}/release/keel-upstream" --name backend --port 18080 >"$WORK/upstream.log" 2>&1 &
pids+=($!)
"$ENVOY" -c envoy/rate-limit.yaml --concurrency 2 --disable-hot-restart --log-path "$WORK/envoy.log" &
pids+=($!)
for _ in $(seq 100); do
  [ "$(curl -s "$ADMIN/ready" 2>/dev/null)" = "LIVE" ] && break
  sleep 0.1
done
[ "$(curl -s "$ADMIN/ready" 2>/dev/null)" = "LIVE" ] || { echo "demo: Envoy did not start; its log:"; cat "$WORK/envoy.log"; exit 1; }
echo "Policy: 100 requests per second per x-api-key, bucket of 100 (starts full)."

burst() { # key count connections: h2load (HTTP/1.1) sends them as fast as Envoy answers
  h2load --h1 -n "$2" -c "$3" -H "x-api-key: $1" "$LISTENER/orders" 2>&1 |
    awk '/^finished in/ {sub(",", "", $3); print "  sent in " $3} /^status codes:/ {print "  " $3 " allowed (2xx), " $7 " refused (4xx: 429)"}'
}

say "1. A burst of 300 requests from alice over 8 connections"
burst alice 300 8
echo "   (about 100 allowed, plus what refilled at 100/s while the burst ran; the rest refused)"

say "2. What a refused client sees"
# A token comes back every 10 ms: ten requests on one connection spend any that did.
curl -s -D "$WORK/headers" -H 'x-api-key: alice' $(printf "$LISTENER/orders/%d " $(seq 10)) >"$WORK/bodies"
tr -d '\r' <"$WORK/headers" | grep -A8 -m1 '^HTTP/1.1 429' | grep -Ei '^(HTTP|retry-after|ratelimit|content-type)' | sed 's/^/  /'
grep -q 'rate limited' "$WORK/bodies" && echo "  body: rate limited"

say "3. Meanwhile bob has his own bucket"
burst bob 20 4
curl -s -D - -o /dev/null -H 'x-api-key: bob' "$LISTENER/orders/1" | tr -d '\r' | grep -Ei '^(HTTP|ratelimit)' | sed 's/^/  /'

say "4. One second later alice is allowed again"
sleep 1
curl -s -D - -o /dev/null -H 'x-api-key: alice' "$LISTENER/orders/1" | tr -d '\r' | grep -Ei '^(HTTP|ratelimit)' | sed 's/^/  /'

say "5. Envoy's counters (admin /stats?filter=keel)"
curl -s "$ADMIN/stats?filter=keel" | sed 's/^/  /'
echo
echo "Done. Configuration reference: docs/config/rate-limit.md"
