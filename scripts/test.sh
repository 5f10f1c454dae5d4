#!/usr/bin/env bash
# The test command: installs what the tests need (scripts/install-test-deps.sh),
# then runs every test of the workspace. Tests start their own nats-server and
# redis-server on free ports.
#
# Every process the tests start inherits COSTMESH_TEST_RUN; after the tests,
# any process still carrying it (a server, a service, a job) is listed,
# killed, and fails the run: a test must leave nothing behind.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/install-test-deps.sh
export COSTMESH_TEST_RUN="costmesh-test-$$-$(date +%s)"

leftovers() {
  local pid
  for env in /proc/[0-9]*/environ; do
    pid=${env#/proc/}; pid=${pid%/environ}
    [ "$pid" = "$$" ] && continue
    if { tr '\0' '\n' < "$env"; } 2>/dev/null | grep -qx "COSTMESH_TEST_RUN=$COSTMESH_TEST_RUN"; then
      # Zombies hold nothing; the shell running this check is ours.
      state=$(awk '{print $3}' "/proc/$pid/stat" 2>/dev/null || echo Z)
      [ "$state" = "Z" ] && continue
      echo "$pid"
    fi
  done
}

status=0
cargo test --workspace --locked "$@" || status=$?
# Alert rules: syntax and unit tests (Debian's prometheus package).
if [ "$status" = 0 ]; then
  promtool check config compose/prometheus/prometheus.yml
  promtool check rules compose/prometheus/alerts.yml
  promtool test rules compose/prometheus/alerts.test.yml
  # The compose deployment parses and resolves (no container engine needed).
  docker-compose -f compose/docker-compose.yml config -q
  docker-compose -f compose/docker-compose.yml -f compose/cluster.yml config -q
fi

# Give killed children a moment to be reaped, then look for what is left.
sleep 1
left=""
for pid in $(leftovers); do
  # The check's own helpers (its subshell, tr, grep) are gone by now.
  [ -d "/proc/$pid" ] && left="$left $pid"
done
if [ -n "$left" ]; then
  echo "test.sh: processes the tests started are still running:" >&2
  for pid in $left; do
    echo "  $pid: $(tr '\0' ' ' < /proc/$pid/cmdline 2>/dev/null | cut -c1-200)" >&2
  done
  kill -9 $left 2>/dev/null || true
  exit 1
fi
exit "$status"
