#!/usr/bin/env bash
# Writes compose/secrets/, which compose/docker-compose.yml mounts as
# compose secrets:
#   - one nkey per service, per GPU node and for the operator and a CLI
#     client (`costmesh nats-config`; existing keys are kept), the public
#     keys, and the nats-server config holding the generated authorization;
#   - the Redis password (and a redis.conf requiring it), the Grafana admin
#     password, the gateway's admin token (`costmesh cache purge --token-file`).
# Run it once before `docker compose up`, and again after adding a node
# (COSTMESH_NODES, space-separated; default gpu-host-1). Then restart nats.
set -euo pipefail
cd "$(dirname "$0")/.."
dir=compose/secrets
nodes=${COSTMESH_NODES:-gpu-host-1}
mkdir -p "$dir"
chmod 700 "$dir"
if [ -n "${COSTMESH_BIN:-}" ]; then
  costmesh=("$COSTMESH_BIN")
elif command -v costmesh >/dev/null; then
  costmesh=(costmesh)
else
  costmesh=(cargo run -q --release -p costmesh --)
fi
args=(nats-config --keys-dir "$dir" --client cli --admin operator --out "$dir/nats-auth.conf")
for n in $nodes; do args+=(--node "$n"); done
"${costmesh[@]}" "${args[@]}"
umask 077
{
  echo "# nats-server config for compose, written by scripts/compose-secrets.sh"
  echo "listen: 0.0.0.0:4222"
  echo "# Monitoring for the container's own healthcheck only (not published)."
  echo "http: 127.0.0.1:8222"
  echo 'jetstream { store_dir: "/data" }'
  cat "$dir/nats-auth.conf"
} > "$dir/nats.conf"
secret() { [ -s "$dir/$1" ] || head -c 32 /dev/urandom | base64 | tr -d '/+=\n' > "$dir/$1"; }
secret redis.pw
secret grafana-admin.pw
secret gateway-admin.token
printf 'requirepass %s\nsave ""\nappendonly no\n' "$(cat "$dir/redis.pw")" > "$dir/redis.conf"
# Readable inside the containers (they run as uid 10001; a compose file
# secret is a bind mount), private on the host through the 0700 directory.
chmod 644 "$dir"/*
echo "compose-secrets: wrote $dir (nodes: $nodes)" >&2
