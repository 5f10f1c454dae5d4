#!/usr/bin/env bash
# cache-gateway benchmark, side by side in one run with wrk:
#   hit path:  the gateway (release build, Redis behind its in-process tier)
#              vs Varnish (Debian package) caching the same backend;
#   miss path: every request through the gateway to the backend
#              (`Cache-Control: no-store`) vs calling the backend directly,
#              and vs Varnish passing the same requests through (`return (pass)`).
# The backend is the demo model (`costmesh cache demo-model`, 0 ms latency).
# Contenders alternate, ROUNDS rounds of DURATION seconds each; the table
# gives medians of requests/s and p99 latency.
#
#   scripts/bench-gateway.sh [ROUNDS] [DURATION_S] [CONNECTIONS]
set -euo pipefail
cd "$(dirname "$0")/.."
rounds=${1:-3}
duration=${2:-10}
conns=${3:-64}

need=()
command -v wrk >/dev/null || need+=(wrk)
command -v varnishd >/dev/null || need+=(varnish)
if [ ${#need[@]} -gt 0 ]; then
  apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi
scripts/install-test-deps.sh >/dev/null
cargo build --release -q -p costmesh -p costmesh-cache-gateway
target=${CARGO_TARGET_DIR:-target}/release
work=$(mktemp -d /var/tmp/gateway-bench.XXXX)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT

port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_port() { for _ in $(seq 100); do (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0; sleep 0.1; done; echo "port $1 never opened" >&2; exit 1; }

nats_port=$(port); redis_port=$(port); model_port=$(port); gw_port=$(port); admin_port=$(port); varnish_port=$(port)
.tools/bin/nats-server -a 127.0.0.1 -p "$nats_port" -js -sd "$work/js" >"$work/nats.log" 2>&1 & pids+=($!)
redis-server --port "$redis_port" --bind 127.0.0.1 --save '' --appendonly no >"$work/redis.log" 2>&1 & pids+=($!)
"$target/costmesh" cache demo-model --listen "127.0.0.1:$model_port" --latency-ms 0 >"$work/model.log" 2>&1 & pids+=($!)
wait_port "$nats_port"; wait_port "$redis_port"; wait_port "$model_port"

cat >"$work/gateway.toml" <<EOF
[nats]
url = "nats://127.0.0.1:$nats_port"
[redis]
url = "redis://127.0.0.1:$redis_port"
[log]
level = "warn"
[cache_gateway]
listen = "127.0.0.1:$gw_port"
admin = { listen = "127.0.0.1:$admin_port" }
[[cache_gateway.routes]]
name = "bench"
backends = ["http://127.0.0.1:$model_port"]
EOF
# One tokio worker by default: wrk takes one of this machine's two cores, and
# on the other a single worker answers with a far lower tail than two
# threads contending for it (measured: p99 0.7-1.2 ms vs 3.2-3.5 ms at 16
# connections). Set GATEWAY_WORKERS=0 for tokio's default (one per core).
workers=${GATEWAY_WORKERS:-1}
if [ "$workers" = 0 ]; then unset TOKIO_WORKER_THREADS; else export TOKIO_WORKER_THREADS=$workers; fi
"$target/cache-gateway" --config "$work/gateway.toml" >"$work/gateway.log" 2>&1 & pids+=($!)
unset TOKIO_WORKER_THREADS

cat >"$work/bench.vcl" <<EOF
vcl 4.1;
backend default { .host = "127.0.0.1"; .port = "$model_port"; }
sub vcl_recv {
  set req.url = regsub(req.url, "^/bench", "");
  if (req.http.Cache-Control ~ "no-store") { return (pass); }
}
sub vcl_backend_response { set beresp.ttl = 1h; }
EOF
varnishd -j none -n "$work/varnish" -a "127.0.0.1:$varnish_port" -f "$work/bench.vcl" -s malloc,256m \
  -F >"$work/varnish.log" 2>&1 & pids+=($!)
wait_port "$gw_port"; wait_port "$varnish_port"

path="/bench/v1/generate?prompt=hello"
# Warm both caches (and check they answer).
curl -fsS "http://127.0.0.1:$gw_port$path" >/dev/null
curl -fsS "http://127.0.0.1:$varnish_port$path" >/dev/null
curl -fsS "http://127.0.0.1:$gw_port$path" -D - -o /dev/null | grep -i '^cache-status: costmesh; hit' >/dev/null \
  || { echo "gateway did not hit" >&2; exit 1; }

run() { # name url [header]
  local name=$1 url=$2; shift 2
  wrk -t1 -c"$conns" -d"${duration}s" --latency "$@" "$url" >"$work/wrk.out"
  python3 - "$name" "$work/wrk.out" >>"$work/results.tsv" <<'PY'
import re, sys
name, text = sys.argv[1], open(sys.argv[2]).read()
rps = float(re.search(r"Requests/sec:\s+([\d.]+)", text).group(1))
m = re.search(r"99%\s+([\d.]+)(us|ms|s)\b", text)
p99_ms = float(m.group(1)) * {"us": 1e-3, "ms": 1, "s": 1e3}[m.group(2)]
errs = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
print(f"{name}\t{rps}\t{p99_ms}\t{errs.group(1) if errs else 0}")
PY
}
for r in $(seq "$rounds"); do
  run gateway-hit "http://127.0.0.1:$gw_port$path"
  run varnish-hit "http://127.0.0.1:$varnish_port$path"
  run gateway-miss "http://127.0.0.1:$gw_port$path" -H "Cache-Control: no-store"
  run varnish-pass "http://127.0.0.1:$varnish_port$path" -H "Cache-Control: no-store"
  run direct "http://127.0.0.1:$model_port/v1/generate?prompt=hello"
done

python3 - "$work/results.tsv" "$rounds" "$duration" "$conns" "$workers" <<'PY'
import statistics, sys
rows = [l.split("\t") for l in open(sys.argv[1]).read().split("\n") if l]
by = {}
for name, rps, p99, errs in rows:
    by.setdefault(name, []).append((float(rps), float(p99), int(errs)))
med = {n: (statistics.median(r for r, _, _ in v), statistics.median(p for _, p, _ in v), sum(e for _, _, e in v)) for n, v in by.items()}
print(f"rounds={sys.argv[2]} duration={sys.argv[3]}s connections={sys.argv[4]} (wrk -t1) gateway workers={sys.argv[5]}")
print(f"{'contender':<14}{'req/s (median)':>16}{'p99 ms (median)':>17}{'non-2xx':>9}")
for n in ["gateway-hit", "varnish-hit", "gateway-miss", "varnish-pass", "direct"]:
    r, p, e = med[n]
    print(f"{n:<14}{r:>16.0f}{p:>17.2f}{e:>9}")
gh, vh, gm, vp, d = (med[n] for n in ["gateway-hit", "varnish-hit", "gateway-miss", "varnish-pass", "direct"])
print(f"hit throughput gateway/varnish = {gh[0] / vh[0]:.2f}x; p99 gateway/varnish = {gh[1] / vh[1]:.2f}x")
print(f"miss path: gateway/direct throughput = {gm[0] / d[0]:.2f}x; p99 {gm[1]:.2f} ms vs {d[1]:.2f} ms direct")
print(f"miss path vs Varnish pass: throughput {gm[0] / vp[0]:.2f}x; p99 {gm[1]:.2f} ms vs {vp[1]:.2f} ms")
PY
