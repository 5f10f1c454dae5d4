#!/usr/bin/env bash
# cache-gateway benchmark, side by side in one run with wrk, every contender
# at its shipped defaults:
#   hit path:  the gateway (release build, Redis behind its in-process tier)
#              vs Varnish (Debian) and nginx `proxy_cache` (Debian) caching
#              the same backend, for GET answers of ~80 B, ~2 KB and ~16 KB
#              and for a POST with a JSON body (gateway vs nginx with
#              `proxy_cache_methods POST` and the body in its key: Varnish
#              does not cache POST without a vmod);
#   miss path: every request through the gateway to the backend
#              (`Cache-Control: no-store`) vs calling the backend directly,
#              vs Varnish's `pass` and nginx's `proxy_cache_bypass`.
# The backend is the demo model (`costmesh cache demo-model`, 0 ms latency;
# `tokens=N` sets the answer's size). Contenders alternate, ROUNDS rounds of
# DURATION seconds each per connection count; the table gives medians of
# requests/s, p50 and p99 latency.
#
#   scripts/bench-gateway.sh [ROUNDS] [DURATION_S] [CONNECTIONS...]
#
# GATEWAY_WORKERS=N overrides `cache_gateway.workers` (default 0: one
# serving thread per core).
set -euo pipefail
cd "$(dirname "$0")/.."
rounds=${1:-3}
duration=${2:-6}
conn_list=(16 64)
if [ $# -gt 2 ]; then conn_list=("${@:3}"); fi

need=()
command -v wrk >/dev/null || need+=(wrk)
command -v varnishd >/dev/null || need+=(varnish)
command -v nginx >/dev/null || [ -x /usr/sbin/nginx ] || need+=(nginx-light)
if [ ${#need[@]} -gt 0 ]; then
  apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi
nginx_bin=$(command -v nginx || echo /usr/sbin/nginx)
scripts/install-test-deps.sh >/dev/null
cargo build --release -q -p costmesh -p costmesh-cache-gateway
target=${CARGO_TARGET_DIR:-target}/release
work=$(mktemp -d /var/tmp/gateway-bench.XXXX)
chmod 755 "$work"
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT

port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_port() { for _ in $(seq 100); do (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0; sleep 0.1; done; echo "port $1 never opened" >&2; exit 1; }

nats_port=$(port); redis_port=$(port); model_port=$(port); gw_port=$(port); admin_port=$(port)
varnish_port=$(port); nginx_port=$(port)
.tools/bin/nats-server -a 127.0.0.1 -p "$nats_port" -js -sd "$work/js" >"$work/nats.log" 2>&1 & pids+=($!)
redis-server --port "$redis_port" --bind 127.0.0.1 --save '' --appendonly no >"$work/redis.log" 2>&1 & pids+=($!)
"$target/costmesh" cache demo-model --listen "127.0.0.1:$model_port" --latency-ms 0 >"$work/model.log" 2>&1 & pids+=($!)
wait_port "$nats_port"; wait_port "$redis_port"; wait_port "$model_port"

workers_line=""
[ -n "${GATEWAY_WORKERS:-}" ] && workers_line="workers = $GATEWAY_WORKERS"
cat >"$work/gateway.toml" <<EOF
[nats]
url = "nats://127.0.0.1:$nats_port"
[redis]
url = "redis://127.0.0.1:$redis_port"
[log]
level = "warn"
[cache_gateway]
listen = "127.0.0.1:$gw_port"
$workers_line
admin = { listen = "127.0.0.1:$admin_port" }
[[cache_gateway.routes]]
name = "bench"
backends = ["http://127.0.0.1:$model_port"]
EOF
env -u TOKIO_WORKER_THREADS "$target/cache-gateway" --config "$work/gateway.toml" >"$work/gateway.log" 2>&1 & pids+=($!)

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

mkdir -p "$work/nginx/cache" "$work/nginx/tmp"
chmod -R 777 "$work/nginx"
cat >"$work/nginx/nginx.conf" <<EOF
daemon off;
worker_processes auto;
pid $work/nginx/nginx.pid;
error_log $work/nginx/error.log warn;
events { worker_connections 1024; }
http {
  access_log off;
  client_body_temp_path $work/nginx/tmp/body;
  proxy_temp_path $work/nginx/tmp/proxy;
  fastcgi_temp_path $work/nginx/tmp/fastcgi;
  uwsgi_temp_path $work/nginx/tmp/uwsgi;
  scgi_temp_path $work/nginx/tmp/scgi;
  proxy_cache_path $work/nginx/cache levels=1:2 keys_zone=bench:10m max_size=256m inactive=1h use_temp_path=off;
  upstream model { server 127.0.0.1:$model_port; keepalive 64; }
  map \$http_cache_control \$no_store { default 0; ~no-store 1; }
  server {
    listen 127.0.0.1:$nginx_port;
    location /bench/ {
      proxy_pass http://model/;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_cache bench;
      proxy_cache_methods GET HEAD POST;
      # The body in the key, as the gateway keys it (kept in memory for that).
      client_body_buffer_size 64k;
      proxy_cache_key "\$request_method\$request_uri\$request_body";
      proxy_cache_valid 200 1h;
      proxy_cache_bypass \$no_store;
      proxy_no_cache \$no_store;
    }
  }
}
EOF
"$nginx_bin" -p "$work/nginx" -c "$work/nginx/nginx.conf" >"$work/nginx/stdout.log" 2>&1 & pids+=($!)
wait_port "$gw_port"; wait_port "$varnish_port"; wait_port "$nginx_port"

declare -A path=(
  [80b]="/bench/v1/generate?prompt=hello"
  [2kb]="/bench/v1/generate?prompt=hello&tokens=330"
  [16kb]="/bench/v1/generate?prompt=hello&tokens=2700"
)
post_body='{"prompt":"hello","max_tokens":8,"temperature":0}'
cat >"$work/post.lua" <<EOF
wrk.method = "POST"
wrk.body = '$post_body'
wrk.headers["Content-Type"] = "application/json"
EOF
gw="http://127.0.0.1:$gw_port"; va="http://127.0.0.1:$varnish_port"; ng="http://127.0.0.1:$nginx_port"
hit() { # url [curl args]: warm, then check the next answer is a hit
  local url=$1; shift
  curl -fsS "$@" "$url" -o /dev/null
  curl -fsS "$@" "$url" -D "$work/h" -o "$work/b"
}
sizes=""
for s in 80b 2kb 16kb; do
  hit "$gw${path[$s]}"; grep -qi '^cache-status: costmesh; hit' "$work/h" || { echo "gateway did not hit $s" >&2; exit 1; }
  sizes+="$s=$(stat -c %s "$work/b")B "
  hit "$va${path[$s]}"; grep -qi '^x-varnish: [0-9]* [0-9]' "$work/h" || { echo "varnish did not hit $s" >&2; exit 1; }
  hit "$ng${path[$s]}"
done
post=(-X POST -H 'content-type: application/json' --data "$post_body")
hit "$gw${path[80b]%%\?*}" "${post[@]}"; grep -qi '^cache-status: costmesh; hit' "$work/h" || { echo "gateway did not hit POST" >&2; exit 1; }
hit "$ng${path[80b]%%\?*}" "${post[@]}"
sleep 1 # nginx writes its cache file after the first answer

run() { # name conns url [wrk args]
  local name=$1 conns=$2 url=$3; shift 3
  wrk -t1 -c"$conns" -d"${duration}s" --latency "$@" "$url" >"$work/wrk.out"
  python3 - "$name" "$conns" "$work/wrk.out" >>"$work/results.tsv" <<'PY'
import re, sys
name, conns, text = sys.argv[1], sys.argv[2], open(sys.argv[3]).read()
rps = float(re.search(r"Requests/sec:\s+([\d.]+)", text).group(1))
def pct(p):
    m = re.search(p + r"%\s+([\d.]+)(us|ms|s)\b", text)
    return float(m.group(1)) * {"us": 1e-3, "ms": 1, "s": 1e3}[m.group(2)]
errs = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
print(f"{name}\t{conns}\t{rps}\t{pct('50')}\t{pct('99')}\t{errs.group(1) if errs else 0}")
PY
}
for conns in "${conn_list[@]}"; do
  for r in $(seq "$rounds"); do
    for s in 80b 2kb 16kb; do
      run "GET $s gateway" "$conns" "$gw${path[$s]}"
      run "GET $s varnish" "$conns" "$va${path[$s]}"
      run "GET $s nginx" "$conns" "$ng${path[$s]}"
    done
    run "POST gateway" "$conns" "$gw${path[80b]%%\?*}" -s "$work/post.lua"
    run "POST nginx" "$conns" "$ng${path[80b]%%\?*}" -s "$work/post.lua"
    run "miss gateway" "$conns" "$gw${path[80b]}" -H "Cache-Control: no-store"
    run "miss varnish-pass" "$conns" "$va${path[80b]}" -H "Cache-Control: no-store"
    run "miss nginx-bypass" "$conns" "$ng${path[80b]}" -H "Cache-Control: no-store"
    run "miss direct" "$conns" "http://127.0.0.1:$model_port/v1/generate?prompt=hello"
  done
done

python3 - "$work/results.tsv" "$rounds" "$duration" "${GATEWAY_WORKERS:-default}" "$sizes" <<'PY'
import statistics, sys
rows = [l.split("\t") for l in open(sys.argv[1]).read().split("\n") if l]
by = {}
for name, conns, rps, p50, p99, errs in rows:
    by.setdefault((name, int(conns)), []).append((float(rps), float(p50), float(p99), int(errs)))
med = {k: tuple(statistics.median(x[i] for x in v) for i in range(3)) + (sum(x[3] for x in v),) for k, v in by.items()}
print(f"rounds={sys.argv[2]} duration={sys.argv[3]}s (wrk -t1) gateway workers={sys.argv[4]}; answers {sys.argv[5]}")
print(f"{'contender':<22}{'conns':>6}{'req/s':>10}{'p50 ms':>9}{'p99 ms':>9}{'non-2xx':>9}")
names = list(dict.fromkeys(n for n, _ in by))
for c in sorted({c for _, c in by}):
    for n in names:
        r, p50, p99, e = med[(n, c)]
        print(f"{n:<22}{c:>6}{r:>10.0f}{p50:>9.2f}{p99:>9.2f}{e:>9}")
    for case in ["GET 80b", "GET 2kb", "GET 16kb", "POST"]:
        g = med[(f"{case} gateway", c)]
        peers = [(n.split()[-1], med[(n, c)]) for n in names if n.startswith(case + " ") and not n.endswith("gateway")]
        best = max(peers, key=lambda p: p[1][0])
        print(f"  {case:<9} c={c}: gateway/{best[0]} (best peer) req/s {g[0] / best[1][0]:.2f}x, p99 {g[2] / best[1][2]:.2f}x"
              + "".join(f"; vs {n} {g[0] / m[0]:.2f}x, p99 {g[2] / m[2]:.2f}x" for n, m in peers if n != best[0]))
    g, d = med[("miss gateway", c)], med[("miss direct", c)]
    print(f"  miss      c={c}: p50 {g[1]:.2f} ms vs {d[1]:.2f} direct (+{g[1] - d[1]:.2f}), p99 {g[2]:.2f} vs {d[2]:.2f} (+{g[2] - d[2]:.2f});"
          f" req/s {g[0] / d[0]:.2f}x direct, {g[0] / med[('miss varnish-pass', c)][0]:.2f}x Varnish pass,"
          f" {g[0] / med[('miss nginx-bypass', c)][0]:.2f}x nginx bypass")
PY
