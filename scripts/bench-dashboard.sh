#!/usr/bin/env bash
# The dashboard server's CPU with N pages open against none, same mesh, same
# run: `costmesh up` (in-process bus, simulated GPUs sampling every second)
# for SECS seconds with no page, then SECS seconds with N event streams open
# (what a page holds open; curl reads them). CPU is the process's user+system
# ticks from /proc, so it includes the five services: the difference is the
# cost of the pages.
#   scripts/bench-dashboard.sh [N=10] [SECS=30]
set -euo pipefail
cd "$(dirname "$0")/.."
N=${1:-10}; SECS=${2:-30}
cargo build -q --release -p costmesh
PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
export COSTMESH__CACHE_GATEWAY__LISTEN=127.0.0.1:0
for s in GPU_AGENT SCHEDULER STORAGE_JANITOR COST_WATCHER CACHE_GATEWAY; do export COSTMESH__${s}__ADMIN__LISTEN=127.0.0.1:0; done
./target/release/costmesh up --quiet --dashboard 127.0.0.1:$PORT >/dev/null 2>&1 &
UP=$!
trap 'kill $UP 2>/dev/null; kill $(jobs -p) 2>/dev/null || true' EXIT
until curl -sf -o /dev/null http://127.0.0.1:$PORT/api/state; do sleep 0.2; done
sleep 5
ticks() { awk '{print $14 + $15}' /proc/$UP/stat; }
HZ=$(getconf CLK_TCK)
WEIGHT=0
for a in / /assets/app.js /assets/style.css /assets/uplot.js /assets/uplot.css /favicon.svg; do
  WEIGHT=$((WEIGHT + $(curl -s -o /dev/null -w '%{size_download}' http://127.0.0.1:$PORT$a)))
done
t0=$(ticks); sleep "$SECS"; t1=$(ticks)
for i in $(seq "$N"); do curl -sN http://127.0.0.1:$PORT/api/events >/tmp/bench-dashboard-$i.out & done
sleep 2
t2=$(ticks); sleep "$SECS"; t3=$(ticks)
BYTES=$(cat /tmp/bench-dashboard-*.out | wc -c); rm -f /tmp/bench-dashboard-*.out
awk -v a=$((t1-t0)) -v b=$((t3-t2)) -v hz="$HZ" -v s="$SECS" -v n="$N" -v w="$WEIGHT" -v by="$BYTES" 'BEGIN {
  printf "page weight: %d B (all assets)\n", w;
  printf "costmesh up, no page:   %.2f %% of a core\n", 100*a/hz/s;
  printf "costmesh up, %d pages:  %.2f %% of a core (%.2f %% more; %.0f B/s streamed to each page)\n", n, 100*b/hz/s, 100*(b-a)/hz/s, by/n/(s+2) }'
