#!/usr/bin/env bash
# Smoke test for a machine with an NVIDIA GPU: runs gpu-agent with the NVML
# backend in OBSERVE mode for a minute and saves every sample it read.
# It never changes a GPU setting: mode is forced to "observe", the power
# commands subject gets nothing, and the agent only reads through NVML.
#
#   scripts/gpu-smoke.sh [OUT_DIR] [SECONDS]
#
# Needs: the NVIDIA driver (libnvidia-ml.so.1), a built workspace or cargo,
# and nats-server (scripts/install-test-deps.sh puts one in .tools/bin).
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-gpu-smoke-out}
secs=${2:-60}
mkdir -p "$out"

bin=${BIN_DIR:-target/release}
if [ ! -x "$bin/gpu-agent" ] || [ ! -x "$bin/costmesh" ]; then
  cargo build --release -p costmesh-gpu-agent -p costmesh
fi
nats=$(command -v nats-server || echo .tools/bin/nats-server)
[ -x "$nats" ] || { echo "nats-server not found: run scripts/install-test-deps.sh" >&2; exit 1; }

port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
"$nats" -a 127.0.0.1 -p "$port" -js -sd "$out/js" >"$out/nats.log" 2>&1 &
nats_pid=$!
trap 'kill $nats_pid $tail_pid $agent_pid 2>/dev/null || true' EXIT
sleep 1
url="nats://127.0.0.1:$port"

nvidia-smi --query-gpu=index,name,power.draw,power.limit,temperature.gpu,utilization.gpu --format=csv >"$out/nvidia-smi-before.csv" 2>/dev/null || true

"$bin/costmesh" events tail --nats "$url" --prefix smoke --json "smoke.telemetry.>" >"$out/samples.jsonl" 2>"$out/tail.log" &
tail_pid=$!
sleep 1

COSTMESH__NATS__URL="$url" \
COSTMESH__MESH__SUBJECT_PREFIX=smoke \
COSTMESH__GPU_AGENT__BACKEND=nvml \
COSTMESH__GPU_AGENT__MODE=observe \
COSTMESH__GPU_AGENT__SAMPLE_INTERVAL=1s \
COSTMESH__GPU_AGENT__ADMIN__LISTEN=127.0.0.1:0 \
COSTMESH__LOG__FORMAT=json \
  "$bin/gpu-agent" >"$out/agent.stdout" 2>"$out/agent.log" &
agent_pid=$!
sleep "$secs"
kill -TERM $agent_pid 2>/dev/null || true
wait $agent_pid 2>/dev/null || true
sleep 1

nvidia-smi --query-gpu=index,name,power.draw,power.limit,temperature.gpu,utilization.gpu --format=csv >"$out/nvidia-smi-after.csv" 2>/dev/null || true
n=$(wc -l <"$out/samples.jsonl")
echo "gpu-smoke: $n samples in $out/samples.jsonl (agent log: $out/agent.log)"
[ "$n" -gt 0 ]
